"""The guidance signs' endpoint: free spaces and open/full/closed per car park, from a board
built once per interval (no database work per sign), ETags, the city key not rate-limited."""

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import orjson
from fastapi import FastAPI

from parking.app import create_app
from parking.auth import repository as auth_repo
from parking.auth.apikeys import announce_revoked
from parking.auth.principal import Unauthenticated
from parking.auth.tokens import digest, new_secret
from parking.db import create_pool
from parking.public.service import SignBoard, signs
from parking.public.signs import sign_caller
from parking.runtime import Runtime
from tests.conftest import bearer, create_lot, enter, eventually, unique_plate
from tests.gates import GateProbe


async def test_signs_show_free_spaces_full_and_closed_from_a_cached_board(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe
) -> None:
    runtime.settings.public_cache_seconds = 3600
    busy, full, closed = [await create_lot(runtime) for _ in range(3)]
    async with runtime.pool.acquire() as conn:
        await conn.execute("UPDATE car_parks SET capacity = 1 WHERE id = $1", full.id)
        await conn.execute("UPDATE car_parks SET closed_at = now() WHERE id = $1", closed.id)
    for _ in range(2):
        await enter(runtime, gate, busy, unique_plate(), parked_for=timedelta(minutes=1))
    await enter(runtime, gate, full, unique_plate(), parked_for=timedelta(minutes=1))
    codes = f"{closed.code},{busy.code},{full.code},no-such-park"
    first = await api.get("/api/v1/public/signs", params={"car_parks": codes})
    assert first.status_code == 200, first.text
    assert first.json()["car_parks"] == [
        {"code": closed.code, "free": 0, "status": "closed"},
        {"code": busy.code, "free": 48, "status": "open"},
        {"code": full.code, "free": 0, "status": "full"},
        {"code": "no-such-park", "free": None, "status": "unknown"},
    ]
    assert first.headers["cache-control"] == "public, max-age=10"
    unchanged = await api.get(
        "/api/v1/public/signs",
        params={"car_parks": codes},
        headers={"If-None-Match": first.headers["etag"]},
    )
    assert unchanged.status_code == 304
    everything = await api.get("/api/v1/public/signs")
    assert {busy.code, full.code, closed.code} <= {
        s["code"] for s in everything.json()["car_parks"]
    }

    # Served from the board: a change in the database is not read again for each sign...
    async with runtime.pool.acquire() as conn:
        await conn.execute("UPDATE car_parks SET closed_at = now() WHERE id = $1", busy.id)
    again = await api.get("/api/v1/public/signs", params={"car_parks": busy.code})
    assert again.json()["car_parks"] == [{"code": busy.code, "free": 48, "status": "open"}]
    # ...but by the next board (a new process here).
    fresh = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(runtime)), base_url="http://parking.test"
    )
    async with fresh:
        rebuilt = await fresh.get("/api/v1/public/signs", params={"car_parks": busy.code})
    assert rebuilt.json()["car_parks"] == [{"code": busy.code, "free": 0, "status": "closed"}]


async def test_the_city_key_is_not_limited_anonymous_signs_are(
    runtime: Runtime, api: httpx.AsyncClient
) -> None:
    runtime.settings.public_requests_per_minute_per_client = 2
    city_key = "ck_" + new_secret()
    async with runtime.pool.acquire() as conn:
        await auth_repo.create_api_key(conn, "city", digest(city_key), "signs test")
    for _ in range(5):
        signed = await api.get("/api/v1/public/signs", headers=bearer(city_key))
        assert signed.status_code == 200
    anonymous = [(await api.get("/api/v1/public/signs")).status_code for _ in range(3)]
    assert anonymous == [200, 200, 429]


async def test_a_poll_answered_from_the_board_takes_no_database_connection(
    runtime: Runtime, api: httpx.AsyncClient
) -> None:
    runtime.settings.public_cache_seconds = 3600
    lot = await create_lot(runtime)
    built = await api.get("/api/v1/public/signs", params={"car_parks": lot.code})
    assert built.status_code == 200, built.text
    # The API reads through a pool of one connection, and that one is taken: a sign is still
    # answered, from the board.
    one = await create_pool(runtime.endpoints.database_url, min_size=1, max_size=1)
    shared, runtime.read_pool = runtime.read_pool, one
    try:
        async with one.acquire():
            polled = await asyncio.wait_for(
                api.get("/api/v1/public/signs", params={"car_parks": lot.code}), timeout=10
            )
    finally:
        runtime.read_pool = shared
        await one.close()
    assert polled.status_code == 200 and polled.json() == built.json()


async def _key_kept(runtime: Runtime, api: httpx.AsyncClient, signed: dict[str, str]) -> None:
    """The process keeps keys only while it hears revocations (auth.apikeys): once subscribed,
    one more poll reads the key into memory."""
    await asyncio.wait_for(runtime.api_keys.subscribed.wait(), 10)
    assert (await api.get("/api/v1/public/signs", headers=signed)).status_code == 200


async def test_a_signed_poll_takes_no_database_connection_either(
    runtime: Runtime, api: httpx.AsyncClient
) -> None:
    """The city's key is read from the process's key cache, not the database, at every poll."""
    runtime.settings.public_cache_seconds = 3600
    lot = await create_lot(runtime)
    city_key = "ck_" + new_secret()
    async with runtime.pool.acquire() as conn:
        await auth_repo.create_api_key(conn, "city", digest(city_key), "signs test")
    signed = bearer(city_key)
    built = await api.get("/api/v1/public/signs", params={"car_parks": lot.code}, headers=signed)
    assert built.status_code == 200, built.text
    await _key_kept(runtime, api, signed)
    # Every connection of both pools taken: a signed sign is still answered.
    ones = [
        await create_pool(runtime.endpoints.database_url, min_size=1, max_size=1) for _ in range(2)
    ]
    shared = runtime.pool, runtime.read_pool
    runtime.pool, runtime.read_pool = ones
    try:
        async with ones[0].acquire(), ones[1].acquire():
            polled = await asyncio.wait_for(
                api.get("/api/v1/public/signs", params={"car_parks": lot.code}, headers=signed),
                timeout=10,
            )
    finally:
        runtime.pool, runtime.read_pool = shared
        for one in ones:
            await one.close()
    assert polled.status_code == 200 and polled.json() == built.json()
    # An unknown key is still refused.
    refused = await api.get("/api/v1/public/signs", headers=bearer("ck_" + new_secret()))
    assert refused.status_code == 401


def test_unchanged_numbers_keep_their_etag_on_the_next_board() -> None:
    numbers = {"A1": b'{"code":"A1","free":3,"status":"open"}'}
    earlier = SignBoard(dict(numbers), datetime(2026, 1, 1, 8, 0, 0, tzinfo=UTC))
    later = SignBoard(dict(numbers), datetime(2026, 1, 1, 8, 0, 9, tzinfo=UTC))
    first, second = signs(earlier, ["A1", "B2"]), signs(later, ["A1", "B2"])
    assert first.body != second.body and first.etag == second.etag
    assert orjson.loads(second.body) == {
        "car_parks": [
            {"code": "A1", "free": 3, "status": "open"},
            {"code": "B2", "free": None, "status": "unknown"},
        ],
        "as_of": "2026-01-01T08:00:09Z",
    }
    changed = SignBoard({"A1": b'{"code":"A1","free":2,"status":"open"}'}, later.as_of)
    assert signs(changed, ["A1", "B2"]).etag != first.etag
    # Kept with its board: the same list is not built again.
    assert signs(later, ["A1", "B2"]) is second


async def test_a_known_signs_poll_is_answered_before_the_routing_as_the_route_answers(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient
) -> None:
    runtime.settings.public_cache_seconds = 3600
    lot = await create_lot(runtime)
    city_key = "ck_" + new_secret()
    async with runtime.pool.acquire() as conn:
        await auth_repo.create_api_key(conn, "city", digest(city_key), "signs test")
    signed = bearer(city_key)
    params = {"car_parks": f"{lot.code},no-such-park"}
    # The first poll goes through the route: it builds the board and checks the key.
    first = await api.get("/api/v1/public/signs", params=params, headers=signed)
    assert first.status_code == 200, first.text
    await _key_kept(runtime, api, signed)

    def refuse() -> None:
        raise Unauthenticated("the route was asked")

    # From then on the route is not asked (its caller check would refuse everyone now)...
    app.dependency_overrides[sign_caller] = refuse
    try:
        again = await api.get("/api/v1/public/signs", params=params, headers=signed)
        assert again.status_code == 200, again.text
        assert again.content == first.content
        for header in ("etag", "cache-control", "content-type", "content-length"):
            assert again.headers[header] == first.headers[header], header
        unchanged = await api.get(
            "/api/v1/public/signs",
            params=params,
            headers=signed | {"If-None-Match": first.headers["etag"]},
        )
        assert unchanged.status_code == 304 and unchanged.content == b""
        # ...but anything else still is: anonymous callers, unknown keys, a repeated query.
        assert (await api.get("/api/v1/public/signs", params=params)).status_code == 401
        unknown = bearer("ck_" + new_secret())
        assert (await api.get("/api/v1/public/signs", headers=unknown)).status_code == 401
        repeated = await api.get(
            f"/api/v1/public/signs?car_parks={lot.code}&car_parks=x", headers=signed
        )
        assert repeated.status_code == 401
        # A revoked key leaves the fast path as soon as the revocation is heard.
        async with runtime.pool.acquire() as conn:
            key_id = await conn.fetchval(
                "UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1 RETURNING id",
                digest(city_key),
            )
        await announce_revoked(runtime.redis, runtime.settings.redis_key_prefix, key_id)

        async def refused() -> bool | None:
            answer = await api.get("/api/v1/public/signs", params=params, headers=signed)
            return answer.status_code == 401 or None

        assert await eventually(refused)
    finally:
        app.dependency_overrides.clear()
