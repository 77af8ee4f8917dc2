"""The one order in which a capture being decided, paid or opened is locked.

An operator deciding a held capture locks its exception, then the capture
(`parking.operators.repository.exception_for_update`), then the stay. Everything else that
settles a capture's stay takes the same order through `lock_for_decision` (a gate payment being
booked, a booth payment, a gate opened by hand for the capture), so that no two of them lock
opposite ends first and wait for each other (a deadlock: PostgreSQL aborts one, a 500).
"""

from uuid import UUID

import asyncpg


async def lock_for_decision(
    conn: asyncpg.Connection, capture_id: UUID, car_park_id: int | None = None
) -> None:
    """Locks the capture's exception (if it has one), then the capture: before its stay. A
    ghost stay's exception is left alone: it is its stay's, which migration 0055's rule updates
    once whatever ends the stay locked the stay (locked first here, the two waited for each
    other). With `car_park_id`, only a capture of that car park: staff of another company wait
    on nothing of it."""
    await conn.execute(
        """SELECT 1 FROM lane_exceptions
           WHERE capture_id = $1 AND reason <> 'ghost_stay'
             AND ($2::bigint IS NULL OR car_park_id = $2)
           FOR UPDATE""",
        capture_id,
        car_park_id,
    )
    await conn.execute(
        """SELECT 1 FROM captures WHERE capture_id = $1 AND ($2::bigint IS NULL OR car_park_id = $2)
           FOR UPDATE""",
        capture_id,
        car_park_id,
    )
