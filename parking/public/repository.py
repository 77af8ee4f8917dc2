"""Public queries beyond `parking.car_parks.repository` (which lists car parks and finds one)."""

import asyncpg

# Mean Earth radius (IUGG), metres.
EARTH_RADIUS_M = 6_371_008.8


async def nearby(
    conn: asyncpg.Connection, latitude: float, longitude: float, radius_m: float
) -> list[asyncpg.Record]:
    """Car parks with a location within `radius_m` of the point (haversine great-circle
    distance), nearest first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT id, code, name, capacity, latitude, longitude, distance_m FROM (
               SELECT id, code, name, capacity, latitude, longitude,
                      2 * $4::float8 * asin(least(1, sqrt(
                          power(sin(radians(latitude - $1) / 2), 2)
                          + cos(radians($1)) * cos(radians(latitude))
                            * power(sin(radians(longitude - $2) / 2), 2)
                      ))) AS distance_m
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
