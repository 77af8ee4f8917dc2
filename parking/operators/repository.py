"""SQL of the operator API. Every read of a car park, stay, exception or charge is scoped by the
caller's operator company in SQL: another company's objects are simply not found."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from gate_controller.protocol import Direction
from parking.occupancy.repository import takes_a_place

_CAR_PARK_COLUMNS = """id, code, name, capacity, latitude, longitude, no_entry_policy,
    no_entry_fee_fen, closed_at IS NOT NULL AS closed"""


async def car_parks(conn: asyncpg.Connection, operator_id: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {_CAR_PARK_COLUMNS} FROM car_parks WHERE operator_id = $1 ORDER BY code",
        operator_id,
    )
    return rows


async def car_park(
    conn: asyncpg.Connection, operator_id: int, code: str, *, lock: bool = False
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {_CAR_PARK_COLUMNS} FROM car_parks WHERE operator_id = $1 AND code = $2
            {"FOR UPDATE" if lock else ""}""",
        operator_id,
        code,
    )
    return row


async def update_car_park(
    conn: asyncpg.Connection, car_park_id: int, *, name: str, capacity: int, closed: bool
) -> asyncpg.Record:
    """Closing keeps the time it was first closed; reopening clears it."""
    row: asyncpg.Record = await conn.fetchrow(
        f"""UPDATE car_parks SET name = $2, capacity = $3,
                   closed_at = CASE WHEN $4 THEN coalesce(closed_at, now()) END
            WHERE id = $1
            RETURNING {_CAR_PARK_COLUMNS}""",
        car_park_id,
        name,
        capacity,
        closed,
    )
    return row


async def gates(conn: asyncpg.Connection, car_park_id: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT id, code, direction, created_at FROM gates WHERE car_park_id = $1 ORDER BY code",
        car_park_id,
    )
    return rows


async def gate(conn: asyncpg.Connection, car_park_id: int, code: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT id, code, direction FROM gates WHERE car_park_id = $1 AND code = $2",
        car_park_id,
        code,
    )
    return row


async def insert_gate(
    conn: asyncpg.Connection, car_park_id: int, code: str, direction: str
) -> asyncpg.Record | None:
    """None when the car park already has a gate with this code."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """INSERT INTO gates (car_park_id, code, direction) VALUES ($1, $2, $3)
           ON CONFLICT (car_park_id, code) DO NOTHING
           RETURNING id, code, direction, created_at""",
        car_park_id,
        code,
        direction,
    )
    return row


async def tariffs(conn: asyncpg.Connection, car_park_id: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT id, effective_from, rules, created_at FROM tariffs WHERE car_park_id = $1
           ORDER BY effective_from DESC""",
        car_park_id,
    )
    return rows


async def insert_tariff(
    conn: asyncpg.Connection, car_park_id: int, effective_from: datetime, rules: dict[str, Any]
) -> asyncpg.Record | None:
    """None when the car park already has a version from that instant."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """INSERT INTO tariffs (car_park_id, effective_from, rules) VALUES ($1, $2, $3)
           ON CONFLICT (car_park_id, effective_from) DO NOTHING
           RETURNING id, effective_from, rules, created_at""",
        car_park_id,
        effective_from,
        rules,
    )
    return row


async def stays(
    conn: asyncpg.Connection,
    operator_id: int,
    *,
    car_park_id: int | None,
    plate: str | None,
    entered_from: datetime | None,
    entered_to: datetime | None,
    status: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    # Only the filters given go into the statement: one statement per combination, each with
    # its own plan. A single "($n IS NULL OR …)" statement is planned generically after a few
    # runs, and that plan is a scan of every stay (88 ms on a city day against 0.26 ms).
    filters = (
        ("s.car_park_id = {}", car_park_id),
        ("s.plate = {}", plate),
        ("s.entered_at >= {}", entered_from),
        ("s.entered_at < {}", entered_to),
        ("s.status = {}", status),
    )
    conditions = ["cp.operator_id = $1"]
    args: list[object] = [operator_id]
    for condition, value in filters:
        if value is not None:
            args.append(value)
            conditions.append(condition.format(f"${len(args)}"))
    args.append(limit)
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT s.id, cp.code AS car_park, s.plate, s.plate_color, s.status, s.entered_at,
                   s.exited_at, s.fee_fen, s.settlement, c.id AS charge_id,
                   c.status AS charge_status
            FROM sessions s JOIN car_parks cp ON cp.id = s.car_park_id
            LEFT JOIN charges c ON c.session_id = s.id
            WHERE {" AND ".join(conditions)}
            ORDER BY s.entered_at DESC, s.id DESC LIMIT ${len(args)}""",
        *args,
    )
    return rows


_EXCEPTION_COLUMNS = """e.id, cp.code AS car_park, g.code AS gate, e.reason, e.created_at,
    e.candidates, e.image IS NOT NULL AS has_image, e.status, e.resolved_plate, e.capture_id"""


async def exceptions(
    conn: asyncpg.Connection,
    operator_id: int,
    *,
    car_park_id: int | None,
    status: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_EXCEPTION_COLUMNS}
            FROM lane_exceptions e JOIN car_parks cp ON cp.id = e.car_park_id
            JOIN gates g ON g.id = e.gate_id
            WHERE cp.operator_id = $1
              AND ($2::bigint IS NULL OR e.car_park_id = $2)
              AND ($3::text IS NULL OR e.status = $3)
            ORDER BY e.created_at DESC, e.id DESC LIMIT $4""",
        operator_id,
        car_park_id,
        status,
        limit,
    )
    return rows


async def capture_conflicts(
    conn: asyncpg.Connection, operator_id: int, *, car_park_id: int | None, limit: int
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT x.id, x.capture_id, cp.code AS car_park, g.code AS gate, x.received_at,
                  x.resent, c.command AS stored_command, c.captured_at AS stored_captured_at
           FROM capture_conflicts x JOIN car_parks cp ON cp.id = x.car_park_id
           JOIN gates g ON g.id = x.gate_id
           JOIN capture_keys k ON k.capture_id = x.capture_id
           JOIN captures c ON c.capture_id = k.capture_id AND c.captured_at = k.captured_at
           WHERE cp.operator_id = $1 AND ($2::bigint IS NULL OR x.car_park_id = $2)
           ORDER BY x.received_at DESC, x.id DESC LIMIT $3""",
        operator_id,
        car_park_id,
        limit,
    )
    return rows


async def exception_image(
    conn: asyncpg.Connection, operator_id: int, exception_id: int
) -> asyncpg.Record | None:
    """The exception's stored frame (`image`, NULL when there was none or it was erased)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """SELECT e.image FROM lane_exceptions e JOIN car_parks cp ON cp.id = e.car_park_id
           WHERE e.id = $1 AND cp.operator_id = $2""",
        exception_id,
        operator_id,
    )
    return row


@dataclass(frozen=True, slots=True)
class HeldCapture:
    """A capture the lane held, with what is needed to decide it again."""

    exception_id: int
    exception_status: str
    reason: str
    capture_id: UUID
    car_park_id: int
    lot: str
    gate: str
    seq: int
    direction: Direction
    captured_at: datetime
    received_at: datetime
    offline: bool
    plate_color: str | None


async def exception_for_update(
    conn: asyncpg.Connection, operator_id: int, exception_id: int
) -> HeldCapture | None:
    """Locked, so that two operators resolving the same exception decide it once."""
    row = await conn.fetchrow(
        """SELECT e.id AS exception_id, e.status AS exception_status, e.reason, c.capture_id,
                  cp.id AS car_park_id, cp.code AS lot, g.code AS gate, c.seq, c.direction,
                  c.captured_at, c.received_at, c.offline, c.plate_color
           FROM lane_exceptions e JOIN car_parks cp ON cp.id = e.car_park_id
           JOIN gates g ON g.id = e.gate_id JOIN captures c
               ON c.capture_id = e.capture_id AND c.captured_at = e.capture_captured_at
           WHERE e.id = $1 AND cp.operator_id = $2
           FOR UPDATE OF e, c""",
        exception_id,
        operator_id,
    )
    return HeldCapture(**dict(row)) if row else None


async def ghost_stay_ended(conn: asyncpg.Connection, capture_id: UUID) -> bool:
    """Whether the capture's ghost exception, if it has one, is about a stay that has ended
    since (the exception was resolved with it: migration 0055)."""
    ended: bool | None = await conn.fetchval(
        """SELECT s.status <> 'open' FROM lane_exceptions e
           JOIN sessions s ON s.id = (e.candidates -> 0 ->> 'session_id')::bigint
           WHERE e.capture_id = $1 AND e.reason = 'ghost_stay'""",
        capture_id,
    )
    return bool(ended)


async def mark_exception_resolved(
    conn: asyncpg.Connection, capture_id: UUID, plate: str | None, actor: str
) -> int | None:
    """Resolves the capture's open exception, if it has one; returns its id."""
    exception_id: int | None = await conn.fetchval(
        """UPDATE lane_exceptions SET status = 'resolved', resolved_plate = $2, resolved_by = $3,
                  resolved_at = now()
           WHERE capture_id = $1 AND status = 'open' RETURNING id""",
        capture_id,
        plate,
        actor,
    )
    return exception_id


@dataclass(frozen=True, slots=True)
class GhostException:
    """A ghost stay's exception, locked, with the stay it is about (None: not a ghost's)."""

    exception_id: int
    reason: str
    car_park_id: int
    lot: str
    gate: str
    session_id: int | None


async def ghost_exception(
    conn: asyncpg.Connection, operator_id: int, exception_id: int
) -> GhostException | None:
    """Unlocked: its stay is what is locked, and ends once (`end_ghost_stay`). Whatever closes
    a stay locks it before migration 0055's rule resolves its ghost exception; locking the
    exception first would wait for them while they wait for it (a deadlock)."""
    row = await conn.fetchrow(
        """SELECT e.id AS exception_id, e.reason, cp.id AS car_park_id, cp.code AS lot,
                  g.code AS gate,
                  CASE WHEN e.reason = 'ghost_stay'
                       THEN (e.candidates -> 0 ->> 'session_id')::bigint END AS session_id
           FROM lane_exceptions e JOIN car_parks cp ON cp.id = e.car_park_id
           JOIN gates g ON g.id = e.gate_id
           WHERE e.id = $1 AND cp.operator_id = $2""",
        exception_id,
        operator_id,
    )
    return GhostException(**dict(row)) if row else None


async def end_ghost_stay(
    conn: asyncpg.Connection, session_id: int, at: datetime
) -> asyncpg.Record | None:
    """An operator ends a ghost stay whose car left at a time nobody knows: closed when they
    did it, with no exit capture, no fee and nobody charged. None when it is no longer open.
    Its ghost exception is resolved by migration 0055's rule."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""UPDATE sessions SET status = 'closed', exited_at = $2, fee_fen = NULL,
                   settlement = 'operator'
            WHERE id = $1 AND status = 'open'
            RETURNING id, entered_at, {takes_a_place()} AS counted_in""",
        session_id,
        at,
    )
    return row


@dataclass(frozen=True, slots=True)
class HeldStay:
    id: int
    status: str
    plate: str
    plate_color: str | None
    entered_at: datetime
    fixed_fee_fen: int | None
    # A stay opened at the exit (no entry record, fixed-fee policy) was never counted in.
    counted_in: bool


@dataclass(frozen=True, slots=True)
class GateCapture:
    """A capture at a gate, locked, and the stay it was decided for, locked too."""

    capture_id: UUID
    direction: str
    action: str
    stay: HeldStay | None


async def capture_at_gate(
    conn: asyncpg.Connection, gate_id: int, capture_id: UUID
) -> GateCapture | None:
    row = await conn.fetchrow(
        """SELECT capture_id, direction, command->>'action' AS action, session_id
           FROM captures WHERE capture_id = $1 AND gate_id = $2 FOR UPDATE""",
        capture_id,
        gate_id,
    )
    if row is None:
        return None
    stay = None
    if row["session_id"] is not None:
        # Locked as the lane and the payments lock it, so the stay is closed once.
        stay_row = await conn.fetchrow(
            f"""SELECT id, status, plate, plate_color, entered_at, fixed_fee_fen,
                       {takes_a_place()} AS counted_in
                FROM sessions WHERE id = $1 FOR UPDATE""",
            row["session_id"],
        )
        stay = HeldStay(**dict(stay_row))
    return GateCapture(row["capture_id"], row["direction"], row["action"], stay)


async def close_stay_by_operator(
    conn: asyncpg.Connection,
    *,
    session_id: int,
    exited_at: datetime,
    exit_capture_id: UUID,
    fee_fen: int | None,
) -> None:
    """An operator let the car out: the fee is recorded and nobody is charged."""
    await conn.execute(
        """UPDATE sessions SET status = 'closed', exited_at = $2, exit_capture_id = $3,
                  fee_fen = $4, settlement = 'operator'
           WHERE id = $1 AND status = 'open'""",
        session_id,
        exited_at,
        exit_capture_id,
        fee_fen,
    )


async def charge_of_operator(conn: asyncpg.Connection, operator_id: int, charge_id: int) -> bool:
    found: bool = await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM charges c JOIN sessions s ON s.id = c.session_id
                          JOIN car_parks cp ON cp.id = s.car_park_id
                          WHERE c.id = $1 AND cp.operator_id = $2)""",
        charge_id,
        operator_id,
    )
    return found


async def open_debts(
    conn: asyncpg.Connection, operator_id: int, now: datetime
) -> list[asyncpg.Record]:
    """Open debts of stays at the company's car parks, with their age in whole days."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT d.amount_fen, d.account_id,
                  floor(extract(epoch FROM $2::timestamptz - d.created_at) / 86400)::int
                      AS age_days
           FROM debts d
           JOIN sessions s ON s.id = d.session_id JOIN car_parks cp ON cp.id = s.car_park_id
           WHERE d.settled_at IS NULL AND cp.operator_id = $1""",
        operator_id,
        now,
    )
    return rows


async def charge_exceptions(
    conn: asyncpg.Connection,
    operator_id: int,
    *,
    car_park_id: int | None,
    status: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Charges the provider refused for the car park's own reason, newest first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT e.id, e.charge_id, cp.code AS car_park, c.amount_fen, c.status AS charge_status,
                  e.provider, e.http_status, e.code, e.reason, e.status, e.created_at,
                  e.resolved_at, e.resolved_by
           FROM charge_exceptions e JOIN car_parks cp ON cp.id = e.car_park_id
           JOIN charges c ON c.id = e.charge_id
           WHERE cp.operator_id = $1
             AND ($2::bigint IS NULL OR e.car_park_id = $2)
             AND ($3::text IS NULL OR e.status = $3)
           ORDER BY e.created_at DESC, e.id DESC LIMIT $4""",
        operator_id,
        car_park_id,
        status,
        limit,
    )
    return rows


async def charge_exception_of_operator(
    conn: asyncpg.Connection, operator_id: int, exception_id: int
) -> bool:
    found: bool = await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM charge_exceptions e
                          JOIN car_parks cp ON cp.id = e.car_park_id
                          WHERE e.id = $1 AND cp.operator_id = $2)""",
        exception_id,
        operator_id,
    )
    return found


# Which car park a job is about: a charge's stay's, a refund's own, a gate command's payment's
# held capture's, a feed delivery's. Driver notifications belong to an account, not to a
# company: not listed here.
_JOB_CAR_PARK = """JOIN LATERAL (
        SELECT s.car_park_id FROM charges c JOIN sessions s ON s.id = c.session_id
        WHERE j.kind = 'charge' AND c.id = j.ref_id
        UNION ALL
        SELECT r.car_park_id FROM refunds r WHERE j.kind = 'refund' AND r.id = j.ref_id
        UNION ALL
        SELECT cap.car_park_id FROM payments p
        JOIN captures cap ON cap.capture_id = p.capture_id
                         AND cap.captured_at = p.capture_captured_at
        WHERE j.kind = 'gate_command' AND p.id = j.ref_id
        UNION ALL
        SELECT d.car_park_id FROM feed_deliveries d
        WHERE j.kind = 'feed_delivery' AND d.id = j.ref_id
    ) owner ON true
    JOIN car_parks cp ON cp.id = owner.car_park_id"""
_JOB_COLUMNS = """j.id, j.kind, j.ref_id, j.attempts - j.attempts_at_retry AS attempts,
    j.attempts AS total_attempts, j.last_error, j.created_at, j.available_at, j.locked_until,
    j.dead_at, j.done_at, cp.code AS car_park"""


async def jobs_needing_a_person(
    conn: asyncpg.Connection,
    operator_id: int,
    *,
    car_park_id: int | None,
    dead: bool,
    stuck: bool,
    overdue_before: datetime,
    many_attempts: int,
    limit: int,
) -> list[asyncpg.Record]:
    """Dead jobs and stuck ones (not done, due before `overdue_before` or tried at least
    `many_attempts` times since the last retry) of the company's car parks, oldest first."""
    # Only the states asked for go into the statement, so that each is planned on its own
    # partial index (outbox_dead, outbox_due) and never as a scan of every done job.
    args: list[object] = [operator_id, car_park_id, limit]
    wanted = []
    if dead:
        wanted.append("o.dead_at IS NOT NULL")
    if stuck:
        args += [overdue_before, many_attempts]
        wanted.append(
            """(o.done_at IS NULL AND o.dead_at IS NULL
                AND (o.available_at < $4 OR o.attempts - o.attempts_at_retry >= $5))"""
        )
    if not wanted:
        return []
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_JOB_COLUMNS}
            FROM (SELECT * FROM outbox o WHERE o.kind <> 'notification'
                  AND ({" OR ".join(wanted)})) j
            {_JOB_CAR_PARK}
            WHERE cp.operator_id = $1 AND ($2::bigint IS NULL OR cp.id = $2)
            ORDER BY coalesce(j.dead_at, j.available_at), j.id LIMIT $3""",
        *args,
    )
    return rows


async def job_of_operator(
    conn: asyncpg.Connection, operator_id: int, job_id: int
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {_JOB_COLUMNS} FROM outbox j {_JOB_CAR_PARK}
            WHERE j.id = $1 AND cp.operator_id = $2""",
        job_id,
        operator_id,
    )
    return row


async def wake_outbox_workers(conn: asyncpg.Connection) -> None:
    """Delivered at commit, like the insert trigger's (migration 0003)."""
    await conn.execute("SELECT pg_notify('outbox', '')")


async def audit_log(
    conn: asyncpg.Connection,
    operator_id: int,
    *,
    before: int | None,
    action: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    """What the company's staff did, newest first, a page at a time (ids below `before`):
    one index range per staff member (audit_log_actor), merged."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT a.id, a.actor, u.name AS actor_name, u.email AS actor_email, a.action,
                  a.subject, a.detail, a.created_at
           FROM operator_users u
           CROSS JOIN LATERAL (
               SELECT * FROM audit_log l
               WHERE l.actor = 'operator_user:' || u.id
                 AND ($2::bigint IS NULL OR l.id < $2) AND ($3::text IS NULL OR l.action = $3)
               ORDER BY l.id DESC LIMIT $4) a
           WHERE u.operator_id = $1
           ORDER BY a.id DESC LIMIT $4""",
        operator_id,
        before,
        action,
        limit,
    )
    return rows
