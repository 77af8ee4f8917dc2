"""The dashboard's queries, always scoped to one operator's car parks."""

from collections.abc import Sequence
from datetime import datetime

import asyncpg


async def own_car_parks(conn: asyncpg.Connection, operator_id: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT id, code, name, capacity FROM car_parks WHERE operator_id = $1 ORDER BY code",
        operator_id,
    )
    return rows


async def hourly_traffic(
    conn: asyncpg.Connection,
    car_park_ids: Sequence[int],
    start: datetime,
    end: datetime,
    timezone: str,
) -> list[asyncpg.Record]:
    """Entries and exits per local hour in [start, end). An entry is a stay opened by an entry
    gate (not one opened at the exit for want of an entry record); an exit closed a stay (a
    superseded stay's exit was missed, so it is not one)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT hour, count(*) FILTER (WHERE kind = 'entry') AS entries,
                  count(*) FILTER (WHERE kind = 'exit') AS exits
           FROM (
               SELECT extract(hour FROM entered_at AT TIME ZONE $4)::int AS hour, 'entry' AS kind
               FROM sessions
               WHERE car_park_id = ANY($1) AND entry_capture_id IS NOT NULL
                 AND entered_at >= $2 AND entered_at < $3
               UNION ALL
               SELECT extract(hour FROM exited_at AT TIME ZONE $4)::int, 'exit'
               FROM sessions
               WHERE car_park_id = ANY($1) AND status = 'closed'
                 AND exited_at >= $2 AND exited_at < $3
           ) moves
           GROUP BY hour ORDER BY hour""",
        list(car_park_ids),
        start,
        end,
        timezone,
    )
    return rows


async def open_exception_count(conn: asyncpg.Connection, car_park_ids: Sequence[int]) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM lane_exceptions WHERE status = 'open' AND car_park_id = ANY($1)",
        list(car_park_ids),
    )
    return count
