"""Charges after exit through a real HTTP sandbox provider that fails like a real one: accepted
asynchronously, answers lost, 5xx, timeouts, declines; one provider order per session."""

from datetime import timedelta

import asyncpg

from billing import ledger
from parking.runtime import Runtime
from parking.settings import Settings
from parking_dev import sandbox
from tests.conftest import (
    SANDBOX_FAULTS,
    Lot,
    charges_of,
    create_lot,
    eventually,
    exit_after,
    make_driver,
    provider_and_runtime,
    provider_order,
    unique_plate,
)
from tests.gates import GateProbe


async def _settled(runtime: Runtime, lot: Lot, n: int) -> list[asyncpg.Record]:
    rows = await charges_of(runtime, lot)
    return rows if len(rows) == n and all(r["status"] != "pending" for r in rows) else []


async def test_5xx_lost_answers_and_timeouts_are_retried_with_one_order_per_session(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    faults = sandbox.FaultConfig(
        error_rate=0.3,
        lost_response_rate=0.3,
        timeout_rate=0.1,
        timeout_s=0.6,
        lost_notification_rate=1.0,
        processing_delay_s=0.01,
        seed=11,
    )
    settings.payment_provider_timeout_s = 0.3
    # About 6 attempts in 10 fail: a charge may need a dozen. Waits capped low, so that all of
    # its attempts fit in the test's 40 s (doubling from 0.05 s, the 11th came after 51 s).
    settings.job_backoff_cap_s = 0.5
    async with provider_and_runtime(settings, database_url, faults) as (runtime, url):
        lot = await create_lot(runtime)
        drivers = [await make_driver(runtime, unique_plate()) for _ in range(8)]
        for driver in drivers:
            command = await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=90))
            assert (command["action"], command["fee_fen"]) == ("open", 1200)

        rows = await eventually(lambda: _settled(runtime, lot, 8), timeout_s=40)
        assert {r["status"] for r in rows} == {"succeeded"}
        for row in rows:
            order = await provider_order(url, row["idempotency_key"])
            assert order is not None and order["status"] == "succeeded"
            assert order["amount_fen"] == row["amount_fen"] == 1200
            assert order["order_id"] == row["provider_ref"]
        assert len({r["idempotency_key"] for r in rows}) == 8, "one provider order per session"
        assert runtime.outbox.stats.retries > 0, "the injected faults were exercised"
        async with runtime.pool.acquire() as conn:
            assert await ledger.is_balanced(conn)
            assert await ledger.balance(conn, ledger.revenue(lot.id)) == -8 * 1200
            assert await ledger.balance(conn, ledger.clearing("sandbox")) >= 8 * 1200
            for driver in drivers:
                assert await ledger.balance(conn, ledger.receivable(driver.account_id)) == 0
            # Every charged exit told its driver, once.
            sent = await conn.fetchval(
                "SELECT count(*) FROM notifications WHERE kind = 'exit_charged' "
                "AND account_id = ANY($1)",
                [d.account_id for d in drivers],
            )
        assert sent == 8


async def test_declined_charge_becomes_a_debt_and_blocks_pay_later(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    driver = await make_driver(runtime, unique_plate())
    async with runtime.pool.acquire() as conn:
        agreement_no = await conn.fetchval(
            "SELECT agreement_no FROM pay_later_agreements WHERE id = $1", driver.agreement_id
        )
    # The session-wide sandbox declines agreements listed in its fault config.
    SANDBOX_FAULTS.declined_agreements.add(agreement_no)

    first = await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))
    assert first["action"] == "open"
    rows = await eventually(lambda: _settled(runtime, lot, 1))
    assert rows[0]["status"] == "failed"
    async with runtime.pool.acquire() as conn:
        blocked = await conn.fetchval(
            "SELECT blocked_for_arrears FROM accounts WHERE id = $1", driver.account_id
        )
        debt = await conn.fetchrow("SELECT * FROM debts WHERE account_id = $1", driver.account_id)
        owed = await ledger.balance(conn, ledger.receivable(driver.account_id))
        assert await ledger.is_balanced(conn)
    assert blocked is True
    assert (debt["amount_fen"], debt["charge_id"]) == (600, rows[0]["id"])
    assert owed == 600, "the debt stays on the driver's receivable"

    # The next visit shows the debt at the entry, and the exit holds with fee + debt.
    second = await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))
    assert second["action"] == "hold", "arrears block pay-later at the next exit"
    assert second["fee_fen"] == 600 + 600
    assert any("欠费" in line for line in second["display"])


async def test_unknown_outcome_is_asked_of_the_provider_never_turned_into_a_debt(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    # Every answer is lost after the charge is applied and no notification ever comes: only
    # an order query can tell what happened.
    faults = sandbox.FaultConfig(lost_response_rate=1.0, lost_notification_rate=1.0, seed=3)
    async with provider_and_runtime(settings, database_url, faults) as (runtime, url):
        lot = await create_lot(runtime)
        driver = await make_driver(runtime, unique_plate())
        command = await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))
        assert command["action"] == "open"
        rows = await eventually(lambda: _settled(runtime, lot, 1), timeout_s=20)
        assert rows[0]["status"] == "succeeded"
        async with runtime.pool.acquire() as conn:
            blocked = await conn.fetchval(
                "SELECT blocked_for_arrears FROM accounts WHERE id = $1", driver.account_id
            )
            assert await ledger.balance(conn, ledger.receivable(driver.account_id)) == 0
        assert blocked is False
        assert (await provider_order(url, rows[0]["idempotency_key"]) or {})["status"] == (
            "succeeded"
        )


async def test_provider_down_keeps_the_charge_pending_and_retrying_not_in_debt(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    faults = sandbox.FaultConfig(error_rate=1.0)
    async with provider_and_runtime(settings, database_url, faults) as (runtime, _):
        lot = await create_lot(runtime)
        driver = await make_driver(runtime, unique_plate())
        await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))

        # The attempt count the worker writes to the charge (not its in-memory counter, which
        # goes up before that write).
        async def attempted_three_times() -> list[asyncpg.Record] | None:
            rows = await charges_of(runtime, lot)
            return rows if rows and rows[0]["attempts"] >= 3 else None

        rows = await eventually(attempted_three_times, timeout_s=10)
        assert [r["status"] for r in rows] == ["pending"]
        assert rows[0]["attempts"] >= 3 and "503" in rows[0]["last_error"]
        async with runtime.pool.acquire() as conn:
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM debts WHERE account_id = $1", driver.account_id
                )
                == 0
            )
