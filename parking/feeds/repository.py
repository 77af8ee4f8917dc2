"""Push subscriptions and their deliveries (migration 0030)."""

import uuid
from datetime import datetime

import asyncpg

from billing.queue import delete_in_batches

_SUBSCRIPTION = """s.id, s.public_id, s.format, s.endpoint, s.topics, s.consecutive_failures,
    s.paused_at, s.created_at,
    (SELECT array_agg(c.code ORDER BY c.code) FROM car_parks c WHERE c.id = ANY (s.car_park_ids))
        AS car_parks"""


async def own_car_park_ids(
    conn: asyncpg.Connection, operator_id: int, codes: list[str]
) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT code, id FROM car_parks WHERE operator_id = $1 AND code = ANY ($2::text[])",
        operator_id,
        codes,
    )
    return {r["code"]: r["id"] for r in rows}


async def create(
    conn: asyncpg.Connection,
    *,
    operator_id: int,
    format: str,
    endpoint: str,
    secret: str,
    topics: list[str],
    car_park_ids: list[int] | None,
) -> asyncpg.Record:
    row: asyncpg.Record = await conn.fetchrow(
        f"""WITH s AS (
                INSERT INTO feed_subscriptions
                    (operator_id, format, endpoint, secret, topics, car_park_ids)
                VALUES ($1, $2, $3, $4, $5, $6) RETURNING *)
            SELECT {_SUBSCRIPTION} FROM s""",
        operator_id,
        format,
        endpoint,
        secret,
        topics,
        car_park_ids,
    )
    return row


async def subscriptions(
    conn: asyncpg.Connection, operator_id: int, format: str
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_SUBSCRIPTION} FROM feed_subscriptions s
            WHERE s.operator_id = $1 AND s.format = $2 AND s.deleted_at IS NULL ORDER BY s.id""",
        operator_id,
        format,
    )
    return rows


async def delete(
    conn: asyncpg.Connection, operator_id: int, format: str, public_id: uuid.UUID | None = None
) -> asyncpg.Record | None:
    """The company's subscription (of `format`; by its id, or its only one) is deleted."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """UPDATE feed_subscriptions SET deleted_at = now()
           WHERE operator_id = $1 AND format = $2 AND deleted_at IS NULL
             AND ($3::uuid IS NULL OR public_id = $3)
           RETURNING id, public_id""",
        operator_id,
        format,
        public_id,
    )
    return row


async def resume(
    conn: asyncpg.Connection, operator_id: int, public_id: uuid.UUID
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""WITH s AS (
                UPDATE feed_subscriptions SET paused_at = NULL, consecutive_failures = 0
                WHERE operator_id = $1 AND public_id = $2 AND deleted_at IS NULL
                RETURNING *)
            SELECT {_SUBSCRIPTION} FROM s""",
        operator_id,
        public_id,
    )
    return row


async def deliveries(conn: asyncpg.Connection, delivery_ids: list[int]) -> list[asyncpg.Record]:
    """Deliveries with what sending them needs: their subscription, car park and stay, and
    whether a stay's end must wait for its start (pending outside `delivery_ids`: a receiver
    gets a stay's start before its end, whichever was retried), and when that start is due
    next."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT d.id, d.topic, d.status, d.event_at, d.car_park_id, d.session_id,
                  s.id AS subscription_id, s.operator_id, s.format, s.endpoint, s.secret,
                  s.paused_at, s.deleted_at,
                  c.code, c.name, c.capacity, c.version, c.closed_at, c.latitude, c.longitude,
                  c.created_at, c.updated_at,
                  st.plate, st.plate_color, st.status AS session_status, st.entered_at,
                  st.exited_at, st.fee_fen, st.settlement, st.assigned_right_id,
                  start.id IS NOT NULL AS start_pending, start.due_at AS start_due_at
           FROM feed_deliveries d
           LEFT JOIN LATERAL (
               SELECT e.id, o.available_at AS due_at FROM feed_deliveries e
               LEFT JOIN outbox o ON o.kind = 'feed_delivery' AND o.ref_id = e.id
               WHERE d.topic = 'session_ended' AND e.subscription_id = d.subscription_id
                 AND e.session_id = d.session_id AND e.topic = 'session_started'
                 AND e.status = 'pending' AND NOT (e.id = ANY ($1::bigint[]))
               LIMIT 1) start ON true
           JOIN feed_subscriptions s ON s.id = d.subscription_id
           JOIN car_parks c ON c.id = d.car_park_id
           LEFT JOIN sessions st ON st.id = d.session_id
           WHERE d.id = ANY ($1::bigint[])""",
        delivery_ids,
    )
    return rows


async def finish(
    conn: asyncpg.Connection,
    job_ids: list[int],
    sent: list[tuple[int, int | None]],
    skipped: list[int],
    took: list[int],
) -> None:
    """One statement for a batch: the deliveries `sent` (id, the count it carried) and
    `skipped` (their subscription is paused or gone) recorded, their jobs (`job_ids`, those
    finished without sending too) done, and the failures in a row of the subscriptions that
    `took` one are over."""
    await conn.execute(
        """WITH sent AS (
               UPDATE feed_deliveries d SET status = 'sent', sent_value = v.value,
                                            sent_at = now()
               FROM unnest($2::bigint[], $3::int[]) AS v(id, value) WHERE d.id = v.id),
           skipped AS (
               UPDATE feed_deliveries SET status = 'skipped' WHERE id = ANY ($4::bigint[])),
           took AS (
               UPDATE feed_subscriptions SET consecutive_failures = 0
               WHERE id = ANY ($5::bigint[]) AND consecutive_failures <> 0)
           UPDATE outbox SET done_at = now(), locked_until = NULL
           WHERE id = ANY ($1::bigint[])""",
        job_ids,
        [delivery_id for delivery_id, _ in sent],
        [value for _, value in sent],
        skipped,
        sorted(set(took)),
    )


async def failed(
    conn: asyncpg.Connection, subscription_id: int, attempts: int, pause_after: int | None
) -> datetime | None:
    """Counts `attempts` failed in a row; pauses the subscription at `pause_after` in a row
    (None: never). Returns when it was paused, if it is."""
    paused: datetime | None = await conn.fetchval(
        """UPDATE feed_subscriptions
           SET consecutive_failures = consecutive_failures + $3,
               paused_at = CASE WHEN $2::int IS NOT NULL AND consecutive_failures + $3 >= $2
                                THEN coalesce(paused_at, now()) ELSE paused_at END
           WHERE id = $1 RETURNING paused_at""",
        subscription_id,
        pause_after,
        attempts,
    )
    return paused


async def queue_occupancy(
    conn: asyncpg.Connection,
    car_park_ids: list[int] | None,
    interval_s: float,
    subscription_id: int | None = None,
    format: str | None = None,
) -> int:
    """A pending occupancy delivery for each live subscriber of each car park (None: every
    car park a subscriber covers; or only `subscription_id`'s, or only subscribers of
    `format`), unless one is pending already; due `interval_s` after the last one sent to that
    subscriber for that car park. Returns how many were queued."""
    queued: int = await conn.fetchval(
        """WITH delivery AS (
               INSERT INTO feed_deliveries (subscription_id, topic, car_park_id)
               SELECT s.id, 'occupancy', c.id
               FROM car_parks c JOIN feed_subscriptions s ON s.operator_id = c.operator_id
               WHERE ($1::bigint[] IS NULL OR c.id = ANY ($1::bigint[]))
                 AND s.deleted_at IS NULL AND s.paused_at IS NULL
                 AND 'occupancy' = ANY (s.topics)
                 AND (s.car_park_ids IS NULL OR c.id = ANY (s.car_park_ids))
                 AND ($3::bigint IS NULL OR s.id = $3)
                 AND ($4::text IS NULL OR s.format = $4)
               ON CONFLICT (subscription_id, car_park_id)
                   WHERE topic = 'occupancy' AND status = 'pending' DO NOTHING
               RETURNING id, subscription_id, car_park_id),
           job AS (
               INSERT INTO outbox (kind, ref_id, available_at)
               SELECT 'feed_delivery', d.id, greatest(now(), (
                   SELECT max(l.sent_at) FROM feed_deliveries l
                   WHERE l.subscription_id = d.subscription_id AND l.car_park_id = d.car_park_id
                     AND l.topic = 'occupancy' AND l.sent_at IS NOT NULL
               ) + make_interval(secs => $2))
               FROM delivery d RETURNING 1)
           SELECT count(*) FROM job""",
        car_park_ids,
        interval_s,
        subscription_id,
        format,
    )
    return queued


async def mark_dead(conn: asyncpg.Connection, delivery_id: int, error: str) -> int:
    """The delivery dead; a stay's start takes the ends waiting for it with it (their jobs
    dead with `error`): a receiver never gets an end before its start. Returns how many ends
    went with it."""
    ends: int = await conn.fetchval(
        """WITH d AS (
               UPDATE feed_deliveries SET status = 'dead' WHERE id = $1 AND status = 'pending'
               RETURNING id, subscription_id, session_id, topic),
           ends AS (
               UPDATE feed_deliveries e SET status = 'dead' FROM d
               WHERE d.topic = 'session_started' AND e.subscription_id = d.subscription_id
                 AND e.id > d.id AND e.session_id = d.session_id
                 AND e.topic = 'session_ended' AND e.status = 'pending'
               RETURNING e.id),
           jobs AS (
               UPDATE outbox o SET dead_at = now(), locked_until = NULL, last_error = $2
               FROM ends WHERE o.kind = 'feed_delivery' AND o.ref_id = ends.id
                 AND o.done_at IS NULL AND o.dead_at IS NULL
               RETURNING 1)
           SELECT count(*) FROM jobs""",
        delivery_id,
        error[:500],
    )
    return ends


async def retried(conn: asyncpg.Connection, delivery_id: int) -> list[int]:
    """An admin retried the delivery's dead job: it is pending again, and with it the other
    end of its stay when that is dead too (a start and the ends that died with it go again
    together, the end after its start). Returns the other deliveries' jobs made due."""
    rows = await conn.fetch(
        """WITH d AS (
               UPDATE feed_deliveries SET status = 'pending' WHERE id = $1 AND status = 'dead'
               RETURNING id, subscription_id, session_id, topic),
           other AS (
               UPDATE feed_deliveries e SET status = 'pending' FROM d
               WHERE e.subscription_id = d.subscription_id AND e.session_id = d.session_id
                 AND e.status = 'dead'
                 AND ((d.topic = 'session_started' AND e.topic = 'session_ended' AND e.id > d.id)
                      OR (d.topic = 'session_ended' AND e.topic = 'session_started'
                          AND e.id < d.id))
               RETURNING e.id)
           UPDATE outbox o SET dead_at = NULL, available_at = now(), locked_until = NULL,
                               attempts_at_retry = attempts
           FROM other WHERE o.kind = 'feed_delivery' AND o.ref_id = other.id
             AND o.dead_at IS NOT NULL
           RETURNING o.id""",
        delivery_id,
    )
    return sorted(r["id"] for r in rows)


async def prune(conn: asyncpg.Connection, *, done_before: datetime, dead_before: datetime) -> int:
    """Deletes deliveries sent or skipped before `done_before` and dead ones before
    `dead_before` (their outbox jobs go with the outbox's own pruning)."""
    return await delete_in_batches(
        conn,
        """WITH gone AS (
               DELETE FROM feed_deliveries WHERE id IN (
                   SELECT id FROM feed_deliveries
                   WHERE status <> 'pending'
                     AND created_at < CASE WHEN status = 'dead' THEN $2::timestamptz
                                           ELSE $1::timestamptz END
                   LIMIT $3)
               RETURNING 1)
           SELECT count(*) FROM gone""",
        done_before,
        dead_before,
    )
