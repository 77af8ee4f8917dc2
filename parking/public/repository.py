"""Public queries beyond `parking.car_parks.repository` (which lists car parks and finds one)."""

import asyncpg

# Mean Earth radius (IUGG), metres.
EARTH_RADIUS_M = 6_371_008.8


def distance_m_sql(latitude: str, longitude: str, radius: str, table: str = "car_parks") -> str:
    """SQL for the haversine great-circle distance in metres from the point given by the
    parameters `latitude`, `longitude` (e.g. "$1", "$2") to the location of `table`'s car park;
    `radius` is the parameter holding EARTH_RADIUS_M."""
    lat, lon = f"{table}.latitude", f"{table}.longitude"
    return f"""2 * {radius}::float8 * asin(least(1, sqrt(
                   power(sin(radians({lat} - {latitude}) / 2), 2)
                   + cos(radians({latitude})) * cos(radians({lat}))
                     * power(sin(radians({lon} - {longitude}) / 2), 2))))"""


async def nearby(
    conn: asyncpg.Connection, latitude: float, longitude: float, radius_m: float
) -> list[asyncpg.Record]:
    """Car parks with a location within `radius_m` of the point (haversine great-circle
    distance), nearest first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT id, code, name, capacity, latitude, longitude, distance_m FROM (
               SELECT id, code, name, capacity, latitude, longitude,
                      {distance_m_sql("$1", "$2", "$4")} AS distance_m
               FROM car_parks
               WHERE latitude IS NOT NULL AND longitude IS NOT NULL
           ) located
           WHERE distance_m <= $3
           ORDER BY distance_m, code""",
        latitude,
        longitude,
        radius_m,
        EARTH_RADIUS_M,
    )
    return rows


async def sign_rows(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every car park, with what a guidance sign needs."""
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT id, code, capacity, closed_at IS NOT NULL AS closed FROM car_parks ORDER BY code"
    )
    return rows
