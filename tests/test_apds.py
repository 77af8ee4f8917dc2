"""APDS v4 routes (/apds/v4/…) validated against the official APDS v4 OpenAPI document
(tests/fixtures/apds/apds4.yaml) on real data: car parks as places with their occupancy, a
car park without a tariff, a closed one, empty lists, tariffs as rate tables, a company's stays
as sessions (its staff only), paging, APDS's filters and its error shape."""

import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from billing.tariff import Band, RateLine, Tariff
from parking.admin import repository as admin
from parking.runtime import Runtime
from tests.apds_schema import (
    discriminated,
    document,
    response_component,
    schema_errors,
)
from tests.conftest import (
    Lot,
    bearer,
    create_lot,
    driver_token,
    enter,
    exit_after,
    located_car_park,
    make_driver,
    make_staff,
    staff_token,
    unique_plate,
)
from tests.gates import GateProbe


def conforms(path: str, answer: httpx.Response, status: int = 200) -> Any:
    """The answer's body, after checking it is what the document says `GET path` answers."""
    assert answer.status_code == status, answer.text
    body = answer.json()
    errors = schema_errors(response_component(path, "get", status), body)
    assert errors == [], errors
    return body


def apds_error(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    body: dict[str, Any] = answer.json()
    assert schema_errors("ResponseStatus", body) == []
    assert body["status"] == "error" and body["code"] == status, body
    return body


def _spot() -> tuple[float, float]:
    """A point in the South Pacific no other test puts a car park near."""
    return random.uniform(-50, -40), random.uniform(-130, -120)


async def _locate(runtime: Runtime, lot: Lot, latitude: float, longitude: float) -> None:
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE car_parks SET latitude = $2, longitude = $3 WHERE id = $1",
            lot.id,
            latitude,
            longitude,
        )


async def _untariffed(runtime: Runtime, latitude: float, longitude: float) -> str:
    return await located_car_park(runtime, latitude, longitude, name="无收费标准停车场", capacity=0)


def test_the_document_is_the_official_v4_and_its_one_defect_is_still_there() -> None:
    doc = document()
    assert doc["openapi"] == "3.1.0" and doc["info"]["version"] == "4.0"
    # The patch in tests/apds_schema.py is needed only while Reference cannot be satisfied.
    reference = {"id": "浙A12345", "className": "ChineseNumberPlate"}
    assert schema_errors("Reference", reference, patched=False) != []
    assert schema_errors("Reference", reference) == []


async def test_places_with_occupancy_a_closed_car_park_and_one_without_a_tariff(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe
) -> None:
    latitude, longitude = _spot()
    busy, closed = await create_lot(runtime), await create_lot(runtime)
    await _locate(runtime, busy, latitude, longitude)
    await _locate(runtime, closed, latitude + 0.001, longitude)
    untariffed = await _untariffed(runtime, latitude, longitude + 0.001)
    for _ in range(2):
        await enter(runtime, gate, busy, unique_plate(), parked_for=timedelta(minutes=5))
    admin_staff = await make_staff(runtime, closed.operator_id, "admin")
    changed = await api.patch(
        f"/api/v1/operator/car-parks/{closed.code}",
        json={"closed": True},
        headers=bearer(staff_token(app, admin_staff)),
    )
    assert changed.status_code == 200 and changed.json()["closed"] is True, changed.text

    near = {"latitude": latitude, "longitude": longitude, "radius": 1000}
    listed = conforms("/places", await api.get("/apds/v4/places", params={**near, "expand": "all"}))
    assert listed["meta"]["total"] == 3 and listed["meta"]["offset"] == 0
    by_id = {place["id"]: place for place in listed["data"]}
    assert set(by_id) == {busy.code, closed.code, untariffed}
    for place in listed["data"]:
        # The list's items are HierarchyElements; a place must also be a whole Place.
        assert schema_errors(discriminated("HierarchyElement", place["type"]), place) == []
        assert place["type"] == "place" and place["layer"] == 0
        assert place["timeZone"] == "Asia/Shanghai"
    assert by_id[busy.code]["name"] == [{"language": "zh", "string": busy.name}]
    demand = by_id[busy.code]["hierarchyElementReference"]["demandTable"][0]["demandType"][0]
    assert demand["count"] == 2 and demand["occupancyCalculation"] == "counted"
    assert by_id[busy.code]["hierarchyElementReference"]["supply"][0]["supplyQuantity"] == 50
    assert by_id[busy.code]["indicativePlacePointLocation"][0]["coordinates"] == [
        longitude,
        latitude,
    ]
    # Closed: no spaces offered, a no-parking restriction, not open around the clock.
    shut = by_id[closed.code]
    assert shut["hierarchyElementReference"]["supply"][0]["supplyQuantity"] == 0
    assert shut["operatingRestrictions"][0]["operatingRestriction"] == "noParking"
    assert shut["times"]["available24hours"] is False
    assert shut["version"] == 3  # located, then closed
    assert "operatingRestrictions" not in by_id[busy.code]

    # Without `expand`: only what APDS requires, still conformant.
    plain = conforms("/places", await api.get("/apds/v4/places", params=near))
    assert all("hierarchyElementReference" not in place for place in plain["data"])

    one = await api.get(f"/apds/v4/places/{busy.code}", params={"expand": "occupancy"})
    assert one.status_code == 200 and one.headers["etag"]
    assert schema_errors(response_component("/places/{id}", "get", 200), one.json()) == []
    assert schema_errors("Place", one.json()) == []


async def test_empty_lists_paging_and_modified_since(
    runtime: Runtime, api: httpx.AsyncClient
) -> None:
    nowhere = await api.get(
        "/apds/v4/places", params={"latitude": -89.9, "longitude": 0, "radius": 10}
    )
    assert conforms("/places", nowhere)["data"] == []
    assert nowhere.json()["meta"]["total"] == 0
    not_places = await api.get("/apds/v4/places", params={"type": "space"})
    assert conforms("/places", not_places)["data"] == []

    latitude, longitude = _spot()
    lots = [await create_lot(runtime) for _ in range(3)]
    for n, lot in enumerate(lots):
        await _locate(runtime, lot, latitude + n * 0.0001, longitude)
    runtime.settings.apds_page_size = 2
    near = {"latitude": latitude, "longitude": longitude, "radius": 500}
    first = conforms("/places", await api.get("/apds/v4/places", params={**near, "page": 1}))
    second = conforms("/places", await api.get("/apds/v4/places", params={**near, "page": 2}))
    past = conforms("/places", await api.get("/apds/v4/places", params={**near, "page": 3}))
    assert first["meta"] | {"referenceInstant": 0} == {
        "referenceInstant": 0,
        "offset": 0,
        "pageSize": 2,
        "total": 3,
    }
    assert second["meta"]["offset"] == 2 and len(second["data"]) == 1 and past["data"] == []
    assert {p["id"] for p in first["data"] + second["data"]} == {lot.code for lot in lots}

    # modified_since: only the car park renamed since then.
    since = int(time.time()) + 1
    async with runtime.pool.acquire() as conn:
        while int((await conn.fetchval("SELECT now()")).timestamp()) < since:
            await conn.execute("SELECT pg_sleep(0.05)")
        await conn.execute("UPDATE car_parks SET name = '改名停车场' WHERE id = $1", lots[1].id)
    runtime.settings.apds_page_size = 100
    changed = conforms(
        "/places", await api.get("/apds/v4/places", params={**near, "modified_since": since})
    )
    assert [p["id"] for p in changed["data"]] == [lots[1].code]
    assert changed["data"][0]["name"][0]["string"] == "改名停车场"


async def test_rates_are_our_tariffs_and_a_car_park_without_one_has_none(
    runtime: Runtime, api: httpx.AsyncClient
) -> None:
    lot = await create_lot(runtime)
    day_night = Tariff(
        free_minutes=15,
        bands=(
            Band(
                name="白天",
                start="08:00",
                end="20:00",
                lines=(
                    RateLine(from_minute=0, to_minute=60, kind="flat", amount_fen=500),
                    RateLine(
                        from_minute=60, kind="per_increment", increment_minutes=30, amount_fen=250
                    ),
                ),
                max_fen=4000,
            ),
            Band(
                name="夜间",
                start="20:00",
                end="08:00",
                lines=(RateLine(from_minute=0, kind="flat", amount_fen=1000),),
            ),
        ),
        daily_cap_fen=5000,
        colour_discount_percent={"green": 50},
    )
    async with runtime.pool.acquire() as conn:
        await admin.create_tariff(
            conn, lot.id, effective_from=datetime.now(UTC) + timedelta(days=1), tariff=day_night
        )
    listed = conforms("/rates", await api.get("/apds/v4/rates", params={"place": lot.code}))
    assert listed["meta"]["total"] == 2  # the hourly one in force and tomorrow's
    for table in listed["data"]:
        assert schema_errors("RateTable", table) == []
    current, tomorrow = listed["data"]
    assert tomorrow["rateSupersedeLink"]["id"] == current["id"]
    day, night = tomorrow["rateLineCollections"]
    assert [line["rateLineType"] for line in day["rateLines"]] == ["flatRate", "incrementingRate"]
    assert day["rateLines"][1] | {"description": None} == {
        "id": f"{tomorrow['id']}-1-2",
        "version": 1,
        "sequence": 2,
        "rateLineType": "incrementingRate",
        "durationStart": "01:00",
        "incrementPeriod": "PT30M",
        "value": 2.5,
        "description": None,
    }
    assert day["maxValueCollection"] == {"currencyType": "CNY", "currencyValue": 40.0}
    assert day["resetTime"] == "08:00" and night["rateLines"][0]["value"] == 10.0
    notes = day["rateLines"][0]["description"][0]["string"]
    assert "15分钟内离场免费" in notes and "¥50.00" in notes and "优惠50%" in notes

    one = await api.get(f"/apds/v4/rates/{tomorrow['id']}")
    assert one.status_code == 200
    assert schema_errors(response_component("/rates/{id}", "get", 200), one.json()) == []
    apds_error(await api.get("/apds/v4/rates/999999999999"), 404)
    apds_error(await api.get("/apds/v4/rates/not-a-number"), 404)

    latitude, longitude = _spot()
    untariffed = await _untariffed(runtime, latitude, longitude)
    none = conforms("/rates", await api.get("/apds/v4/rates", params={"place": untariffed}))
    assert none["data"] == [] and none["meta"]["total"] == 0
    # The car park without a tariff is still a place.
    conforms("/places", await api.get("/apds/v4/places", params={"name": "无收费标准"}))


async def test_sessions_are_the_companys_own_and_name_the_plate(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    staying, leaving = unique_plate(), (await make_driver(runtime, unique_plate())).plate
    await enter(runtime, gate, lot, staying, parked_for=timedelta(minutes=30))
    left = await exit_after(runtime, gate, lot, leaving, timedelta(minutes=90))
    assert left["action"] == "open", left
    own = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))
    listed = conforms(
        "/sessions", await api.get("/apds/v4/sessions", params={"place": lot.code}, headers=own)
    )
    assert listed["meta"]["total"] == 2
    by_plate = {s["identifiedCredentials"][0]["identifier"]["id"]: s for s in listed["data"]}
    assert set(by_plate) == {staying, leaving}
    assert "actualEnd" in by_plate[leaving] and "actualEnd" not in by_plate[staying]
    assert by_plate[leaving]["hierarchyElement"]["id"] == lot.code
    one = await api.get(f"/apds/v4/sessions/{by_plate[leaving]['id']}", headers=own)
    assert one.status_code == 200
    assert schema_errors(response_component("/sessions/{id}", "get", 200), one.json()) == []

    ended_since = int((datetime.now(UTC) - timedelta(minutes=5)).timestamp())
    ended = conforms(
        "/sessions",
        await api.get(
            "/apds/v4/sessions",
            params={"place": lot.code, "end_after": ended_since},
            headers=own,
        ),
    )
    assert [s["id"] for s in ended["data"]] == [by_plate[leaving]["id"]]

    # Another company sees an empty list and none of these; drivers and strangers nothing.
    other = await create_lot(runtime)
    theirs = bearer(staff_token(app, await make_staff(runtime, other.operator_id, "admin")))
    empty = conforms(
        "/sessions", await api.get("/apds/v4/sessions", params={"place": lot.code}, headers=theirs)
    )
    assert empty["data"] == [] and empty["meta"]["total"] == 0
    apds_error(await api.get(f"/apds/v4/sessions/{by_plate[leaving]['id']}", headers=theirs), 404)
    apds_error(await api.get("/apds/v4/sessions"), 401)
    driver = await make_driver(runtime, unique_plate())
    apds_error(
        await api.get("/apds/v4/sessions", headers=bearer(driver_token(app, driver.account_id))),
        403,
    )


async def test_right_specifications_and_assigned_rights_are_the_companys_own(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, lot: Lot
) -> None:
    admin_staff = await make_staff(runtime, lot.operator_id, "admin")
    own = bearer(staff_token(app, admin_staff))
    # A company without specifications or rights: empty lists, in APDS's shape.
    for path in ("/rights/specs", "/rights/assigned"):
        empty = conforms(path, await api.get(f"/apds/v4{path}", headers=own))
        assert empty["data"] == [] and empty["meta"]["total"] == 0

    night = await api.post(
        "/api/v1/operator/right-specs",
        json={
            "name": "夜间包月",
            "kind": "free_passage",
            "car_parks": [lot.code],
            "weekdays": [1, 2, 3, 4, 5],
            "window_start": "19:00",
            "window_end": "07:00",
        },
        headers=own,
    )
    discount = await api.post(
        "/api/v1/operator/right-specs",
        json={"name": "商户员工", "kind": "discount", "discount_percent": 30},
        headers=own,
    )
    assert night.status_code == discount.status_code == 201, (night.text, discount.text)
    plates = sorted([unique_plate(), unique_plate()])
    now = datetime.now(UTC)
    given = await api.post(
        "/api/v1/operator/rights",
        json={
            "spec_id": night.json()["id"],
            "vehicles": [{"plate": plate, "color": "blue"} for plate in plates],
            "valid_from": (now - timedelta(days=1)).isoformat(),
            "valid_until": (now + timedelta(days=30)).isoformat(),
        },
        headers=own,
    )
    cancelled = await api.post(
        "/api/v1/operator/rights",
        json={
            "spec_id": discount.json()["id"],
            "vehicles": [{"plate": unique_plate(), "color": "yellow"}],
            "valid_from": now.isoformat(),
            "valid_until": (now + timedelta(days=7)).isoformat(),
        },
        headers=own,
    )
    assert given.status_code == cancelled.status_code == 201, (given.text, cancelled.text)
    cancel = await api.post(f"/api/v1/operator/rights/{cancelled.json()['id']}/cancel", headers=own)
    assert cancel.status_code == 200, cancel.text

    specs = conforms("/rights/specs", await api.get("/apds/v4/rights/specs", headers=own))
    assert specs["meta"]["total"] == 2
    by_id = {spec["id"]: spec for spec in specs["data"]}
    at_night = by_id[str(night.json()["id"])]
    assert at_night["hierarchyElements"] == [{"id": lot.code, "version": 1, "className": "Place"}]
    period = at_night["validity"]["validityTimeSpecification"]["validPeriods"][0]
    assert period["recurringDayWeekMonthPeriod"][0]["applicableDay"][-1] == "friday"
    assert period["recurringTimePeriodOfDay"] == [
        {"startTimeOfPeriod": "19:00", "endTimeOfPeriod": "07:00"}
    ]
    assert at_night["issuer"]["id"] == str(lot.operator_id)
    # Every car park of the company, now and later.
    everywhere = by_id[str(discount.json()["id"])]
    assert [place["id"] for place in everywhere["hierarchyElements"]] == [lot.code]
    assert "30%" in everywhere["description"][0]["string"]
    one = await api.get(f"/apds/v4/rights/specs/{at_night['id']}", headers=own)
    assert one.json() == at_night
    conforms("/rights/specs/{id}", one)
    by_place = conforms(
        "/rights/specs", await api.get("/apds/v4/rights/specs?place=NOWHERE", headers=own)
    )
    assert by_place["data"] == []

    assigned = conforms("/rights/assigned", await api.get("/apds/v4/rights/assigned", headers=own))
    assert assigned["meta"]["total"] == 2
    first, second = assigned["data"]
    assert first["rightSpecification"]["id"] == str(night.json()["id"])
    assert [c["identifier"]["id"] for c in first["rightHolder"]["credentials"]] == plates
    assert "cancelTime" not in first["plannedUses"][0]
    assert "cancelTime" in second["plannedUses"][0]
    one = await api.get(f"/apds/v4/rights/assigned/{first['id']}", headers=own)
    assert one.json() == first
    conforms("/rights/assigned/{id}", one)
    by_plate = conforms(
        "/rights/assigned",
        await api.get("/apds/v4/rights/assigned", params={"credential_id": plates[1]}, headers=own),
    )
    assert [r["id"] for r in by_plate["data"]] == [first["id"]]
    by_spec = conforms(
        "/rights/assigned",
        await api.get(
            "/apds/v4/rights/assigned",
            params={
                "right_spec": discount.json()["id"],
                "end_before": int(now.timestamp()) + 86400 * 8,
            },
            headers=own,
        ),
    )
    assert [r["id"] for r in by_spec["data"]] == [second["id"]]
    apds_error(
        await api.get("/apds/v4/rights/assigned", params={"right_spec": "x"}, headers=own), 400
    )

    # Another company sees empty lists and none of these; drivers and strangers nothing.
    other = await create_lot(runtime)
    theirs = bearer(staff_token(app, await make_staff(runtime, other.operator_id, "attendant")))
    for path in ("/rights/specs", "/rights/assigned"):
        empty = conforms(path, await api.get(f"/apds/v4{path}", headers=theirs))
        assert empty["data"] == [], path
    apds_error(await api.get(f"/apds/v4/rights/specs/{at_night['id']}", headers=theirs), 404)
    apds_error(await api.get(f"/apds/v4/rights/assigned/{first['id']}", headers=theirs), 404)
    apds_error(await api.get("/apds/v4/rights/assigned/99999999999999999999", headers=own), 404)
    apds_error(await api.get("/apds/v4/rights/assigned"), 401)
    driver = await make_driver(runtime, unique_plate())
    apds_error(
        await api.get(
            "/apds/v4/rights/specs", headers=bearer(driver_token(app, driver.account_id))
        ),
        403,
    )


async def test_a_sessions_right_resolves_and_a_rights_status_is_told(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    own = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
    spec = await api.post(
        "/api/v1/operator/right-specs",
        json={"name": "商户员工", "kind": "discount", "discount_percent": 30},
        headers=own,
    )
    assert spec.status_code == 201, spec.text
    now = datetime.now(UTC)
    rights = []
    for _ in range(3):
        given = await api.post(
            "/api/v1/operator/rights",
            json={
                "spec_id": spec.json()["id"],
                "vehicles": [{"plate": unique_plate(), "color": "blue"}],
                "valid_from": (now - timedelta(days=1)).isoformat(),
                "valid_until": (now + timedelta(days=30)).isoformat(),
            },
            headers=own,
        )
        assert given.status_code == 201, given.text
        rights.append(given.json()["id"])
    active, suspended, cancelled = rights
    for right, change in ((suspended, "suspend"), (cancelled, "cancel")):
        changed = await api.post(f"/api/v1/operator/rights/{right}/{change}", headers=own)
        assert changed.status_code == 200, changed.text

    # A suspended or cancelled right says so; a cancelled one expired when it was cancelled.
    listed = conforms("/rights/assigned", await api.get("/apds/v4/rights/assigned", headers=own))
    by_id = {r["id"]: r for r in listed["data"]}
    assert by_id[str(active)]["validityStatus"] == "definedByValidityTimeSpec"
    assert by_id[str(suspended)]["validityStatus"] == "suspended"
    assert "cancelTime" not in by_id[str(suspended)]["plannedUses"][0]
    gone = by_id[str(cancelled)]
    assert gone["validityStatus"] == "suspended"
    assert gone["expiry"] == gone["plannedUses"][0]["cancelTime"]

    # A stay under a right names it, a stay without one its pay-as-you-go right: both resolve,
    # and so do their specifications.
    visitor, holder = unique_plate(), unique_plate()
    await enter(runtime, gate, lot, visitor, parked_for=timedelta(minutes=5))
    await enter(runtime, gate, lot, holder, parked_for=timedelta(minutes=5))
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE sessions SET assigned_right_id = $2 WHERE plate = $1", holder, active
        )
    stays = conforms(
        "/sessions", await api.get("/apds/v4/sessions", params={"place": lot.code}, headers=own)
    )
    named = {
        s["identifiedCredentials"][0]["identifier"]["id"]: s["segments"][0]["assignedRight"]["id"]
        for s in stays["data"]
    }
    assert named[holder] == str(active)
    assert named[visitor].startswith("stay-")
    for right_id in named.values():
        right = conforms(
            "/rights/assigned/{id}",
            await api.get(f"/apds/v4/rights/assigned/{right_id}", headers=own),
        )
        assert right["id"] == right_id
        conforms(
            "/rights/specs/{id}",
            await api.get(
                f"/apds/v4/rights/specs/{right['rightSpecification']['id']}", headers=own
            ),
        )
    paid = (await api.get(f"/apds/v4/rights/assigned/{named[visitor]}", headers=own)).json()
    assert paid["rightHolder"]["credentials"][0]["identifier"]["id"] == visitor
    # A stay under a right has no pay-as-you-go right; another company sees neither.
    holder_stay = next(
        s["id"]
        for s in stays["data"]
        if named[s["identifiedCredentials"][0]["identifier"]["id"]] == str(active)
    )
    apds_error(await api.get(f"/apds/v4/rights/assigned/stay-{holder_stay}", headers=own), 404)
    other = await create_lot(runtime)
    theirs = bearer(staff_token(app, await make_staff(runtime, other.operator_id, "admin")))
    apds_error(await api.get(f"/apds/v4/rights/assigned/{named[visitor]}", headers=theirs), 404)
    apds_error(await api.get("/apds/v4/rights/assigned/stay-x", headers=own), 404)


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("/apds/v4/places", {"latitude": "north"}, 422),
        ("/apds/v4/places", {"latitude": 95, "longitude": 0, "radius": 10}, 422),
        ("/apds/v4/places", {"latitude": 30, "longitude": 120}, 400),
        ("/apds/v4/places", {"expand": "occupancy,everything"}, 400),
        ("/apds/v4/places", {"page": 0}, 422),
        ("/apds/v4/places/no-such-place", {}, 404),
        ("/apds/v4/rates", {"modified_since": -1}, 422),
        ("/apds/v4/nothing-here", {}, 404),
    ],
)
async def test_bad_requests_get_apds_errors(
    api: httpx.AsyncClient, path: str, params: dict[str, Any], status: int
) -> None:
    body = apds_error(await api.get(path, params=params), status)
    assert body["message"]


async def test_public_apds_routes_are_cached_and_rate_limited_like_the_public_api(
    runtime: Runtime, api: httpx.AsyncClient
) -> None:
    first = await api.get("/apds/v4/places", params={"page": 1})
    assert first.headers["cache-control"] == "public, max-age=10"
    again = await api.get(
        "/apds/v4/places", params={"page": 1}, headers={"If-None-Match": first.headers["etag"]}
    )
    assert again.status_code == 304
    runtime.settings.public_requests_per_minute_per_client = 3
    answers = [await api.get("/apds/v4/rates") for _ in range(4)]
    # Two requests above and one here were allowed; the rest refused, in APDS's shape.
    assert [a.status_code for a in answers] == [200, 429, 429, 429]
    assert apds_error(answers[-1], 429)["message"]
