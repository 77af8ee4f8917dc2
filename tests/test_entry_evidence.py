"""The entry side of the lane and what it does to charges (review 29): an entry is evidence
that a car parked or held here left unseen, or entered elsewhere, only when it is surely read
and comes after what it would end."""

from datetime import UTC, datetime, timedelta

import asyncpg

from parking.runtime import Runtime
from tests.conftest import Lot, create_lot, enter, make_driver, unique_plate
from tests.gates import GateProbe


async def _stays(runtime: Runtime, lot: Lot, plate: str) -> list[asyncpg.Record]:
    async with runtime.pool.acquire() as conn:
        rows: list[asyncpg.Record] = await conn.fetch(
            "SELECT * FROM sessions WHERE car_park_id = $1 AND plate = $2 ORDER BY entered_at",
            lot.id,
            plate,
        )
    return rows


async def test_a_doubtful_entry_read_never_makes_a_held_cars_stay_its_drivers_debt(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """X is held at the exit for ¥12.00 (no pay-later) and backs away to fetch money: X's car is
    still inside. A stranger's car comes in, read as X at 0.92 (taken, not certain). That read
    alone is the evidence X's car left unseen; yet X's stay became X's debt (blocked, notified),
    as only X's own entry and hold reads were checked for being proven. Now it goes to a
    person."""
    driver = await make_driver(runtime, unique_plate(), pay_later=False)
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE plate_bindings SET bound_at = bound_at - interval '1 day' WHERE plate = $1",
            driver.plate,
        )
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=90))
    held = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert (held["action"], held["fee_fen"]) == ("hold", 1200)
    stranger = await gate.decide(lot.code, "in1", gate.capture("in", driver.plate, confidence=0.92))
    assert stranger["action"] == "open"
    first = (await _stays(runtime, lot, driver.plate))[0]
    async with runtime.pool.acquire() as conn:
        debts = await conn.fetchval(
            "SELECT count(*) FROM debts WHERE account_id = $1", driver.account_id
        )
        blocked = await conn.fetchval(
            "SELECT blocked_for_arrears FROM accounts WHERE id = $1", driver.account_id
        )
    assert (first["settlement"], first["account_id"], debts, blocked) == (
        "unpaid_exit",
        None,
        0,
        False,
    ), "a doubtful entry read is no proof the held car left: an operator decides, no debt"


async def test_an_offline_entry_from_before_a_stays_hold_never_makes_that_hold_a_debt(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """The entry gate, offline, let in a car read as X 20 minutes ago; X's car, parked for 90
    minutes, is held at the exit now (¥12.00, no pay-later) and the entry is uploaded after. The
    hold on X's stay came after that entry: X's car had not left unseen before it (the entry was
    another car, or X's stay was still being read at the exit). Yet the stay was ended as missed
    at the entry and X made to owe the hold's fee while X's car stood at the barrier."""
    driver = await make_driver(runtime, unique_plate(), pay_later=False)
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE plate_bindings SET bound_at = bound_at - interval '1 day' WHERE plate = $1",
            driver.plate,
        )
    # Taken by the gate before X's entry capture reached us (a lower seq), uploaded later.
    upload = gate.capture("in", driver.plate).model_copy(
        update={
            "offline": True,
            "offline_action": "open",
            "captured_at": datetime.now(UTC) - timedelta(minutes=20),
        }
    )
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=90))
    held = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert (held["action"], held["fee_fen"]) == ("hold", 1200)
    await gate.decide(lot.code, "in1", upload)
    first = (await _stays(runtime, lot, driver.plate))[0]
    async with runtime.pool.acquire() as conn:
        debts = await conn.fetchval(
            "SELECT count(*) FROM debts WHERE account_id = $1", driver.account_id
        )
    assert (first["settlement"], debts) != ("debt", 1), (
        "a stay held at the exit after the entry was not missed by it: no debt"
    )


async def test_a_doubtful_entry_read_elsewhere_never_unmatches_the_cars_stay_here(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """X's car has been parked here for 3 hours (entry certain). At another car park a
    stranger's car is read as X at 0.92 (taken, not certain). X's car then leaves here, read
    as its own plate at 0.92: without that entry it matches X's stay; with it, the stay was a
    ghost "seen elsewhere" on a doubtful read, no candidate, and X's exit "no entry record" (a
    fixed fee where that is the policy) while X's stay stayed open. Only a certain entry
    elsewhere shows the car left."""
    plate = unique_plate()
    await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=3))
    elsewhere = await create_lot(runtime)
    await enter(runtime, gate, elsewhere, plate, parked_for=timedelta(minutes=30), confidence=0.92)
    leaving = gate.capture("out", plate, confidence=0.92)
    await gate.decide(lot.code, "out1", leaving)
    here = (await _stays(runtime, lot, plate))[0]
    async with runtime.pool.acquire() as conn:
        decided = await conn.fetchrow(
            "SELECT outcome, session_id FROM captures WHERE capture_id = $1", leaving.capture_id
        )
    assert decided["session_id"] == here["id"], (
        "a doubtful read at another car park is no proof X's car left here",
        dict(decided),
    )


async def test_a_double_read_at_the_entry_barrier_in_another_colour_is_one_stay(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """The entry camera reads the car twice within a second: blue surely, then yellow doubtfully
    (0.92). DESIGN.md step 1 dedupes by (car park, plate) within the window; the lane deduped
    by (plate, colour), so a second stay opened and the car was counted in twice (review 29).
    A doubtful read of characters that just came in, in another colour, is that car again."""
    plate = unique_plate()
    before = await runtime.occupancy.get(lot.id)
    first = await gate.decide(lot.code, "in1", gate.capture("in", plate))
    again = await gate.decide(
        lot.code, "in1", gate.capture("in", plate, confidence=0.92, color="yellow")
    )
    assert first["action"] == again["action"] == "open"
    stays = await _stays(runtime, lot, plate)
    after = await runtime.occupancy.get(lot.id)
    assert (len(stays), after - before) == (1, 1), [(s["plate_color"], s["status"]) for s in stays]
