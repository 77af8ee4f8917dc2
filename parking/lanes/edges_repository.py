"""SQL of the lane's edge cases (`edges.py`): held stays left without paying, stays the booth
was paid for, gate clocks. Every function runs on the caller's connection/transaction."""

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg


@dataclass(frozen=True, slots=True)
class Hold:
    """The last time a stay's exit was held with a fee a driver could pay."""

    capture_id: UUID
    captured_at: datetime
    gate_id: int
    held_at: datetime
    outcome: str
    # The hold's read was proven (certain by a calibrated score).
    read_proven: bool


async def last_payable_hold(conn: asyncpg.Connection, session_id: int) -> Hold | None:
    row = await conn.fetchrow(
        """SELECT capture_id, captured_at, gate_id, received_at AS held_at, outcome,
                  COALESCE(read_proven, false) AS read_proven
           FROM captures
           WHERE session_id = $1 AND outcome IN
                 ('held_unbound', 'held_no_agreement', 'held_over_limit', 'held_arrears')
           ORDER BY received_at DESC LIMIT 1""",
        session_id,
    )
    return Hold(**dict(row)) if row else None


async def account_bound_throughout(
    conn: asyncpg.Connection, plate: str, color: str, since: datetime, until: datetime
) -> int | None:
    """The account the vehicle (plate and colour) was bound to from `since` (a stay's entry)
    to `until` (its exit) without a break, if it still exists. A binding that ended in between
    (given up, or moved to the owner a registry or the city platform proved) covers no part
    of what the stay owes."""
    account_id: int | None = await conn.fetchval(
        """SELECT b.account_id FROM plate_bindings b JOIN accounts a ON a.id = b.account_id
           WHERE b.plate = $1 AND b.color = $4
             AND b.bound_at <= $2 AND (b.unbound_at IS NULL OR b.unbound_at > $3)
             AND a.deleted_at IS NULL
           ORDER BY b.bound_at DESC LIMIT 1""",
        plate,
        since,
        until,
        color,
    )
    return account_id


async def live_neighbours(
    conn: asyncpg.Connection, gate_id: int, seq: int
) -> tuple[datetime | None, datetime | None]:
    """When we received the gate's nearest live captures before and after `seq` in its counter
    (which grows across the agent's restarts): a capture with a lower seq was taken before
    this one, one with a higher seq after it."""
    row = await conn.fetchrow(
        """SELECT (SELECT received_at FROM captures
                   WHERE gate_id = $1 AND NOT offline AND seq < $2
                   ORDER BY seq DESC LIMIT 1) AS before,
                  (SELECT received_at FROM captures
                   WHERE gate_id = $1 AND NOT offline AND seq > $2
                   ORDER BY seq LIMIT 1) AS after""",
        gate_id,
        seq,
    )
    assert row is not None
    return row["before"], row["after"]


async def supersede_unpaid(
    conn: asyncpg.Connection,
    *,
    session_id: int,
    exited_at: datetime,
    fee_fen: int,
    account_id: int | None,
    settlement: str,
) -> None:
    """A missed exit whose stay was held with a fee: superseded, with the fee and who owes it."""
    await conn.execute(
        """UPDATE sessions SET status = 'superseded', exited_at = $2, fee_fen = $3,
                  account_id = $4, settlement = $5
           WHERE id = $1 AND status = 'open'""",
        session_id,
        exited_at,
        fee_fen,
        account_id,
        settlement,
    )


async def booth_paid_stay(
    conn: asyncpg.Connection,
    car_park_id: int,
    plate: str,
    color: str,
    at: datetime,
    reentered_by: datetime,
) -> int | None:
    """A stay of the vehicle the booth was paid for whose exit capture has not come yet, and
    that the vehicle had not entered here again after by `reentered_by` (the gate's clock,
    less what it may be ahead): an exit from a later stay is that stay's, even when the
    earlier one's exit never came."""
    session_id: int | None = await conn.fetchval(
        """SELECT s.id FROM sessions s
           WHERE s.car_park_id = $1 AND s.plate = $2 AND s.plate_color = $4
             AND s.settlement = 'paid_at_booth'
             AND s.exit_capture_id IS NULL AND s.entered_at <= $3
             AND NOT EXISTS (
                 SELECT 1 FROM sessions n
                 WHERE n.car_park_id = s.car_park_id AND n.plate = s.plate
                   AND n.plate_color = s.plate_color
                   AND n.entered_at > s.entered_at AND n.entered_at <= $5)
           ORDER BY s.entered_at DESC LIMIT 1 FOR UPDATE""",
        car_park_id,
        plate,
        at,
        color,
        reentered_by,
    )
    return session_id


async def attach_exit_capture(conn: asyncpg.Connection, session_id: int, capture_id: UUID) -> None:
    await conn.execute(
        "UPDATE sessions SET exit_capture_id = $2 WHERE id = $1 AND exit_capture_id IS NULL",
        session_id,
        capture_id,
    )


async def insert_clock_skew(
    conn: asyncpg.Connection,
    *,
    capture_id: UUID,
    car_park_id: int,
    gate_id: int,
    direction: str,
    session_id: int | None,
    gate_time: datetime,
    received_at: datetime,
    kind: str,
    skew_s: int,
    taken_at: datetime,
) -> None:
    await conn.execute(
        """INSERT INTO gate_clock_skews (capture_id, car_park_id, gate_id, direction, session_id,
                                         gate_time, received_at, kind, skew_s, taken_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
           ON CONFLICT (capture_id) DO NOTHING""",
        capture_id,
        car_park_id,
        gate_id,
        direction,
        session_id,
        gate_time,
        received_at,
        kind,
        skew_s,
        taken_at,
    )
