"""Exits a gate decided alone while it could not reach the server, uploaded when the link
returned: charged once when the driver agreed to pay later, otherwise closed as unpaid and
handed to a person — never charged without consent, never left open."""

from datetime import UTC, datetime, timedelta

import httpx
from fastapi import FastAPI

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
