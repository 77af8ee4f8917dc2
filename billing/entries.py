"""Stays registered with the payment provider at their entry (WeChat Pay Score parking's
创建停车入场): the lane queues a `parking_entry` job in the entry's transaction, the outbox
worker registers the stay, keeps the provider's parking id on it and records the plate's
service state the provider answered. A stay never registered (the provider was away) is
registered by the deduction at its exit, under the same number."""

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from billing import fees


def out_parking_no(session_id: int, entry_capture_id: UUID | None, entered_at: datetime) -> str:
    """Our number for a stay's entry at the provider: the same at the entry and at the exit, at
    most 32 characters, and not another deployment's on a shared merchant account (the entry
    capture's random id is part of it; a stay without one, its entry's microsecond)."""
    tail = entry_capture_id.hex if entry_capture_id else f"{int(entered_at.timestamp() * 1e6):x}"
    return f"e{session_id}-{tail}"[:32]


async def queue(conn: asyncpg.Connection, session_id: int) -> None:
    """In the entry's transaction: the stay is registered after commit."""
    await conn.execute("INSERT INTO outbox (kind, ref_id) VALUES ('parking_entry', $1)", session_id)


@dataclass(frozen=True, slots=True)
class Entry:
    session_id: int
    car_park_id: int
    entry_capture_id: UUID | None
    plate: str
    plate_color: str
    entered_at: datetime
    car_park_name: str
    provider_parking_id: str | None
    # The driver's agreement with the provider when the stay began (None: none any more).
    provider: str | None
    agreement_no: str | None

    @property
    def out_parking_no(self) -> str:
        return out_parking_no(self.session_id, self.entry_capture_id, self.entered_at)


async def load(conn: asyncpg.Connection, session_id: int) -> Entry | None:
    row = await conn.fetchrow(
        """SELECT s.id AS session_id, s.car_park_id, s.entry_capture_id, s.plate,
                  s.plate_color, s.entered_at, cp.name AS car_park_name, s.provider_parking_id,
                  pa.provider, pa.agreement_no
           FROM sessions s
           JOIN car_parks cp ON cp.id = s.car_park_id
           LEFT JOIN plate_bindings b ON b.plate = s.plate AND b.color = s.plate_color
               AND b.unbound_at IS NULL AND b.bound_at <= s.entered_at
           LEFT JOIN pay_later_agreements pa ON pa.account_id = b.account_id
               AND pa.cancelled_at IS NULL AND pa.signed_at <= s.entered_at
           WHERE s.id = $1""",
        session_id,
    )
    return Entry(**dict(row)) if row else None


async def free_duration_s(conn: asyncpg.Connection, entry: Entry) -> int:
    """The free time of the tariff the stay is priced by, as the provider shows it."""
    tariff = fees.tariff_at(await fees.tariff_versions(conn, entry.car_park_id), entry.entered_at)
    return tariff.free_minutes * 60 if tariff is not None else 0


async def record_parking_id(conn: asyncpg.Connection, session_id: int, parking_id: str) -> None:
    """The provider's id of the stay, kept once (a late second registration changes nothing)."""
    await conn.execute(
        """UPDATE sessions SET provider_parking_id = $2
           WHERE id = $1 AND provider_parking_id IS NULL""",
        session_id,
        parking_id,
    )
