"""Rights at the lane and through the operator API: a whitelist and a pass open free, a discount
is priced by the fee calculation, a blacklisted vehicle is held with an exception for the
attendant, a pass for two plates lets one inside at a time (the other is a visitor), a pass
renewed while parked covers the stay, a suspended right does nothing, and a CSV with bad rows
imports the good ones and reports each bad one."""

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from fastapi import FastAPI

from parking.gates import repository as gates_repo
from parking.lanes.worker import lane_events_channel
from parking.runtime import Runtime
from tests.conftest import (
    Lot,
    backdate_entry,
    bearer,
    create_lot,
    driver_token,
    enter,
    eventually,
    make_driver,
    make_staff,
    staff_token,
    unique_plate,
)
from tests.gates import GateProbe


async def _admin(runtime: Runtime, app: FastAPI, lot: Lot) -> dict[str, str]:
    return bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))


async def _spec(api: httpx.AsyncClient, admin: dict[str, str], **body: Any) -> int:
    body.setdefault("name", f"spec-{unique_plate()}")
    response = await api.post("/api/v1/operator/right-specs", json=body, headers=admin)
    assert response.status_code == 201, response.text
    spec_id: int = response.json()["id"]
    return spec_id


async def _right(
    api: httpx.AsyncClient,
    admin: dict[str, str],
    spec_id: int,
    plates: list[str],
    *,
    valid_from: datetime | None = None,
    valid_until: datetime | None = None,
    max_inside: int | None = None,
) -> dict[str, Any]:
    now = datetime.now(UTC)
    response = await api.post(
        "/api/v1/operator/rights",
        json={
            "spec_id": spec_id,
            "vehicles": [{"plate": p, "color": "blue"} for p in plates],
            "valid_from": (valid_from or now - timedelta(days=1)).isoformat(),
            "valid_until": (valid_until or now + timedelta(days=30)).isoformat(),
            "max_inside": max_inside,
        },
        headers=admin,
    )
    assert response.status_code == 201, response.text
    right: dict[str, Any] = response.json()
    return right


async def _stay(runtime: Runtime, lot: Lot, plate: str) -> dict[str, Any]:
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT status, fee_fen, settlement, assigned_right_id, applied_right_id
               FROM sessions WHERE car_park_id = $1 AND plate = $2 ORDER BY id DESC LIMIT 1""",
            lot.id,
            plate,
        )
    assert row is not None
    return dict(row)


async def _exit(gate: GateProbe, lot: Lot, plate: str) -> dict[str, Any]:
    return await gate.decide(lot.code, "out1", gate.capture("out", plate))


async def test_a_whitelisted_unbound_car_leaves_free_and_the_stay_names_the_right(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    admin = await _admin(runtime, app, lot)
    spec = await _spec(api, admin, name="白名单 应急车辆", kind="free_passage")
    plate, visitor = unique_plate(), unique_plate()
    right = await _right(api, admin, spec, [plate])
    await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=3))
    command = await _exit(gate, lot, plate)
    assert command["action"] == "open" and command["fee_fen"] == 0
    assert "白名单 应急车辆" in command["display"]
    stay = await _stay(runtime, lot, plate)
    assert stay["status"] == "closed" and stay["settlement"] == "free"
    assert stay["applied_right_id"] == right["id"] and stay["assigned_right_id"] == right["id"]
    # Another car park of another company: the right is not its.
    other = await create_lot(runtime)
    await enter(runtime, gate, other, plate, parked_for=timedelta(hours=3))
    assert (await _exit(gate, other, plate))["action"] == "hold"
    # A car without the right is held as before.
    await enter(runtime, gate, lot, visitor, parked_for=timedelta(hours=3))
    assert (await _exit(gate, lot, visitor))["fee_fen"] == 1800


async def test_a_discount_is_priced_by_the_fee_calculation_and_charged_pay_later(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    admin = await _admin(runtime, app, lot)
    spec = await _spec(
        api, admin, name="员工五折", kind="discount", discount_percent=50, car_parks=[lot.code]
    )
    driver = await make_driver(runtime, unique_plate())
    right = await _right(api, admin, spec, [driver.plate])
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=150))
    command = await _exit(gate, lot, driver.plate)
    assert command["action"] == "open" and command["fee_fen"] == 900  # ¥18 less 50 %
    stay = await _stay(runtime, lot, driver.plate)
    assert stay["settlement"] == "pay_later" and stay["fee_fen"] == 900
    assert stay["applied_right_id"] == right["id"]
    # The driver sees the right on the stay.
    mine = bearer(driver_token(app, driver.account_id))
    stays = (await api.get("/api/v1/me/stays", headers=mine)).json()["items"]
    assert [(s["fee_fen"], s["pass_name"]) for s in stays] == [(900, "员工五折")]


async def test_a_blacklisted_car_is_held_with_the_reason_for_the_attendant(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    admin = await _admin(runtime, app, lot)
    plate = unique_plate()
    # A whitelist does not outrank a blacklist.
    spec = await _spec(api, admin, kind="free_passage")
    await _right(api, admin, spec, [plate])
    await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=2))
    listed = await api.post(
        "/api/v1/operator/blacklist",
        json={"plate": plate, "color": "blue", "reason": "逃费三次"},
        headers=admin,
    )
    assert listed.status_code == 201, listed.text
    again = await api.post(
        "/api/v1/operator/blacklist",
        json={"plate": plate, "color": "blue", "reason": "again"},
        headers=admin,
    )
    assert again.status_code == 409
    command = await _exit(gate, lot, plate)
    assert command["action"] == "hold"
    assert (await _stay(runtime, lot, plate))["status"] == "open"
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT reason, candidates FROM lane_exceptions WHERE car_park_id = $1", lot.id
        )
    assert row["reason"] == "blacklisted" and row["candidates"][0]["reason"] == "逃费三次"
    exceptions = (await api.get("/api/v1/operator/exceptions", headers=admin)).json()
    (held,) = [e for e in exceptions if e["reason"] == "blacklisted"]
    # Resolving it by plate while the vehicle is listed changes nothing.
    refused = await api.post(
        f"/api/v1/operator/exceptions/{held['id']}/resolve",
        json={"plate": plate, "color": "blue"},
        headers=admin,
    )
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "blacklisted"
    # At the entry too: held, and no stay is opened. Another colour is another vehicle.
    blocked = await gate.decide(lot.code, "in1", gate.capture("in", plate, color="yellow"))
    assert blocked["action"] == "open"
    removed = await api.delete(f"/api/v1/operator/blacklist/{listed.json()['id']}", headers=admin)
    assert removed.status_code == 200 and removed.json()["removed_at"] is not None
    # Off the list, the attendant resolves the held exit: the whitelist lets it out free.
    resolved = await api.post(
        f"/api/v1/operator/exceptions/{held['id']}/resolve",
        json={"plate": plate, "color": "blue"},
        headers=admin,
    )
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["action"] == "open" and resolved.json()["fee_fen"] == 0


async def test_blacklisted_at_the_entry(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    admin = await _admin(runtime, app, lot)
    plate = unique_plate()
    response = await api.post(
        "/api/v1/operator/blacklist",
        json={"plate": plate, "color": "blue", "reason": "套牌嫌疑"},
        headers=admin,
    )
    assert response.status_code == 201
    feed = runtime.occupancy.redis.pubsub()
    await feed.subscribe(lane_events_channel(runtime.settings))
    command = await gate.decide(lot.code, "in1", gate.capture("in", plate))
    assert command["action"] == "hold"

    async def alert() -> dict[str, Any] | None:
        message = await feed.get_message(ignore_subscribe_messages=True, timeout=0.2)
        event: dict[str, Any] | None = orjson.loads(message["data"]) if message else None
        return event if event and event.get("lot") == lot.code else None

    # The attendant's alert in the dashboard's lane feed, with the reason (plate masked).
    event = await eventually(alert)
    await feed.aclose()
    assert event["outcome"] == "held_blacklisted" and event["alert"] == "黑名单：套牌嫌疑"
    assert plate not in orjson.dumps(event).decode()
    async with runtime.pool.acquire() as conn:
        stays = await conn.fetchval(
            "SELECT count(*) FROM sessions WHERE car_park_id = $1 AND plate = $2", lot.id, plate
        )
        reason = await conn.fetchval(
            "SELECT reason FROM lane_exceptions WHERE capture_id = $1",
            command["capture_id"],
        )
    assert stays == 0 and reason == "blacklisted"


async def test_a_pass_for_two_plates_lets_one_inside_the_other_is_a_visitor(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    admin = await _admin(runtime, app, lot)
    spec = await _spec(api, admin, name="包月 一位两车", kind="free_passage")
    first, second = unique_plate(), unique_plate()
    right = await _right(api, admin, spec, [first, second], max_inside=1)
    # Both arrive at once, at two entry gates: one takes the place, one is a visitor.
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO gates (car_park_id, code, direction) VALUES ($1, 'in2', 'in')", lot.id
        )
    commands = await asyncio.gather(
        gate.decide(lot.code, "in1", gate.capture("in", first)),
        gate.decide(lot.code, "in2", gate.capture("in", second)),
    )
    displays = [" ".join(c["display"]) for c in commands]
    assert all(c["action"] == "open" for c in commands)
    assert sum("按临时车计费" in d for d in displays) == 1, displays
    places = [(await _stay(runtime, lot, p))["assigned_right_id"] for p in (first, second)]
    assert sorted(places, key=lambda p: p is None) == [right["id"], None]
    occupancy = (await api.get("/api/v1/operator/reports/pass-occupancy", headers=admin)).json()
    assert [(o["car_park"], o["pass_holders"], o["visitors"]) for o in occupancy] == [
        (lot.code, 1, 1)
    ]
    holder, visitor = (first, second) if places[0] else (second, first)
    for plate in (holder, visitor):
        await backdate_entry(runtime, lot, plate, timedelta(hours=2))
    assert (await _exit(gate, lot, holder))["fee_fen"] == 0
    assert (await _exit(gate, lot, visitor))["fee_fen"] == 1200  # priced as a visitor
    # With the place free again, the other vehicle of the pass takes it.
    await enter(runtime, gate, lot, visitor, parked_for=timedelta(hours=2))
    assert (await _stay(runtime, lot, visitor))["assigned_right_id"] == right["id"]
    assert (await _exit(gate, lot, visitor))["fee_fen"] == 0


async def test_a_free_place_of_a_capped_pass_is_taken_whatever_uncapped_rights_the_car_holds(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """Rights never add up: the one most favourable to the driver applies. A vehicle holding
    a 10 % discount (no cap) and a pass of "at most 1 inside" whose place is free takes the
    pass's place at entry and leaves free: the discount must not stand in for the place,
    leaving the pass unusable for that stay."""
    admin = await _admin(runtime, app, lot)
    discount = await _spec(api, admin, name="九折", kind="discount", discount_percent=10)
    monthly = await _spec(api, admin, name="月卡", kind="free_passage")
    plate = unique_plate()
    await _right(api, admin, discount, [plate, unique_plate()])
    right = await _right(api, admin, monthly, [plate, unique_plate()], max_inside=1)
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    assert (await _stay(runtime, lot, plate))["assigned_right_id"] == right["id"]
    quote = (await api.get(f"/api/v1/car-parks/{lot.code}/quote", params={"plate": plate})).json()
    assert quote["fee_fen"] == 0, quote
    assert (await _exit(gate, lot, plate))["fee_fen"] == 0
    assert (await _stay(runtime, lot, plate))["applied_right_id"] == right["id"]


async def test_a_pass_renewed_while_parked_covers_the_whole_stay(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    admin = await _admin(runtime, app, lot)
    spec = await _spec(api, admin, kind="free_passage")
    renewed, lapsed = unique_plate(), unique_plate()
    now = datetime.now(UTC)
    # Both passes end an hour ago; the cars came in three hours ago.
    ends = now - timedelta(hours=1)
    rights = [
        await _right(api, admin, spec, [p], valid_from=now - timedelta(days=30), valid_until=ends)
        for p in (renewed, lapsed)
    ]
    for plate in (renewed, lapsed):
        await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=3))
    shorter = await api.post(
        f"/api/v1/operator/rights/{rights[0]['id']}/renew",
        json={"valid_until": (ends - timedelta(days=1)).isoformat()},
        headers=admin,
    )
    assert shorter.status_code == 409
    response = await api.post(
        f"/api/v1/operator/rights/{rights[0]['id']}/renew",
        json={"valid_until": (now + timedelta(days=30)).isoformat()},
        headers=admin,
    )
    assert response.status_code == 200, response.text
    assert (await _exit(gate, lot, renewed))["fee_fen"] == 0
    # Not renewed: the hour after it lapsed is priced.
    assert (await _exit(gate, lot, lapsed))["fee_fen"] == 600


async def test_suspend_resume_cancel_and_list(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    admin = await _admin(runtime, app, lot)
    spec = await _spec(api, admin, kind="flat_fee", flat_fee_fen=500)
    plate = unique_plate()
    right = await _right(api, admin, spec, [plate])
    base = f"/api/v1/operator/rights/{right['id']}"
    assert (await api.post(f"{base}/suspend", headers=admin)).json()["status"] == "suspended"
    assert (await api.post(f"{base}/suspend", headers=admin)).status_code == 409
    await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=3))
    assert (await _exit(gate, lot, plate))["fee_fen"] == 1800  # suspended: no right
    assert (await api.post(f"{base}/resume", headers=admin)).json()["status"] == "active"
    await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=3))
    assert (await _exit(gate, lot, plate))["fee_fen"] == 500
    assert (await api.post(f"{base}/cancel", headers=admin)).json()["status"] == "cancelled"
    assert (await api.post(f"{base}/resume", headers=admin)).status_code == 409
    listed = await api.get(
        "/api/v1/operator/rights", params={"plate": plate, "status": "cancelled"}, headers=admin
    )
    assert [r["id"] for r in listed.json()] == [right["id"]]
    # Another company's admin sees none of it.
    other = await create_lot(runtime)
    other_admin = await _admin(runtime, app, other)
    assert (await api.get("/api/v1/operator/rights", headers=other_admin)).json() == []
    assert (await api.post(f"{base}/cancel", headers=other_admin)).status_code == 404


async def test_rights_are_listed_by_vehicle_colour_and_characters(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, lot: Lot
) -> None:
    """`?plate=&color=` names a vehicle: a blue and a yellow 浙A12345 are two, and each right
    is listed for its own. Before, the colour only checked the plate's form: both were listed
    for either colour, and a green plate's eight characters without `color` were refused as no
    blue plate."""
    admin = await _admin(runtime, app, lot)
    spec = await _spec(api, admin, kind="free_passage")
    plate = unique_plate()
    now = datetime.now(UTC)
    ids = {}
    for color in ("blue", "yellow"):
        made = await api.post(
            "/api/v1/operator/rights",
            json={
                "spec_id": spec,
                "vehicles": [{"plate": plate, "color": color}],
                "valid_from": (now - timedelta(days=1)).isoformat(),
                "valid_until": (now + timedelta(days=30)).isoformat(),
            },
            headers=admin,
        )
        assert made.status_code == 201, made.text
        ids[color] = made.json()["id"]

    async def listed(**params: str) -> httpx.Response:
        return await api.get("/api/v1/operator/rights", params=params, headers=admin)

    for color in ("blue", "yellow"):
        shown = await listed(plate=plate, color=color)
        assert [r["id"] for r in shown.json()] == [ids[color]], color
    assert [r["id"] for r in (await listed(plate=plate)).json()] == [ids["blue"], ids["yellow"]]
    assert (await listed(plate=plate, color="white")).json() == []
    assert (await listed(plate=f"浙AD{plate[-5:]}")).json() == [], "a green plate's form"
    for params in ({"plate": plate, "color": "red"}, {"plate": plate, "color": "green"}):
        refused = await listed(**params)
        assert refused.status_code == 422, params
        assert refused.json()["error"]["code"] == "invalid_request", params


async def test_bad_requests_change_nothing(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, lot: Lot
) -> None:
    admin = await _admin(runtime, app, lot)
    bad_specs = [
        {"name": "x", "kind": "discount"},  # no percent
        {"name": "x", "kind": "free_passage", "discount_percent": 10},
        {"name": "x", "kind": "free_passage", "window_start": "19:00"},
        {"name": "x", "kind": "free_passage", "weekdays": [0]},
        {"name": "x", "kind": "free_passage", "car_parks": ["not-ours"]},
    ]
    for body in bad_specs:
        response = await api.post("/api/v1/operator/right-specs", json=body, headers=admin)
        assert response.status_code in (404, 422), (body, response.text)
        assert "error" in response.json()
    spec = await _spec(api, admin, kind="free_passage")
    now = datetime.now(UTC).isoformat()
    for body in (
        {
            "spec_id": spec,
            "vehicles": [{"plate": "浙A1", "color": "blue"}],
            "valid_from": now,
            "valid_until": now,
        },
        {"spec_id": spec, "vehicles": [], "valid_from": now, "valid_until": now},
    ):
        response = await api.post("/api/v1/operator/rights", json=body, headers=admin)
        assert response.status_code == 422
    assert (await api.get("/api/v1/operator/rights", headers=admin)).json() == []
    assert len((await api.get("/api/v1/operator/right-specs", headers=admin)).json()) == 1


async def test_a_csv_with_bad_rows_imports_the_good_ones_and_reports_each_bad_one(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, lot: Lot
) -> None:
    admin = await _admin(runtime, app, lot)
    await _spec(api, admin, name="月租", kind="free_passage")
    good_a, good_b, good_c = unique_plate(), unique_plate(), unique_plate()
    csv_text = "\n".join(
        [
            "spec,plates,valid_from,valid_until,max_inside,label",
            f"月租,{good_a}/blue,2026-12-01,2026-12-31,,301室",
            "月租,浙A1/blue,2026-12-01,2026-12-31,,bad plate",
            f"季租,{unique_plate()},2026-12-01,2026-12-31,,unknown spec",
            f"月租,{unique_plate()},2026-12-31,2026-12-01,,ends before it starts",
            f"月租,{unique_plate()},yesterday,2026-12-31,,bad date",
            f"月租,{unique_plate()},2026-12-01,2026-12-31,0,bad cap",
            f"月租,{good_b};{good_c}/blue,2026-12-01T08:00:00+08:00,2027-01-31,1,两车一位",
        ]
    )
    response = await api.post(
        "/api/v1/operator/rights/import",
        content=csv_text.encode("utf-8-sig"),
        headers={**admin, "content-type": "text/csv"},
    )
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["imported"] == 2
    assert [f["line"] for f in report["failed"]] == [3, 4, 5, 6, 7]
    assert all(f["error"] for f in report["failed"])
    # Each reason has a code the console words in the operator's language, with its cell.
    assert [(f["code"], f["value"]) for f in report["failed"]] == [
        ("invalid_plate", "浙A1/blue"),
        ("unknown_right_spec", "季租"),
        ("invalid_row", None),
        ("invalid_date", "yesterday"),
        ("invalid_row", None),
    ]
    rights = (await api.get("/api/v1/operator/rights", headers=admin)).json()
    assert sorted(r["id"] for r in rights) == sorted(report["right_ids"])
    by_label = {r["label"]: r for r in rights}
    # A date is a local day; valid_until's date is the last day of validity.
    assert by_label["301室"]["valid_from"].startswith("2026-11-30T16:00:00")
    assert by_label["301室"]["valid_until"].startswith("2026-12-31T16:00:00")
    assert by_label["两车一位"]["max_inside"] == 1
    assert {v["plate"] for v in by_label["两车一位"]["vehicles"]} == {good_b, good_c}
    missing = await api.post(
        "/api/v1/operator/rights/import",
        content=b"plates,label\n",
        headers={**admin, "content-type": "text/csv"},
    )
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "invalid_csv"


async def test_the_quote_the_held_gate_and_the_booth_price_the_stay_under_its_right(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    admin = await _admin(runtime, app, lot)
    spec = await _spec(api, admin, name="商户八折", kind="discount", discount_percent=20)
    plate = unique_plate()  # not bound: held at the exit with the fee
    await _right(api, admin, spec, [plate])
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=150))
    quote = (await api.get(f"/api/v1/car-parks/{lot.code}/quote", params={"plate": plate})).json()
    assert quote["fee_fen"] == 1440 and quote["right"] == "商户八折"
    assert quote["right_reduction_fen"] == 360
    held = gate.capture("out", plate)
    command = await gate.decide(lot.code, "out1", held)
    assert command["action"] == "hold" and command["fee_fen"] == 1440
    wrong = await api.post(
        f"/api/v1/operator/car-parks/{lot.code}/booth-payments",
        json={"capture_id": str(held.capture_id), "method": "cash", "amount_fen": 1800},
        headers=admin,
    )
    assert wrong.status_code == 409 and wrong.json()["error"]["details"]["fee_fen"] == 1440
    paid = await api.post(
        f"/api/v1/operator/car-parks/{lot.code}/booth-payments",
        json={"capture_id": str(held.capture_id), "method": "cash", "amount_fen": 1440},
        headers=admin,
    )
    assert paid.status_code == 201, paid.text


async def test_the_offline_whitelist_has_pass_holders_and_no_blacklisted_vehicle(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    admin = await _admin(runtime, app, lot)
    monthly = await _spec(api, admin, kind="free_passage")
    discount = await _spec(api, admin, kind="discount", discount_percent=10)
    holder, sharer, discounted, bound_bad = (unique_plate() for _ in range(4))
    await _right(api, admin, monthly, [holder, sharer], max_inside=1)
    await _right(api, admin, discount, [discounted])
    await make_driver(runtime, bound_bad)
    for plate in (holder, sharer, discounted, bound_bad):
        await gate.decide(lot.code, "in1", gate.capture("in", plate))
    response = await api.post(
        "/api/v1/operator/blacklist",
        json={"plate": bound_bad, "color": "blue", "reason": "欠费不缴"},
        headers=admin,
    )
    assert response.status_code == 201
    async with runtime.pool.acquire() as conn:
        cars = (await gates_repo.offline_whitelists(conn)).get(lot.code, [])
    # The pass's one place (the sharer came in as a visitor), free of any limit; a discount is
    # no free passage; a blacklisted vehicle is off the list even though it could pay later.
    assert [(c.plate, c.per_session_limit_fen) for c in cars] == [(holder, None)]


async def test_overlapping_rights_the_most_favourable_one_prices_the_stay_once(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    admin = await _admin(runtime, app, lot)
    flat = await _spec(api, admin, name="flat ¥10", kind="flat_fee", flat_fee_fen=1000)
    half = await _spec(api, admin, name="half", kind="discount", discount_percent=50)
    hour = await _spec(api, admin, name="free hour", kind="free_minutes", free_minutes=60)
    driver = await make_driver(runtime, unique_plate())
    rights = [await _right(api, admin, s, [driver.plate]) for s in (flat, half, hour)]
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=150))
    # By the tariff ¥18; flat ¥10, half ¥9, an hour free ¥12: ¥9, charged once.
    command = await _exit(gate, lot, driver.plate)
    assert command["fee_fen"] == 900
    assert (await _stay(runtime, lot, driver.plate))["applied_right_id"] == rights[1]["id"]
    async with runtime.pool.acquire() as conn:
        charged = await conn.fetch(
            "SELECT amount_fen FROM charges WHERE account_id = $1", driver.account_id
        )
    assert [c["amount_fen"] for c in charged] == [900]


async def test_a_right_specification_named_with_a_nul_is_refused_as_bad_input(
    runtime: Runtime, app: FastAPI, lot: Lot
) -> None:
    """A 422 in the one error shape, as for every other stored name: before, PostgreSQL
    refused the NUL and the operator got a 500."""
    headers = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as client:
        response = await client.post(
            "/api/v1/operator/right-specs",
            json={"name": "月卡\u0000夜间", "kind": "free_passage"},
            headers=headers,
        )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"


async def test_a_pass_not_yet_valid_takes_no_place_at_entry(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """A vehicle with a 10 % discount and a pass "at most 1 inside" that starts tomorrow
    enters today: it takes no place of the pass. Before, it did, and the pass's other vehicle,
    entering once the pass had begun while this car was still inside, was a visitor."""
    admin = await _admin(runtime, app, lot)
    discount = await _spec(api, admin, kind="discount", discount_percent=10)
    monthly = await _spec(api, admin, kind="free_passage")
    plate, other = unique_plate(), unique_plate()
    await _right(api, admin, discount, [plate])
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    pass_ = await _right(
        api,
        admin,
        monthly,
        [plate, other],
        valid_from=tomorrow,
        valid_until=tomorrow + timedelta(days=30),
        max_inside=1,
    )
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=10))
    assert (await _stay(runtime, lot, plate))["assigned_right_id"] != pass_["id"]
