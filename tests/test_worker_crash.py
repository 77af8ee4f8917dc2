"""Exactly-once charging when the charge worker dies with SIGKILL at its dangerous points.

The charge worker runs here as its own operating-system process (`parking worker`), exactly as
in production, and is killed with SIGKILL, so nothing gets to clean up: no `finally`, no
rollback beyond what PostgreSQL does for a dropped connection, and the HTTP request it had in
flight is cut off mid-way. The lane service, the sandbox provider and the test itself keep
running in the test process, against the machine's real PostgreSQL, Redis and MQTT broker.

Each kill is timed by polling observable state, never by sleeping: the outbox row's lease, the
provider's order book, our charges table, and a spy that counts the requests hanging inside
the sandbox's injected faults. A second worker then starts with the faults off, and every test
proves the same outcome: one provider order per charge, the charge succeeded and settled once
in the ledger, the driver owes nothing, the ledger balances.

Every test gets a database of its own: a worker process serves every job in its database, so a
job left behind by another test would otherwise reach this test's provider and skew its counts.
"""

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from billing import ledger
from parking.infra import Endpoints
from parking.runtime import ProviderEndpoint, Runtime, running
from parking.settings import Settings
from parking_dev import sandbox
from tests.conftest import (
    ADMIN_DSN,
    MQTT_URL,
    REDIS_URL,
    Driver,
    Lot,
    charges_of,
    create_lot,
    eventually,
    exit_after,
    make_driver,
    provider_order,
    unique_plate,
)
from tests.gates import GateProbe

REPO_ROOT = Path(__file__).resolve().parent.parent
FEE_FEN = 1200  # 90 minutes at ¥6 per started hour (create_lot's tariff)
# The faults once the trouble is over; no API server runs in these tests, so every outcome is
# learned by order query, never by notification.
NORMAL_FAULTS: dict[str, Any] = {"processing_delay_s": 0.01, "lost_notification_rate": 1.0}
# The first worker's HTTP timeout outlasts every injected hang, so it is still waiting for the
# provider when it is killed (it never gives up by itself).
PROVIDER_TIMEOUT_S = 30.0
# (a) The request hangs this long before the provider applies it. Long enough that the second
# worker normally settles the charge first, short enough to wait the orphan out in the test.
HANG_BEFORE_APPLY_S = 8.0
# (b) The provider applies the charge, then holds its answer this long (cut short when the
# sandbox stops at the end of the test).
HANG_AFTER_APPLY_S = 20.0
SETTLE_TIMEOUT_S = 30.0


@pytest.fixture
async def own_database_url() -> AsyncIterator[str]:
    """A fresh database for one test (migrated by the runtime on start), dropped after it."""
    name = f"parking_crash_{uuid.uuid4().hex[:10]}"
    admin_conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin_conn.execute(f'CREATE DATABASE "{name}"')
        base, _, _ = ADMIN_DSN.rpartition("/")
        yield f"{base}/{name}"
    finally:
        await admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin_conn.close()


class FaultSpy:
    """Counts the calls into one of the sandbox's fault gates (`fail_before_effect`: every
    create request, before it takes effect; `fail_after_effect`: after it did) and how many of
    them are still inside it, i.e. hanging in an injected timeout."""

    def __init__(self, state: sandbox.Sandbox, method: str) -> None:
        self._inner: Callable[..., Awaitable[Any]] = getattr(state, method)
        self.entered = 0
        self.left = 0

    async def __call__(self, *args: Any) -> Any:
        self.entered += 1
        try:
            return await self._inner(*args)
        finally:
            self.left += 1

    @property
    def inside(self) -> int:
        return self.entered - self.left


@dataclass
class Setup:
    runtime: Runtime
    provider_url: str
    secret: str
    state: sandbox.Sandbox
    # Create requests (POST /v1/charges) as they reach the provider, before any effect...
    before_apply: FaultSpy
    # ...and after the provider applied them, before it answers.
    after_apply: FaultSpy


@contextlib.asynccontextmanager
async def lanes_without_worker(
    settings: Settings,
    database_url: str,
    faults: sandbox.FaultConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Setup]:
    """A sandbox provider of its own (spied on) and the lane service with NO outbox worker: exits
    commit their charge and its outbox job, and nothing in this process ever executes them."""
    secret = uuid.uuid4().hex
    async with sandbox.running(faults, secret=secret) as (url, app):
        state: sandbox.Sandbox = app.state.sandbox
        before_apply = FaultSpy(state, "fail_before_effect")
        after_apply = FaultSpy(state, "fail_after_effect")
        monkeypatch.setattr(state, "fail_before_effect", before_apply)
        monkeypatch.setattr(state, "fail_after_effect", after_apply)
        eps = Endpoints(database_url, REDIS_URL, MQTT_URL)
        async with running(
            settings, eps, ProviderEndpoint(url, secret), outbox_worker=False
        ) as runtime:
            yield Setup(runtime, url, secret, state, before_apply, after_apply)


class WorkerProcess:
    """`parking worker` in a child process, its output in a file (a pipe nobody reads could
    fill up and block it)."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-6000:]

    def check_alive(self) -> None:
        if self.proc.returncode is not None:
            raise AssertionError(
                f"worker exited by itself ({self.proc.returncode}):\n{self.output()}"
            )

    async def kill_9(self) -> None:
        self.check_alive()
        self.proc.send_signal(signal.SIGKILL)
        assert await self.proc.wait() == -signal.SIGKILL


@contextlib.asynccontextmanager
async def worker_process(
    setup: Setup, settings: Settings, database_url: str, log_path: Path
) -> AsyncIterator[WorkerProcess]:
    """Starts `parking worker` against the test's servers; stops it (killing it if it will not
    stop) unless the test already killed it. Its output is printed, so a failing test shows it."""
    env = {
        **os.environ,
        "PARKING_DATABASE_URL": database_url,
        "PARKING_REDIS_URL": REDIS_URL,
        "PARKING_MQTT_URL": MQTT_URL,
        "PARKING_MQTT_TOPIC_PREFIX": settings.mqtt_topic_prefix,
        "PARKING_REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "PARKING_PAYMENT_PROVIDER_URL": setup.provider_url,
        "PARKING_PAYMENT_PROVIDER_SECRET": setup.secret,
        "PARKING_PAYMENT_PROVIDER_TIMEOUT_S": str(PROVIDER_TIMEOUT_S),
        # A dead worker's claim is taken over a second after it was made.
        "PARKING_WORKER_LEASE_S": "1",
        "PARKING_CHARGE_QUERY_AFTER_S": "0.2",
        "PARKING_CHARGE_RETRY_BASE_S": "0.05",
        "PARKING_WORKER_POLL_INTERVAL_S": "0.1",
        "PARKING_PUBLIC_BASE_URL": "http://127.0.0.1:9",
        "PARKING_LOG_LEVEL": "WARNING",
    }
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "parking.cli",
            "worker",
            cwd=REPO_ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
        )
    worker = WorkerProcess(proc, log_path)
    try:
        yield worker
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        print(f"--- {log_path.name} ---\n{worker.output()}")


async def pay_later_exits(setup: Setup, gate: GateProbe, n: int) -> tuple[Lot, list[Driver]]:
    """n pay-later drivers leave after 90 minutes: each gate opens at once, and each exit has
    committed a pending charge and its outbox job that nobody has touched."""
    runtime = setup.runtime
    lot = await create_lot(runtime)
    drivers = [await make_driver(runtime, unique_plate()) for _ in range(n)]
    for driver in drivers:
        command = await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=90))
        assert (command["action"], command["fee_fen"]) == ("open", FEE_FEN), command
    rows = await charges_of(runtime, lot)
    assert [r["status"] for r in rows] == ["pending"] * n
    jobs = await outbox_jobs(runtime, rows)
    assert [(j["attempts"], j["locked_until"], j["done_at"]) for j in jobs] == [(0, None, None)] * n
    return lot, drivers


async def outbox_jobs(runtime: Runtime, rows: list[asyncpg.Record]) -> list[asyncpg.Record]:
    async with runtime.pool.acquire() as conn:
        return await conn.fetch(
            "SELECT * FROM outbox WHERE kind = 'charge' AND ref_id = ANY($1) ORDER BY ref_id",
            [r["id"] for r in rows],
        )


async def settlements(runtime: Runtime, charge_id: int) -> int:
    """How many ledger transactions settled the charge."""
    async with runtime.pool.acquire() as conn:
        count: int = await conn.fetchval(
            "SELECT count(DISTINCT transaction_id) FROM ledger_entries "
            "WHERE charge_id = $1 AND kind = 'charge_settled'",
            charge_id,
        )
    return count


async def all_succeeded(
    runtime: Runtime, lot: Lot, n: int, worker: WorkerProcess
) -> list[asyncpg.Record]:
    worker.check_alive()
    rows = await charges_of(runtime, lot)
    return rows if len(rows) == n and all(r["status"] == "succeeded" for r in rows) else []


async def set_faults(provider_url: str, faults: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=provider_url) as http:
        response = await http.post("/_sandbox/faults", json=faults)
        response.raise_for_status()


async def assert_charged_once(setup: Setup, lot: Lot, drivers: list[Driver]) -> None:
    """Each exit was charged exactly once, and our books say so exactly once."""
    runtime = setup.runtime
    rows = await charges_of(runtime, lot)
    assert [r["status"] for r in rows] == ["succeeded"] * len(drivers)
    # One order per session at the provider, ever: its books hold this test's orders only.
    orders = setup.state.book.orders()
    assert sorted(o.out_trade_no for o in orders) == sorted(r["idempotency_key"] for r in rows)
    for row in rows:
        order = await provider_order(setup.provider_url, row["idempotency_key"])
        assert order is not None and order["status"] == "succeeded", order
        assert order["amount_fen"] == row["amount_fen"] == FEE_FEN
        assert order["order_id"] == row["provider_ref"]
        assert await settlements(runtime, row["id"]) == 1, "settled exactly once"
    assert all(j["done_at"] is not None for j in await outbox_jobs(runtime, rows))
    async with runtime.pool.acquire() as conn:
        assert await ledger.is_balanced(conn)
        for driver in drivers:
            assert await ledger.balance(conn, ledger.receivable(driver.account_id)) == 0
        assert await ledger.balance(conn, ledger.revenue(lot.id)) == -FEE_FEN * len(drivers)
        collected = await conn.fetchval(
            "SELECT sum(amount_fen) FROM ledger_entries WHERE charge_id = ANY($1) "
            "AND ledger_account = $2",
            [r["id"] for r in rows],
            ledger.clearing("sandbox"),
        )
        told = await conn.fetchval(
            "SELECT count(*) FROM notifications WHERE kind = 'exit_charged' "
            "AND account_id = ANY($1)",
            [d.account_id for d in drivers],
        )
    assert collected == FEE_FEN * len(drivers)
    assert told == len(drivers), "each driver told once"


async def test_worker_killed_while_its_charge_request_hangs_before_the_provider_applied_it(
    settings: Settings,
    own_database_url: str,
    gate: GateProbe,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """(a) Killed after claiming the job and sending the charge, before the provider applied it.

    Proves impossible: a charge lost because the dead worker's claim is never taken over; a
    second order because the restarted worker sends again and the dead worker's orphaned
    request is applied later as well; a charge booked twice.
    """
    n = 3
    faults = sandbox.FaultConfig(
        timeout_rate=1.0,
        timeout_s=HANG_BEFORE_APPLY_S,
        processing_delay_s=0.01,
        lost_notification_rate=1.0,
    )
    async with lanes_without_worker(settings, own_database_url, faults, monkeypatch) as setup:
        runtime = setup.runtime
        lot, drivers = await pay_later_exits(setup, gate, n)
        rows = await charges_of(runtime, lot)

        async with worker_process(
            setup, settings, own_database_url, tmp_path / "worker-1.log"
        ) as first:

            async def hanging_before_apply() -> bool:
                first.check_alive()
                jobs = await outbox_jobs(runtime, rows)
                claimed = all(j["locked_until"] is not None for j in jobs)
                return claimed and setup.before_apply.inside == n and not setup.state.book.orders()

            await eventually(hanging_before_apply, timeout_s=SETTLE_TIMEOUT_S)
            await first.kill_9()

        # The crash left every charge pending with a claimed job, and the provider with nothing.
        assert [r["status"] for r in await charges_of(runtime, lot)] == ["pending"] * n
        jobs = await outbox_jobs(runtime, rows)
        assert [(j["attempts"], j["done_at"]) for j in jobs] == [(1, None)] * n
        for row in rows:
            assert await provider_order(setup.provider_url, row["idempotency_key"]) is None
        hanging = setup.before_apply.inside
        assert hanging == n, "the dead worker's requests are still hanging at the provider"

        await set_faults(setup.provider_url, NORMAL_FAULTS)
        async with worker_process(
            setup, settings, own_database_url, tmp_path / "worker-2.log"
        ) as second:
            await eventually(
                lambda: all_succeeded(runtime, lot, n, second), timeout_s=SETTLE_TIMEOUT_S
            )
            await assert_charged_once(setup, lot, drivers)
            refs = {r["id"]: r["provider_ref"] for r in await charges_of(runtime, lot)}

            # The dead worker's requests reach the provider when their hang ends: the provider
            # finds each key's order and makes no second one; our books do not move.
            async def orphans_done() -> bool:
                return setup.before_apply.inside == 0

            await eventually(orphans_done, timeout_s=HANG_BEFORE_APPLY_S + SETTLE_TIMEOUT_S)
            await assert_charged_once(setup, lot, drivers)
            assert {r["id"]: r["provider_ref"] for r in await charges_of(runtime, lot)} == refs


async def test_worker_killed_after_the_provider_applied_the_charge_before_booking_the_answer(
    settings: Settings,
    own_database_url: str,
    gate: GateProbe,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """(b) Killed while the provider's answer is on its way: the money is taken, our books do
    not know it yet.

    Proves impossible: the charge staying pending (or turning into a debt) although the driver
    paid; the restarted worker sending the charge again instead of asking for the order; the
    settlement booked twice. The restarted worker must learn the outcome by order query.
    """
    n = 3
    faults = sandbox.FaultConfig(
        slow_after_apply_rate=1.0,
        timeout_s=HANG_AFTER_APPLY_S,
        processing_delay_s=0.01,
        lost_notification_rate=1.0,
    )
    async with lanes_without_worker(settings, own_database_url, faults, monkeypatch) as setup:
        runtime = setup.runtime
        lot, drivers = await pay_later_exits(setup, gate, n)
        rows = await charges_of(runtime, lot)
        keys = [r["idempotency_key"] for r in rows]

        async with worker_process(
            setup, settings, own_database_url, tmp_path / "worker-1.log"
        ) as first:

            async def applied_but_unanswered() -> bool:
                first.check_alive()
                orders = [setup.state.book.order(key) for key in keys]
                final = all(o is not None and o.status == "succeeded" for o in orders)
                ours = [r["status"] for r in await charges_of(runtime, lot)]
                return final and setup.after_apply.inside == n and ours == ["pending"] * n

            await eventually(applied_but_unanswered, timeout_s=SETTLE_TIMEOUT_S)
            await first.kill_9()

        # The provider has taken the money; our books have not moved past the fee accrual.
        assert [r["status"] for r in await charges_of(runtime, lot)] == ["pending"] * n
        for row in rows:
            order = await provider_order(setup.provider_url, row["idempotency_key"])
            assert order is not None and order["status"] == "succeeded"
            assert await settlements(runtime, row["id"]) == 0
        creates = setup.before_apply.entered
        assert creates == n

        await set_faults(setup.provider_url, NORMAL_FAULTS)
        async with worker_process(
            setup, settings, own_database_url, tmp_path / "worker-2.log"
        ) as second:
            await eventually(
                lambda: all_succeeded(runtime, lot, n, second), timeout_s=SETTLE_TIMEOUT_S
            )
            await assert_charged_once(setup, lot, drivers)
        creates = setup.before_apply.entered
        assert creates == n, "the restarted worker asked for the order, it did not resend"
        assert all(j["attempts"] >= 2 for j in await outbox_jobs(runtime, rows))


async def test_charges_committed_while_no_worker_runs_are_charged_once_when_one_starts(
    settings: Settings,
    own_database_url: str,
    gate: GateProbe,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """(c) Exits while no charge worker runs at all (all crashed, or a deploy in progress).

    Proves impossible: a gate waiting for the worker; a charge lost because it was only in a
    worker's memory; a charge made twice when the worker catches up on the backlog.
    """
    n = 4
    faults = sandbox.FaultConfig(processing_delay_s=0.01, lost_notification_rate=1.0)
    async with lanes_without_worker(settings, own_database_url, faults, monkeypatch) as setup:
        runtime = setup.runtime
        # The gates opened, the charges and jobs are committed, and no request left for the
        # provider (pay_later_exits checks the first two).
        lot, drivers = await pay_later_exits(setup, gate, n)
        assert setup.before_apply.entered == 0 and not setup.state.book.orders()

        async with worker_process(
            setup, settings, own_database_url, tmp_path / "worker.log"
        ) as worker:
            await eventually(
                lambda: all_succeeded(runtime, lot, n, worker), timeout_s=SETTLE_TIMEOUT_S
            )
            await assert_charged_once(setup, lot, drivers)
        creates = setup.before_apply.entered
        assert creates == n, "one create request per charge"
