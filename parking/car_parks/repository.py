import asyncpg


async def list_car_parks(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT id, code, name, capacity, latitude, longitude FROM car_parks ORDER BY code"
    )
    return rows


async def get_by_code(conn: asyncpg.Connection, code: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT id, code, name, capacity, latitude, longitude FROM car_parks WHERE code = $1",
        code,
    )
    return row
