"""SQL of plate ownership disputes and of moving a binding between accounts."""

from datetime import datetime

import asyncpg

# A dispute with both parties' evidence: the holder's binding it was about and, once upheld,
# the claimant's binding.
_CLAIM = """
    SELECT d.id, d.plate, d.color, d.status, d.created_at, d.resolved_at, d.resolved_by,
           d.resolution_note, d.claimant_account_id, d.holder_account_id,
           d.claimant_verified_by, d.same_licence_as_holder,
           d.claimant_binding_id, cb.bound_at AS claimant_bound_at,
           d.holder_binding_id, hb.verified_by AS holder_verified_by,
           hb.bound_at AS holder_bound_at, hb.unbound_at AS holder_unbound_at
    FROM plate_disputes d
    LEFT JOIN plate_bindings hb ON hb.id = d.holder_binding_id
    LEFT JOIN plate_bindings cb ON cb.id = d.claimant_binding_id"""


async def open_claims(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"{_CLAIM} WHERE d.status = 'open' ORDER BY d.created_at, d.id LIMIT $1", limit
    )
    return rows


async def claim(conn: asyncpg.Connection, dispute_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(f"{_CLAIM} WHERE d.id = $1", dispute_id)
    return row


async def lock_claim(conn: asyncpg.Connection, dispute_id: int) -> asyncpg.Record | None:
    """The dispute's own row, locked: one decision at a time."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """SELECT id, plate, color, status, claimant_account_id, holder_account_id,
                  claimant_verified_by, claimant_licence_ref
           FROM plate_disputes WHERE id = $1 FOR UPDATE""",
        dispute_id,
    )
    return row


async def close(
    conn: asyncpg.Connection,
    dispute_id: int,
    *,
    status: str,
    resolved_by: str,
    note: str | None,
) -> datetime | None:
    """Ends an open dispute now; its `resolved_at` (the proof time), None when it was not
    open. The clock's time, not the transaction's start: it must not precede a binding that
    another transaction committed while this one ran."""
    resolved_at: datetime | None = await conn.fetchval(
        """UPDATE plate_disputes
           SET status = $2, resolved_at = clock_timestamp(), resolved_by = $3,
               resolution_note = $4
           WHERE id = $1 AND status = 'open' RETURNING resolved_at""",
        dispute_id,
        status,
        resolved_by,
        note,
    )
    return resolved_at


async def end_binding(
    conn: asyncpg.Connection, account_id: int, plate: str, color: str, at: datetime
) -> int | None:
    """Ends the account's active binding of the vehicle at `at`; its id, None when it had none."""
    binding_id: int | None = await conn.fetchval(
        """UPDATE plate_bindings SET unbound_at = $4
           WHERE account_id = $1 AND plate = $2 AND color = $3 AND unbound_at IS NULL
           RETURNING id""",
        account_id,
        plate,
        color,
        at,
    )
    return binding_id


async def bind_from(
    conn: asyncpg.Connection,
    account_id: int,
    plate: str,
    color: str,
    *,
    at: datetime,
    verified_by: str | None,
    licence_ref: str | None,
) -> int | None:
    """The account's new binding of the vehicle, beginning at `at`; None when another account
    holds it actively."""
    binding_id: int | None = await conn.fetchval(
        """INSERT INTO plate_bindings (account_id, plate, color, bound_at, verified_by,
                                       licence_ref)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (plate, color) WHERE unbound_at IS NULL DO NOTHING
           RETURNING id""",
        account_id,
        plate,
        color,
        at,
        verified_by,
        licence_ref,
    )
    return binding_id


async def set_claimant_binding(conn: asyncpg.Connection, dispute_id: int, binding_id: int) -> None:
    await conn.execute(
        "UPDATE plate_disputes SET claimant_binding_id = $2 WHERE id = $1", dispute_id, binding_id
    )


async def repoint_open_disputes(
    conn: asyncpg.Connection, plate: str, color: str, holder_account_id: int, binding_id: int
) -> None:
    """Other claims of a vehicle that just moved are now against its new holder (and the one
    the new holder made itself, if any, is moot: it holds the vehicle). Whether a claimant
    showed the holder's very licence was of the previous holder's: unknown for the new one (the
    licences are kept as salted hashes, which cannot be compared with each other)."""
    await conn.execute(
        """UPDATE plate_disputes SET status = 'withdrawn', resolved_at = now(),
                  resolved_by = 'superseded'
           WHERE plate = $1 AND color = $2 AND status = 'open' AND claimant_account_id = $3""",
        plate,
        color,
        holder_account_id,
    )
    await conn.execute(
        """UPDATE plate_disputes SET holder_account_id = $3, holder_binding_id = $4,
                  same_licence_as_holder = NULL
           WHERE plate = $1 AND color = $2 AND status = 'open' AND holder_account_id <> $3""",
        plate,
        color,
        holder_account_id,
        binding_id,
    )


async def stays_between(
    conn: asyncpg.Connection, plate: str, color: str, since: datetime, until: datetime | None
) -> list[asyncpg.Record]:
    """Stays of the vehicle (or of its characters with no colour read) that were parked at
    any time between `since` and `until` (now when None), oldest first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT s.id, cp.code AS car_park_code, cp.name AS car_park, s.plate_color, s.status,
                  s.entered_at, s.exited_at, s.fee_fen, s.settlement, s.account_id
           FROM sessions s JOIN car_parks cp ON cp.id = s.car_park_id
           WHERE s.plate = $1 AND (s.plate_color IS NULL OR s.plate_color = $2)
             AND s.status <> 'superseded'
             AND s.entered_at < COALESCE($4::timestamptz, 'infinity')
             AND (s.exited_at IS NULL OR s.exited_at >= $3)
           ORDER BY s.entered_at, s.id LIMIT 500""",
        plate,
        color,
        since,
        until,
    )
    return rows
