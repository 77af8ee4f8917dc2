"""The outbox worker: runs what a committed transaction queued (charges, refunds, driver
notifications, gate commands after a payment) and a periodic sweep (debt reminders, payments
whose notification never came).

The queue's mechanics (claim with a lease, jittered backoff, done, dead after a number of
attempts per kind, pruning) are in `billing.queue`; this module is the handlers and the
dispatch. Jobs are claimed with FOR UPDATE SKIP LOCKED and a lease, so several workers can run
and a crashed one's jobs come back after the lease. A charge is sent with its own idempotency
key on every attempt and a follow-up asks the provider before sending again, so neither a lost
answer nor a worker killed at any point can charge twice.
"""

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import structlog

from billing import agreements, charges, debts, entries, notifications, passes, refunds, settlement
from billing import queue as job_queue
from billing.dead_letters import dead_letter
from billing.providers import (
    OrderResult,
    PaymentProvider,
    ProviderMalformed,
    ProviderRejected,
    ProviderUnavailable,
)
from billing.queue import Job

log = structlog.get_logger(__name__)


@dataclass
class WorkerStats:
    charged: int = 0
    retries: int = 0
    arrears: int = 0
    # Charges the provider refused for the car park's own reason: held for an operator.
    held_for_operator: int = 0
    refunded: int = 0
    notified: int = 0
    reminders: int = 0
    # Plate service states asked again by the sweep and answered.
    plate_states: int = 0
    # Jobs that raised something unexpected (a count: a list would grow for ever).
    failures: int = 0
    # Jobs that used up their kind's attempts (each logged as outbox.job_dead).
    dead: int = 0


# Attempts per kind of job before it is dead and waits for an operator. A charge or a refund
# keeps being asked about for a while (each retry asks the provider first); a driver's message
# or a barrier's open command is worth little once late.
DEFAULT_MAX_ATTEMPTS: Mapping[str, int] = {
    "charge": 20,
    "refund": 20,
    "notification": 8,
    "gate_command": 5,
    "parking_entry": 8,
    "verify_charge": 10,
}
# Dead jobs that carry no money, deleted after the dead-letter retention: a driver's message
# or a barrier's command that never went out. Dead charges and refunds wait for an operator.
# A stay whose entry was never registered is registered by its deduction at the exit.
PRUNABLE_DEAD_KINDS = frozenset({"notification", "gate_command", "parking_entry", "feed_delivery"})

# A handler of a kind of job the worker runs for another package (parking's feed deliveries):
# returning means done; raising `billing.queue.RetryLater` means again after the backoff
# (`billing.queue.Waiting`: again later, the try not counted as an attempt).
Handler = Callable[[Job], Awaitable[None]]
# Runs a claimed batch of one kind at once (a feed's deliveries: read and written back in a
# few statements); marks done the jobs it finished and returns the others' RetryLater by id.
BatchHandler = Callable[[list[Job]], Awaitable[Mapping[int, job_queue.RetryLater]]]


class OutboxWorker:
    def __init__(
        self,
        pool: asyncpg.Pool,
        provider: PaymentProvider,
        notifier: notifications.Notifier,
        *,
        gate_commands: Callable[[int], Awaitable[None]] | None = None,
        charge_verifier: Callable[[int], Awaitable[None]] | None = None,
        timezone: str = "Asia/Shanghai",
        language: notifications.Language = "zh",
        receipt_base_url: str | None = None,
        retry_base_s: float = 0.5,
        query_after_s: float = 5.0,
        request_in_flight_s: float = 120.0,
        poll_interval_s: float = 0.5,
        lease_s: float = 60.0,
        batch: int = 8,
        sweep_interval_s: float = 60.0,
        reminder_every: timedelta = timedelta(days=3),
        pass_reminder_before: timedelta = timedelta(days=3),
        payment_lifetime_s: float = 900.0,
        plate_state_max_age_s: float = 86_400.0,
        plate_state_batch: int = 50,
        max_attempts: Mapping[str, int] = DEFAULT_MAX_ATTEMPTS,
        backoff_cap_s: float = 300.0,
        rng: random.Random | None = None,
        handlers: Mapping[str, Handler] | None = None,
        batch_handlers: Mapping[str, BatchHandler] | None = None,
        on_dead: Mapping[str, job_queue.OnDead] | None = None,
        kinds: Iterable[str] | None = None,
        sweeps: bool = True,
    ) -> None:
        """`kinds`: the kinds of job this worker claims (default: those it has handlers for);
        `sweeps`: whether it also runs the periodic sweep (one worker of a process does)."""
        self.pool = pool
        self.provider = provider
        self.notifier = notifier
        # Publishes the open command for a payment that released a held car (needs MQTT).
        self.gate_commands = gate_commands
        # Reads a charge's entry and exit frames again before it is sent (a 'verify_charge'
        # job: the charge rests on an uncalibrated camera's reads); needs the plate reader.
        self.charge_verifier = charge_verifier
        self.tz = ZoneInfo(timezone)
        self.style = notifications.MessageStyle(self.tz, language, receipt_base_url)
        self.retry_base_s = retry_base_s
        # How long to wait for the notification of an accepted charge before asking.
        self.query_after_s = query_after_s
        # How long a request our client gave up on may still take effect at the provider.
        self.request_in_flight = timedelta(seconds=request_in_flight_s)
        self.sweep_interval_s = sweep_interval_s
        self.reminder_every = reminder_every
        self.pass_reminder_before = pass_reminder_before
        # An unpaid QR or app payment is closed at the provider after this long.
        self.payment_lifetime_s = payment_lifetime_s
        # Plate service states older than this are asked again, this many per sweep.
        self.plate_state_max_age_s = plate_state_max_age_s
        self.plate_state_batch = plate_state_batch
        self._handlers: dict[str, Callable[[Job], Awaitable[None]]] = {
            "charge": self._charge,
            "refund": self._refund,
            "notification": self._notify,
            "gate_command": self._gate_command,
            "parking_entry": self._parking_entry,
            "verify_charge": self._verify_charge,
        }
        for kind, handler in (handlers or {}).items():
            self._handlers[kind] = self._then_done(handler)
        self._batch_handlers = dict(batch_handlers or {})
        self.poll_interval_s = poll_interval_s
        self.lease_s = lease_s
        self.batch = batch
        self.queue = job_queue.Queue(
            pool,
            job_queue.RetryPolicy(max_attempts=dict(max_attempts), cap_s=backoff_cap_s),
            lease_s=lease_s,
            rng=rng,
            on_dead=on_dead,
            kinds=sorted({*self._handlers, *self._batch_handlers}) if kinds is None else kinds,
        )
        self.sweeps = sweeps
        self.stats = WorkerStats()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        # (job id, attempts) of jobs in hand whose outcome could not be written.
        self._unreleased: set[tuple[int, int]] = set()

    async def run(self) -> None:
        """Works until stopped; LISTEN wakes it as soon as a job is committed. When the
        database goes away it keeps trying and, once it is back, listens on a new connection."""

        def wake(*_: object) -> None:
            self._wake.set()

        # The sweep runs beside the jobs, never before them: its provider look-ups (a plate's
        # service state, a payment nobody told us about) may hang up to the provider's
        # timeout each, and charges must not wait behind them.
        sweeping = asyncio.create_task(self._sweep_periodically()) if self.sweeps else None
        try:
            while not self._stopping.is_set():
                try:
                    async with self.pool.acquire() as listener:
                        await listener.add_listener("outbox", wake)
                        try:
                            await self._work(listener)
                        finally:
                            if not listener.is_closed():
                                await listener.remove_listener("outbox", wake)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    log.exception("outbox.listen_failed")
                    await asyncio.sleep(self.poll_interval_s)
        finally:
            if sweeping is not None:
                # What a sweep does is asked again at the next one: cutting it short loses
                # nothing (its transaction rolls back).
                sweeping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeping

    async def _sweep_periodically(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.sweep(datetime.now(UTC))
            except Exception:  # the database went away, or worse: the next sweep tries again
                log.exception("outbox.sweep_failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.sweep_interval_s):
                    await self._stopping.wait()

    async def _work(self, listener: asyncpg.Connection) -> None:
        """Passes until stopped, or until the listening connection is lost."""
        while not self._stopping.is_set() and not listener.is_closed():
            try:
                if self._unreleased:
                    await self._release_unfinished()
                claimed = await self.run_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                # The database went away: jobs stay in the outbox; try again shortly.
                log.exception("outbox.pass_failed")
                claimed = 0
            if claimed == 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval_s):
                        await self._wake.wait()
                self._wake.clear()

    async def _release_unfinished(self) -> None:
        """Jobs whose outcome could not be written (the database went away mid-job) are
        released once it is back instead of waiting out their lease, unless someone claimed
        them since (attempts changed)."""
        await self.queue.release(self._unreleased)
        self._unreleased.clear()

    def stop(self) -> None:
        """Finishes the jobs in hand and returns from `run` (a deploy, SIGTERM): jobs are not
        left claimed until their lease runs out."""
        self._stopping.set()
        self._wake.set()

    async def run_once(self) -> int:
        """Claims and runs one batch of due jobs; returns how many were claimed (a job claimed
        past its attempts is made dead instead of run)."""
        dead_before = self.queue.dead
        jobs = await self.queue.claim(self.batch)
        buried = self.queue.dead - dead_before
        self.stats.dead += buried
        batches: dict[str, list[Job]] = {}
        for job in jobs:
            if job.kind in self._batch_handlers:
                batches.setdefault(job.kind, []).append(job)
        await asyncio.gather(
            *(self._run_job(job) for job in jobs if job.kind not in self._batch_handlers),
            *(self._run_batch(kind, batch) for kind, batch in batches.items()),
        )
        return len(jobs) + buried

    async def _run_batch(self, kind: str, jobs: list[Job]) -> None:
        """A batch handler's jobs: those it returns are tried again later, the others it has
        made done itself; when it fails, all of them are tried again."""
        try:
            retries = await self._batch_handlers[kind](jobs)
        except Exception as exc:  # a batch's failure must not stop the worker
            log.exception("outbox.batch_failed", kind=kind, jobs=len(jobs))
            self.stats.failures += 1
            retries = {job.id: job_queue.RetryLater(f"{type(exc).__name__}: {exc}") for job in jobs}
        for job in jobs:
            retry = retries.get(job.id)
            if retry is None:
                continue
            try:
                await self._again(job, retry)
            except Exception:
                self._unreleased.add((job.id, job.attempts))

    def _then_done(self, handler: Handler) -> Handler:
        async def run(job: Job) -> None:
            await handler(job)
            await self._done(job)

        return run

    async def _run_job(self, job: Job) -> None:
        try:
            await self._handlers[job.kind](job)
        except job_queue.RetryLater as exc:
            # An expected failure (a subscriber's endpoint down): no traceback.
            try:
                await self._again(job, exc)
            except Exception:
                self._unreleased.add((job.id, job.attempts))
        except Exception as exc:  # a job's failure must not stop the others
            log.exception("outbox.job_failed", job_id=job.id, kind=job.kind)
            self.stats.failures += 1
            try:
                # Unexpected errors back off to the capped delay; the job stays visible.
                await self._retry_later(job, f"{type(exc).__name__}: {exc}")
            except Exception:
                self._unreleased.add((job.id, job.attempts))

    async def _charge(self, job: Job) -> None:
        async with self.pool.acquire() as conn:
            charge = await charges.load_job(conn, job.ref_id)
        if charge is None or charge.status != "pending":
            await self._done(job)
            return
        # charge.attempts: a charge sent before (by an earlier job, e.g. before an operator
        # asked for a retry) is asked about first too.
        follow_up = job.attempts > 1 or charge.attempts > 0
        if not follow_up and not await self._begin_sending(job, charge.charge_id, again=False):
            return
        try:
            result = None
            if follow_up:
                # A retry or a follow-up: ask first, the order may exist (a lost answer, a crash
                # after sending, a notification that never came). A refused query says nothing
                # about the charge: it is retried, never taken for a decline.
                try:
                    result = await self.provider.query(out_trade_no=charge.idempotency_key)
                except ProviderRejected as exc:
                    raise ProviderUnavailable(f"order query refused: {exc}") from exc
                if result is None and not await self._begin_sending(
                    job, charge.charge_id, again=True
                ):
                    return
            if result is None:
                result = await self.provider.create_charge(
                    out_trade_no=charge.idempotency_key,
                    agreement_no=charge.agreement_no,
                    amount_fen=charge.amount_fen,
                    description=charges.description(charge.car_park_name),
                    parking=charge.deduction(),
                )
        except ProviderUnavailable as exc:
            # The outcome is unknown, never a failure: the provider may have taken the money
            # and lost the answer (or sent one we cannot read: kept as a dead letter). Keep
            # asking, at a capped backoff, with the same key.
            self.stats.retries += 1
            log.warning("billing.charge_retry", charge_id=charge.charge_id, attempt=job.attempts)
            async with self.pool.acquire() as conn:
                if isinstance(exc, ProviderMalformed):
                    await dead_letter(conn, self.provider.name, exc)
                await charges.record_attempt_error(conn, charge.charge_id, str(exc))
            await self._retry_later(job, str(exc))
            return
        except ProviderRejected as exc:
            async with self.pool.acquire() as conn, conn.transaction():
                if exc.side == "driver":
                    # Declined, insufficient funds, agreement paused: the driver's debt.
                    failed = await settlement.fail_charge(conn, charge, str(exc), self.style)
                    if failed.effect == "arrears":
                        self.stats.arrears += 1
                else:
                    # The car park's own request was refused: never the driver's debt. The
                    # charge stays pending for an operator (charge_exceptions).
                    await charges.hold_for_operator(
                        conn,
                        charge,
                        provider=self.provider.name,
                        code=exc.code,
                        http_status=exc.status_code,
                        reason=str(exc),
                    )
                    self.stats.held_for_operator += 1
                    log.error(
                        "billing.charge_held_for_operator",
                        charge_id=charge.charge_id,
                        code=exc.code,
                        status=exc.status_code,
                    )
                await self._mark_done(conn, job)
            return
        if not result.final:
            async with self.pool.acquire() as conn:
                await charges.mark_submitted(conn, charge.charge_id, result.provider_ref)
            await self._retry_later(
                job, "accepted; waiting for the notification", self.query_after_s
            )
            return
        await self._apply(job, result)

    async def _begin_sending(self, job: Job, charge_id: int, *, again: bool) -> bool:
        """Just before the charge goes to the provider: False (its job done) when a driver's
        "not my car" holds it until an operator decides (a decision that lets it stand makes
        the job due again), or it is no longer pending. `again`: the provider was asked and
        has no order of it (`charges.send_again`)."""
        async with self.pool.acquire() as conn, conn.transaction():
            if again:
                sending = await charges.send_again(conn, charge_id, self.request_in_flight)
            else:
                sending = await charges.begin_sending(conn, charge_id)
            if not sending:
                await self._mark_done(conn, job)
        if not sending:
            log.info("billing.charge_held_for_dispute", charge_id=charge_id)
        return sending

    async def _refund(self, job: Job) -> None:
        async with self.pool.acquire() as conn:
            refund = await refunds.load(conn, job.ref_id)
        if refund is None or refund.status != "pending":
            await self._done(job)
            return
        try:
            result = await self.provider.refund(
                out_refund_no=refund.out_refund_no,
                out_trade_no=refund.out_trade_no,
                amount_fen=refund.amount_fen,
                reason=refund.reason,
            )
        except ProviderUnavailable as exc:
            self.stats.retries += 1
            async with self.pool.acquire() as conn:
                if isinstance(exc, ProviderMalformed):
                    await dead_letter(conn, self.provider.name, exc)
                await refunds.record_error(conn, refund.id, str(exc))
            await self._retry_later(job, str(exc))
            return
        except ProviderRejected as exc:
            if not refunds.refusal_ends_refund(exc.status_code):
                # The car park's own request refused (its credentials, its balance): the refund
                # stays owed and is asked again at the backoff; past its last attempt it waits
                # in the jobs an operator retries (GET /api/v1/operator/jobs).
                log.error("billing.refund_refused_retrying", refund_id=refund.id, code=exc.code)
                async with self.pool.acquire() as conn:
                    await refunds.record_error(conn, refund.id, str(exc))
                await self._retry_later(job, str(exc))
                return
            log.error("billing.refund_rejected", refund_id=refund.id, error=str(exc))
            async with self.pool.acquire() as conn, conn.transaction():
                await refunds.mark_failed(conn, refund.id, str(exc))
                await self._mark_done(conn, job)
            return
        if not result.final:
            # Accepted, not yet with the payer (WeChat's refunds are asynchronous): its
            # notification may never come, so the provider is asked again (the same refund
            # number answers the same refund) until it says how it ended.
            await self._retry_later(job, "refund processing at the provider", self.query_after_s)
            return
        if result.status != "succeeded":
            # Closed or abnormal at the provider (the payer's account could not take it): the
            # money did not go back; an operator sees the failed refund and pays it otherwise.
            log.error("billing.refund_not_taken", refund_id=refund.id, status=result.status)
            async with self.pool.acquire() as conn, conn.transaction():
                await refunds.mark_failed(conn, refund.id, f"the provider ended it {result.status}")
                await self._mark_done(conn, job)
            return
        await self._apply(job, result)

    async def _apply(self, job: Job | None, result: OrderResult) -> settlement.Applied:
        async with self.pool.acquire() as conn, conn.transaction():
            applied = await settlement.apply(conn, self.provider.name, result, self.style)
            if job is not None and applied.effect != "amount_mismatch":
                await self._mark_done(conn, job)
        if job is not None and applied.effect == "amount_mismatch":
            # Left visible and pending; asked again at the capped backoff.
            await self._retry_later(job, "provider reports another amount")
        if applied.effect == "charged":
            self.stats.charged += 1
        elif applied.effect == "arrears":
            self.stats.arrears += 1
        elif applied.effect == "refunded":
            self.stats.refunded += 1
        return applied

    async def _gate_command(self, job: Job) -> None:
        if self.gate_commands is None:
            await self._retry_later(job, "no gate connection in this process")
            return
        await self.gate_commands(job.ref_id)
        await self._done(job)

    async def _parking_entry(self, job: Job) -> None:
        """Registers a stay with the provider (billing.entries) and records the plate's state."""
        async with self.pool.acquire() as conn:
            entry = await entries.load(conn, job.ref_id)
            free_s = await entries.free_duration_s(conn, entry) if entry else 0
        if (
            entry is None
            or entry.provider_parking_id is not None
            or entry.provider != self.provider.name
        ):
            await self._done(job)
            return
        try:
            registered = await self.provider.register_entry(
                out_parking_no=entry.out_parking_no,
                plate=entry.plate,
                color=entry.plate_color,
                entered_at=entry.entered_at,
                car_park_name=entry.car_park_name,
                free_duration_s=free_s,
                agreement_no=entry.agreement_no,
            )
        except ProviderUnavailable as exc:
            await self._retry_later(job, str(exc))
            return
        except ProviderRejected as exc:
            # The deduction at the exit registers the stay again; an operator sees the log.
            log.error("billing.entry_refused", session_id=entry.session_id, code=exc.code)
            await self._done(job)
            return
        async with self.pool.acquire() as conn, conn.transaction():
            await entries.record_parking_id(conn, entry.session_id, registered.parking_id)
            recorded = await agreements.record_service_state(
                conn,
                self.provider.name,
                entry.plate,
                entry.plate_color,
                registered.state,
                datetime.now(UTC),
                about_agreement=False,
            )
            await self._mark_done(conn, job)
        if registered.state == "normal" and not recorded:
            await agreements.ask_if_resumed(
                self.pool, self.provider, entry.plate, entry.plate_color
            )

    async def _verify_charge(self, job: Job) -> None:
        if self.charge_verifier is None:
            await self._retry_later(job, "no plate reader in this process")
            return
        await self.charge_verifier(job.ref_id)
        await self._done(job)

    async def sweep(self, now: datetime) -> None:
        """Periodic work: debt reminders, payments whose notification never came, and plate
        service states grown old."""
        async with self.pool.acquire() as conn, conn.transaction():
            self.stats.reminders += await debts.send_reminders(
                conn, every=self.reminder_every, now=now, language=self.style.language
            )
            # Passes bought in the app: the revenue earned since, and reminders before expiry.
            await passes.recognise(conn, now)
            self.stats.reminders += await passes.send_expiry_reminders(
                conn, now, self.pass_reminder_before
            )
            # Payments the driver may have completed without us hearing of it, newest first;
            # past their lifetime they are closed at the provider so they cannot be paid late.
            stale = await conn.fetch(
                """SELECT out_trade_no, created_at < $1::timestamptz - make_interval(secs => $3)
                          AS expired
                   FROM payments WHERE status = 'pending'
                   AND created_at < $1::timestamptz - make_interval(secs => $2)
                   ORDER BY created_at DESC LIMIT 200""",
                now,
                self.query_after_s,
                self.payment_lifetime_s,
            )
        for row in stale:
            try:
                await self._follow_up_payment(row["out_trade_no"], expired=row["expired"])
            except Exception:  # one payment's trouble must not stop the sweep
                log.exception("billing.payment_follow_up_failed")
        try:
            await self._refresh_plate_states(now)
        except Exception:  # the rest of the sweep must not depend on the plate states
            log.exception("billing.plate_states_refresh_failed")

    async def _refresh_plate_states(self, now: datetime) -> None:
        """Asks the provider again about bound plates of active agreements whose service state
        is older than the maximum age (or was never learned), a bounded batch per sweep. An
        outage ends the batch: those plates stay stale and are asked at the next sweep. The
        lanes read the recorded states only and never wait for this."""
        async with self.pool.acquire() as conn:
            stale = await agreements.stale_services(
                conn,
                self.provider.name,
                older_than=now - timedelta(seconds=self.plate_state_max_age_s),
                limit=self.plate_state_batch,
            )
        if not stale:
            return
        answered = await agreements.look_up_states(
            self.provider, [(r["agreement_no"], r["plate"], r["color"]) for r in stale]
        )
        async with self.pool.acquire() as conn, conn.transaction():
            await agreements.record_looked_up(conn, self.provider.name, answered, datetime.now(UTC))
        self.stats.plate_states += len(answered)
        log.info("billing.plate_states_refreshed", asked=len(stale), answered=len(answered))

    async def _follow_up_payment(self, out_trade_no: str, *, expired: bool) -> None:
        try:
            result = await self.provider.query(out_trade_no=out_trade_no)
            if expired and (result is None or not result.final):
                result = await self.provider.close_payment(out_trade_no=out_trade_no)
        except (ProviderUnavailable, ProviderRejected):
            return
        if result is not None and result.final:
            await self._apply(None, result)

    async def _notify(self, job: Job) -> None:
        async with self.pool.acquire() as conn:
            notification = await notifications.load(conn, job.ref_id)
            if notification is not None:
                await self.notifier.send(notification)
                await notifications.mark_sent(conn, notification.id)
                self.stats.notified += 1
            await self._mark_done(conn, job)

    async def _again(self, job: Job, retry: job_queue.RetryLater) -> None:
        """A handler's RetryLater: another attempt after the backoff, or, `Waiting` for
        another job, again later without counting this try."""
        if isinstance(retry, job_queue.Waiting):
            await self.queue.wait(
                job, str(retry), retry.base_s or self.retry_base_s, retry.not_before
            )
        else:
            await self._retry_later(job, str(retry), retry.base_s)

    async def _retry_later(self, job: Job, error: str, base_s: float | None = None) -> None:
        """Again after a jittered backoff, or dead when it was the kind's last attempt (a dead
        charge stays pending, never a debt: it waits for an operator)."""
        if not await self.queue.retry_later(job, error, base_s or self.retry_base_s):
            self.stats.dead += 1

    async def _done(self, job: Job) -> None:
        await self.queue.done(job)

    @staticmethod
    async def _mark_done(conn: asyncpg.Connection, job: Job) -> None:
        await job_queue.mark_done(conn, job)
