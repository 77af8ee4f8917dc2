"""Occupancy as PostgreSQL knows it: the open stays. Redis only caches these counts."""

import asyncpg


async def open_count(conn: asyncpg.Connection, car_park_id: int) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM sessions WHERE car_park_id = $1 AND status = 'open'", car_park_id
    )
    return count


async def open_counts(conn: asyncpg.Connection) -> dict[int, int]:
    rows = await conn.fetch(
        """SELECT cp.id, count(s.id) AS n FROM car_parks cp
           LEFT JOIN sessions s ON s.car_park_id = cp.id AND s.status = 'open'
           GROUP BY cp.id"""
    )
    return {r["id"]: r["n"] for r in rows}
