"""Exits a gate decided alone while it could not reach the server, uploaded when the link
returned: charged once when the driver agreed to pay later, otherwise closed as unpaid and
handed to a person — never charged without consent, never left open."""

from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from gate_controller.protocol import Capture
from parking.runtime import Runtime
from tests.conftest import (
    Lot,
    backdate_entry,
    bearer,
    charges_of,
    enter,
    eventually,
    make_driver,
    make_staff,
    reject_awaiting,
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
    """The car leaves at `at` (the gate's clock) through the exit gate, which cannot reach us
    and lets it out (or sends it to the booth); the capture is uploaded when the gate is back.
    Made now, it takes the gate's next seq: before every live capture made after it."""
    return gate.capture("out", plate).model_copy(
        update={"offline": True, "offline_action": action, "captured_at": at}
    )


async def _stays(runtime: Runtime, lot: Lot, plate: str) -> list[asyncpg.Record]:
    async with runtime.pool.acquire() as conn:
        rows: list[asyncpg.Record] = await conn.fetch(
            """SELECT status, exited_at, settlement, exit_capture_id FROM sessions
               WHERE car_park_id = $1 AND plate = $2 ORDER BY entered_at""",
            lot.id,
            plate,
        )
    return rows


async def _charges_of(runtime: Runtime, lot: Lot, account_id: int) -> list[asyncpg.Record]:
    return [c for c in await charges_of(runtime, lot) if c["account_id"] == account_id]


async def _charged(runtime: Runtime, lot: Lot) -> list[tuple[int, str]]:
    return [(c["amount_fen"], c["status"]) for c in await charges_of(runtime, lot)]


# An offline exit uploaded after the car came back in: the re-entry superseded the stay whose
# exit it missed, and the upload is that stay's exit.


@pytest.mark.parametrize(
    ("action", "settlement", "charged"),
    [
        ("open", "pay_later", [(1200, "awaiting_confirmation")]),
        ("hold", "offline_booth", []),
    ],
)
async def test_an_offline_exit_uploaded_after_the_car_came_back_in_ends_the_earlier_stay(
    runtime: Runtime,
    gate: GateProbe,
    lot: Lot,
    action: str,
    settlement: str,
    charged: list[tuple[int, str]],
) -> None:
    """The upload ends the stay the re-entry found open, not the one the car is parked on now:
    that one is charged at its own exit, and the car counts inside throughout. Only the gate's
    clock puts the exit before the re-entry, so the earlier stay's charge waits for an operator
    (a car the gate sent to the booth awaits the booth, as any offline hold does)."""
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
        skews = await conn.fetchval(
            "SELECT count(*) FROM gate_clock_skews WHERE capture_id = $1", upload.capture_id
        )
    first, now_parked = await _stays(runtime, lot, driver.plate)
    assert (first["status"], first["settlement"]) == ("closed", settlement)
    assert first["exit_capture_id"] == upload.capture_id
    assert abs((first["exited_at"] - left_at).total_seconds()) < 1
    assert now_parked["status"] == "open", "the stay the car is parked on is not ended"
    assert skews == 0
    assert await _charged(runtime, lot) == charged

    leaves = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert (leaves["action"], leaves["fee_fen"]) == ("open", 0)  # back a moment ago: free
    assert await runtime.occupancy.get(lot.id) == inside - 1
    assert await _charged(runtime, lot) == charged


async def test_an_exit_a_clock_ahead_puts_just_after_the_re_entry_may_be_the_earlier_stays(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """The car left offline moments before it came back in, through a gate whose clock is a
    minute ahead (within the tolerance): the clock alone puts the exit after the re-entry.
    Nothing the gate did live says which stay it ended, so the earlier stay takes it and an
    operator confirms its charge; the stay the car is parked on is not ended for nothing, and
    the car's real exit from it is no "no entry record"."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=3))
    upload = _left_offline(gate, driver.plate, datetime.now(UTC) + timedelta(minutes=1))
    assert (await gate.decide(lot.code, "in1", gate.capture("in", driver.plate)))["action"] == (
        "open"
    )
    inside = await runtime.occupancy.get(lot.id)
    await gate.decide(lot.code, "out1", upload)
    first, now_parked = await _stays(runtime, lot, driver.plate)
    assert (first["status"], first["exit_capture_id"]) == ("closed", upload.capture_id)
    assert now_parked["status"] == "open", "the stay the car is parked on is not ended"
    assert await runtime.occupancy.get(lot.id) == inside
    [charge] = await _charges_of(runtime, lot, driver.account_id)
    assert charge["status"] == "awaiting_confirmation"

    leaves = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert (leaves["action"], leaves["fee_fen"]) == ("open", 0)
    assert await runtime.occupancy.get(lot.id) == inside - 1


async def test_an_exit_the_gates_live_captures_put_before_the_re_entry_is_charged_at_once(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """The exit gate answered another car live after our car left through it offline (a
    higher seq) and before our car came back in: the upload's exit is proven to be the earlier
    stay's, and its charge needs nobody."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=3))
    upload = _left_offline(gate, driver.plate, datetime.now(UTC) - timedelta(hours=1))
    other = (await make_driver(runtime, unique_plate())).plate
    await enter(runtime, gate, lot, other, parked_for=timedelta(minutes=10))
    assert (await gate.decide(lot.code, "out1", gate.capture("out", other)))["action"] == "open"
    await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
    await gate.decide(lot.code, "out1", upload)

    async def settled() -> list[tuple[int, str]]:
        rows = [
            (c["amount_fen"], c["status"])
            for c in await _charges_of(runtime, lot, driver.account_id)
        ]
        return rows if rows and all(status == "succeeded" for _, status in rows) else []

    assert await eventually(settled) == [(1200, "succeeded")]


async def test_an_exit_after_the_car_came_back_in_and_left_again_is_not_a_second_read_of_it(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """The car also left again before the upload: the upload is the earlier stay's exit, not a
    second read of the later one. An operator rejecting its charge leaves that stay closed (it
    ended by the re-entry's proof): never open again, nor counted in, for a car that is gone."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=3))
    upload = _left_offline(gate, driver.plate, datetime.now(UTC) - timedelta(hours=1))
    await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
    leaves = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert (leaves["action"], leaves["fee_fen"]) == ("open", 0)
    gone = await runtime.occupancy.get(lot.id)
    command = await gate.decide(lot.code, "out1", upload)
    assert command["fee_fen"] == 1200, command
    assert await runtime.occupancy.get(lot.id) == gone, "counted out once, by the live exit"
    first, _ = await _stays(runtime, lot, driver.plate)
    assert (first["status"], first["exit_capture_id"]) == ("closed", upload.capture_id)
    [charge] = await charges_of(runtime, lot)
    assert (charge["amount_fen"], charge["status"]) == (1200, "awaiting_confirmation")

    await reject_awaiting(runtime, app, api, lot, charge["id"])
    assert [s["status"] for s in await _stays(runtime, lot, driver.plate)] == ["closed"] * 2
    assert await runtime.occupancy.get(lot.id) == gone


async def test_a_rejected_exit_named_as_its_own_vehicle_ends_the_stay_it_is_parked_on(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """Only the gate's clock put the upload in the stay the re-entry superseded, and an
    operator rejects that charge: the exit was not that stay's. Naming its own vehicle on the
    rejected exit then ends the stay the car is parked on, priced and charged as the lane
    prices and charges any exit of it (its clock, behind that stay's entry, proven wrong: at
    the upload's receipt, not at the naming), and commands no gate. Before, the reject left
    the earlier stay holding the exit, so the naming was a duplicate of it and the stay parked
    on stayed open until it became a ghost."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=5))
    upload = _left_offline(gate, driver.plate, datetime.now(UTC) - timedelta(hours=4))
    assert (await gate.decide(lot.code, "in1", gate.capture("in", driver.plate)))["action"] == (
        "open"
    )
    await backdate_entry(runtime, lot, driver.plate, timedelta(hours=2))  # parked 2 h since
    await gate.decide(lot.code, "out1", upload)
    [charge] = await _charges_of(runtime, lot, driver.account_id)
    assert charge["status"] == "awaiting_confirmation"
    inside = await runtime.occupancy.get(lot.id)
    attendant, exception_id = await reject_awaiting(runtime, app, api, lot, charge["id"])
    first, now_parked = await _stays(runtime, lot, driver.plate)
    assert (first["status"], first["exit_capture_id"]) == ("closed", None)
    assert now_parked["status"] == "open"
    async with runtime.pool.acquire() as conn:  # uploaded an hour ago, named now
        await conn.execute(
            "UPDATE captures SET received_at = received_at - interval '1 hour' "
            "WHERE capture_id = $1",
            upload.capture_id,
        )

    answer = await api.post(
        f"/api/v1/operator/exceptions/{exception_id}/resolve",
        json={"plate": driver.plate, "color": "blue"},
        headers=attendant,
    )

    assert answer.status_code == 200, answer.text
    # Parked an hour when the upload reached us: priced then, not when the operator named it.
    assert (answer.json()["fee_fen"], answer.json()["gate_commanded"]) == (600, False)
    first, now_parked = await _stays(runtime, lot, driver.plate)
    assert (first["status"], first["exit_capture_id"]) == ("closed", None)
    assert (now_parked["status"], now_parked["exit_capture_id"]) == ("closed", upload.capture_id)
    assert await runtime.occupancy.get(lot.id) == inside - 1
    [stay_charge] = await _charges_of(runtime, lot, driver.account_id)
    # Its exit time unwitnessed: confirmed by an operator, as the lane leaves any such charge.
    assert (stay_charge["amount_fen"], stay_charge["status"]) == (600, "awaiting_confirmation")
    async with runtime.pool.acquire() as conn:
        charged_stay = await conn.fetchval(
            "SELECT id FROM sessions WHERE exit_capture_id = $1", upload.capture_id
        )
    assert stay_charge["session_id"] == charged_stay


async def test_a_rejected_exit_named_as_another_vehicle_ends_that_vehicles_stay(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """The rejected exit was another parked pay-later car's: naming it ends that car's stay,
    and that stay alone holds the crossing. Before, the stay the charge was rejected on kept
    the exit capture too: one crossing, two stays' exit."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=3))
    upload = _left_offline(gate, driver.plate, datetime.now(UTC) - timedelta(hours=1))
    await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
    other = (await make_driver(runtime, unique_plate())).plate
    await enter(runtime, gate, lot, other, parked_for=timedelta(minutes=10))
    await gate.decide(lot.code, "out1", upload)
    [charge] = await _charges_of(runtime, lot, driver.account_id)
    attendant, exception_id = await reject_awaiting(runtime, app, api, lot, charge["id"])

    answer = await api.post(
        f"/api/v1/operator/exceptions/{exception_id}/resolve",
        json={"plate": other, "color": "blue"},
        headers=attendant,
    )

    assert answer.status_code == 200, answer.text
    [others] = await _stays(runtime, lot, other)
    assert (others["status"], others["exit_capture_id"]) == ("closed", upload.capture_id)
    assert [
        (s["status"], s["exit_capture_id"]) for s in await _stays(runtime, lot, driver.plate)
    ] == [
        ("closed", None),
        ("open", None),
    ]


async def test_an_exit_the_gates_live_captures_put_after_the_re_entry_is_the_later_stays(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """The exit gate answered another car live after the re-entry and before this capture (a
    lower seq): whatever its clock says (3 h behind, inside the earlier stay), the car left on
    the stay it is parked on."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=5))
    await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
    other = (await make_driver(runtime, unique_plate())).plate
    await enter(runtime, gate, lot, other, parked_for=timedelta(minutes=10))
    assert (await gate.decide(lot.code, "out1", gate.capture("out", other)))["action"] == "open"
    inside = await runtime.occupancy.get(lot.id)
    upload = _left_offline(gate, driver.plate, datetime.now(UTC) - timedelta(hours=3))
    await gate.decide(lot.code, "out1", upload)
    first, later = await _stays(runtime, lot, driver.plate)
    assert (first["status"], first["exit_capture_id"]) == ("superseded", None)
    assert (later["status"], later["exit_capture_id"]) == ("closed", upload.capture_id)
    assert await runtime.occupancy.get(lot.id) == inside - 1


async def test_a_second_read_of_the_offline_crossing_is_a_duplicate(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """The offline gate read the leaving car twice, 5 s apart: the second upload is the same
    crossing, never the end of the stay the car is parked on now."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=3))
    left_at = datetime.now(UTC) - timedelta(hours=1)
    first_read = _left_offline(gate, driver.plate, left_at)
    second_read = _left_offline(gate, driver.plate, left_at + timedelta(seconds=5))
    await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
    inside = await runtime.occupancy.get(lot.id)
    assert (await gate.decide(lot.code, "out1", first_read))["fee_fen"] == 1200
    await gate.decide(lot.code, "out1", second_read)
    first, parked = await _stays(runtime, lot, driver.plate)
    assert first["exit_capture_id"] == first_read.capture_id
    assert parked["status"] == "open"
    assert await runtime.occupancy.get(lot.id) == inside
    assert len(await charges_of(runtime, lot)) == 1


async def _live_exit_received(runtime: Runtime, gate: GateProbe, lot: Lot, ago: timedelta) -> None:
    """Another car leaves through out1 live, answered `ago`."""
    other = (await make_driver(runtime, unique_plate())).plate
    await enter(runtime, gate, lot, other, parked_for=ago + timedelta(hours=1))
    live = gate.capture("out", other)
    assert (await gate.decide(lot.code, "out1", live))["action"] == "open"
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE captures SET received_at = now() - $2::interval WHERE capture_id = $1",
            live.capture_id,
            ago,
        )


async def _moved_back(
    runtime: Runtime, lot: Lot, plate: str, *, out: timedelta, back: timedelta
) -> None:
    """The vehicle's first stay ended `out` ago and its stay now began `back` ago."""
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            """UPDATE sessions SET exited_at = now() - $3::interval
               WHERE car_park_id = $1 AND plate = $2 AND status <> 'open'""",
            lot.id,
            plate,
            out,
        )
        await conn.execute(
            """UPDATE sessions SET entered_at = now() - $3::interval
               WHERE car_park_id = $1 AND plate = $2 AND status = 'open'""",
            lot.id,
            plate,
            back,
        )


async def test_a_second_read_is_matched_by_the_gates_clock_not_by_the_bounded_exit_time(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """The gate's clock was 200 s behind (within the tolerance): the first read's exit was
    bounded up to the gate's last live capture, 195 s from the second read's gate time. The
    second read is still that crossing: before, it ended the stay the car is parked on."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=3))
    await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
    await _moved_back(runtime, lot, driver.plate, out=timedelta(hours=1), back=timedelta(hours=1))
    await _live_exit_received(runtime, gate, lot, timedelta(minutes=90))
    gate_time = datetime.now(UTC) - timedelta(minutes=90, seconds=200)
    first_read = _left_offline(gate, driver.plate, gate_time)
    second_read = _left_offline(gate, driver.plate, gate_time + timedelta(seconds=5))
    inside = await runtime.occupancy.get(lot.id)
    await gate.decide(lot.code, "out1", first_read)
    await gate.decide(lot.code, "out1", second_read)
    first, parked = await _stays(runtime, lot, driver.plate)
    assert (first["status"], first["exit_capture_id"]) == ("closed", first_read.capture_id)
    assert parked["status"] == "open"
    assert await runtime.occupancy.get(lot.id) == inside
    assert len(await _charges_of(runtime, lot, driver.account_id)) == 1


async def test_an_offline_exit_a_live_capture_puts_after_the_entry_is_no_earlier_crossing(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """The car left live 3 h ago and came in again 2 h ago. The exit gate answered another car
    live 1 h ago, lost its link, and let our car out, its clock 3 h behind: next to the earlier
    live exit. That is no second read of it: the live capture proves the upload came after this
    stay began, so it ends it (before these checks, the stay stayed open with the car gone)."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=5))
    assert (await gate.decide(lot.code, "out1", gate.capture("out", driver.plate)))["action"]
    await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
    await _moved_back(runtime, lot, driver.plate, out=timedelta(hours=3), back=timedelta(hours=2))
    await _live_exit_received(runtime, gate, lot, timedelta(hours=1))
    inside = await runtime.occupancy.get(lot.id)
    upload = _left_offline(gate, driver.plate, datetime.now(UTC) - timedelta(hours=3, seconds=-30))
    await gate.decide(lot.code, "out1", upload)
    _, later = await _stays(runtime, lot, driver.plate)
    assert (later["status"], later["exit_capture_id"]) == ("closed", upload.capture_id)
    assert await runtime.occupancy.get(lot.id) == inside - 1


async def test_an_offline_exit_of_a_stay_owed_at_a_hold_only_records_its_exit(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """The car was held for its fee (nobody bound), then left through the gate once it could
    not reach us; its re-entry made that fee owed (an unpaid exit for an operator). The upload
    is that stay's exit: recorded on it, nothing owed twice, the stay parked on untouched."""
    plate = unique_plate()
    await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=3))
    held = await gate.decide(lot.code, "out1", gate.capture("out", plate))
    assert held["action"] == "hold" and held["fee_fen"]
    upload = _left_offline(gate, plate, datetime.now(UTC))
    await gate.decide(lot.code, "in1", gate.capture("in", plate))
    inside = await runtime.occupancy.get(lot.id)
    await gate.decide(lot.code, "out1", upload)
    first, parked = await _stays(runtime, lot, plate)
    assert (first["status"], first["settlement"]) == ("superseded", "unpaid_exit")
    assert first["exit_capture_id"] == upload.capture_id
    assert parked["status"] == "open"
    assert await runtime.occupancy.get(lot.id) == inside


async def test_a_blacklisted_offline_hold_within_a_superseded_stay_counts_nobody_in(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """Held for a person, the superseded stay stays as it was and the count with it."""
    admin = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=3))
    upload = _left_offline(gate, driver.plate, datetime.now(UTC) - timedelta(hours=1), "hold")
    await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
    listed = await api.post(
        "/api/v1/operator/blacklist",
        json={"plate": driver.plate, "color": "blue", "reason": "逃费"},
        headers=admin,
    )
    assert listed.status_code == 201, listed.text
    inside = await runtime.occupancy.get(lot.id)
    assert (await gate.decide(lot.code, "out1", upload))["action"] == "hold"
    assert await runtime.occupancy.get(lot.id) == inside
