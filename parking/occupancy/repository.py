"""Occupancy as PostgreSQL knows it: the open stays that take a place. Redis only caches these
counts."""

import asyncpg


def takes_a_place(stay: str = "sessions") -> str:
    """Whether the stay `stay` (a `sessions` row's name in the query) takes a place: it came
    in through an entry, or was carried over from before the system started (no entry capture,
    no fixed fee). A stay opened at the exit under the no-entry fixed-fee policy never came in
    through a gate here: the lane does not count it in (its delta 0), so no count may (live 1,
    rebuilt 2, and nothing ever counting it out). The one definition for the rebuild and every
    path that counts a stay out (the booth, payments, an operator's open, a rejected charge)."""
    return f"({stay}.entry_capture_id IS NOT NULL OR {stay}.fixed_fee_fen IS NULL)"


async def open_count(conn: asyncpg.Connection, car_park_id: int) -> int:
    count: int = await conn.fetchval(
        f"""SELECT count(*) FROM sessions
            WHERE car_park_id = $1 AND status = 'open' AND {takes_a_place()}""",
        car_park_id,
    )
    return count


async def open_counts(conn: asyncpg.Connection) -> dict[int, int]:
    rows = await conn.fetch(
        f"""SELECT cp.id, count(s.id) AS n FROM car_parks cp
            LEFT JOIN (SELECT id, car_park_id FROM sessions
                       WHERE status = 'open' AND {takes_a_place()}) s
                      ON s.car_park_id = cp.id
            GROUP BY cp.id"""
    )
    return {r["id"]: r["n"] for r in rows}


async def car_park_ids(conn: asyncpg.Connection) -> list[int]:
    return [r["id"] for r in await conn.fetch("SELECT id FROM car_parks ORDER BY id")]
