import asyncpg

from parking.car_parks import repository
from parking.car_parks.schemas import CarParkOccupancy
from parking.errors import NotFound
from parking.occupancy.service import Occupancy


def view(row: asyncpg.Record, occupied: int) -> CarParkOccupancy:
    return CarParkOccupancy(
        code=row["code"],
        name=row["name"],
        capacity=row["capacity"],
        occupied=occupied,
        free=max(0, row["capacity"] - occupied),
        latitude=row["latitude"],
        longitude=row["longitude"],
    )


async def list_with_occupancy(
    conn: asyncpg.Connection, occupancy: Occupancy
) -> list[CarParkOccupancy]:
    rows = await repository.list_car_parks(conn)
    counts = await occupancy.get_many([r["id"] for r in rows])
    return [view(r, counts[r["id"]]) for r in rows]


async def get_with_occupancy(
    conn: asyncpg.Connection, occupancy: Occupancy, code: str
) -> CarParkOccupancy:
    row = await repository.get_by_code(conn, code)
    if row is None:
        raise NotFound("car_park")
    return view(row, await occupancy.get(row["id"]))
