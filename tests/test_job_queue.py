"""The outbox as a job queue (billing.queue): retries back off exponentially with jitter up to a
cap, a job is dead after its kind's attempts (a dead charge is pending, never a debt) until an
operator retries it, and done jobs, dead letters, sent notifications and old refresh tokens are
pruned after their retention while money is never pruned."""

import random
import statistics
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest

from billing import queue as job_queue
from parking import cli
from parking.retention import service as retention
from parking.runtime import Runtime
from parking.settings import Settings
from parking_dev import sandbox
from tests.conftest import (
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

# Money tables: pruning must never take a row from them.
MONEY = ("charges", "payments", "refunds", "debts", "ledger_entries")


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
    assert limits == {
        "charge": 20,
        "refund": 20,
        "notification": 8,
        "gate_command": 2,
        "feed_delivery": 10,
        "verify_charge": 10,
    }
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
        # Never claimed again, even when due: the worker passes over it. (Its in-memory count of
        # dead jobs is not asserted: the session's database holds other tests' jobs too.)
        async with runtime.pool.acquire() as conn:
            await conn.execute(
                "UPDATE outbox SET available_at = now() - interval '1 hour' WHERE id = $1",
                row["id"],
            )
        for _ in range(3):
            await runtime.outbox.run_once()
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


async def _prunable_world(runtime: Runtime, lot: Lot) -> dict[str, dict[str, int]]:
    """Rows on either side of each retention; returns {table: {label: id}}."""
    driver = await make_driver(runtime, unique_plate())
    ids: dict[str, dict[str, int]] = {"outbox": {}, "dead_letters": {}, "notifications": {}}
    ids["refresh_tokens"] = {}

    def ref() -> int:
        return 10**15 + uuid.uuid4().int % 10**12

    async with runtime.pool.acquire() as conn:
        # (label, kind, done days ago, dead days ago, created days ago)
        for label, kind, done, dead, created in (
            ("done_8d", "notification", 8, None, 8),
            ("done_6d", "notification", 6, None, 6),
            ("due_30d", "notification", None, None, 30),
            ("dead_notification_31d", "notification", None, 31, 31),
            ("dead_notification_29d", "notification", None, 29, 29),
            ("dead_gate_command_31d", "gate_command", None, 31, 31),
            ("dead_charge_400d", "charge", None, 400, 400),
            ("dead_refund_400d", "refund", None, 400, 400),
        ):
            ids["outbox"][label] = await conn.fetchval(
                """INSERT INTO outbox (kind, ref_id, created_at, available_at, done_at, dead_at,
                                       locked_until)
                   VALUES ($1, $2, now() - make_interval(days => $5),
                           now() + interval '1 day', now() - make_interval(days => $3),
                           now() - make_interval(days => $4), now() + interval '1 day')
                   RETURNING id""",
                kind,
                ref(),
                done,
                dead,
                created,
            )
        for label, days in (("31d", 31), ("29d", 29)):
            ids["dead_letters"][label] = await conn.fetchval(
                """INSERT INTO dead_letters (source, reason, payload_size, received_at)
                   VALUES ('test', 'prune test', 0, now() - make_interval(days => $1))
                   RETURNING id""",
                days,
            )
        for label, status, days in (
            ("sent_91d", "sent", 91),
            ("sent_89d", "sent", 89),
            ("pending_200d", "pending", 200),
            ("failed_200d", "failed", 200),
        ):
            ids["notifications"][label] = await conn.fetchval(
                """INSERT INTO notifications (account_id, kind, source_key, body, status,
                                              created_at, sent_at)
                   VALUES ($1, 'test', $2, 'prune test', $3, now() - make_interval(days => $4),
                           CASE WHEN $3 = 'sent' THEN now() - make_interval(days => $4) END)
                   RETURNING id""",
                driver.account_id,
                f"prune-test:{uuid.uuid4()}",
                status,
                days,
            )
        for label, expires_days, revoked_days in (
            ("expired_8d", -8, None),
            ("expired_6d", -6, None),
            ("revoked_8d", 20, 8),
            ("revoked_6d", 20, 6),
            ("live", 20, None),
        ):
            ids["refresh_tokens"][label] = await conn.fetchval(
                """INSERT INTO refresh_tokens (token_hash, subject, family, expires_at,
                                               revoked_at)
                   VALUES ($1, 'account:0', gen_random_uuid(),
                           now() + make_interval(days => $2),
                           now() - make_interval(days => $3))
                   RETURNING id""",
                uuid.uuid4().hex,
                expires_days,
                revoked_days,
            )
    return ids


PRUNED = {
    "outbox": {"done_8d", "dead_notification_31d", "dead_gate_command_31d"},
    "dead_letters": {"31d"},
    "notifications": {"sent_91d"},
    "refresh_tokens": {"expired_8d", "revoked_8d"},
}


async def test_pruning_deletes_what_outlived_its_retention_and_never_money(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    # A real charged exit: its job is done; backdated, the job goes and its money stays.
    driver = await make_driver(runtime, unique_plate())
    await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=90))

    async def charged() -> list[object]:
        rows = await charges_of(runtime, lot)
        return rows if rows and rows[0]["status"] == "succeeded" else []

    [charge] = await eventually(charged)
    ids = await _prunable_world(runtime, lot)
    async with runtime.pool.acquire() as conn:

        async def job_done() -> object:
            return await conn.fetchval(
                """UPDATE outbox SET done_at = now() - interval '8 days'
                   WHERE kind = 'charge' AND ref_id = $1 AND done_at IS NOT NULL RETURNING id""",
                charge["id"],
            )

        charge_job = await eventually(job_done)
        money_before = {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in MONEY}

    counts = await retention.prune(
        runtime.pool, retention.Retention.from_settings(runtime.settings), datetime.now(UTC)
    )
    assert set(counts) == {
        "done_jobs",
        "dead_jobs",
        "dead_letters",
        "sent_notifications",
        "refresh_tokens",
        "feed_deliveries",
    }

    async with runtime.pool.acquire() as conn:
        for table, rows in ids.items():
            left = {
                r["id"]
                for r in await conn.fetch(
                    f"SELECT id FROM {table} WHERE id = ANY($1)",
                    list(rows.values()),
                )
            }
            gone = {label for label, row_id in rows.items() if row_id not in left}
            assert gone == PRUNED[table], table
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE id = $1", charge_job) == 0
        assert await conn.fetchval("SELECT status FROM charges WHERE id = $1", charge["id"]) == (
            "succeeded"
        )
        assert await conn.fetchval(
            "SELECT count(*) FROM ledger_entries WHERE session_id = $1", charge["session_id"]
        )
        # Even with every retention long past, no money row goes (in a transaction undone after).
        tr = conn.transaction()
        await tr.start()
        try:
            far = datetime.now(UTC) + timedelta(days=365 * 100)
            await job_queue.prune(
                conn, done_before=far, dead_before=far, prunable_dead_kinds=["notification"]
            )
            for table, before in money_before.items():
                after = await conn.fetchval(f"SELECT count(*) FROM {table}")
                assert after == before, table
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM outbox WHERE id = ANY($1)",
                    [ids["outbox"]["dead_charge_400d"], ids["outbox"]["dead_refund_400d"]],
                )
                == 2
            ), "dead money jobs wait for an operator"
        finally:
            await tr.rollback()


async def test_parking_prune_prints_its_counts_as_json(
    settings: Settings, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings.database_url = database_url
    await cli._once(settings, cli._prune)
    printed = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {
        "done_jobs",
        "dead_jobs",
        "dead_letters",
        "sent_notifications",
        "refresh_tokens",
        "feed_deliveries",
    }
    assert all(isinstance(v, int) and v >= 0 for v in printed.values())
    assert cli.build_parser().parse_args(["prune"]).command == "prune"
