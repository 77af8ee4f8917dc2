"""The outbox as a job queue (billing.queue): retries back off exponentially with jitter up to a
cap, and a job is dead after its kind's attempts (a dead charge is pending, never a debt) until
an operator retries it."""

import asyncio
import random
import statistics
import uuid
from datetime import timedelta

import httpx

from billing import queue as job_queue
from parking.runtime import Runtime
from parking.settings import Settings
from parking_dev import sandbox
from tests.conftest import (
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


def test_backoff_doubles_up_to_the_cap_with_equal_jitter() -> None:
    rng = random.Random(16)  # seeded: the same draws every run, so this cannot flake
    base, cap = 0.5, 300.0
    for attempt in range(1, 16):
        full = min(cap, base * 2 ** (attempt - 1))
        draws = [job_queue.backoff_s(attempt, base, cap, rng) for _ in range(2000)]
        # Never sooner than half the delay, never later than all of it.
        assert all(full / 2 <= d <= full for d in draws), attempt
        # Spread over the whole upper half (jitter), centred on three quarters.
        assert len(set(draws)) == len(draws)
        assert min(draws) < full * 0.52 and max(draws) > full * 0.98
        assert abs(statistics.fmean(draws) / full - 0.75) < 0.02
    # A huge attempt number neither overflows nor passes the cap.
    assert cap / 2 <= job_queue.backoff_s(10**6, base, cap, rng) <= cap
    # Without an rng of its own it still draws within bounds.
    assert 0.25 <= job_queue.backoff_s(1, base, cap) <= 0.5


def test_attempt_limits_per_kind_come_from_the_settings() -> None:
    from parking.runtime import job_limits

    limits = job_limits(Settings(job_max_attempts_gate_command=2))
    assert limits == {"charge": 20, "refund": 20, "notification": 8, "gate_command": 2}
    policy = job_queue.RetryPolicy(max_attempts=limits)
    assert policy.limit("gate_command") == 2
    assert policy.limit("something new") == job_queue.DEFAULT_MAX_ATTEMPTS


async def test_a_charge_is_dead_after_its_attempts_not_a_debt_and_charged_once_when_retried(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    settings.job_max_attempts_charge = 3
    faults = sandbox.FaultConfig(error_rate=1.0)
    async with provider_and_runtime(settings, database_url, faults) as (runtime, url):
        lot = await create_lot(runtime)
        driver = await make_driver(runtime, unique_plate())
        await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))
        [charge] = await charges_of(runtime, lot)

        async def job() -> dict[str, object]:
            async with runtime.pool.acquire() as conn:
                row = await conn.fetchrow(
                    "SELECT * FROM outbox WHERE kind = 'charge' AND ref_id = $1", charge["id"]
                )
            assert row is not None
            return dict(row)

        async def dead() -> dict[str, object] | None:
            row = await job()
            return row if row["dead_at"] is not None else None

        row = await eventually(dead, timeout_s=20)
        assert row["attempts"] == 3 and row["done_at"] is None
        assert "503" in str(row["last_error"])
        assert runtime.outbox.stats.dead == 1
        # Never claimed again: well past the backoff the next attempt would have had.
        await asyncio.sleep(0.6)
        assert (await job())["attempts"] == 3
        [charge] = await charges_of(runtime, lot)
        assert charge["status"] == "pending"
        async with runtime.pool.acquire() as conn:
            debts = await conn.fetchval(
                "SELECT count(*) FROM debts WHERE account_id = $1", driver.account_id
            )
            blocked = await conn.fetchval(
                "SELECT blocked_for_arrears FROM accounts WHERE id = $1", driver.account_id
            )
        assert (debts, blocked) == (0, False), "a dead charge is not the driver's debt"

        # The provider is back and an operator retries: charged, once, with the same key.
        async with httpx.AsyncClient() as client:
            (await client.post(f"{url}/_sandbox/faults", json={})).raise_for_status()
        async with runtime.pool.acquire() as conn:
            retried = await job_queue.retry_dead(conn, int(str(row["id"])))
            assert retried is not None and retried["attempts"] == 3
            assert await job_queue.retry_dead(conn, int(str(row["id"]))) is None, "not dead now"
            await conn.execute("SELECT pg_notify('outbox', '')")

        async def charged() -> list[object]:
            rows = await charges_of(runtime, lot)
            return rows if rows[0]["status"] == "succeeded" else []

        await eventually(charged, timeout_s=20)
        order = await provider_order(url, charge["idempotency_key"])
        assert order is not None and order["status"] == "succeeded"
        final = await job()
        assert final["done_at"] is not None and final["attempts_at_retry"] == 3
        # The retry asked the provider first (attempt 4 > 1), as every retry does.
        assert int(str(final["attempts"])) >= 4


async def test_a_job_whose_worker_never_finishes_it_ends_dead_without_running(
    runtime: Runtime,
) -> None:
    """A lease that ran out counts as an attempt: a job that kills its worker every time does
    not come back for ever."""
    limit = runtime.settings.job_max_attempts_gate_command
    async with runtime.pool.acquire() as conn:
        job_id = await conn.fetchval(
            """INSERT INTO outbox (kind, ref_id, attempts, available_at, locked_until)
               VALUES ('gate_command', $1, $2, now() - interval '1 minute',
                       now() - interval '1 second') RETURNING id""",
            10**15 + uuid.uuid4().int % 10**12,
            limit,
        )
        await conn.execute("SELECT pg_notify('outbox', '')")

    async def dead() -> object:
        async with runtime.pool.acquire() as conn:
            return await conn.fetchrow(
                "SELECT * FROM outbox WHERE id = $1 AND dead_at IS NOT NULL", job_id
            )

    row = await eventually(dead)
    assert row["attempts"] == limit + 1 and "lease" in row["last_error"]
    assert runtime.outbox.stats.failures == 0, "it was not run"
