"""The public, read-only API for guidance signs and the city platform.

Anyone may call it; the city's API key is accepted too (a presented credential must be valid).
Answers may be cached for 10 s by anyone, and carry an ETag so that a poller asking again with
If-None-Match gets 304 while nothing changed. Car parks are read from the read replica when
there is one (`ReadConnectionDep`); the counts come from the occupancy counters either way.

The list, the places and each nearby search are built once per PARKING_PUBLIC_CACHE_SECONDS
(default 1 s) in each process and served from memory in between (`AnswerCache`): their counts
are at most that old when they leave the process. One car park's answer is built every time.
"""

import hashlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response

from parking.auth.principal import MaybePrincipalDep
from parking.car_parks.schemas import CarParkCode
from parking.deps import ReadConnectionDep, RuntimeDep
from parking.public import service
from parking.public.cache import Answer, AnswerCache, app_cache
from parking.public.schemas import CarParkAvailability, NearbyCarPark, Place
from parking.ratelimit import client_address, hit


async def public_client_limit(
    principal: MaybePrincipalDep, request: Request, runtime: RuntimeDep
) -> None:
    """Anonymous callers of the public API get PARKING_PUBLIC_REQUESTS_PER_MINUTE_PER_CLIENT
    (429 beyond); the city's key (guidance signs, many behind one address) is not counted."""
    if principal is not None and principal.kind == "city":
        return
    settings = runtime.settings
    await hit(
        runtime.redis,
        f"{settings.redis_key_prefix}ratelimit:public:{client_address(request)}",
        settings.public_requests_per_minute_per_client,
        60,
    )


PublicLimit = Depends(public_client_limit)

router = APIRouter(prefix="/api/v1/public", tags=["public"], dependencies=[PublicLimit])

CACHE_CONTROL = "public, max-age=10"
NOT_MODIFIED: dict[int | str, dict[str, Any]] = {304: {"description": "Not modified"}}


def get_answer_cache(request: Request, runtime: RuntimeDep) -> AnswerCache[Answer]:
    """The app's cache of built answers."""
    return app_cache(request, "public_answers", runtime.settings.public_cache_seconds)


AnswerCacheDep = Annotated[AnswerCache[Answer], Depends(get_answer_cache)]


def answer_of(payload: Any) -> Answer:
    # OPT_UTC_Z: times end in "Z", as pydantic writes them.
    body = orjson.dumps(payload, option=orjson.OPT_UTC_Z)
    return Answer(body, f'"{hashlib.sha256(body).hexdigest()[:32]}"')


def respond(request: Request, answer: Answer) -> Response:
    headers = {"Cache-Control": CACHE_CONTROL, "ETag": answer.etag}
    if _matches(request.headers.get("if-none-match"), answer.etag):
        return Response(status_code=304, headers=headers)
    return Response(answer.body, media_type="application/json", headers=headers)


async def cached(
    request: Request,
    answers: AnswerCache[Answer],
    key: Hashable,
    payload: Callable[[], Awaitable[Any]],
) -> Response:
    async def build() -> Answer:
        return answer_of(await payload())

    return respond(request, await answers.get(key, build))


def _matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match uses the weak comparison: W/ prefixes do not matter."""
    if if_none_match is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag.removeprefix("W/") in tags


@router.get("/car-parks", response_model=list[CarParkAvailability], responses=NOT_MODIFIED)
async def list_car_parks(
    _: MaybePrincipalDep,
    request: Request,
    conn: ReadConnectionDep,
    runtime: RuntimeDep,
    answers: AnswerCacheDep,
) -> Response:
    """Every car park with its capacity, free and occupied spaces and location."""
    return await cached(
        request, answers, "car-parks", lambda: service.car_parks_available(conn, runtime)
    )


@router.get("/car-parks/nearby", response_model=list[NearbyCarPark], responses=NOT_MODIFIED)
async def nearby_car_parks(
    _: MaybePrincipalDep,
    request: Request,
    conn: ReadConnectionDep,
    runtime: RuntimeDep,
    answers: AnswerCacheDep,
    lat: Annotated[float, Query(ge=-90, le=90)],
    lon: Annotated[float, Query(ge=-180, le=180)],
    radius_m: Annotated[int, Query(ge=1, le=20_000)] = 1000,
) -> Response:
    """Car parks within `radius_m` metres of the point, nearest first, with the distance."""
    return await cached(
        request,
        answers,
        ("nearby", lat, lon, radius_m),
        lambda: service.nearby(conn, runtime, lat, lon, radius_m),
    )


@router.get("/car-parks/{code}", response_model=CarParkAvailability, responses=NOT_MODIFIED)
async def get_car_park(
    code: CarParkCode,
    _: MaybePrincipalDep,
    request: Request,
    conn: ReadConnectionDep,
    runtime: RuntimeDep,
) -> Response:
    return respond(request, answer_of(await service.car_park_available(conn, runtime, code)))


@router.get("/places", response_model=list[Place], responses=NOT_MODIFIED)
async def list_places(
    _: MaybePrincipalDep,
    request: Request,
    conn: ReadConnectionDep,
    runtime: RuntimeDep,
    answers: AnswerCacheDep,
) -> Response:
    """Car parks as APDS-style places (localised names, location, capacity, availability)."""
    return await cached(request, answers, "places", lambda: service.places(conn, runtime))
