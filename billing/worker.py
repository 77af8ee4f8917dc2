"""The outbox worker: runs queued charges and notifications after their transaction committed.

Jobs are claimed with FOR UPDATE SKIP LOCKED and a lease, so several workers can run and a
crashed one's jobs come back after the lease. A charge is sent with its session's idempotency
key on every attempt, so a retry after a lost answer cannot charge twice.
"""

import asyncio
import contextlib
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import asyncpg
import structlog

from billing import charges, notifications
from billing.providers import ChargeResult, PaymentProvider, ProviderUnavailable

log = structlog.get_logger(__name__)


@dataclass
class WorkerStats:
    charged: int = 0
    retries: int = 0
    arrears: int = 0
    notified: int = 0
    # Jobs that raised something unexpected (a count: a list would grow for ever).
    failures: int = 0


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    kind: str
    ref_id: int
    attempts: int


class OutboxWorker:
    def __init__(
        self,
        pool: asyncpg.Pool,
        provider: PaymentProvider,
        notifier: notifications.Notifier,
        *,
        timezone: str = "Asia/Shanghai",
        max_attempts: int = 6,
        retry_base_s: float = 0.5,
        poll_interval_s: float = 0.5,
        lease_s: float = 60.0,
        batch: int = 8,
    ) -> None:
        self.pool = pool
        self.provider = provider
        self.notifier = notifier
        self.tz = ZoneInfo(timezone)
        self.max_attempts = max_attempts
        self.retry_base_s = retry_base_s
        self.poll_interval_s = poll_interval_s
        self.lease_s = lease_s
        self.batch = batch
        self.stats = WorkerStats()
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Works until cancelled; LISTEN wakes it as soon as a job is committed."""

        def wake(*_: object) -> None:
            self._wake.set()

        async with self.pool.acquire() as listener:
            await listener.add_listener("outbox", wake)
            try:
                while True:
                    try:
                        claimed = await self.run_once()
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                        # The database went away: jobs stay in the outbox; try again shortly.
                        log.exception("outbox.pass_failed")
                        claimed = 0
                    if claimed == 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
                        self._wake.clear()
            finally:
                await listener.remove_listener("outbox", wake)

    async def run_once(self) -> int:
        """Claims and runs one batch of due jobs; returns how many were claimed."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """UPDATE outbox SET locked_until = now() + make_interval(secs => $2),
                          attempts = attempts + 1
                   WHERE id IN (SELECT id FROM outbox
                                WHERE done_at IS NULL AND available_at <= now()
                                  AND (locked_until IS NULL OR locked_until < now())
                                ORDER BY available_at, id LIMIT $1
                                FOR UPDATE SKIP LOCKED)
                   RETURNING id, kind, ref_id, attempts""",
                self.batch,
                self.lease_s,
            )
        jobs = [Job(**dict(r)) for r in rows]
        await asyncio.gather(*(self._run_job(job) for job in jobs))
        return len(jobs)

    async def _run_job(self, job: Job) -> None:
        try:
            if job.kind == "charge":
                await self._charge(job)
            else:
                await self._notify(job)
        except Exception as exc:  # a job's failure must not stop the others
            log.exception("outbox.job_failed", job_id=job.id, kind=job.kind)
            self.stats.failures += 1
            with contextlib.suppress(Exception):
                # Unexpected errors back off to the capped delay; the job stays visible.
                await self._retry_later(job, f"{type(exc).__name__}: {exc}")

    async def _charge(self, job: Job) -> None:
        async with self.pool.acquire() as conn:
            charge = await charges.load_job(conn, job.ref_id)
        if charge is None or charge.status != "pending":
            await self._done(job)
            return
        try:
            result = await self.provider.charge(
                idempotency_key=charge.idempotency_key,
                agreement_no=charge.agreement_no,
                amount_fen=charge.amount_fen,
                description=f"parking {charge.car_park_name}",
            )
        except ProviderUnavailable as exc:
            if job.attempts >= self.max_attempts:
                # The outcome is unknown, not a failure: the provider may have taken the money
                # and lost the answer. Ask it before deciding the driver owes anything.
                await self._settle_from_lookup(job, charge, str(exc))
                return
            self.stats.retries += 1
            log.warning("billing.charge_retry", charge_id=charge.charge_id, attempt=job.attempts)
            async with self.pool.acquire() as conn:
                await charges.record_attempt_error(conn, charge.charge_id, str(exc))
            await self._retry_later(job, str(exc))
            return
        await self._record(job, charge, result)

    async def _settle_from_lookup(self, job: Job, charge: charges.ChargeJob, error: str) -> None:
        try:
            result = await self.provider.lookup(idempotency_key=charge.idempotency_key)
        except ProviderUnavailable:
            # Still unknown: keep trying (at the capped backoff) rather than guess.
            self.stats.retries += 1
            await self._retry_later(job, f"outcome unknown: {error}")
            return
        if result is None:
            await self._charge_failed(job, charge, f"provider never received it: {error}")
        else:
            await self._record(job, charge, result)

    async def _record(self, job: Job, charge: charges.ChargeJob, result: ChargeResult) -> None:
        if result.status == "declined":
            await self._charge_failed(job, charge, f"declined: {result.reason}")
            return
        async with self.pool.acquire() as conn, conn.transaction():
            if await charges.mark_succeeded(conn, charge, result.provider_ref, self.provider.name):
                await notifications.enqueue(
                    conn,
                    account_id=charge.account_id,
                    kind="exit_charged",
                    source_key=f"charge:{charge.charge_id}:succeeded",
                    body=notifications.exit_charged_text(
                        charge.plate,
                        charge.car_park_name,
                        charge.entered_at,
                        charge.exited_at,
                        charge.amount_fen,
                        self.tz,
                    ),
                )
                self.stats.charged += 1
                log.info(
                    "billing.charged", charge_id=charge.charge_id, amount_fen=charge.amount_fen
                )
            await self._mark_done(conn, job)

    async def _charge_failed(self, job: Job, charge: charges.ChargeJob, reason: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if await charges.mark_failed(conn, charge, reason):
                await notifications.enqueue(
                    conn,
                    account_id=charge.account_id,
                    kind="charge_failed",
                    source_key=f"charge:{charge.charge_id}:failed",
                    body=(
                        f"{charge.plate}: the parking fee at {charge.car_park_name} could not be "
                        "collected; pay it in the app to keep leaving without stopping"
                    ),
                )
                self.stats.arrears += 1
                log.warning("billing.charge_failed", charge_id=charge.charge_id, reason=reason)
            await self._mark_done(conn, job)

    async def _notify(self, job: Job) -> None:
        async with self.pool.acquire() as conn:
            notification = await notifications.load(conn, job.ref_id)
            if notification is not None:
                await self.notifier.send(notification)
                await notifications.mark_sent(conn, notification.id)
                self.stats.notified += 1
            await self._mark_done(conn, job)

    async def _retry_later(self, job: Job, error: str) -> None:
        delay = min(self.retry_base_s * 2 ** (job.attempts - 1), 300.0)
        async with self.pool.acquire() as conn:
            await conn.execute(
                """UPDATE outbox SET available_at = now() + make_interval(secs => $2),
                          locked_until = NULL, last_error = $3 WHERE id = $1""",
                job.id,
                delay,
                error[:500],
            )

    async def _done(self, job: Job) -> None:
        async with self.pool.acquire() as conn:
            await self._mark_done(conn, job)

    @staticmethod
    async def _mark_done(conn: asyncpg.Connection, job: Job) -> None:
        await conn.execute(
            "UPDATE outbox SET done_at = now(), locked_until = NULL WHERE id = $1", job.id
        )
