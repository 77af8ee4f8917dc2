"""The operator API: staff of a company manage only its car parks (another company's objects
are not found), admins change car parks, gates and tariffs and refund fees, attendants resolve
held captures and open gates; every change is audit-logged."""

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from fastapi import FastAPI

from gate_controller.protocol import Capture
from parking.logging import mask_plate
from parking.runtime import Runtime
from tests.conftest import (
    Lot,
    bearer,
    charges_of,
    create_lot,
    driver_in_debt,
    driver_token,
    enter,
    eventually,
    exit_after,
    make_driver,
    make_staff,
    reject_awaiting,
    staff_token,
    stay_status,
    unique_plate,
)
from tests.gates import GateProbe

OPERATOR = "/api/v1/operator"
HOURLY = {
    "free_minutes": 15,
    "bands": [
        {
            "name": "all day",
            "start": "00:00",
            "end": "00:00",
            "lines": [{"from_minute": 0, "kind": "per_increment", "amount_fen": 500}],
        }
    ],
}


async def _headers(runtime: Runtime, app: FastAPI, operator_id: int, role: str) -> dict[str, str]:
    return bearer(staff_token(app, await make_staff(runtime, operator_id, role)))


async def _audit(runtime: Runtime, action: str, subject: str) -> list[asyncpg.Record]:
    async with runtime.pool.acquire() as conn:
        return await conn.fetch(
            "SELECT actor, detail FROM audit_log WHERE action = $1 AND subject = $2",
            action,
            subject,
        )


async def _row(runtime: Runtime, sql: str, *args: Any) -> asyncpg.Record:
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow(sql, *args)
    assert row is not None
    return row


async def _held_exit(gate: GateProbe, lot: Lot, plate: str | None) -> Capture:
    """An exit the lane holds: with no plate read it is an 'unreadable' exception."""
    capture = gate.capture("out", plate)
    command = await gate.decide(lot.code, "out1", capture)
    assert command["action"] == "hold", command
    return capture


async def _exception_id(runtime: Runtime, capture: Capture) -> int:
    row = await _row(
        runtime, "SELECT id FROM lane_exceptions WHERE capture_id = $1", capture.capture_id
    )
    exception_id: int = row["id"]
    return exception_id


async def test_admin_manages_car_parks_gates_and_tariffs_with_an_audit_trail(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    admin = await _headers(runtime, app, lot.operator_id, "admin")
    second = await create_lot(runtime)
    async with runtime.pool.acquire() as conn:  # the same company's second car park
        await conn.execute(
            "UPDATE car_parks SET operator_id = $1 WHERE id = $2", lot.operator_id, second.id
        )
    await enter(runtime, gate, lot, unique_plate(), parked_for=timedelta(minutes=5))

    listed = (await api.get(f"{OPERATOR}/car-parks", headers=admin)).json()
    assert [c["code"] for c in listed] == sorted([lot.code, second.code])
    mine = next(c for c in listed if c["code"] == lot.code)
    assert (mine["capacity"], mine["occupied"], mine["free"]) == (50, 1, 49)

    patched = await api.patch(
        f"{OPERATOR}/car-parks/{lot.code}", json={"name": "城中街", "capacity": 60}, headers=admin
    )
    assert patched.status_code == 200, patched.text
    assert (patched.json()["name"], patched.json()["free"]) == ("城中街", 59)
    fetched = (await api.get(f"{OPERATOR}/car-parks/{lot.code}", headers=admin)).json()
    assert (fetched["name"], fetched["capacity"]) == ("城中街", 60)
    [updated] = await _audit(runtime, "car_park.updated", f"car_park:{lot.id}")
    assert updated["detail"]["capacity"] == {"from": 50, "to": 60}
    bad = await api.patch(f"{OPERATOR}/car-parks/{lot.code}", json={"capacity": -1}, headers=admin)
    assert bad.status_code == 422

    added = await api.post(
        f"{OPERATOR}/car-parks/{lot.code}/gates",
        json={"code": "both2", "direction": "both"},
        headers=admin,
    )
    assert added.status_code == 201, added.text
    again = await api.post(
        f"{OPERATOR}/car-parks/{lot.code}/gates",
        json={"code": "both2", "direction": "in"},
        headers=admin,
    )
    assert again.status_code == 409 and again.json()["error"]["code"] == "gate_exists"
    gates = (await api.get(f"{OPERATOR}/car-parks/{lot.code}/gates", headers=admin)).json()
    assert [(g["code"], g["direction"]) for g in gates] == [
        ("both2", "both"),
        ("in1", "in"),
        ("out1", "out"),
    ]
    async with runtime.pool.acquire() as conn:
        gate_id = await conn.fetchval(
            "SELECT id FROM gates WHERE car_park_id = $1 AND code = 'both2'", lot.id
        )
    assert len(await _audit(runtime, "gate.created", f"gate:{gate_id}")) == 1

    starts = datetime.now(UTC) + timedelta(hours=1)
    created = await api.post(
        f"{OPERATOR}/car-parks/{lot.code}/tariffs",
        json={"effective_from": starts.isoformat(), "rules": HOURLY},
        headers=admin,
    )
    assert created.status_code == 201, created.text
    versions = (await api.get(f"{OPERATOR}/car-parks/{lot.code}/tariffs", headers=admin)).json()
    assert versions[0]["id"] == created.json()["id"], "newest first"
    assert len(versions) == 2
    assert versions[0]["rules"]["bands"][0]["lines"][0]["amount_fen"] == 500
    assert versions[1]["rules"]["bands"][0]["lines"][0]["amount_fen"] == 600
    [audited] = await _audit(runtime, "tariff.created", f"tariff:{created.json()['id']}")
    assert audited["actor"].startswith("operator_user:")

    # Bands that leave part of the day without a price.
    gap = {**HOURLY, "bands": [{**HOURLY["bands"][0], "end": "20:00"}]}
    invalid = await api.post(
        f"{OPERATOR}/car-parks/{lot.code}/tariffs",
        json={"effective_from": starts.isoformat(), "rules": gap},
        headers=admin,
    )
    assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "invalid_tariff"
    assert invalid.json()["error"]["details"][0]["loc"][:2] == ["rules", "bands"]
    backdated = await api.post(
        f"{OPERATOR}/car-parks/{lot.code}/tariffs",
        json={
            "effective_from": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
            "rules": HOURLY,
        },
        headers=admin,
    )
    assert backdated.status_code == 422
    assert backdated.json()["error"]["code"] == "effective_from_in_past"
    assert (
        len((await api.get(f"{OPERATOR}/car-parks/{lot.code}/tariffs", headers=admin)).json()) == 2
    )


async def test_another_company_finds_nothing_of_this_one(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    driver = await make_driver(runtime, unique_plate())
    await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))
    [charge] = await charges_of(runtime, lot)
    held = await _held_exit(gate, lot, None)
    exception_id = await _exception_id(runtime, held)
    other = await create_lot(runtime)
    theirs = await _headers(runtime, app, other.operator_id, "admin")
    ours = await _headers(runtime, app, lot.operator_id, "admin")

    listed = (await api.get(f"{OPERATOR}/car-parks", headers=theirs)).json()
    assert [c["code"] for c in listed] == [other.code]
    assert (await api.get(f"{OPERATOR}/car-parks/{lot.code}", headers=ours)).status_code == 200
    car_park = f"{OPERATOR}/car-parks/{lot.code}"
    refused = [
        await api.get(car_park, headers=theirs),
        await api.patch(car_park, json={"capacity": 1}, headers=theirs),
        await api.get(f"{car_park}/gates", headers=theirs),
        await api.post(f"{car_park}/gates", json={"code": "x", "direction": "in"}, headers=theirs),
        await api.get(f"{car_park}/tariffs", headers=theirs),
        await api.post(
            f"{car_park}/tariffs",
            json={"effective_from": datetime.now(UTC).isoformat(), "rules": HOURLY},
            headers=theirs,
        ),
        await api.post(f"{car_park}/gates/out1/open", json={"reason": "test"}, headers=theirs),
        await api.get(f"{OPERATOR}/stays", params={"car_park": lot.code}, headers=theirs),
        await api.get(f"{OPERATOR}/exceptions", params={"car_park": lot.code}, headers=theirs),
    ]
    assert [r.json()["error"]["code"] for r in refused] == ["car_park_not_found"] * len(refused)

    assert (
        await api.get(f"{OPERATOR}/stays", params={"plate": driver.plate}, headers=theirs)
    ).json() == []
    assert (await api.get(f"{OPERATOR}/exceptions", headers=theirs)).json() == []
    image = await api.get(f"{OPERATOR}/exceptions/{exception_id}/image", headers=theirs)
    resolve = await api.post(
        f"{OPERATOR}/exceptions/{exception_id}/resolve",
        json={"plate": driver.plate, "color": "blue"},
        headers=theirs,
    )
    refund = await api.post(
        f"{OPERATOR}/charges/{charge['id']}/refunds",
        json={"amount_fen": 100, "reason": "goodwill"},
        headers=theirs,
    )
    assert [(r.status_code, r.json()["error"]["code"]) for r in (image, resolve, refund)] == [
        (404, "exception_not_found"),
        (404, "exception_not_found"),
        (404, "charge_not_found"),
    ]
    assert (await _row(runtime, "SELECT status FROM lane_exceptions WHERE id = $1", exception_id))[
        "status"
    ] == "open"
    revenue = (await api.get(f"{OPERATOR}/reports/revenue", headers=theirs)).json()
    assert all(r["car_park"] != lot.code for r in revenue)


async def test_attendants_may_not_change_car_parks_tariffs_or_money(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, lot: Lot
) -> None:
    attendant = await _headers(runtime, app, lot.operator_id, "attendant")
    car_park = f"{OPERATOR}/car-parks/{lot.code}"
    assert (await api.get(car_park, headers=attendant)).status_code == 200
    refused = [
        await api.patch(car_park, json={"capacity": 1}, headers=attendant),
        await api.post(
            f"{car_park}/gates", json={"code": "x", "direction": "in"}, headers=attendant
        ),
        await api.post(
            f"{car_park}/tariffs",
            json={"effective_from": datetime.now(UTC).isoformat(), "rules": HOURLY},
            headers=attendant,
        ),
        await api.post(
            f"{OPERATOR}/charges/1/refunds",
            json={"amount_fen": 100, "reason": "goodwill"},
            headers=attendant,
        ),
    ]
    assert [r.status_code for r in refused] == [403] * 4
    assert (await api.get(car_park)).status_code == 401
    driver = bearer(driver_token(app, (await make_driver(runtime, unique_plate())).account_id))
    assert (await api.get(car_park, headers=driver)).status_code == 403


async def test_resolving_an_unreadable_exit_with_the_parked_drivers_plate_opens_and_charges(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    staff = await make_staff(runtime, lot.operator_id, "attendant")
    attendant = bearer(staff_token(app, staff))
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=90))
    held = await _held_exit(gate, lot, None)

    queue = await api.get(
        f"{OPERATOR}/exceptions", params={"car_park": lot.code, "status": "open"}, headers=attendant
    )
    [item] = queue.json()
    assert set(item) == {
        "id",
        "car_park",
        "gate",
        "reason",
        "created_at",
        "candidates",
        "has_image",
        "image_url",
        "status",
        "resolved_plate",
        "capture_id",
    }
    assert (item["car_park"], item["gate"], item["reason"], item["status"]) == (
        lot.code,
        "out1",
        "unreadable",
        "open",
    )
    assert item["capture_id"] == str(held.capture_id)
    assert (item["has_image"], item["image_url"], item["resolved_plate"]) == (False, None, None)
    assert await runtime.occupancy.get(lot.id) == 1

    # Typed as the attendant reads it off the car: lower case, with the usual dot.
    typed = f"{driver.plate[:2]}·{driver.plate[2:].lower()}"
    resolved = await api.post(
        f"{OPERATOR}/exceptions/{item['id']}/resolve",
        json={"plate": typed, "color": "blue"},
        headers=attendant,
    )
    assert resolved.status_code == 200, resolved.text
    assert resolved.json() == {
        "outcome": "exited_pay_later",
        "action": "open",
        "fee_fen": 1200,
        "gate_commanded": True,
    }

    await gate.wait_for(held, commands=2)
    second = gate.commands[str(held.capture_id)][1]
    assert (second["action"], second["fee_fen"]) == ("open", 1200)
    [charge] = await charges_of(runtime, lot)
    assert (charge["account_id"], charge["amount_fen"]) == (driver.account_id, 1200)
    capture = await _row(runtime, "SELECT * FROM captures WHERE capture_id = $1", held.capture_id)
    assert (capture["outcome"], capture["plate"], capture["plate_source"]) == (
        "exited_pay_later",
        driver.plate,
        "operator",
    )
    assert capture["session_id"] == charge["session_id"]
    exception = await _row(runtime, "SELECT * FROM lane_exceptions WHERE id = $1", item["id"])
    assert (exception["status"], exception["resolved_plate"], exception["resolved_by"]) == (
        "resolved",
        driver.plate,
        f"operator_user:{staff.user_id}",
    )
    [audited] = await _audit(runtime, "lane_exception.resolved", f"lane_exception:{item['id']}")
    assert audited["detail"]["fee_fen"] == 1200
    assert await runtime.occupancy.get(lot.id) == 0

    twice = await api.post(
        f"{OPERATOR}/exceptions/{item['id']}/resolve",
        json={"plate": typed, "color": "blue"},
        headers=attendant,
    )
    assert twice.status_code == 409 and twice.json()["error"]["code"] == "already_resolved"
    # The gate sends the held capture again: it gets the new decision, not the hold.
    await gate.send(lot.code, "out1", held)
    await gate.wait_for(held, commands=3, acks=2)
    assert gate.commands[str(held.capture_id)][2]["action"] == "open"
    assert len(await charges_of(runtime, lot)) == 1


async def test_resolving_a_held_entry_lets_the_car_in_and_counts_it(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    attendant = await _headers(runtime, app, lot.operator_id, "attendant")
    held = gate.capture("in", None)
    assert (await gate.decide(lot.code, "in1", held))["action"] == "hold"
    plate = unique_plate()

    resolved = await api.post(
        f"{OPERATOR}/exceptions/{await _exception_id(runtime, held)}/resolve",
        json={"plate": plate, "color": "blue"},
        headers=attendant,
    )
    assert resolved.json() == {
        "outcome": "entered",
        "action": "open",
        "fee_fen": None,
        "gate_commanded": True,
    }
    await gate.wait_for(held, commands=2)
    assert gate.commands[str(held.capture_id)][1]["action"] == "open"
    stay = await _row(
        runtime, "SELECT * FROM sessions WHERE entry_capture_id = $1", held.capture_id
    )
    assert (stay["plate"], stay["status"], stay["car_park_id"]) == (plate, "open", lot.id)
    assert await runtime.occupancy.get(lot.id) == 1


async def test_an_exception_shows_its_frame_and_refuses_plates_that_are_not_parked(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    attendant = await _headers(runtime, app, lot.operator_id, "attendant")
    look_alike = await make_driver(runtime, "浙N8D07S")
    await enter(runtime, gate, lot, look_alike.plate, parked_for=timedelta(hours=1))
    held = await _held_exit(gate, lot, None)
    exception_id = await _exception_id(runtime, held)
    frame = b"\xff\xd8\xff\xe0 a frame"
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE lane_exceptions SET image = $2 WHERE id = $1", exception_id, frame
        )

    [item] = (await api.get(f"{OPERATOR}/exceptions", headers=attendant)).json()
    assert item["image_url"] == f"{OPERATOR}/exceptions/{exception_id}/image"
    image = await api.get(item["image_url"], headers=attendant)
    assert image.headers["content-type"] == "image/jpeg" and image.content == frame

    resolve = f"{OPERATOR}/exceptions/{exception_id}/resolve"
    invalid = await api.post(resolve, json={"plate": "not a plate"}, headers=attendant)
    assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "invalid_request"
    # A plate nobody parked here has, one look-alike away from a parked car: what the attendant
    # typed is taken as it is, never bent onto the parked driver.
    absent = await api.post(resolve, json={"plate": "浙NB007S", "color": "blue"}, headers=attendant)
    assert absent.status_code == 409 and absent.json()["error"]["code"] == "no_open_stay"
    assert await stay_status(runtime, lot, look_alike.plate) == "open"
    assert await charges_of(runtime, lot) == []
    capture = await _row(runtime, "SELECT * FROM captures WHERE capture_id = $1", held.capture_id)
    assert (capture["outcome"], capture["plate_source"]) == ("held_unreadable", "none")
    assert (await _row(runtime, "SELECT status FROM lane_exceptions WHERE id = $1", exception_id))[
        "status"
    ] == "open"
    assert await _audit(runtime, "lane_exception.resolved", f"lane_exception:{exception_id}") == []

    async with runtime.pool.acquire() as conn:  # erased after its retention period
        await conn.execute("UPDATE lane_exceptions SET image = NULL WHERE id = $1", exception_id)
    erased = await api.get(item["image_url"], headers=attendant)
    assert erased.status_code == 404 and erased.json()["error"]["code"] == "image_not_found"


async def test_opening_a_held_exit_by_hand_closes_the_stay_without_charging(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    attendant = await _headers(runtime, app, lot.operator_id, "attendant")
    plate = unique_plate()  # nobody has bound it: the exit holds for ¥12.00
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    held = await _held_exit(gate, lot, plate)
    open_url = f"{OPERATOR}/car-parks/{lot.code}/gates/out1/open"

    too_short = await api.post(open_url, json={"reason": "ok"}, headers=attendant)
    assert too_short.status_code == 422
    opened = await api.post(
        open_url,
        json={"reason": "driver paid cash at the booth", "capture_id": str(held.capture_id)},
        headers=attendant,
    )
    assert opened.status_code == 200, opened.text
    body = opened.json()
    assert (body["capture_id"], body["fee_fen"]) == (str(held.capture_id), 1200)

    await gate.wait_for(held, commands=2)
    assert gate.commands[str(held.capture_id)][1]["action"] == "open"
    stay = await _row(runtime, "SELECT * FROM sessions WHERE id = $1", body["session_id"])
    assert (stay["status"], stay["settlement"], stay["fee_fen"]) == ("closed", "operator", 1200)
    assert await charges_of(runtime, lot) == []
    assert await runtime.occupancy.get(lot.id) == 0
    async with runtime.pool.acquire() as conn:
        gate_id = await conn.fetchval(
            "SELECT id FROM gates WHERE car_park_id = $1 AND code = 'out1'", lot.id
        )
    [audited] = await _audit(runtime, "gate.opened", f"gate:{gate_id}")
    assert audited["detail"]["reason"] == "driver paid cash at the booth"

    # No capture: the barrier opens with a command of its own.
    bare = await api.post(open_url, json={"reason": "ambulance"}, headers=attendant)
    assert bare.status_code == 200 and bare.json()["session_id"] is None
    key = bare.json()["capture_id"]

    async def commanded() -> bool:
        return bool(gate.commands.get(key))

    await eventually(commanded)
    assert gate.commands[key][0]["action"] == "open"
    assert len(await _audit(runtime, "gate.opened", f"gate:{gate_id}")) == 2
    unknown = await api.post(
        open_url,
        json={"reason": "ambulance", "capture_id": "00000000-0000-4000-8000-000000000000"},
        headers=attendant,
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "capture_not_found"


async def test_stays_are_listed_newest_first_with_filters_and_masked_plates(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    attendant = await _headers(runtime, app, lot.operator_id, "attendant")
    parked, left = unique_plate(), await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, parked, parked_for=timedelta(hours=2))
    await exit_after(runtime, gate, lot, left.plate, timedelta(minutes=30))

    async def stays(**params: str) -> list[dict[str, Any]]:
        response = await api.get(f"{OPERATOR}/stays", params=params, headers=attendant)
        assert response.status_code == 200, response.text
        result: list[dict[str, Any]] = response.json()
        return result

    newest, oldest = await stays(car_park=lot.code)
    assert (newest["plate"], oldest["plate"]) == (mask_plate(left.plate), mask_plate(parked))
    assert (newest["status"], newest["fee_fen"], newest["settlement"]) == (
        "closed",
        600,
        "pay_later",
    )
    assert newest["charge_id"] == (await charges_of(runtime, lot))[0]["id"]
    assert (oldest["status"], oldest["charge_id"]) == ("open", None)
    assert [s["id"] for s in await stays(status="open")] == [oldest["id"]]
    assert [s["id"] for s in await stays(plate=left.plate)] == [newest["id"]]
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert [s["id"] for s in await stays(**{"from": since})] == [newest["id"]]
    assert [s["id"] for s in await stays(to=since)] == [oldest["id"]]
    assert [s["id"] for s in await stays(limit="1")] == [newest["id"]]
    combined = {"car_park": lot.code, "plate": left.plate, "from": since, "status": "closed"}
    assert [s["id"] for s in await stays(**combined)] == [newest["id"]]
    assert await stays(car_park=lot.code, plate=parked, status="closed") == []
    wrong = await api.get(f"{OPERATOR}/stays", params={"status": "gone"}, headers=attendant)
    assert wrong.status_code == 422


async def test_refunds_and_money_reports_cover_only_the_companys_car_parks(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    admin = await _headers(runtime, app, lot.operator_id, "admin")
    other = await create_lot(runtime)
    theirs = await _headers(runtime, app, other.operator_id, "admin")
    driver = await make_driver(runtime, unique_plate())
    await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=90))
    debtor = await driver_in_debt(runtime, gate, lot)

    async def settled() -> list[asyncpg.Record]:
        rows = await charges_of(runtime, lot)
        done = [r["status"] for r in rows] == ["succeeded", "failed"]
        return rows if done else []

    charged, _ = await eventually(settled, timeout_s=15)

    refund_url = f"{OPERATOR}/charges/{charged['id']}/refunds"
    refunded = await api.post(
        refund_url, json={"amount_fen": 300, "reason": "barrier hit the car"}, headers=admin
    )
    assert refunded.status_code == 201, refunded.text
    assert (refunded.json()["amount_fen"], refunded.json()["kind"]) == (300, "operator")
    too_much = await api.post(
        refund_url, json={"amount_fen": 1000, "reason": "barrier hit the car"}, headers=admin
    )
    assert too_much.status_code == 409 and too_much.json()["error"]["code"] == "refund_not_allowed"
    [audited] = await _audit(runtime, "refund.requested", f"refund:{refunded.json()['id']}")
    assert audited["actor"].startswith("operator_user:")
    listed = (await api.get(f"{OPERATOR}/refunds", headers=admin)).json()
    assert [r["id"] for r in listed] == [refunded.json()["id"]]
    assert listed[0]["reason"] == "barrier hit the car"
    assert (await api.get(f"{OPERATOR}/refunds", headers=theirs)).json() == []

    revenue = (await api.get(f"{OPERATOR}/reports/revenue", headers=admin)).json()
    assert [(r["car_park"], r["pay_later_fen"]) for r in revenue] == [(lot.code, 1800)]
    exported = await api.get(f"{OPERATOR}/reports/revenue", params={"format": "csv"}, headers=admin)
    assert exported.headers["content-type"].startswith("text/csv")
    assert exported.headers["content-disposition"].startswith("attachment;")
    [line] = list(csv.DictReader(io.StringIO(exported.text)))
    assert (line["car_park"], line["pay_later_fen"]) == (lot.code, "1800")
    empty = await api.get(f"{OPERATOR}/reports/revenue", params={"format": "csv"}, headers=theirs)
    assert list(csv.DictReader(io.StringIO(empty.text))) == []
    backwards = await api.get(
        f"{OPERATOR}/reports/revenue",
        params={"from": "2026-02-01", "to": "2026-01-01"},
        headers=admin,
    )
    assert backwards.status_code == 422

    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE debts SET created_at = now() - interval '40 days' WHERE account_id = $1",
            debtor.account_id,
        )
    ageing = (await api.get(f"{OPERATOR}/reports/debts", headers=admin)).json()
    assert [(b["age_days"], b["debts"], b["amount_fen"]) for b in ageing] == [
        ("0-7", 0, 0),
        ("8-30", 0, 0),
        ("31-90", 1, 600),
        ("91+", 0, 0),
    ]
    assert all(
        b["debts"] == 0 for b in (await api.get(f"{OPERATOR}/reports/debts", headers=theirs)).json()
    )


async def test_malformed_requests_are_refused_before_they_reach_the_database(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, lot: Lot
) -> None:
    admin = await _headers(runtime, app, lot.operator_id, "admin")
    car_park = f"{OPERATOR}/car-parks/{lot.code}"
    beyond_utc = "9999-12-31T23:00:00-05:00"
    responses = [
        await api.patch(car_park, json={"name": "a\x00b"}, headers=admin),
        await api.get(f"{OPERATOR}/car-parks/bad%00code", headers=admin),
        await api.get(f"{OPERATOR}/exceptions/{2**63}/image", headers=admin),
        await api.post(
            f"{OPERATOR}/charges/1/refunds",
            json={"amount_fen": 2**63, "reason": "goodwill"},
            headers=admin,
        ),
        await api.post(
            f"{car_park}/tariffs",
            json={"effective_from": beyond_utc, "rules": HOURLY},
            headers=admin,
        ),
        await api.post(
            f"{car_park}/tariffs",
            json={
                "effective_from": datetime.now(UTC).isoformat(),
                "rules": {**HOURLY, "free_minutes": 2**64},
            },
            headers=admin,
        ),
        await api.post(
            f"{car_park}/tariffs",
            json={
                "effective_from": datetime.now(UTC).isoformat(),
                "rules": {**HOURLY, "bands": [{**HOURLY["bands"][0], "name": "day\x00"}]},
            },
            headers=admin,
        ),
        await api.get(f"{OPERATOR}/stays", params={"from": beyond_utc}, headers=admin),
        await api.get(f"{OPERATOR}/stays", params={"plate": "浙A\x0012345"}, headers=admin),
    ]
    assert [r.status_code for r in responses] == [422] * len(responses), [r.text for r in responses]
    # The default period of a report ending on the first day there is starts on that day.
    first_days = await api.get(
        f"{OPERATOR}/reports/revenue", params={"to": "0001-01-02"}, headers=admin
    )
    assert (first_days.status_code, first_days.json()) == (200, [])


async def test_dead_and_stuck_jobs_are_listed_for_the_company_and_admins_retry_dead_ones(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    admin = await _headers(runtime, app, lot.operator_id, "admin")
    attendant = await _headers(runtime, app, lot.operator_id, "attendant")
    other = await _headers(runtime, app, (await create_lot(runtime)).operator_id, "admin")
    for _ in range(2):
        driver = await make_driver(runtime, unique_plate())
        await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=90))

    async def charged() -> list[asyncpg.Record]:
        rows = await charges_of(runtime, lot)
        return rows if len(rows) == 2 and all(r["status"] == "succeeded" for r in rows) else []

    first, second = await eventually(charged)
    async with runtime.pool.acquire() as conn:
        # The first charge's job died (as after 20 refused attempts); the second is stuck: due
        # an hour ago and held under a lease nobody releases.
        dead_id = await conn.fetchval(
            """UPDATE outbox SET done_at = NULL, dead_at = now(), attempts = 20,
                      last_error = 'provider 503'
               WHERE kind = 'charge' AND ref_id = $1 RETURNING id""",
            first["id"],
        )
        stuck_id = await conn.fetchval(
            """UPDATE outbox SET done_at = NULL, available_at = now() - interval '1 hour',
                      locked_until = now() + interval '1 hour'
               WHERE kind = 'charge' AND ref_id = $1 RETURNING id""",
            second["id"],
        )
    try:
        listed = (await api.get(f"{OPERATOR}/jobs", headers=attendant)).json()
        by_id = {j["id"]: j for j in listed}
        assert by_id[dead_id]["state"] == "dead" and by_id[stuck_id]["state"] == "stuck"
        assert by_id[dead_id] | {"dead_at": None, "created_at": None, "available_at": None} == {
            "id": dead_id,
            "kind": "charge",
            "ref_id": first["id"],
            "car_park": lot.code,
            "state": "dead",
            "attempts": 20,
            "total_attempts": 20,
            "last_error": "provider 503",
            "created_at": None,
            "available_at": None,
            "locked_until": None,
            "dead_at": None,
        }
        dead_only = (await api.get(f"{OPERATOR}/jobs?state=dead", headers=admin)).json()
        assert dead_id in {j["id"] for j in dead_only} and stuck_id not in {
            j["id"] for j in dead_only
        }
        assert (
            await api.get(f"{OPERATOR}/jobs", params={"car_park": lot.code}, headers=admin)
        ).json() == listed
        # Another company sees none of them and cannot retry them.
        assert not {dead_id, stuck_id} & {
            j["id"] for j in (await api.get(f"{OPERATOR}/jobs", headers=other)).json()
        }
        response = await api.post(f"{OPERATOR}/jobs/{dead_id}/retry", headers=other)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "job_not_found"
        response = await api.post(f"{OPERATOR}/jobs/{dead_id}/retry", headers=attendant)
        assert response.status_code == 403
        response = await api.post(f"{OPERATOR}/jobs/{stuck_id}/retry", headers=admin)
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "job_not_dead"

        response = await api.post(f"{OPERATOR}/jobs/{dead_id}/retry", headers=admin)
        assert response.status_code == 200, response.text
        retried = response.json()
        assert (retried["state"], retried["attempts"], retried["total_attempts"]) == (
            "due",
            0,
            20,
        )
        [entry] = await _audit(runtime, "job.retried", f"outbox:{dead_id}")
        assert entry["actor"].startswith("operator_user:")
        assert entry["detail"]["kind"] == "charge"
        assert entry["detail"]["last_error"] == "provider 503"

        async def done() -> object:
            async with runtime.pool.acquire() as conn:
                return await conn.fetchrow(
                    "SELECT * FROM outbox WHERE id = $1 AND done_at IS NOT NULL", dead_id
                )

        # The worker takes it up at once: the charge was collected already, so it is done.
        job = await eventually(done)
        assert (job["attempts"], job["attempts_at_retry"], job["dead_at"]) == (21, 20, None)
    finally:
        async with runtime.pool.acquire() as conn:
            await conn.execute(
                "UPDATE outbox SET done_at = now(), locked_until = NULL WHERE id = $1", stuck_id
            )


async def test_naming_a_car_that_came_in_after_the_offline_exit_reached_us_closes_nothing(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """Review 23. An offline exit nobody could read reached us an hour ago; a pay-later car came
    in ten minutes ago and is parked. Naming that car on the old exit closed its stay at the
    upload's time (before its entry: free) and held its real exit as "no entry record". It was
    not in the car park when the upload arrived: 409 no_open_stay, its stay left open, as for a
    live exit named after a re-entry."""
    upload = gate.capture("out", None).model_copy(
        update={
            "offline": True,
            "offline_action": "open",
            "captured_at": datetime.now(UTC) - timedelta(minutes=70),
        }
    )
    await gate.decide(lot.code, "out1", upload)
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE captures SET received_at = now() - interval '1 hour' WHERE capture_id = $1",
            upload.capture_id,
        )
        exception_id = await conn.fetchval(
            "SELECT id FROM lane_exceptions WHERE capture_id = $1 AND status = 'open'",
            upload.capture_id,
        )
    assert exception_id is not None
    parked = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, parked.plate, parked_for=timedelta(minutes=10))
    attendant = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))

    answer = await api.post(
        f"/api/v1/operator/exceptions/{exception_id}/resolve",
        json={"plate": parked.plate, "color": "blue"},
        headers=attendant,
    )

    async with runtime.pool.acquire() as conn:
        stay = await conn.fetchrow(
            "SELECT status, exited_at, entered_at, fee_fen FROM sessions "
            "WHERE car_park_id = $1 AND plate = $2",
            lot.id,
            parked.plate,
        )
    # The car drives out for real: an ordinary pay-later exit, not "no entry record".
    out = await gate.decide(lot.code, "out1", gate.capture("out", parked.plate))
    assert (answer.status_code, stay["status"], out["action"]) == (409, "open", "open"), (
        answer.text,
        dict(stay),
        out["display"],
    )


async def test_opening_the_gate_by_hand_for_a_rejected_exit_closes_no_stay(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """Review 23. A charge on a doubtful exit is rejected: its stay is opened again (the car may
    still be inside) and the exit waits as 'rejected'; that car left long ago and the gate never
    held it. An attendant's manual open citing that capture closed the reopened stay and gave it
    the crossing, which naming the right car then gave a second stay. A stay is closed by hand
    only for a held exit, whose car is at the barrier."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, confidence=0.85, parked_for=timedelta(hours=2))
    exit_ = gate.capture("out", driver.plate, confidence=0.85)
    assert (await gate.decide(lot.code, "out1", exit_))["action"] == "open"
    async with runtime.pool.acquire() as conn:
        charge_id = await conn.fetchval(
            "SELECT id FROM charges WHERE account_id = $1 AND status = 'awaiting_confirmation'",
            driver.account_id,
        )
    attendant, exception_id = await reject_awaiting(runtime, app, api, lot, charge_id)
    other = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, other.plate, parked_for=timedelta(hours=3))

    opened = await api.post(
        f"/api/v1/operator/car-parks/{lot.code}/gates/out1/open",
        json={"reason": "车主在出口求助", "capture_id": str(exit_.capture_id)},
        headers=attendant,
    )
    named = await api.post(
        f"/api/v1/operator/exceptions/{exception_id}/resolve",
        json={"plate": other.plate, "color": "blue"},
        headers=attendant,
    )

    async with runtime.pool.acquire() as conn:
        reopened = await conn.fetchrow(
            "SELECT status, exit_capture_id, settlement FROM sessions "
            "WHERE car_park_id = $1 AND plate = $2",
            lot.id,
            driver.plate,
        )
        holders = await conn.fetchval(
            "SELECT count(*) FROM sessions WHERE exit_capture_id = $1", exit_.capture_id
        )
    assert opened.status_code == 200, opened.text
    assert named.status_code == 200, named.text
    assert (reopened["status"], reopened["exit_capture_id"], holders) == ("open", None, 1), (
        dict(reopened),
        opened.json(),
    )
