"""The job queue under the outbox worker: claim with a lease, retry with jittered backoff, done,
dead after a number of attempts per kind, an operator's retry, pruning. It knows nothing of what
a job does: `billing.worker` holds the handlers and the dispatch.

Jobs are rows of `outbox`, inserted by the transaction that caused them (a stay's exit inserts
its charge's job, a booked payment its gate command): the queue never enqueues. That is why it
is these few statements on the table we have and not a queue library: PgQueuer would bring its
own table and its own enqueue, and the job would have to be written through it inside the
caller's transaction at every one of those places, for what is here a claim, three updates and
a delete.

States: due (neither done nor dead; claimed when `available_at` has passed and no lease is
running), done (`done_at`), dead (`dead_at`, with `last_error`). A worker that dies holding a
job loses only its lease: the job is claimed again after it, and that claim counts as an
attempt, so a job that kills its worker every time ends dead too.
"""

import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import structlog

log = structlog.get_logger(__name__)

# Attempts a job of a kind not in the policy gets.
DEFAULT_MAX_ATTEMPTS = 10
# 2**60 times any base is past every cap; a larger exponent would overflow a float.
_MAX_EXPONENT = 60
# Rows deleted per statement when pruning, so that no pass holds long locks or a huge WAL burst.
PRUNE_BATCH = 5000


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    kind: str
    ref_id: int
    # Every attempt ever made, this one included (a handler's "is this a retry?").
    attempts: int
    # `attempts` when an operator last retried the job: the limit counts from there.
    attempts_at_retry: int = 0

    @property
    def attempts_since_retry(self) -> int:
        return self.attempts - self.attempts_at_retry


class RetryLater(Exception):
    """Raised by a job's handler when the job should be tried again after its backoff (from
    `base_s`, or the worker's base when None), or made dead if that was its last attempt."""

    def __init__(self, error: str, base_s: float | None = None) -> None:
        super().__init__(error)
        self.base_s = base_s


class Waiting(RetryLater):
    """Raised (or returned by a batch handler) when the job cannot run yet because it waits
    for another (a stay's end for its start): tried again after `base_s` (or at `not_before`,
    when that is later), and the try is given back: it is no attempt of its own and never makes
    the job dead. The handler bounds the wait (what it waits for has attempts of its own)."""

    def __init__(
        self, error: str, base_s: float | None = None, not_before: datetime | None = None
    ) -> None:
        super().__init__(error, base_s)
        self.not_before = not_before


# Called with a job and its last error when it goes dead (its handler's own bookkeeping).
OnDead = Callable[[Job, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how fast a kind of job is tried. `max_attempts` per kind (others get
    `default_max_attempts`); delays double from the caller's base up to `cap_s`, with jitter."""

    max_attempts: Mapping[str, int] = field(default_factory=dict)
    default_max_attempts: int = DEFAULT_MAX_ATTEMPTS
    cap_s: float = 300.0

    def limit(self, kind: str) -> int:
        return self.max_attempts.get(kind, self.default_max_attempts)


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """The delay before try `attempt + 1`: exponential from `base_s`, capped at `cap_s`, with
    "equal jitter" (half the delay fixed, the other half drawn uniformly), so that jobs that
    failed together (a provider outage) do not all come back in the same instant, and none comes
    back sooner than half its delay (an accepted charge is not asked about at once)."""
    exponent = min(max(attempt, 1) - 1, _MAX_EXPONENT)
    delay = min(cap_s, base_s * 2.0**exponent)
    return delay / 2 + (rng or random).uniform(0, delay / 2)


class Queue:
    """The outbox's mechanics on a pool. One per worker process."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        policy: RetryPolicy | None = None,
        *,
        lease_s: float = 60.0,
        rng: random.Random | None = None,
        on_dead: Mapping[str, OnDead] | None = None,
        kinds: Iterable[str] | None = None,
    ) -> None:
        self.pool = pool
        # The kinds this queue claims (None: every kind): each worker claims the kinds it has
        # handlers for, so the feeds' deliveries, with a worker of their own, never wait
        # behind charges nor delay them (migration 0030's index serves a claim per kind).
        self.kinds = None if kinds is None else sorted(kinds)
        # Per kind, what else a dead job changes (a feed delivery is marked dead).
        self.on_dead = dict(on_dead or {})
        self.policy = policy or RetryPolicy()
        self.lease_s = lease_s
        self.rng = rng or random.Random()
        # Jobs that went dead in this process (a count, logged each time as outbox.job_dead).
        self.dead = 0

    async def claim(self, batch: int) -> list[Job]:
        """Claims up to `batch` due jobs (FOR UPDATE SKIP LOCKED: several workers share them)
        under a lease, counting an attempt each. A job claimed past its limit (its workers kept
        dying before they could record an outcome) is made dead here instead of being run."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """UPDATE outbox SET locked_until = now() + make_interval(secs => $2),
                          attempts = attempts + 1
                   WHERE id IN (SELECT id FROM outbox
                                WHERE done_at IS NULL AND dead_at IS NULL
                                  AND available_at <= now()
                                  AND (locked_until IS NULL OR locked_until < now())
                                  AND ($3::text[] IS NULL OR kind = ANY ($3::text[]))
                                ORDER BY available_at, id LIMIT $1
                                FOR UPDATE SKIP LOCKED)
                   RETURNING id, kind, ref_id, attempts, attempts_at_retry""",
                batch,
                self.lease_s,
                self.kinds,
            )
        jobs = [Job(**dict(r)) for r in rows]
        runnable = []
        for job in jobs:
            if job.attempts_since_retry > self.policy.limit(job.kind):
                await self.bury(job, "its worker never finished it (lease expired every time)")
            else:
                runnable.append(job)
        return runnable

    async def retry_later(self, job: Job, error: str, base_s: float) -> bool:
        """Releases the job to be tried again after a jittered backoff, or makes it dead when
        this was its kind's last attempt. True when it will be tried again."""
        if job.attempts_since_retry >= self.policy.limit(job.kind):
            await self.bury(job, error)
            return False
        delay = backoff_s(job.attempts_since_retry, base_s, self.policy.cap_s, self.rng)
        async with self.pool.acquire() as conn:
            await conn.execute(
                """UPDATE outbox SET available_at = now() + make_interval(secs => $2),
                          locked_until = NULL, last_error = $3 WHERE id = $1""",
                job.id,
                delay,
                error[:500],
            )
        return True

    async def wait(
        self, job: Job, error: str, base_s: float, not_before: datetime | None = None
    ) -> None:
        """Releases a job that waits for another (`Waiting`): due again after a jittered
        `base_s`, or at `not_before` when later, and its claim not counted as an attempt. A
        job made dead meanwhile (what it waited for went dead) stays dead, its claim not
        counted either."""
        delay = backoff_s(1, base_s, self.policy.cap_s, self.rng)
        async with self.pool.acquire() as conn:
            await conn.execute(
                """UPDATE outbox
                   SET available_at = CASE WHEN dead_at IS NOT NULL THEN available_at
                           ELSE greatest(now() + make_interval(secs => $2), coalesce($4, now()))
                       END,
                       last_error = CASE WHEN dead_at IS NOT NULL THEN last_error ELSE $3 END,
                       attempts = attempts - 1, locked_until = NULL
                   WHERE id = $1 AND attempts = $5 AND done_at IS NULL""",
                job.id,
                delay,
                error[:500],
                not_before,
                job.attempts,
            )

    async def bury(self, job: Job, error: str) -> None:
        """Dead: never claimed again, kept (with its last error) until an operator retries it.
        What the job was for is left as it is: a dead charge stays pending, never a debt."""
        async with self.pool.acquire() as conn:
            await conn.execute(
                """UPDATE outbox SET dead_at = now(), locked_until = NULL, last_error = $2
                   WHERE id = $1 AND done_at IS NULL""",
                job.id,
                error[:500],
            )
        self.dead += 1
        if (hook := self.on_dead.get(job.kind)) is not None:
            await hook(job, error[:500])
        log.error(
            "outbox.job_dead",
            job_id=job.id,
            kind=job.kind,
            ref_id=job.ref_id,
            attempts=job.attempts,
            error=error[:500],
        )

    async def done(self, job: Job) -> None:
        async with self.pool.acquire() as conn:
            await mark_done(conn, job)

    async def release(self, held: Iterable[tuple[int, int]]) -> None:
        """Releases jobs whose outcome could not be written (the database went away mid-job)
        instead of waiting out their lease, unless someone claimed them since (attempts
        changed). `held` is (job id, attempts) pairs."""
        pairs = list(held)
        async with self.pool.acquire() as conn:
            await conn.execute(
                """UPDATE outbox SET locked_until = NULL
                   FROM unnest($1::bigint[], $2::int[]) AS mine(id, attempts)
                   WHERE outbox.id = mine.id AND outbox.attempts = mine.attempts
                     AND outbox.done_at IS NULL""",
                [job_id for job_id, _ in pairs],
                [attempts for _, attempts in pairs],
            )


async def mark_done(conn: asyncpg.Connection, job: Job) -> None:
    """Done, in the caller's transaction (with the effect the job had)."""
    await conn.execute(
        "UPDATE outbox SET done_at = now(), locked_until = NULL WHERE id = $1", job.id
    )


async def retry_dead(conn: asyncpg.Connection, job_id: int) -> asyncpg.Record | None:
    """A dead job due again now with its full number of attempts (an operator's decision; the
    caller audit-logs it). None when the job is not dead."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """UPDATE outbox SET dead_at = NULL, available_at = now(), locked_until = NULL,
                  attempts_at_retry = attempts
           WHERE id = $1 AND dead_at IS NOT NULL
           RETURNING id, kind, ref_id, attempts, last_error""",
        job_id,
    )
    return row


async def delete_in_batches(conn: asyncpg.Connection, statement: str, *args: object) -> int:
    """Runs a `DELETE … WHERE id IN (SELECT id … LIMIT $n)` statement until it deletes
    nothing; `statement` takes the batch size as its last parameter and returns a count."""
    total = 0
    while True:
        deleted: int = await conn.fetchval(statement, *args, PRUNE_BATCH)
        total += deleted
        if deleted < PRUNE_BATCH:
            return total


async def prune(
    conn: asyncpg.Connection,
    *,
    done_before: datetime,
    dead_before: datetime,
    prunable_dead_kinds: Iterable[str],
) -> dict[str, int]:
    """Deletes jobs done before `done_before`, and dead jobs of `prunable_dead_kinds` dead
    before `dead_before`. Dead jobs of any other kind (money) wait for an operator for ever."""
    done = await delete_in_batches(
        conn,
        """WITH gone AS (
               DELETE FROM outbox WHERE id IN (
                   SELECT id FROM outbox WHERE done_at IS NOT NULL AND done_at < $1 LIMIT $2)
               RETURNING 1)
           SELECT count(*) FROM gone""",
        done_before,
    )
    dead = await delete_in_batches(
        conn,
        """WITH gone AS (
               DELETE FROM outbox WHERE id IN (
                   SELECT id FROM outbox
                   WHERE dead_at IS NOT NULL AND dead_at < $1 AND kind = ANY($2::text[])
                   LIMIT $3)
               RETURNING 1)
           SELECT count(*) FROM gone""",
        dead_before,
        list(prunable_dead_kinds),
    )
    return {"done_jobs": done, "dead_jobs": dead}
