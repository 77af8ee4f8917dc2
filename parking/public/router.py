"""The public, read-only API for guidance signs and the city platform.

Anyone may call it; the city's API key is accepted too (a presented credential must be valid).
Answers may be cached for 10 s by anyone, and carry an ETag so that a poller asking again with
If-None-Match gets 304 while nothing changed. Car parks are read from the read replica when
there is one (`ReadConnectionDep`); the counts come from the occupancy counters either way.
"""

import hashlib
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, TypeAdapter

from parking.auth.principal import MaybePrincipalDep
from parking.car_parks.schemas import CarParkCode
from parking.deps import ReadConnectionDep, RuntimeDep
from parking.public import service
from parking.public.schemas import CarParkAvailability, NearbyCarPark, Place

router = APIRouter(prefix="/api/v1/public", tags=["public"])

CACHE_CONTROL = "public, max-age=10"
_NOT_MODIFIED: dict[int | str, dict[str, Any]] = {304: {"description": "Not modified"}}
_MODELS: TypeAdapter[BaseModel | Sequence[BaseModel]] = TypeAdapter(BaseModel | Sequence[BaseModel])


def _cacheable(request: Request, payload: BaseModel | Sequence[BaseModel]) -> Response:
    # serialize_as_any: each model with its own fields, not those of BaseModel (none).
    body = _MODELS.dump_json(payload, by_alias=True, serialize_as_any=True)
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    headers = {"Cache-Control": CACHE_CONTROL, "ETag": etag}
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


def _matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match uses the weak comparison: W/ prefixes do not matter."""
    if if_none_match is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


@router.get("/car-parks", response_model=list[CarParkAvailability], responses=_NOT_MODIFIED)
async def list_car_parks(
    _: MaybePrincipalDep, request: Request, conn: ReadConnectionDep, runtime: RuntimeDep
) -> Response:
    """Every car park with its capacity, free and occupied spaces and location."""
    return _cacheable(request, await service.car_parks_available(conn, runtime))


@router.get("/car-parks/nearby", response_model=list[NearbyCarPark], responses=_NOT_MODIFIED)
async def nearby_car_parks(
    _: MaybePrincipalDep,
    request: Request,
    conn: ReadConnectionDep,
    runtime: RuntimeDep,
    lat: Annotated[float, Query(ge=-90, le=90)],
    lon: Annotated[float, Query(ge=-180, le=180)],
    radius_m: Annotated[int, Query(ge=1, le=20_000)] = 1000,
) -> Response:
    """Car parks within `radius_m` metres of the point, nearest first, with the distance."""
    return _cacheable(request, await service.nearby(conn, runtime, lat, lon, radius_m))


@router.get("/car-parks/{code}", response_model=CarParkAvailability, responses=_NOT_MODIFIED)
async def get_car_park(
    code: CarParkCode,
    _: MaybePrincipalDep,
    request: Request,
    conn: ReadConnectionDep,
    runtime: RuntimeDep,
) -> Response:
    return _cacheable(request, await service.car_park_available(conn, runtime, code))


@router.get("/places", response_model=list[Place], responses=_NOT_MODIFIED)
async def list_places(
    _: MaybePrincipalDep, request: Request, conn: ReadConnectionDep, runtime: RuntimeDep
) -> Response:
    """Car parks as APDS-style places (localised names, location, capacity, availability)."""
    return _cacheable(request, await service.places(conn, runtime))
