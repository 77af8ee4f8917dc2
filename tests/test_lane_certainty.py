"""Never the wrong driver (issue #15): the lane's part, through the real lane.

Each test is one way the adversarial review got a stranger charged on the lane as it was:
a consistent misread, a plate's colour ignored, no margin between parked look-alikes, a car
with no entry record bent onto a parked look-alike or another province's plate, a fixed fee
charged on one read, the green discount on a camera's colour guess, a binding made after the
car came in. A vehicle is its (plate, colour); only a stay whose entry and exit reads were
both certain is charged without a person; otherwise the car park's policy holds the gate or
opens it with the charge awaiting an operator (`parking/confirmations/`).
"""

import asyncio
import base64
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from billing import charges
from billing.tariff import Tariff
from parking.admin import repository as admin
from parking.confirmations import repository as confirmations_repo
from parking.confirmations.service import disown_stay
from parking.disputes import service as disputes
from parking.lanes import repository as lanes_repo
from parking.lanes.reading import operator_reading
from parking.messages import message_style
from parking.migrate import MIGRATIONS_DIR
from parking.runtime import ProviderEndpoint, Runtime
from tests.conftest import (
    Driver,
    Lot,
    backdate_entry,
    bearer,
    decide_dispute,
    driver_token,
    enter,
    eventually,
    make_driver,
    make_staff,
    reject_awaiting,
    set_car_park,
    staff_token,
    unique_plate,
)
from tests.gates import GateProbe

FIXTURES = Path(__file__).parent / "fixtures"
FRAME = (FIXTURES / "plate_wanM04698.jpg").read_bytes()


async def _charges(runtime: Runtime, *drivers: Driver) -> list[dict[str, Any]]:
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT * FROM charges WHERE account_id = ANY($1) ORDER BY id",
            [d.account_id for d in drivers],
        )
    return [dict(r) for r in rows]


async def _jobs(runtime: Runtime, charge_id: int) -> int:
    async with runtime.pool.acquire() as conn:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE kind = 'charge' AND ref_id = $1", charge_id
            )
        )


async def _exception(runtime: Runtime, capture_id: object) -> dict[str, Any] | None:
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM lane_exceptions WHERE capture_id = $1", capture_id)
    return dict(row) if row else None


async def _open_stays(runtime: Runtime, lot: Lot) -> list[tuple[str, str]]:
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT plate, plate_color FROM sessions WHERE car_park_id = $1 AND status = 'open'"
            " ORDER BY plate, plate_color",
            lot.id,
        )
    return [(r["plate"], r["plate_color"]) for r in rows]


# 1. One consistent misread charges a stranger.


async def test_a_misread_that_is_not_certain_at_both_ends_charges_nobody_without_a_person(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    # 皖ALC998 is bound; a car showing 皖ACC998 is read as 皖ALC998 at 0.85 at both gates.
    owner = await make_driver(runtime, "皖ALC998")
    await enter(runtime, gate, lot, owner.plate, confidence=0.85)
    command = await gate.decide(lot.code, "out1", gate.capture("out", owner.plate, confidence=0.85))

    # The car park's default policy: the gate opens, the charge waits for an operator.
    assert command["action"] == "open"
    (charge,) = await _charges(runtime, owner)
    assert charge["status"] == "awaiting_confirmation"
    assert await _jobs(runtime, charge["id"]) == 0, "nothing is sent to the provider"
    async with runtime.pool.acquire() as conn:
        accrued = await conn.fetchval(
            "SELECT count(*) FROM ledger_entries WHERE session_id = $1", charge["session_id"]
        )
    assert accrued == 0, "nothing is booked"


async def test_a_hold_policy_car_park_holds_an_exit_that_is_not_certain(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    await set_car_park(runtime, lot, uncertain_exit_policy="hold")
    owner = await make_driver(runtime, "皖ALC99B")
    await enter(runtime, gate, lot, owner.plate, confidence=0.85)
    exit_capture = gate.capture("out", owner.plate, confidence=0.85)
    command = await gate.decide(lot.code, "out1", exit_capture)

    assert (command["action"], command["fee_fen"]) == ("hold", 1200)
    assert command["payment_qr_url"], "the driver may pay at the gate meanwhile"
    exception = await _exception(runtime, exit_capture.capture_id)
    assert exception is not None and exception["reason"] == "uncertain"
    assert await _charges(runtime, owner) == []
    assert await _open_stays(runtime, lot) == [(owner.plate, "blue")]


async def test_paying_a_held_uncertain_exit_by_qr_resolves_its_exception(
    runtime: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    provider: ProviderEndpoint,
) -> None:
    """The driver pays the hold at the gate: the gate opens and the operator's queue no longer
    asks anybody to decide the exit (resolved with the payment, audit-logged)."""
    await set_car_park(runtime, lot, uncertain_exit_policy="hold")
    owner = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, owner.plate, confidence=0.85)
    exit_capture = gate.capture("out", owner.plate, confidence=0.85)
    assert (await gate.decide(lot.code, "out1", exit_capture))["action"] == "hold"
    exception = await _exception(runtime, exit_capture.capture_id)
    assert exception is not None and (exception["reason"], exception["status"]) == (
        "uncertain",
        "open",
    )

    qr_path = f"/api/v1/gate-payments/{exit_capture.capture_id}"
    started = await api.post(qr_path)
    assert started.status_code == 200, started.text
    async with httpx.AsyncClient(base_url=provider.url) as wallet:
        out_trade_no = httpx.URL(started.json()["pay_url"]).path.rsplit("/", 1)[-1]
        paid = await wallet.post(f"/v1/payments/{out_trade_no}/pay")
        assert paid.status_code == 200, paid.text
    assert (await api.get(qr_path)).json()["status"] == "succeeded"
    await gate.wait_for(exit_capture, commands=2)
    assert gate.commands[str(exit_capture.capture_id)][1]["action"] == "open"

    exception = await _exception(runtime, exit_capture.capture_id)
    assert exception is not None and exception["status"] == "resolved"
    attendant = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))
    queue = await api.get(
        "/api/v1/operator/exceptions", params={"status": "open"}, headers=attendant
    )
    assert exception["id"] not in {e["id"] for e in queue.json()}
    async with runtime.pool.acquire() as conn:
        audit = await conn.fetch(
            "SELECT actor, detail FROM audit_log WHERE action = 'lane_exception.resolved' "
            "AND subject = $1",
            f"lane_exception:{exception['id']}",
        )
    assert [(a["actor"], a["detail"]["settled_by"]) for a in audit] == [("system", "gate_payment")]
    # Nothing is left for an operator to decide: deciding it now is refused.
    late = await api.post(
        f"/api/v1/operator/exceptions/{exception['id']}/resolve",
        json={"plate": owner.plate, "color": "blue"},
        headers=attendant,
    )
    assert (late.status_code, late.json()["error"]["code"]) == (409, "already_resolved")


async def test_a_camera_misreading_the_same_way_with_another_colour_charges_nobody(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    # Read 0.99 at both gates, but as a yellow plate: the bound plate is a blue one.
    owner = await make_driver(runtime, "皖ALC99D")
    await enter(runtime, gate, lot, owner.plate, confidence=0.99, color="yellow")
    command = await gate.decide(
        lot.code, "out1", gate.capture("out", owner.plate, confidence=0.99, color="yellow")
    )

    assert (command["action"], command["fee_fen"]) == ("hold", 1200)
    assert await _charges(runtime, owner) == []


# 2. Colour is part of a plate's identity.


async def test_a_yellow_plate_is_another_vehicle_than_the_blue_one_with_its_characters(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    owner = await make_driver(runtime, "浙X12345")  # bound blue
    # (backdate_entry moves every open stay of the plate: both have been here 90 minutes.)
    await enter(runtime, gate, lot, owner.plate, color="blue", parked_for=timedelta(0))
    await enter(runtime, gate, lot, owner.plate, color="yellow")  # a lorry, read right
    assert await _open_stays(runtime, lot) == [("浙X12345", "blue"), ("浙X12345", "yellow")]

    lorry = await gate.decide(lot.code, "out1", gate.capture("out", owner.plate, color="yellow"))
    assert (lorry["action"], lorry["fee_fen"]) == ("hold", 1200)
    assert await _charges(runtime, owner) == []

    car = await gate.decide(lot.code, "out1", gate.capture("out", owner.plate, color="blue"))
    assert (car["action"], car["fee_fen"]) == ("open", 1200)
    (charge,) = await _charges(runtime, owner)
    async with runtime.pool.acquire() as conn:
        color = await conn.fetchval(
            "SELECT plate_color FROM sessions WHERE id = $1", charge["session_id"]
        )
    assert (color, charge["amount_fen"]) == ("blue", 1200)


async def test_an_attendant_names_the_colour_of_the_vehicle_they_let_out(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """A lorry (yellow) and a car (blue, bound) with the same characters are parked; the lorry
    leaves unread and waits for an attendant. Before, the plate typed took the camera's colour
    (none: blue by the grammar) and charged the car's holder while the car was still inside."""
    plate = unique_plate()
    owner = await make_driver(runtime, plate)
    await enter(runtime, gate, lot, plate, color="blue", parked_for=timedelta(0))
    await enter(runtime, gate, lot, plate, color="yellow")
    held = gate.capture("out", None)
    assert (await gate.decide(lot.code, "out1", held))["action"] == "hold"
    exception = await _exception(runtime, held.capture_id)
    assert exception is not None
    attendant = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))
    resolve = f"/api/v1/operator/exceptions/{exception['id']}/resolve"

    unnamed = await api.post(resolve, json={"plate": plate}, headers=attendant)
    assert (unnamed.status_code, unnamed.json()["error"]["code"]) == (422, "invalid_request")
    assert "colour" in unnamed.text
    not_green = await api.post(resolve, json={"plate": plate, "color": "green"}, headers=attendant)
    assert not_green.status_code == 422
    assert await _open_stays(runtime, lot) == [(plate, "blue"), (plate, "yellow")]

    lorry = await api.post(resolve, json={"plate": plate, "color": "yellow"}, headers=attendant)
    assert lorry.status_code == 200, lorry.text
    assert (lorry.json()["action"], lorry.json()["fee_fen"]) == ("hold", 1200)  # pays at the gate
    assert await _charges(runtime, owner) == []
    async with runtime.pool.acquire() as conn:
        decided = await conn.fetchrow(
            "SELECT c.plate_color, c.plate_source, s.plate_color AS stay_color FROM captures c"
            " JOIN sessions s ON s.id = c.session_id WHERE c.capture_id = $1",
            held.capture_id,
        )
    assert tuple(decided.values()) == ("yellow", "operator", "yellow")
    # The car is still inside, its stay open; the lorry's waits for its payment at the gate.
    assert await _open_stays(runtime, lot) == [(plate, "blue"), (plate, "yellow")]


# 3. A margin from every score below certain.


async def test_two_parked_look_alikes_are_never_told_apart_by_a_read_that_is_not_certain(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    first = await make_driver(runtime, "浙U58871")
    second = await make_driver(runtime, "浙U5B871")
    for driver in (first, second):
        await enter(runtime, gate, lot, driver.plate)

    for confidence in (0.80, 0.95):
        exit_capture = gate.capture("out", second.plate, confidence=confidence)
        command = await gate.decide(lot.code, "out1", exit_capture)
        assert command["action"] == "hold", confidence
        exception = await _exception(runtime, exit_capture.capture_id)
        assert exception is not None and exception["reason"] == "ambiguous", confidence
    assert await _charges(runtime, first, second) == []
    assert len(await _open_stays(runtime, lot)) == 2

    # A certain read is the car it says, look-alike or not.
    sure = await gate.decide(lot.code, "out1", gate.capture("out", second.plate, confidence=0.99))
    assert sure["action"] == "open"
    assert [c["account_id"] for c in await _charges(runtime, first, second)] == [second.account_id]


# 4. A car with no entry record is never bent onto a parked look-alike or another province.


async def test_a_car_with_no_entry_record_is_not_the_parked_look_alike(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    parked = await make_driver(runtime, "浙W61245")
    await enter(runtime, gate, lot, parked.plate)

    # Another province's car, and a look-alike (5/S), read without certainty: each is a plate
    # of its own that is not parked here, so "no entry record" explains it.
    for stranger in ("皖W61245", "浙W6124S"):
        exit_capture = gate.capture("out", stranger, confidence=0.6)
        command = await gate.decide(lot.code, "out1", exit_capture)
        assert command["action"] == "hold", stranger
        exception = await _exception(runtime, exit_capture.capture_id)
        assert exception is not None and exception["reason"] == "no_entry", stranger
    assert await _open_stays(runtime, lot) == [(parked.plate, "blue")]
    assert await _charges(runtime, parked) == []


# 5. A fixed fee for a car with no entry record is never charged to a pay-later account.


async def test_the_no_entry_fixed_fee_is_paid_at_the_gate_never_charged_on_one_read(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient
) -> None:
    await set_car_park(runtime, lot, no_entry_policy="fixed_fee", no_entry_fee_fen=2000)
    driver = await make_driver(runtime, unique_plate())  # bound, not here

    command = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))

    assert (command["action"], command["fee_fen"]) == ("hold", 2000)
    assert command["payment_qr_url"].endswith(f"/pay/{command['capture_id']}")
    assert await _charges(runtime, driver) == []
    # The QR code takes the fixed fee, and nobody's debts: one read names nobody.
    started = await api.post(f"/api/v1/gate-payments/{command['capture_id']}")
    assert started.status_code == 200, started.text
    assert (started.json()["stay_fee_fen"], started.json()["debt_fen"]) == (2000, 0)


# The colour discount follows the plate type, not a camera's colour guess.


async def test_the_green_discount_needs_a_green_plate_not_a_cameras_guess(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient
) -> None:
    async with runtime.pool.acquire() as conn:
        await admin.create_tariff(
            conn,
            lot.id,
            effective_from=datetime.now(UTC) - timedelta(days=1),
            tariff=Tariff.hourly(free_minutes=0, hourly_fen=600).model_copy(
                update={"colour_discount_percent": {"green": 50}}
            ),
        )
    runtime.lanes.service.forget_tariffs(lot.id)

    # A blue 7-character plate the camera calls green: full price.
    blue = unique_plate()
    await enter(runtime, gate, lot, blue, confidence=0.99, color="green")
    held = await gate.decide(lot.code, "out1", gate.capture("out", blue, color="green"))
    assert (held["action"], held["fee_fen"]) == ("hold", 1200)
    started = await api.post(f"/api/v1/gate-payments/{held['capture_id']}")
    assert started.status_code == 200, started.text
    assert started.json()["stay_fee_fen"] == 1200, "the QR code asks what the gate showed"

    # A yellow plate's type read with doubt at the entry: quoted as the exit would price it,
    # by the plate's grammar (blue), not the guessed colour's discount.
    async with runtime.pool.acquire() as conn:
        await admin.create_tariff(
            conn,
            lot.id,
            effective_from=datetime.now(UTC) - timedelta(hours=12),
            tariff=Tariff.hourly(free_minutes=0, hourly_fen=600).model_copy(
                update={"colour_discount_percent": {"green": 50, "yellow": 50}}
            ),
        )
    runtime.lanes.service.forget_tariffs(lot.id)
    lorry = unique_plate()
    await enter(runtime, gate, lot, lorry, confidence=0.9, color="yellow")
    quoted = await api.get(
        f"/api/v1/car-parks/{lot.code}/quote", params={"plate": lorry, "color": "yellow"}
    )
    assert quoted.status_code == 200, quoted.text
    exit_ = await gate.decide(
        lot.code, "out1", gate.capture("out", lorry, confidence=0.9, color="yellow")
    )
    assert quoted.json()["fee_fen"] == exit_["fee_fen"] == 1200

    # A new-energy plate (8 characters), read green with certainty: half price.
    green = "浙AD" + unique_plate()[3:] + "1"
    await enter(runtime, gate, lot, green, confidence=0.99, color="green")
    half = await gate.decide(lot.code, "out1", gate.capture("out", green, color="green"))
    assert (half["action"], half["fee_fen"]) == ("hold", 600)


# A stay is charged only to the binding that existed when it began.


async def test_a_plate_bound_after_the_car_came_in_pays_at_the_gate(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    plate = unique_plate()
    command = await gate.decide(lot.code, "in1", gate.capture("in", plate))
    assert command["action"] == "open"
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE sessions SET entered_at = entered_at - interval '2 days 10 minutes' "
            "WHERE car_park_id = $1 AND plate = $2 AND status = 'open'",
            lot.id,
            plate,
        )
    late = await make_driver(runtime, plate)  # bound minutes before the stay ends

    command = await gate.decide(lot.code, "out1", gate.capture("out", plate))

    assert (command["action"], command["fee_fen"]) == ("hold", 5000 * 2 + 600)
    assert await _charges(runtime, late) == []


# The operator's side: confirm or reject with both frames.


def _framed(gate: GateProbe, direction: str, plate: str, confidence: float) -> Any:
    capture = gate.capture(direction, plate, confidence=confidence)
    return capture.model_copy(update={"image": base64.b64encode(FRAME).decode()})


async def _awaiting(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> tuple[Driver, list[dict[str, Any]]]:
    """A bound car that came in on a certain read and left on a doubtful one, both framed. The
    frames show another plate (皖M04698): the server's reader refutes the charge, which waits
    for an operator."""
    driver = await make_driver(runtime, unique_plate())
    entry = _framed(gate, "in", driver.plate, 0.99)
    assert (await gate.decide(lot.code, "in1", entry))["action"] == "open"
    await backdate_entry(runtime, lot, driver.plate, timedelta(minutes=90))
    command = await gate.decide(lot.code, "out1", _framed(gate, "out", driver.plate, 0.95))
    assert (command["action"], command["fee_fen"]) == ("open", 1200)

    async def referred() -> list[dict[str, Any]] | None:
        found = await _charges(runtime, driver)
        return found if found[0]["status"] == "awaiting_confirmation" else None

    # The verification starts the reader's process pool first: allow for it.
    return driver, await eventually(referred, timeout_s=90)


async def test_an_operator_confirms_a_charge_with_both_frames_and_it_is_queued_once(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    driver, (charge,) = await _awaiting(runtime, gate, lot)
    attendant = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))

    listed = (await api.get("/api/v1/operator/confirmations", headers=attendant)).json()
    (item,) = [c for c in listed if c["id"] == charge["id"]]
    assert (item["plate"], item["amount_fen"], item["exit"]["certain"]) == (
        driver.plate,
        1200,
        False,
    )
    # What the server's reader found: the frames show another plate.
    assert item["verification"]["verdict"] == "refuted"
    assert item["verification"]["exit"][0]["plate"] == "皖M04698"
    for read in (item["entry"], item["exit"]):
        image = await api.get(read["image_url"], headers=attendant)
        assert (image.status_code, image.content) == (200, FRAME)

    body = {"reason": "入口与出口为同一车辆"}
    url = f"/api/v1/operator/confirmations/{charge['id']}/confirm"
    confirmed = await api.post(url, json=body, headers=attendant)
    assert confirmed.status_code == 200, confirmed.text
    again = await api.post(url, json=body, headers=attendant)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "not_awaiting_confirmation"
    assert await _jobs(runtime, charge["id"]) == 1

    async def succeeded() -> bool:
        return (await _charges(runtime, driver))[0]["status"] == "succeeded"

    await eventually(succeeded)
    async with runtime.pool.acquire() as conn:
        audit = await conn.fetchval(
            "SELECT detail FROM audit_log WHERE action = 'charge.confirmed' AND subject = $1",
            f"charge:{charge['id']}",
        )
    assert audit["reason"] == body["reason"]


async def test_a_rejected_charge_charges_nobody_and_the_exit_waits_for_the_right_plate(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    driver, (charge,) = await _awaiting(runtime, gate, lot)
    attendant = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))
    before = await runtime.occupancy.get(lot.id)

    rejected = await api.post(
        f"/api/v1/operator/confirmations/{charge['id']}/reject",
        json={"reason": "出口车辆不是入场车辆"},
        headers=attendant,
    )

    assert rejected.status_code == 200, rejected.text
    decided = rejected.json()
    assert (decided["status"], decided["reopened"]) == ("rejected", True)
    assert await _charges(runtime, driver) == []
    assert await _open_stays(runtime, lot) == [(driver.plate, "blue")]
    assert await runtime.occupancy.get(lot.id) == before + 1
    async with runtime.pool.acquire() as conn:
        exception = await conn.fetchrow(
            "SELECT * FROM lane_exceptions WHERE id = $1", decided["exception_id"]
        )
        # The entry the operator disowned is taken on trust no more: neither certain, nor
        # proven (a proven entry is never read again when the stay's next exit is charged).
        reopened = await conn.fetchrow(
            "SELECT entry_certain, entry_proven FROM sessions WHERE id = $1", charge["session_id"]
        )
    assert (reopened["entry_certain"], reopened["entry_proven"]) == (False, False)
    assert (exception["reason"], exception["status"], exception["image"]) == (
        "rejected",
        "open",
        FRAME,
    )


async def test_not_my_car_on_a_charge_awaiting_confirmation_is_decided_in_the_dispute(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """The app shows the stay "awaiting the car park" with its "not my car" button: before,
    tapping it was refused as a debt, and the charge was collected once an operator confirmed
    it. Now the dispute holds it and decides it: the confirmation queue refuses it meanwhile.
    The driver right, the charge is deleted as the queue's reject deletes it: kept (cancelled),
    it held the reopened stay's one charge, and the car's real exit crashed the lane."""
    for outcome, statuses, accrued in (
        ("driver_right", (), 0),
        # Queued: the running worker may have collected it already.
        ("charge_stands", ("pending", "succeeded"), 1),
    ):
        driver, (charge,) = await _awaiting(runtime, gate, lot)
        as_driver = bearer(driver_token(app, driver.account_id))
        opened = await api.post(
            f"/api/v1/me/stays/{charge['session_id']}/dispute", headers=as_driver
        )
        assert opened.status_code == 200, opened.text
        assert (opened.json()["status"], opened.json()["held"]) == ("open", True)

        admin = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
        inside = await runtime.occupancy.get(lot.id)
        async with runtime.pool.acquire() as conn:
            exit_capture = await conn.fetchval(
                "SELECT exit_capture_id FROM sessions WHERE id = $1", charge["session_id"]
            )
        confirm = await api.post(
            f"/api/v1/operator/confirmations/{charge['id']}/confirm",
            json={"reason": "both frames show the bound car"},
            headers=admin,
        )
        assert (confirm.status_code, confirm.json()["error"]["code"]) == (409, "charge_disputed")
        queue = await api.get("/api/v1/operator/confirmations", headers=admin)
        assert charge["id"] not in {c["id"] for c in queue.json()}, "listed among the disputes"

        await decide_dispute(api, admin, opened.json()["id"], outcome)
        left = [c["status"] for c in await _charges(runtime, driver)]
        if outcome == "driver_right":
            assert left == [], "deleted, as the confirmation queue's reject deletes it"
        else:
            assert len(left) == 1 and left[0] in statuses, left
        assert await _jobs(runtime, charge["id"]) == accrued
        async with runtime.pool.acquire() as conn:
            lines = await conn.fetchval(
                "SELECT count(*) FROM ledger_entries WHERE charge_id = $1 AND kind = 'fee_accrued'",
                charge["id"],
            )
        assert lines == 2 * accrued, "accrued once when the charge stands, never when cancelled"
        # The driver right, the stay is disowned as the confirmation queue's reject does: the
        # doubtful exit read may have been another car's, and this one still inside.
        disowned = outcome == "driver_right"
        assert ((driver.plate, "blue") in await _open_stays(runtime, lot)) == disowned
        assert await runtime.occupancy.get(lot.id) == inside + disowned
        async with runtime.pool.acquire() as conn:
            rejected = await conn.fetchval(
                "SELECT count(*) FROM lane_exceptions WHERE capture_id = $1"
                " AND reason = 'rejected' AND status = 'open'",
                exit_capture,
            )
        assert rejected == (1 if disowned else 0)
        if disowned:
            # The car really leaves now: its stay, opened again, is charged at this exit.
            out = await gate.decide(lot.code, "out1", _framed(gate, "out", driver.plate, 0.99))
            assert (out["action"], out["fee_fen"]) == ("open", 1200)
            assert [c["session_id"] for c in await _charges(runtime, driver)] == [
                charge["session_id"]
            ]
            # The decided dispute keeps what was disputed, though its stay has a new exit.
            shown = (
                await api.get(f"/api/v1/operator/disputes/{opened.json()['id']}", headers=admin)
            ).json()
            assert (shown["kind"], shown["amount_fen"], shown["charge"]) == (
                "charge_discarded",
                1200,
                None,
            )
            assert shown["exit"]["capture_id"] == str(exit_capture)
            assert shown["exited_at"] is not None


async def test_the_car_of_a_stay_a_refuted_exit_closed_leaves_on_that_stay_once(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """A doubtful read of another car closed the stay, and the exit's frames showed that car:
    the charge awaits an operator. Before, the stay's own car leaving later was "no entry
    record": it paid the fixed fee at the gate, and the queue still held the stay's charge,
    which confirmed made it pay twice. Now its certain exit read takes the stay back: that
    charge is discarded, the earlier exit goes to the exception queue, and this exit charges
    the stay once."""
    await set_car_park(runtime, lot, no_entry_policy="fixed_fee", no_entry_fee_fen=2000)
    driver, (charge,) = await _awaiting(runtime, gate, lot)
    async with runtime.pool.acquire() as conn:  # the car leaves after the duplicate window
        earlier_exit = await conn.fetchval(
            """UPDATE sessions SET exited_at = exited_at - interval '10 minutes'
               WHERE id = $1 RETURNING exit_capture_id""",
            charge["session_id"],
        )
    inside = await runtime.occupancy.get(lot.id)

    out = await gate.decide(lot.code, "out1", _framed(gate, "out", driver.plate, 0.99))

    assert (out["action"], out["fee_fen"]) == ("open", 1200), "pay-later, not the fixed fee"
    [again] = await _charges(runtime, driver)
    assert (again["session_id"], again["amount_fen"]) == (charge["session_id"], 1200)
    assert again["id"] != charge["id"], "the unvouched exit's charge is discarded"
    assert await runtime.occupancy.get(lot.id) == inside, "counted out at the earlier exit"
    attendant = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))
    queue = await api.get("/api/v1/operator/confirmations", headers=attendant)
    assert charge["id"] not in {c["id"] for c in queue.json()}
    rejected = await _exception(runtime, earlier_exit)
    assert rejected is not None and (rejected["reason"], rejected["status"]) == (
        "rejected",
        "open",
    ), "the car that really left then is for an operator to find"


async def _left_since(runtime: Runtime, stay_id: int) -> None:
    """The stay's exit was ten minutes ago: a read of its plate now is no duplicate of it."""
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE sessions SET exited_at = exited_at - interval '10 minutes' WHERE id = $1",
            stay_id,
        )


async def test_only_the_vehicles_last_stay_is_taken_back(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """The car came back in and left on certain reads since the refuted exit: that stay is over,
    and taking it back would charge it again across the later one."""
    driver, (refuted,) = await _awaiting(runtime, gate, lot)
    await _left_since(runtime, refuted["session_id"])
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=5))
    later = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert later["action"] == "open"
    _, later_charge = await _charges(runtime, driver)
    await _left_since(runtime, later_charge["session_id"])

    out = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))

    assert out["action"] == "hold" and "无入场记录" in out["display"]
    first, _ = await _charges(runtime, driver)
    assert (first["id"], first["status"]) == (refuted["id"], "awaiting_confirmation")


async def test_a_stay_imported_at_go_live_is_taken_back_too(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """Its car was never counted in, so taking it back changes no count; before, that read as
    "nothing taken back", the reopened stay was left open and the exit was no entry record (at
    a fixed-fee car park, a second open stay the database refused on every resend)."""
    await set_car_park(runtime, lot, no_entry_policy="fixed_fee", no_entry_fee_fen=2000)
    driver = await make_driver(runtime, unique_plate())
    async with runtime.pool.acquire() as conn:
        await admin.seed_open_session(
            conn, lot.id, driver.plate, "blue", datetime.now(UTC), entry_proven=True
        )
    await backdate_entry(runtime, lot, driver.plate, timedelta(minutes=90))
    doubtful = await gate.decide(lot.code, "out1", _framed(gate, "out", driver.plate, 0.95))
    assert doubtful["action"] == "open"

    async def refuted() -> list[dict[str, Any]] | None:
        found = await _charges(runtime, driver)
        return found if found[0]["status"] == "awaiting_confirmation" else None

    [charge] = await eventually(refuted, timeout_s=90)
    await _left_since(runtime, charge["session_id"])

    out = await gate.decide(lot.code, "out1", _framed(gate, "out", driver.plate, 0.99))

    assert (out["action"], out["fee_fen"]) == ("open", 1200)
    assert [c["session_id"] for c in await _charges(runtime, driver)] == [charge["session_id"]]
    assert await _open_stays(runtime, lot) == []


async def _exit_decided_during(
    runtime: Runtime,
    gate: GateProbe,
    lot: Lot,
    plate: str,
    meanwhile: Callable[[asyncpg.Connection], Awaitable[object]],
) -> Any:
    """The lane decides the vehicle's certain exit read while another transaction, which did
    `meanwhile` first and holds its locks, commits. Most often the lane is waiting for one of
    those locks when it does; either way, the transaction committed first must win."""
    async with runtime.pool.acquire() as other, runtime.pool.acquire() as lane:
        first = other.transaction()
        await first.start()
        await meanwhile(other)
        gate_info = await lanes_repo.load_gate(lane, lot.code, "out1")
        assert gate_info is not None

        async def decide() -> Any:
            async with lane.transaction():
                return await runtime.lanes.service.decide(
                    lane,
                    gate_info,
                    gate.capture("out", plate),
                    operator_reading(plate, "blue"),
                    datetime.now(UTC),
                )

        deciding = asyncio.create_task(decide())
        await asyncio.sleep(0.5)
        await first.commit()
        return await deciding


async def test_a_dispute_opened_while_the_lane_takes_a_stay_back_keeps_its_charge(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """The driver's "not my car" committed while the lane waited for the charge's lock: before,
    the lane deleted the charge the dispute names and the decision raised. Now the dispute
    decides that charge, and the exit is no entry record."""
    driver, (charge,) = await _awaiting(runtime, gate, lot)
    await _left_since(runtime, charge["session_id"])

    async def dispute(conn: asyncpg.Connection) -> object:
        return await disputes.open_dispute(
            conn,
            charge_id=charge["id"],
            account_id=driver.account_id,
            via="app",
            style=message_style(runtime.settings),
        )

    decision = await _exit_decided_during(runtime, gate, lot, driver.plate, dispute)

    assert decision.outcome == "held_no_entry"
    assert [(c["id"], c["status"]) for c in await _charges(runtime, driver)] == [
        (charge["id"], "awaiting_confirmation")
    ]


async def test_an_exit_nobody_refuted_is_left_to_the_operator(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """A doubtful exit read with no frames to check it: the car may have left then and come back
    in unseen, so its certain read at the exit later takes nothing back (no entry record), and
    the charge stays for the operator."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=90))
    doubtful = await gate.decide(
        lot.code, "out1", gate.capture("out", driver.plate, confidence=0.95)
    )
    assert (doubtful["action"], doubtful["fee_fen"]) == ("open", 1200)
    [charge] = await _charges(runtime, driver)
    assert (charge["status"], charge["verification"]) == ("awaiting_confirmation", None)
    await _left_since(runtime, charge["session_id"])

    out = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))

    assert out["action"] == "hold" and "无入场记录" in out["display"]
    assert [(c["id"], c["status"]) for c in await _charges(runtime, driver)] == [
        (charge["id"], "awaiting_confirmation")
    ]


async def test_the_queue_warns_when_the_vehicle_left_again_paying_the_fixed_fee(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """Nobody refuted the doubtful exit, so the car's later exit with no entry record is asked
    the fixed fee at the gate. Confirming the first charge then would make it pay twice if that
    exit was another car's: the queue says the vehicle left again, and when."""
    await set_car_park(runtime, lot, no_entry_policy="fixed_fee", no_entry_fee_fen=2000)
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=90))
    await gate.decide(lot.code, "out1", gate.capture("out", driver.plate, confidence=0.95))
    [charge] = await _charges(runtime, driver)
    attendant = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))
    queued = (await api.get("/api/v1/operator/confirmations", headers=attendant)).json()
    assert [c["left_again_at"] for c in queued if c["id"] == charge["id"]] == [None]
    await _left_since(runtime, charge["session_id"])

    out = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))

    assert (out["action"], out["fee_fen"]) == ("hold", 2000)
    queued = (await api.get("/api/v1/operator/confirmations", headers=attendant)).json()
    [item] = [c for c in queued if c["id"] == charge["id"]]
    assert item["left_again_at"] is not None


async def test_an_exit_decided_later_never_ends_a_stay_that_began_after_it(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """A rejected exit's car left long ago. Before, an operator naming it later closed whatever
    stay of that vehicle was open then: one that began when the car came back in since, while
    the car was parked, charged pay-later with nobody confirming, and the car, inside, had no
    stay at its real exit. Now a capture decided again is decided as of when it reached us:
    the stay open then, which ended at that entry."""
    other = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, other.plate, parked_for=timedelta(hours=3))
    _, (charge,) = await _awaiting(runtime, gate, lot)
    attendant, exception_id = await reject_awaiting(runtime, app, api, lot, charge["id"])
    # The car in the exit frame was the other one: it comes back in before anyone looks.
    again = await gate.decide(lot.code, "in1", gate.capture("in", other.plate))
    assert again["action"] == "open"

    resolved = await api.post(
        f"/api/v1/operator/exceptions/{exception_id}/resolve",
        json={"plate": other.plate, "color": "blue"},
        headers=attendant,
    )

    # Its stay open then ended at that entry: this capture is that crossing, now settled.
    assert (resolved.status_code, resolved.json()["outcome"]) == (200, "duplicate_read")
    assert resolved.json()["gate_commanded"] is False
    assert (other.plate, "blue") in await _open_stays(runtime, lot), "the car is inside"
    assert await _charges(runtime, other) == []


async def test_a_stay_reopened_with_its_cancelled_charge_kept_can_be_charged_after_0048(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """Before the upheld "not my car" deleted a charge that was awaiting, it cancelled it and
    kept it on the stay it reopened: that stay's real exit then failed at the database (one
    charge per stay). Migration 0048 deletes such charges, never booked nor sent."""
    driver, (charge,) = await _awaiting(runtime, gate, lot)
    async with runtime.pool.acquire() as conn:
        # As the code before a5d775c left it.
        await conn.execute(
            """INSERT INTO charge_disputes (charge_id, session_id, amount_fen, account_id,
                                            car_park_id, via, held, status, decided_at)
               VALUES ($1, $2, 1200, $3, $4, 'app', true, 'driver_right', now())""",
            charge["id"],
            charge["session_id"],
            driver.account_id,
            lot.id,
        )
        await conn.execute("UPDATE charges SET status = 'cancelled' WHERE id = $1", charge["id"])
        await conn.execute(
            """UPDATE sessions SET status = 'open', exited_at = NULL, exit_capture_id = NULL,
                      account_id = NULL, settlement = NULL, fee_fen = NULL
               WHERE id = $1""",
            charge["session_id"],
        )
        await conn.execute(
            (MIGRATIONS_DIR / "0048_reopened_stays_cancelled_charges.sql").read_text("utf-8")
        )

    out = await gate.decide(lot.code, "out1", _framed(gate, "out", driver.plate, 0.99))

    assert (out["action"], out["fee_fen"]) == ("open", 1200)
    [again] = await _charges(runtime, driver)
    assert again["session_id"] == charge["session_id"] and again["id"] != charge["id"]


async def test_deciding_a_rejected_exit_again_commands_no_gate(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """The car of a rejected charge left long ago: the operator's plate moves the stay and the
    occupancy, and no open command is sent to a barrier with nobody waiting at it."""
    driver, (charge,) = await _awaiting(runtime, gate, lot)
    async with runtime.pool.acquire() as conn:
        exit_id = str(
            await conn.fetchval(
                "SELECT exit_capture_id FROM sessions WHERE id = $1", charge["session_id"]
            )
        )
    assert len(gate.commands[exit_id]) == 1
    attendant, exception_id = await reject_awaiting(runtime, app, api, lot, charge["id"])
    before = await runtime.occupancy.get(lot.id)

    resolved = await api.post(
        f"/api/v1/operator/exceptions/{exception_id}/resolve",
        json={"plate": driver.plate, "color": "blue"},
        headers=attendant,
    )

    assert resolved.status_code == 200, resolved.text
    # A command published after the resolution reaches the gate after anything it published.
    opened = await api.post(
        f"/api/v1/operator/car-parks/{lot.code}/gates/out1/open",
        json={"reason": "测试 barrier check"},
        headers=attendant,
    )
    assert opened.status_code == 200, opened.text
    await eventually(lambda: _has_command(gate, opened.json()["capture_id"]))
    assert len(gate.commands[exit_id]) == 1, gate.commands[exit_id]
    assert resolved.json()["gate_commanded"] is False
    assert await _open_stays(runtime, lot) == []
    assert await runtime.occupancy.get(lot.id) == before - 1


async def test_a_held_capture_the_car_went_through_on_another_commands_no_gate(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """An unreadable exit held; the car was read clearly on its next try and left, charged. The
    attendant naming the plate of the held capture later finds it a duplicate of that crossing:
    resolved, and no barrier lifted for whoever stands at it now (before, an open command)."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate)
    held = gate.capture("out", None)
    assert (await gate.decide(lot.code, "out1", held))["action"] == "hold"
    out = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert out["action"] == "open"
    attendant = await _resolved_as_a_duplicate(
        runtime, app, api, lot, held.capture_id, driver.plate
    )

    # A command published after the resolution reaches the gate after anything it published.
    opened = await api.post(
        f"/api/v1/operator/car-parks/{lot.code}/gates/out1/open",
        json={"reason": "测试 barrier check"},
        headers=attendant,
    )
    await eventually(lambda: _has_command(gate, opened.json()["capture_id"]))
    assert [c["action"] for c in gate.commands[str(held.capture_id)]] == ["hold"]
    assert len(await _charges(runtime, driver)) == 1
    # The gate sending the held capture again is answered with what it was told then: the
    # resolution commanded nothing (before, the open it did not send was stored and sent).
    await gate.send(lot.code, "out1", held)
    await gate.wait_for(held, commands=2, acks=2)
    assert [c["action"] for c in gate.commands[str(held.capture_id)]] == ["hold", "hold"]


@pytest.mark.parametrize("direction", ["in", "out"])
async def test_a_held_capture_resolved_after_the_car_passed_on_another_and_moved_on_is_a_duplicate(
    runtime: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    direction: str,
) -> None:
    """The held capture's car went through on its next try and has moved on since: in, then
    out again; or out, then back in. Before, naming it later opened a phantom stay and lifted
    the entry barrier for whoever stood there, or refused the exit's exception for ever (409)."""
    driver = await make_driver(runtime, unique_plate())
    if direction == "out":
        await enter(runtime, gate, lot, driver.plate)
    held = gate.capture(direction, None)
    gate_code = f"{direction}1"
    assert (await gate.decide(lot.code, gate_code, held))["action"] == "hold"
    passed = await gate.decide(lot.code, gate_code, gate.capture(direction, driver.plate))
    assert passed["action"] == "open"
    async with runtime.pool.acquire() as conn:  # held a while ago
        await conn.execute(
            "UPDATE captures SET received_at = received_at - interval '1 hour'"
            " WHERE capture_id = $1",
            held.capture_id,
        )
    # Moved on since: out again, or back in.
    moved = await gate.decide(
        lot.code,
        "out1" if direction == "in" else "in1",
        gate.capture("out" if direction == "in" else "in", driver.plate),
    )
    assert moved["action"] == "open"
    async with runtime.pool.acquire() as conn:
        stays = await conn.fetchval("SELECT count(*) FROM sessions WHERE plate = $1", driver.plate)
    inside = await runtime.occupancy.get(lot.id)

    await _resolved_as_a_duplicate(runtime, app, api, lot, held.capture_id, driver.plate)

    async with runtime.pool.acquire() as conn:
        assert (
            await conn.fetchval("SELECT count(*) FROM sessions WHERE plate = $1", driver.plate)
            == stays
        ), "no phantom stay"
    assert await runtime.occupancy.get(lot.id) == inside


async def _resolved_as_a_duplicate(
    runtime: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    lot: Lot,
    capture_id: object,
    plate: str,
) -> dict[str, str]:
    """An attendant names the held capture's vehicle and finds it passed on another capture:
    resolved, no gate commanded. The attendant's headers."""
    attendant = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))
    async with runtime.pool.acquire() as conn:
        exception_id = await conn.fetchval(
            "SELECT id FROM lane_exceptions WHERE capture_id = $1", capture_id
        )
    resolved = await api.post(
        f"/api/v1/operator/exceptions/{exception_id}/resolve",
        json={"plate": plate, "color": "blue"},
        headers=attendant,
    )
    assert resolved.status_code == 200, resolved.text
    assert (resolved.json()["outcome"], resolved.json()["gate_commanded"]) == (
        "duplicate_read",
        False,
    )
    return attendant


async def test_a_reject_committed_while_the_lane_waits_gives_it_the_reopened_stay(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """The lane's certain exit read waits for the refuted charge's lock while an operator's
    reject commits (the charge deleted, the stay reopened). Before, the lane decided on what it
    read before the wait: "no entry record", the car held beside its own open stay."""
    driver, (charge,) = await _awaiting(runtime, gate, lot)
    await _left_since(runtime, charge["session_id"])

    async def reject(conn: asyncpg.Connection) -> object:
        awaiting = await confirmations_repo.charge_for_update(conn, lot.operator_id, charge["id"])
        assert awaiting is not None
        await charges.discard_unconfirmed(conn, charge["id"])
        return await disown_stay(conn, awaiting)

    decision = await _exit_decided_during(runtime, gate, lot, driver.plate, reject)

    # Its entry disowned, the charge waits for a person; the stay is the car's own.
    assert (decision.outcome, decision.fee_fen, decision.session_id) == (
        "exited_awaiting_confirmation",
        1200,
        charge["session_id"],
    )


async def _has_command(gate: GateProbe, capture_id: str) -> bool:
    return bool(gate.commands.get(capture_id))


async def test_open_stays_entered_on_a_server_read_are_proven_no_more_after_the_colour_rule(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """Migration 0044: a stay opened on a server read before its colour had to be shown surely
    waits for the frames to show it; a camera's entry, and a green plate's, are as they were."""
    plates = {unique_plate(): "ocr", unique_plate(): "camera", "浙AD" + unique_plate()[2:]: "ocr"}
    for plate in plates:
        await enter(runtime, gate, lot, plate, color="green" if len(plate) == 8 else "blue")
    async with runtime.pool.acquire() as conn:
        for plate, source in plates.items():
            await conn.execute(
                """UPDATE captures c SET plate_source = $3 FROM sessions s
                   WHERE s.car_park_id = $1 AND s.plate = $2
                     AND c.capture_id = s.entry_capture_id""",
                lot.id,
                plate,
                source,
            )
            await conn.execute(
                "UPDATE sessions SET entry_proven = true WHERE car_park_id = $1 AND plate = $2",
                lot.id,
                plate,
            )
        sql = (MIGRATIONS_DIR / "0044_server_entries_colour_unproven.sql").read_text("utf-8")
        await conn.execute(sql)
        proven = {
            r["plate"]: r["entry_proven"]
            for r in await conn.fetch(
                "SELECT plate, entry_proven FROM sessions"
                " WHERE car_park_id = $1 AND plate = ANY($2)",
                lot.id,
                list(plates),
            )
        }
    blue_ocr, blue_camera, green_ocr = plates
    assert proven == {blue_ocr: False, blue_camera: True, green_ocr: True}
