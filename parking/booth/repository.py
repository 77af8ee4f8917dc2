"""All SQL of booth payments, gate clock records and the ghost-stay sweep."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from parking.lanes.repository import GHOST_STAY, STAY_OPEN_TOO_LONG
from parking.occupancy.repository import takes_a_place


@dataclass(frozen=True, slots=True)
class BoothStay:
    id: int
    car_park_id: int
    plate: str
    plate_color: str | None
    status: str
    settlement: str | None
    entered_at: datetime
    fee_fen: int | None
    fixed_fee_fen: int | None
    account_id: int | None
    exit_capture_id: UUID | None
    # A stay opened at the exit (no entry record) was never counted in the occupancy.
    counted_in: bool


async def stay_for_update(
    conn: asyncpg.Connection, car_park_id: int, session_id: int
) -> BoothStay | None:
    row = await conn.fetchrow(
        f"""SELECT id, car_park_id, plate, plate_color, status, settlement, entered_at, fee_fen,
                   fixed_fee_fen, account_id, exit_capture_id, {takes_a_place()} AS counted_in
            FROM sessions WHERE id = $1 AND car_park_id = $2 FOR UPDATE""",
        session_id,
        car_park_id,
    )
    return BoothStay(**dict(row)) if row else None


async def stay_exit_capture(
    conn: asyncpg.Connection, car_park_id: int, session_id: int
) -> UUID | None:
    """The stay's exit capture as now committed, unlocked (None: no exit yet, or no stay)."""
    capture_id: UUID | None = await conn.fetchval(
        "SELECT exit_capture_id FROM sessions WHERE id = $1 AND car_park_id = $2",
        session_id,
        car_park_id,
    )
    return capture_id


async def insert_payment(
    conn: asyncpg.Connection,
    *,
    car_park_id: int,
    session_id: int,
    capture: tuple[UUID, datetime] | None,
    method: str,
    amount_fen: int,
    recorded_by: str,
) -> asyncpg.Record:
    """One booth payment per stay: a second one is a unique violation."""
    capture_id, captured_at = capture if capture is not None else (None, None)
    row: asyncpg.Record = await conn.fetchrow(
        """INSERT INTO booth_payments (car_park_id, session_id, capture_id, capture_captured_at,
                                       method, amount_fen, recorded_by)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           RETURNING id, session_id, capture_id, method, amount_fen, recorded_by, created_at""",
        car_park_id,
        session_id,
        capture_id,
        captured_at,
        method,
        amount_fen,
        recorded_by,
    )
    return row


async def close_paid_at_booth(
    conn: asyncpg.Connection,
    session_id: int,
    *,
    exited_at: datetime,
    exit_capture_id: UUID | None,
    fee_fen: int,
) -> bool:
    """An open stay (held at the gate, or gone while the gate was offline) paid at the booth;
    a stay awaiting the booth keeps the exit its upload recorded."""
    done = await conn.fetchval(
        """UPDATE sessions SET status = 'closed', settlement = 'paid_at_booth', fee_fen = $4,
                  exited_at = CASE WHEN status = 'open' THEN $2 ELSE exited_at END,
                  exit_capture_id = COALESCE(exit_capture_id, $3)
           WHERE id = $1 AND (status = 'open'
                              OR (status = 'closed'
                                  AND settlement IN ('offline_booth', 'offline_unpaid')))
           RETURNING id""",
        session_id,
        exited_at,
        exit_capture_id,
        fee_fen,
    )
    return done is not None


async def resolve_stay_exceptions(
    conn: asyncpg.Connection, capture_id: UUID, actor: str
) -> int | None:
    """The open exception of the stay's exit capture (awaiting the booth, left unpaid offline)
    is settled by the booth payment."""
    exception_id: int | None = await conn.fetchval(
        """UPDATE lane_exceptions SET status = 'resolved', resolved_by = $2, resolved_at = now()
           WHERE capture_id = $1 AND status = 'open'
             AND reason IN ('offline_booth', 'offline_exit') RETURNING id""",
        capture_id,
        actor,
    )
    return exception_id


async def clock_skews(
    conn: asyncpg.Connection, operator_id: int, *, car_park_id: int | None, limit: int
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT k.id, cp.code AS car_park, g.code AS gate, k.capture_id, k.direction,
                  k.session_id, k.gate_time, k.received_at, k.kind, k.skew_s, k.taken_at,
                  k.created_at
           FROM gate_clock_skews k JOIN car_parks cp ON cp.id = k.car_park_id
           JOIN gates g ON g.id = k.gate_id
           WHERE cp.operator_id = $1 AND ($2::bigint IS NULL OR k.car_park_id = $2)
           ORDER BY k.created_at DESC, k.id DESC LIMIT $3""",
        operator_id,
        car_park_id,
        limit,
    )
    return rows


_MARK_GHOSTS = f"""
    WITH found AS (
        SELECT s.id, {STAY_OPEN_TOO_LONG.format(now="$1")} AS too_long
        FROM open_stays o JOIN sessions s ON s.id = o.session_id
        JOIN car_parks cp ON cp.id = o.car_park_id
        WHERE s.status = 'open' AND s.ghost_at IS NULL AND {GHOST_STAY.format(now="$1")}
        ORDER BY s.id LIMIT $2
        FOR UPDATE OF s SKIP LOCKED)
    UPDATE sessions s SET ghost_at = $1 FROM found f WHERE s.id = f.id
    RETURNING s.id, s.car_park_id, s.plate, s.entered_at, s.entry_capture_id, f.too_long"""


async def mark_ghosts(conn: asyncpg.Connection, now: datetime, limit: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(_MARK_GHOSTS, now, limit)
    return rows


async def capture_of_stay(
    conn: asyncpg.Connection, session_id: int, entry_capture_id: UUID | None, entered_at: datetime
) -> asyncpg.Record | None:
    """The capture a ghost's exception is filed under: its entry, or (a stay opened at the exit)
    the capture that opened it, captured at its entry."""
    if entry_capture_id is not None:
        return await conn.fetchrow(
            """SELECT c.capture_id, c.captured_at, c.gate_id FROM capture_keys k
               JOIN captures c ON c.capture_id = k.capture_id AND c.captured_at = k.captured_at
               WHERE k.capture_id = $1""",
            entry_capture_id,
        )
    return await conn.fetchrow(
        """SELECT capture_id, captured_at, gate_id FROM captures
           WHERE session_id = $1 AND captured_at BETWEEN $2::timestamptz - interval '1 day'
                                                     AND $2::timestamptz + interval '1 day'
           ORDER BY captured_at LIMIT 1""",
        session_id,
        entered_at,
    )


async def insert_ghost_exception(
    conn: asyncpg.Connection,
    *,
    capture: asyncpg.Record,
    car_park_id: int,
    candidates: list[dict[str, Any]],
) -> bool:
    inserted = await conn.fetchval(
        """INSERT INTO lane_exceptions
               (capture_id, capture_captured_at, car_park_id, gate_id, reason, candidates)
           VALUES ($1, $2, $3, $4, 'ghost_stay', $5)
           ON CONFLICT (capture_id) DO NOTHING RETURNING id""",
        capture["capture_id"],
        capture["captured_at"],
        car_park_id,
        capture["gate_id"],
        candidates,
    )
    return inserted is not None
