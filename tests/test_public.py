"""The public API for guidance signs and the city platform: live availability per car park,
car parks near a point, APDS-style places; cacheable, with ETags; anonymous or a city key."""

import asyncio
import math
import random
import uuid
from datetime import datetime
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import BaseModel, TypeAdapter

from parking.auth import repository as auth_repo
from parking.auth.tokens import digest, new_secret
from parking.public.cache import Answer, AnswerCache
from parking.public.router import get_answer_cache
from parking.public.schemas import CarParkAvailability, NearbyCarPark, Place
from parking.runtime import Runtime
from parking_dev import sandbox
from tests.conftest import (
    Lot,
    api_server,
    bearer,
    eventually,
    located_car_park,
    unique_plate,
)
from tests.gates import GateProbe

EARTH_RADIUS_M = 6_371_008.8


def _haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = (
        math.sin((p2 - p1) / 2) ** 2
        + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(a))


def _as_documented(model: type[BaseModel], answer: httpx.Response) -> list[Any]:
    """The answer, checked to be exactly what the documented models would write (the answers
    are built as plain dicts)."""
    models = TypeAdapter(list[model])  # type: ignore[valid-type]
    assert models.dump_json(models.validate_json(answer.content), by_alias=True) == answer.content
    return list(answer.json())


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _enter(gate: GateProbe, lot: Lot) -> None:
    command = await gate.decide(lot.code, "in1", gate.capture("in", unique_plate()))
    assert command["action"] == "open", command


async def test_car_park_shows_live_counts_and_is_cacheable(
    api: httpx.AsyncClient, runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    await _enter(gate, lot)
    await _enter(gate, lot)

    first = await api.get(f"/api/v1/public/car-parks/{lot.code}")
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["code"], body["name"], body["capacity"]) == (lot.code, lot.name, 50)
    assert (body["occupied"], body["free"], body["location"]) == (2, 48, None)
    assert datetime.fromisoformat(body["updated_at"]).tzinfo is not None
    assert first.headers["cache-control"] == "public, max-age=10"
    etag = first.headers["etag"]

    unchanged = await api.get(
        f"/api/v1/public/car-parks/{lot.code}", headers={"If-None-Match": etag}
    )
    assert unchanged.status_code == 304 and unchanged.content == b""
    assert unchanged.headers["etag"] == etag

    await _enter(gate, lot)
    changed = await api.get(
        f"/api/v1/public/car-parks/{lot.code}", headers={"If-None-Match": f"W/{etag}"}
    )
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag
    assert changed.json()["occupied"] == 3
    assert changed.json()["updated_at"] >= body["updated_at"]


async def test_counts_lost_from_redis_are_rebuilt_from_the_stays(
    api: httpx.AsyncClient, runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    await _enter(gate, lot)
    await runtime.redis.delete(f"{runtime.settings.redis_key_prefix}occupancy:{lot.id}")

    listed = await api.get("/api/v1/public/car-parks")

    assert listed.status_code == 200
    mine = [c for c in _as_documented(CarParkAvailability, listed) if c["code"] == lot.code]
    assert [(c["occupied"], c["free"]) for c in mine] == [(1, 49)]
    assert listed.headers["cache-control"] == "public, max-age=10"


async def test_unknown_car_park_is_404(api: httpx.AsyncClient) -> None:
    answer = await api.get("/api/v1/public/car-parks/no-such-lot")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "car_park_not_found"


async def test_nearby_lists_car_parks_within_the_radius_nearest_first(
    api: httpx.AsyncClient, runtime: Runtime
) -> None:
    # A point of its own, far from any other test's car parks.
    lat, lon = random.uniform(-60, 60), random.uniform(-170, 170)
    far = await located_car_park(runtime, lat + 0.03, lon)  # about 3.3 km north
    near = await located_car_park(runtime, lat, lon + 0.005)  # about 0.5 km east
    middle = await located_car_park(runtime, lat - 0.01, lon - 0.01)  # about 1.4 km south-west

    answer = await api.get(
        "/api/v1/public/car-parks/nearby", params={"lat": lat, "lon": lon, "radius_m": 3000}
    )

    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "public, max-age=10" and answer.headers["etag"]
    found = _as_documented(NearbyCarPark, answer)
    assert [c["code"] for c in found] == [near, middle]
    assert far not in {c["code"] for c in found}
    for car_park in found:
        where = car_park["location"]
        expected = _haversine_m(lat, lon, where["latitude"], where["longitude"])
        assert abs(car_park["distance_m"] - expected) <= 1
        assert (car_park["occupied"], car_park["free"]) == (0, 20)

    wider = await api.get(
        "/api/v1/public/car-parks/nearby", params={"lat": lat, "lon": lon, "radius_m": 20000}
    )
    assert [c["code"] for c in wider.json()] == [near, middle, far]


async def test_nearby_rejects_radius_and_coordinates_out_of_range(
    api: httpx.AsyncClient,
) -> None:
    for params in (
        {"lat": 30.2, "lon": 119.7, "radius_m": 0},
        {"lat": 30.2, "lon": 119.7, "radius_m": 20001},
        {"lat": 91, "lon": 119.7},
        {"lat": 30.2, "lon": 181},
        {"lon": 119.7},
    ):
        answer = await api.get("/api/v1/public/car-parks/nearby", params=params)
        assert answer.status_code == 422, params
        assert answer.json()["error"]["code"] == "invalid_request"


async def test_places_are_apds_shaped_and_full_when_no_space_is_free(
    api: httpx.AsyncClient, runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE car_parks SET capacity = 1, latitude = 30.23, longitude = 119.72 WHERE id = $1",
            lot.id,
        )
    answer = await api.get("/api/v1/public/places")
    assert answer.status_code == 200
    (place,) = [p for p in _as_documented(Place, answer) if p["id"] == lot.code]
    assert place["name"] == [{"language": "zh", "text": lot.name}]
    assert place["location"] == {"latitude": 30.23, "longitude": 119.72}
    assert place["capacity"] == 1
    assert place["availability"]["status"] == "open"
    assert (place["availability"]["free"], place["availability"]["occupied"]) == (1, 0)

    await _enter(gate, lot)

    async def availability_now() -> dict[str, Any]:
        # Places are built once per PARKING_PUBLIC_CACHE_SECONDS: the car shows within that.
        answer = await api.get("/api/v1/public/places")
        (place,) = [p for p in answer.json() if p["id"] == lot.code]
        return dict(place["availability"]) if place["availability"]["occupied"] else {}

    availability = await eventually(availability_now)
    assert (availability["status"], availability["free"], availability["occupied"]) == (
        "full",
        0,
        1,
    )
    assert datetime.fromisoformat(availability["lastUpdated"]).tzinfo is not None


async def test_lists_are_built_once_per_interval_and_nearby_once_per_point(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    clock = _Clock()
    cache = AnswerCache(2.0, clock=clock)
    app.dependency_overrides[get_answer_cache] = lambda: cache
    lat, lon = random.uniform(-60, 60), random.uniform(-170, 170)
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE car_parks SET latitude = $2, longitude = $3 WHERE id = $1", lot.id, lat, lon
        )
    lists = ("/api/v1/public/car-parks", "/api/v1/public/places")
    first = {path: await api.get(path) for path in lists}
    near = await api.get("/api/v1/public/car-parks/nearby", params={"lat": lat, "lon": lon})

    await _enter(gate, lot)
    clock.now = 1.9

    for path, answer in first.items():
        again = await api.get(path)
        assert (again.content, again.headers["etag"]) == (answer.content, answer.headers["etag"])
        unchanged = await api.get(path, headers={"If-None-Match": answer.headers["etag"]})
        assert unchanged.status_code == 304
    same_point = await api.get("/api/v1/public/car-parks/nearby", params={"lat": lat, "lon": lon})
    assert same_point.content == near.content
    # Another point (or radius) is another answer, built now.
    other = await api.get(
        "/api/v1/public/car-parks/nearby", params={"lat": lat, "lon": lon, "radius_m": 999}
    )
    assert [c["occupied"] for c in other.json()] == [1]
    # One car park is never cached.
    one = await api.get(f"/api/v1/public/car-parks/{lot.code}")
    assert one.json()["occupied"] == 1

    clock.now = 2.0
    listed = await api.get(lists[0], headers={"If-None-Match": first[lists[0]].headers["etag"]})
    assert listed.status_code == 200 and listed.headers["etag"] != first[lists[0]].headers["etag"]
    assert [c["occupied"] for c in listed.json() if c["code"] == lot.code] == [1]
    places = (await api.get(lists[1])).json()
    assert [p["availability"]["occupied"] for p in places if p["id"] == lot.code] == [1]
    same_point = await api.get("/api/v1/public/car-parks/nearby", params={"lat": lat, "lon": lon})
    assert [c["occupied"] for c in same_point.json()] == [1]


async def test_concurrent_misses_build_an_answer_once() -> None:
    builds = 0
    release = asyncio.Event()

    async def build() -> Answer:
        nonlocal builds
        builds += 1
        await release.wait()
        return Answer(b"[]", '"e"')

    cache = AnswerCache(1.0)
    callers = [asyncio.create_task(cache.get("car-parks", build)) for _ in range(5)]
    await asyncio.sleep(0)
    # The first builder goes away mid-build: the next caller builds instead.
    callers[0].cancel()
    await asyncio.sleep(0)
    release.set()
    answers = await asyncio.gather(*callers[1:])

    assert {a.body for a in answers} == {b"[]"}
    assert builds == 2
    assert await cache.get("car-parks", build) is answers[0]
    assert builds == 2


async def test_city_key_is_accepted_and_a_bad_credential_refused(
    api: httpx.AsyncClient, runtime: Runtime, lot: Lot
) -> None:
    key = "ck_" + new_secret()
    async with runtime.pool.acquire() as conn:
        await auth_repo.create_api_key(conn, "city", digest(key), "guidance signs")

    with_key = await api.get(f"/api/v1/public/car-parks/{lot.code}", headers=bearer(key))
    anonymous = await api.get(f"/api/v1/public/car-parks/{lot.code}")
    forged = await api.get(
        f"/api/v1/public/car-parks/{lot.code}", headers=bearer("ck_" + new_secret())
    )

    assert with_key.status_code == anonymous.status_code == 200
    assert with_key.json() == anonymous.json()
    assert forged.status_code == 401


async def test_the_v1_car_park_list_is_built_once_per_interval_like_the_other_lists(
    api: httpx.AsyncClient, app: FastAPI, gate: GateProbe, lot: Lot
) -> None:
    clock = _Clock()
    cache = AnswerCache(2.0, clock=clock)
    app.dependency_overrides[get_answer_cache] = lambda: cache
    first = await api.get("/api/v1/car-parks")
    assert first.status_code == 200 and first.headers["etag"]
    assert [c["occupied"] for c in first.json() if c["code"] == lot.code] == [0]

    await _enter(gate, lot)
    clock.now = 1.9
    again = await api.get("/api/v1/car-parks")
    assert (again.content, again.headers["etag"]) == (first.content, first.headers["etag"])
    unchanged = await api.get("/api/v1/car-parks", headers={"If-None-Match": first.headers["etag"]})
    assert unchanged.status_code == 304

    clock.now = 2.0
    fresh = await api.get("/api/v1/car-parks")
    assert [c["occupied"] for c in fresh.json() if c["code"] == lot.code] == [1]
    one = await api.get(f"/api/v1/car-parks/{lot.code}")
    assert one.status_code == 200 and one.json()["occupied"] == 1


async def test_the_v1_car_park_list_is_built_once_whatever_the_query(
    api: httpx.AsyncClient, app: FastAPI, lot: Lot
) -> None:
    statuses = [
        (await api.get("/api/v1/car-parks", params={"bust": uuid.uuid4().hex})).status_code
        for _ in range(5)
    ]
    assert statuses == [200] * 5
    assert len(app.state.public_answers._answers) == 1


async def test_the_public_list_is_limited_per_client_whatever_it_forwards(
    runtime: Runtime,
) -> None:
    runtime.settings.public_requests_per_minute_per_client = 3
    async with (
        api_server(runtime, sandbox.free_port()) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        statuses = [
            (
                await http.get("/api/v1/car-parks", headers={"X-Forwarded-For": f"192.0.2.{n}"})
            ).status_code
            for n in range(5)
        ]
    assert statuses == [200, 200, 200, 429, 429]


async def test_every_public_list_is_limited_per_client_but_not_for_the_city_key(
    api: httpx.AsyncClient, runtime: Runtime, lot: Lot
) -> None:
    runtime.settings.public_requests_per_minute_per_client = 5
    paths = [
        "/api/v1/car-parks",
        f"/api/v1/car-parks/{lot.code}",
        "/api/v1/public/car-parks",
        "/api/v1/public/places",
        f"/api/v1/public/car-parks/{lot.code}",
    ]
    assert [(await api.get(path)).status_code for path in paths] == [200] * 5
    for path in [*paths, "/api/v1/public/car-parks/nearby?lat=30&lon=120"]:
        refused = await api.get(path)
        assert refused.status_code == 429, path
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
    key = "ck_" + new_secret()
    async with runtime.pool.acquire() as conn:
        await auth_repo.create_api_key(conn, "city", digest(key), "guidance signs")
    assert [(await api.get(p, headers=bearer(key))).status_code for p in paths] == [200] * 5
