"""SQL for driver payments at the gate: the held exit a QR code was shown for."""

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from parking.occupancy.repository import takes_a_place


@dataclass(frozen=True, slots=True)
class HeldExit:
    capture_id: UUID
    captured_at: datetime
    lot: str
    gate: str
    car_park_id: int
    car_park_name: str
    outcome: str
    session_id: int | None
    session_status: str | None
    plate: str | None
    plate_color: str | None
    entered_at: datetime | None
    fixed_fee_fen: int | None
    # A stay opened at the exit (no entry record) was never counted in the occupancy.
    counted_in: bool | None
    entry_certain: bool | None = None
    received_at: datetime | None = None
    # The exit's own read was certain (or a person named the vehicle).
    exit_certain: bool | None = None


async def held_exit(
    conn: asyncpg.Connection, capture_id: UUID, *, lock: bool = False
) -> HeldExit | None:
    lock_clause = "FOR UPDATE OF c" if lock else ""
    row = await conn.fetchrow(
        f"""SELECT c.capture_id, c.captured_at, cp.code AS lot, g.code AS gate,
                  cp.id AS car_park_id, cp.name AS car_park_name, c.outcome, c.session_id,
                  s.status AS session_status,
                  s.plate, s.plate_color, s.entered_at, s.fixed_fee_fen,
                  {takes_a_place("s")} AS counted_in, s.entry_certain,
                  c.received_at, c.read_certain AS exit_certain
           FROM captures c JOIN gates g ON g.id = c.gate_id
           JOIN car_parks cp ON cp.id = c.car_park_id
           LEFT JOIN sessions s ON s.id = c.session_id
           WHERE c.capture_id = $1 AND c.direction = 'out' {lock_clause}""",
        capture_id,
    )
    return HeldExit(**dict(row)) if row else None


async def lock_stay(conn: asyncpg.Connection, session_id: int) -> None:
    await conn.execute("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE", session_id)


@dataclass(frozen=True, slots=True)
class NewerCapture:
    capture_id: UUID
    session_id: int | None


async def newest_after(conn: asyncpg.Connection, capture_id: UUID) -> NewerCapture | None:
    """The newest live capture the same gate took after this one, None while this one is still
    the newest: taken after it by the gate's clock and received after it, not ordered by the
    gate's seq, which a replaced controller starts again (its first car would be older than
    its predecessor's last by seq, or the other way round); nor by receipt alone, as a
    capture the agent resent after a restart arrives after cars that came later. Live ones
    only (`captures_gate_live_received`): an offline one is known to the gate itself, whose
    agent refuses the late open on its own."""
    row = await conn.fetchrow(
        """SELECT n.capture_id, n.session_id
           FROM captures c
           JOIN captures n ON n.gate_id = c.gate_id AND NOT n.offline
                AND n.received_at > c.received_at AND n.captured_at > c.captured_at
           WHERE c.capture_id = $1
           ORDER BY n.received_at DESC LIMIT 1""",
        capture_id,
    )
    return NewerCapture(row["capture_id"], row["session_id"]) if row else None


async def account_for_vehicle(
    conn: asyncpg.Connection, plate: str, color: str | None
) -> int | None:
    """The account the vehicle (plate, colour) is bound to. A stay whose colour was not read
    names an account only when one vehicle of these characters is bound."""
    rows = await conn.fetch(
        """SELECT account_id FROM plate_bindings
           WHERE plate = $1 AND unbound_at IS NULL AND ($2::text IS NULL OR color = $2)""",
        plate,
        color,
    )
    return rows[0]["account_id"] if len(rows) == 1 else None


async def payment_for_release(conn: asyncpg.Connection, payment_id: int) -> UUID | None:
    capture_id: UUID | None = await conn.fetchval(
        "SELECT capture_id FROM payments WHERE id = $1 AND status = 'succeeded'", payment_id
    )
    return capture_id


async def open_stays(
    conn: asyncpg.Connection, car_park_code: str, plate: str
) -> list[asyncpg.Record]:
    """The open stays of the plate's characters in the car park: one per vehicle (colour)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT cp.id AS car_park_id, cp.name, s.id, s.entered_at, s.plate_color,
                  s.fixed_fee_fen, s.entry_certain
           FROM car_parks cp JOIN sessions s ON s.car_park_id = cp.id
           WHERE cp.code = $1 AND s.plate = $2 AND s.status = 'open'
           ORDER BY s.entered_at, s.id""",
        car_park_code,
        plate,
    )
    return rows
