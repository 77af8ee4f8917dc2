"""The one order in which a capture being decided, paid or opened is locked.

An operator deciding a held capture locks its exception, then the capture
(`parking.operators.repository.exception_for_update`), then the stay. Everything else that
settles a capture's stay takes the same order through `lock_for_decision` (a gate payment being
booked, a booth payment, a gate opened by hand for the capture), so that no two of them lock
opposite ends first and wait for each other (a deadlock: PostgreSQL aborts one, a 500).
"""

from uuid import UUID

import asyncpg


async def lock_for_decision(conn: asyncpg.Connection, capture_id: UUID) -> None:
    """Locks the capture's exception (if it has one), then the capture: before its stay."""
    await conn.execute("SELECT 1 FROM lane_exceptions WHERE capture_id = $1 FOR UPDATE", capture_id)
    await conn.execute("SELECT 1 FROM captures WHERE capture_id = $1 FOR UPDATE", capture_id)
