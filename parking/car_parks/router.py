"""The original public car park routes (guidance signs and the city platform): cached and
limited per client like the rest of the public API (parking.public.router)."""

from fastapi import APIRouter, Request, Response

from parking.car_parks import service
from parking.car_parks.schemas import CarParkCode, CarParkOccupancy
from parking.deps import ReadConnectionDep, RuntimeDep
from parking.public.router import AnswerCacheDep, PublicLimit, answer_of, cached, respond

router = APIRouter(prefix="/api/v1", tags=["car parks"], dependencies=[PublicLimit])


@router.get("/car-parks", response_model=list[CarParkOccupancy])
async def list_car_parks(
    request: Request, conn: ReadConnectionDep, runtime: RuntimeDep, answers: AnswerCacheDep
) -> Response:
    """Every car park with its live occupancy, built at most once per
    PARKING_PUBLIC_CACHE_SECONDS in each process (a city's list costs tens of milliseconds of
    CPU to build, which must not be spent again for every caller)."""

    async def payload() -> list[dict[str, object]]:
        rows = await service.list_with_occupancy(conn, runtime.occupancy)
        return [row.model_dump() for row in rows]

    return await cached(request, answers, "v1-car-parks", payload)


@router.get("/car-parks/{code}", response_model=CarParkOccupancy)
async def get_car_park(
    code: CarParkCode, request: Request, conn: ReadConnectionDep, runtime: RuntimeDep
) -> Response:
    row = await service.get_with_occupancy(conn, runtime.occupancy, code)
    return respond(request, answer_of(row.model_dump()))
