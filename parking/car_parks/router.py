from fastapi import APIRouter, Response

from parking.car_parks import service
from parking.car_parks.schemas import CarParkCode, CarParkOccupancy
from parking.deps import ReadConnectionDep, RuntimeDep

router = APIRouter(prefix="/api/v1", tags=["car parks"])


@router.get("/car-parks", response_model=list[CarParkOccupancy])
async def list_car_parks(
    conn: ReadConnectionDep, runtime: RuntimeDep, response: Response
) -> list[CarParkOccupancy]:
    """Every car park with its live occupancy (public: guidance signs and the city platform)."""
    response.headers["Cache-Control"] = "public, max-age=5"
    return await service.list_with_occupancy(conn, runtime.occupancy)


@router.get("/car-parks/{code}", response_model=CarParkOccupancy)
async def get_car_park(
    code: CarParkCode, conn: ReadConnectionDep, runtime: RuntimeDep, response: Response
) -> CarParkOccupancy:
    response.headers["Cache-Control"] = "public, max-age=5"
    return await service.get_with_occupancy(conn, runtime.occupancy, code)
