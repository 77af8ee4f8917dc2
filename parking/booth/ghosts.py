"""Ghost stays (issue #15): stays left open far longer than normal, or whose plate was seen
elsewhere since, go to a person (`lane_exceptions`, reason 'ghost_stay') and stop being
candidates for matching an uncertain exit read (`parking.lanes.repository.open_plates`).

Run by the worker's hourly maintenance (parking/runtime.py). Idempotent: a stay is marked once
(`sessions.ghost_at`) and its exception is unique by its capture.
"""

from datetime import datetime

import asyncpg

from parking.booth import repository as repo
from parking.logging import get_logger

log = get_logger(__name__)
_BATCH = 1000


async def sweep_ghost_stays(pool: asyncpg.Pool, now: datetime) -> int:
    """Marks and files every ghost stay found now, a batch per transaction; returns how many."""
    total = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            ghosts = await repo.mark_ghosts(conn, now, _BATCH)
            for ghost in ghosts:
                await _file(conn, ghost, now)
        total += len(ghosts)
        if len(ghosts) < _BATCH:
            break
    if total:
        log.info("lanes.ghost_stays", found=total)
    return total


async def _file(conn: asyncpg.Connection, ghost: asyncpg.Record, now: datetime) -> None:
    capture = await repo.capture_of_stay(
        conn, ghost["id"], ghost["entry_capture_id"], ghost["entered_at"]
    )
    if capture is None:
        # Marked all the same: it is no candidate for matching any more.
        log.warning("lanes.ghost_stay_without_capture", session_id=ghost["id"])
        return
    await repo.insert_ghost_exception(
        conn,
        capture=capture,
        car_park_id=ghost["car_park_id"],
        candidates=[
            {
                "plate": ghost["plate"],
                "kind": "stay",
                "session_id": ghost["id"],
                "why": "open_too_long" if ghost["too_long"] else "seen_elsewhere",
                "open_days": round((now - ghost["entered_at"]).total_seconds() / 86400, 1),
            }
        ],
    )
