"""Exits a gate decided alone while it could not reach the server, uploaded when the link
returned: charged once when the driver agreed to pay later, otherwise closed as unpaid and
handed to a person — never charged without consent, never left open."""

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI

from gate_controller.protocol import Capture
from parking.runtime import Runtime
from tests.conftest import (
    Lot,
    bearer,
    charges_of,
    enter,
    eventually,
    make_driver,
    make_staff,
    staff_token,
    unique_plate,
)
from tests.gates import GateProbe


async def test_offline_exit_of_a_pay_later_driver_is_charged_once_at_the_time_it_left(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=100))
    left_at = datetime.now(UTC) - timedelta(minutes=40)  # stayed 60 minutes: one hour, ¥6
    upload = gate.capture("out", driver.plate).model_copy(
        update={"offline": True, "offline_action": "open", "captured_at": left_at}
    )
    command = await gate.decide(lot.code, "out1", upload)
    assert (command["action"], command["fee_fen"]) == ("open", 600)
    await gate.send(lot.code, "out1", upload)  # the gate resends it: the same effect, once
    await gate.wait_for(upload, commands=2, acks=2)
    assert gate.commands[str(upload.capture_id)][1]["fee_fen"] == 600

    async def charged() -> list:
        rows = await charges_of(runtime, lot)
        return rows if rows and rows[0]["status"] == "succeeded" else []

    rows = await eventually(charged)
    assert [r["amount_fen"] for r in rows] == [600]
    async with runtime.pool.acquire() as conn:
        stay = await conn.fetchrow(
            "SELECT status, exited_at, settlement FROM sessions WHERE id = $1",
            rows[0]["session_id"],
        )
        stored = await conn.fetchrow(
            "SELECT offline, offline_action FROM captures WHERE capture_id = $1",
            upload.capture_id,
        )
    assert (stay["status"], stay["settlement"]) == ("closed", "pay_later")
    assert abs((stay["exited_at"] - left_at).total_seconds()) < 1
    assert (stored["offline"], stored["offline_action"]) == (True, "open")


async def test_offline_exit_without_consent_to_charge_is_closed_unpaid_for_a_person(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    plate = unique_plate()  # not bound: nobody agreed to be charged
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    before = await runtime.occupancy.get(lot.id)
    upload = gate.capture("out", plate).model_copy(
        update={"offline": True, "offline_action": "open"}
    )
    command = await gate.decide(lot.code, "out1", upload)
    assert command["action"] == "open", "the car is gone: nothing to hold"
    async with runtime.pool.acquire() as conn:
        stay = await conn.fetchrow(
            "SELECT status, settlement, fee_fen FROM sessions WHERE exit_capture_id = $1",
            upload.capture_id,
        )
        exception = await conn.fetchrow(
            "SELECT reason, status, candidates FROM lane_exceptions WHERE capture_id = $1",
            upload.capture_id,
        )
    assert (stay["status"], stay["settlement"], stay["fee_fen"]) == (
        "closed",
        "offline_unpaid",
        1200,
    )
    assert (exception["reason"], exception["status"]) == ("offline_exit", "open")
    assert exception["candidates"][0]["held_because"] == "held_unbound"
    assert await charges_of(runtime, lot) == []
    assert await runtime.occupancy.get(lot.id) == before - 1


async def test_an_unpaid_offline_exit_is_settled_at_the_booth_never_decided_again_by_plate(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """Its car left while the gate was offline and its fee is owed: deciding the capture again
    by plate would command a gate nobody waits at and drop the fee; the booth takes it."""
    plate = unique_plate()
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    upload = gate.capture("out", plate).model_copy(
        update={"offline": True, "offline_action": "open"}
    )
    assert (await gate.decide(lot.code, "out1", upload))["action"] == "open"
    async with runtime.pool.acquire() as conn:
        exception_id = await conn.fetchval(
            "SELECT id FROM lane_exceptions WHERE capture_id = $1", upload.capture_id
        )
    attendant = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))

    answer = await api.post(
        f"/api/v1/operator/exceptions/{exception_id}/resolve",
        json={"plate": plate, "color": "blue"},
        headers=attendant,
    )

    assert answer.status_code == 409, answer.text
    assert answer.json()["error"]["code"] == "not_a_plate_question"
    async with runtime.pool.acquire() as conn:
        status = await conn.fetchval(
            "SELECT status FROM lane_exceptions WHERE id = $1", exception_id
        )
        settlement = await conn.fetchval(
            "SELECT settlement FROM sessions WHERE exit_capture_id = $1", upload.capture_id
        )
    assert (status, settlement) == ("open", "offline_unpaid")


async def test_a_live_exit_of_the_same_kind_still_holds(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    plate = unique_plate()
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    command = await gate.decide(lot.code, "out1", gate.capture("out", plate))
    assert (command["action"], command["fee_fen"]) == ("hold", 1200)


def _left_offline(gate: GateProbe, plate: str, at: datetime, action: str = "open") -> Capture:
    """The car leaves at `at` through the exit gate, which cannot reach us and lets it out (or
    sends it to the booth); the capture is uploaded when the gate is back."""
    return gate.capture("out", plate).model_copy(
        update={"offline": True, "offline_action": action, "captured_at": at}
    )


@pytest.mark.parametrize(
    ("action", "settlement"), [("open", "pay_later"), ("hold", "offline_booth")]
)
async def test_an_offline_exit_uploaded_after_the_car_came_back_in_ends_the_earlier_stay(
    runtime: Runtime, gate: GateProbe, lot: Lot, action: str, settlement: str
) -> None:
    """The exit gate could not reach us when the car left; the car came back in before the gate
    uploaded that exit. The upload is the end of the stay the re-entry found still open, not of
    the one the car is parked on now: that stay stays open and is charged once, at its own exit,
    and the car is counted inside throughout. A car the gate sent to the booth awaits the booth
    for the earlier stay, as any offline hold does."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=3))
    left_at = datetime.now(UTC) - timedelta(hours=1)  # the first stay: two hours, ¥12
    upload = _left_offline(gate, driver.plate, left_at, action)
    back_in = await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
    assert back_in["action"] == "open"
    inside = await runtime.occupancy.get(lot.id)
    command = await gate.decide(lot.code, "out1", upload)
    assert command["fee_fen"] == 1200, command
    assert await runtime.occupancy.get(lot.id) == inside, "the car is still inside"
    async with runtime.pool.acquire() as conn:
        stays = await conn.fetch(
            """SELECT status, exited_at, settlement, exit_capture_id FROM sessions
               WHERE car_park_id = $1 AND plate = $2 ORDER BY entered_at""",
            lot.id,
            driver.plate,
        )
        skews = await conn.fetchval(
            "SELECT count(*) FROM gate_clock_skews WHERE capture_id = $1", upload.capture_id
        )
    first, now_parked = stays
    assert (first["status"], first["settlement"]) == ("closed", settlement)
    assert first["exit_capture_id"] == upload.capture_id
    assert abs((first["exited_at"] - left_at).total_seconds()) < 1
    assert now_parked["status"] == "open", "the stay the car is parked on is not ended"
    assert skews == 0, "the gate's clock was right"

    leaves = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert (leaves["action"], leaves["fee_fen"]) == ("open", 0)  # back a moment ago: free
    assert await runtime.occupancy.get(lot.id) == inside - 1
    if action == "hold":
        assert await charges_of(runtime, lot) == [], "never pay-later after a booth hold"
        return

    async def settled() -> list:
        rows = await charges_of(runtime, lot)
        return rows if rows and all(r["status"] == "succeeded" for r in rows) else []

    assert [r["amount_fen"] for r in await eventually(settled)] == [1200]


async def test_an_offline_exit_uploaded_after_the_car_came_back_in_and_left_again_is_charged(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """The same, with the car gone again before the upload: the upload is not a second read
    of that later exit but the end of the earlier stay, charged once beside the later one."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=3))
    upload = _left_offline(gate, driver.plate, datetime.now(UTC) - timedelta(hours=1))
    await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
    inside = await runtime.occupancy.get(lot.id)
    # The exit gate is back: its live captures count on from the one it kept (a higher seq).
    leaves = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert (leaves["action"], leaves["fee_fen"]) == ("open", 0)
    command = await gate.decide(lot.code, "out1", upload)
    assert command["fee_fen"] == 1200, command
    assert await runtime.occupancy.get(lot.id) == inside - 1, "counted out once, by the live exit"
    async with runtime.pool.acquire() as conn:
        first = await conn.fetchrow(
            """SELECT status, settlement, exit_capture_id FROM sessions
               WHERE car_park_id = $1 AND plate = $2 ORDER BY entered_at LIMIT 1""",
            lot.id,
            driver.plate,
        )
    assert (first["status"], first["settlement"]) == ("closed", "pay_later")
    assert first["exit_capture_id"] == upload.capture_id

    async def settled() -> list:
        rows = await charges_of(runtime, lot)
        return rows if rows and all(r["status"] == "succeeded" for r in rows) else []

    assert [r["amount_fen"] for r in await eventually(settled)] == [1200]
