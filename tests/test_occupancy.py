"""Occupancy lives in Redis for speed and is rebuilt from PostgreSQL when Redis loses it."""

import httpx
from redis.asyncio import Redis

from parking.app import create_app
from parking.runtime import Runtime
from tests.conftest import Lot, make_driver, set_car_park, unique_plate
from tests.gates import GateProbe


async def _api_occupancy(runtime: Runtime, code: str) -> dict:
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get(f"/api/v1/car-parks/{code}")
    assert response.status_code == 200, response.text
    return response.json()


async def test_occupancy_is_rebuilt_from_postgres_after_flushall(
    runtime: Runtime, gate: GateProbe, lot: Lot, redis: Redis
) -> None:
    driver = await make_driver(runtime, unique_plate())
    plates = [driver.plate, unique_plate(), unique_plate()]
    for plate in plates:
        await gate.decide(lot.code, "in1", gate.capture("in", plate))
    command = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert command["action"] == "open"
    held = 2
    assert (await _api_occupancy(runtime, lot.code))["occupied"] == held

    # What FLUSHALL does to this deployment: every key gone.
    keys = [k async for k in redis.scan_iter(f"{runtime.settings.redis_key_prefix}*")]
    assert keys
    await redis.delete(*keys)

    assert (await _api_occupancy(runtime, lot.code))["occupied"] == held
    # A change after the flush adjusts the rebuilt count instead of starting from zero.
    await gate.decide(lot.code, "in1", gate.capture("in", unique_plate()))
    await redis.delete(*[k async for k in redis.scan_iter(f"{runtime.settings.redis_key_prefix}*")])
    await gate.decide(lot.code, "in1", gate.capture("in", unique_plate()))
    view = await _api_occupancy(runtime, lot.code)
    assert view["occupied"] == held + 2
    assert view["free"] == view["capacity"] - view["occupied"]


async def test_api_errors_share_one_json_shape(runtime: Runtime) -> None:
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        missing = await client.get("/api/v1/car-parks/does-not-exist")
        no_route = await client.get("/api/v1/nothing-here")
        health = await client.get("/health")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "car_park_not_found"
    assert no_route.status_code == 404
    assert set(no_route.json()["error"]) == {"code", "message", "details"}
    assert health.status_code == 200
    assert health.json()["checks"] == {"postgresql": True, "redis": True, "mqtt": True}


async def _counted_and_rebuilt(runtime: Runtime, redis: Redis, lot: Lot) -> tuple[int, int]:
    """The counter as Redis holds it now, and what a rebuild from PostgreSQL makes of it."""
    key = f"{runtime.settings.redis_key_prefix}occupancy:{lot.id}"
    counted = int(await redis.get(key))
    await redis.delete(key)
    return counted, await runtime.occupancy.get(lot.id)


async def test_a_stay_opened_at_the_exit_is_counted_alike_live_and_rebuilt(
    runtime: Runtime, gate: GateProbe, lot: Lot, redis: Redis
) -> None:
    """A car with no entry record, held at the exit for the car park's fixed fee, opens a stay
    the lane never counts in. The rebuild counted every open stay: one too many for as long
    as the held stay lived, and for good once it was paid (closing it counts nothing out)."""
    await set_car_park(runtime, lot, no_entry_policy="fixed_fee", no_entry_fee_fen=2000)
    await gate.decide(lot.code, "in1", gate.capture("in", unique_plate()))
    command = await gate.decide(lot.code, "out1", gate.capture("out", unique_plate()))
    assert (command["action"], command["fee_fen"]) == ("hold", 2000)
    assert await _counted_and_rebuilt(runtime, redis, lot) == (1, 1)
    assert (await runtime.occupancy.rebuild_all())[lot.id] == 1
