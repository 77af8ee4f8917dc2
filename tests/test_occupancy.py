"""Occupancy lives in Redis for speed and is rebuilt from PostgreSQL when Redis loses it."""

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from parking.app import create_app
from parking.occupancy import repository as occupancy_repository
from parking.runtime import Runtime
from tests.conftest import (
    Lot,
    backdate_entry,
    eventually,
    make_driver,
    set_car_park,
    unique_plate,
)
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


async def test_a_stay_opened_at_the_exit_is_never_counted_out(
    runtime: Runtime, gate: GateProbe, lot: Lot, redis: Redis
) -> None:
    """The car held at the exit for the fixed fee (a stay the lane never counted in) is let out
    by the gate while it cannot reach us; the upload ends that stay and counts nobody out.
    Before, it counted one out: the counter one short of the open stays for good."""
    await set_car_park(runtime, lot, no_entry_policy="fixed_fee", no_entry_fee_fen=2000)
    await gate.decide(lot.code, "in1", gate.capture("in", unique_plate()))
    stranger = unique_plate()
    command = await gate.decide(lot.code, "out1", gate.capture("out", stranger))
    assert (command["action"], command["fee_fen"]) == ("hold", 2000)
    upload = gate.capture("out", stranger).model_copy(
        update={"offline": True, "offline_action": "open", "captured_at": datetime.now(UTC)}
    )
    await gate.decide(lot.code, "out1", upload)
    async with runtime.pool.acquire() as conn:
        status = await conn.fetchval(
            "SELECT status FROM sessions WHERE car_park_id = $1 AND plate = $2", lot.id, stranger
        )
    assert status == "closed"
    assert await _counted_and_rebuilt(runtime, redis, lot) == (1, 1)


@pytest.mark.parametrize("applied", [False, True], ids=["change_lost", "reply_lost"])
async def test_a_redis_error_during_a_change_leaves_the_counter_to_be_rebuilt(
    runtime: Runtime,
    gate: GateProbe,
    lot: Lot,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
    applied: bool,
) -> None:
    """The lane commits an entry, then Redis fails as it counts it in (a reset connection, a
    timeout), the change made or not. The gate's resend is a duplicate that changes nothing:
    before, a lost change left the counter one off for good, its key still there, so nothing
    rebuilt it. Now a failed change drops the counter, and the next reader rebuilds it from
    the open stays."""
    await gate.decide(lot.code, "in1", gate.capture("in", unique_plate()))
    occupancy = runtime.lanes.occupancy
    incr = occupancy._incr
    failed: list[int] = []

    async def blip(**kwargs: Any) -> Any:
        if not failed:
            failed.append(1)
            if applied:
                await incr(**kwargs)
            raise RedisConnectionError("Connection reset by peer")
        return await incr(**kwargs)

    monkeypatch.setattr(occupancy, "_incr", blip)
    second = gate.capture("in", unique_plate())
    await gate.send(lot.code, "in1", second)
    await eventually(lambda: _true(bool(failed)))
    await gate.send(lot.code, "in1", second)  # not acked: the gate sends it again
    await gate.wait_for(second, commands=1, acks=1)
    assert gate.acks[str(second.capture_id)][0]["duplicate"] is True
    assert await runtime.occupancy.get(lot.id) == 2
    assert await _counted_and_rebuilt(runtime, redis, lot) == (2, 2)


async def test_a_rebuild_read_before_a_change_does_not_overwrite_it(
    runtime: Runtime, gate: GateProbe, lot: Lot, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader finds the counter missing and counts the open stays. An entry commits; its
    change finds no counter and rebuilds it too. The reader stores its older count between the
    lane's read and the lane's store: before, the reader's count won (SET NX) and the entry was
    never counted."""
    await gate.decide(lot.code, "in1", gate.capture("in", unique_plate()))
    await redis.delete(f"{runtime.settings.redis_key_prefix}occupancy:{lot.id}")
    read = occupancy_repository.open_count
    reads: list[int] = []
    reader_read, lane_read, reader_done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def interleaved(conn: Any, car_park_id: int) -> int:
        count = await read(conn, car_park_id)
        if car_park_id == lot.id:
            reads.append(count)
            if len(reads) == 1:
                reader_read.set()
                await lane_read.wait()
            elif len(reads) == 2:
                lane_read.set()
                await reader_done.wait()
        return count

    monkeypatch.setattr(occupancy_repository, "open_count", interleaved)
    reader = asyncio.create_task(runtime.occupancy.get(lot.id))
    await reader_read.wait()
    entry = gate.capture("in", unique_plate())
    await gate.send(lot.code, "in1", entry)
    assert await reader == 1, "what the record said when it was read"
    reader_done.set()
    await gate.wait_for(entry)
    assert reads == [1, 2]
    assert await _counted_and_rebuilt(runtime, redis, lot) == (2, 2)


async def _true(value: bool) -> bool:
    return value


async def test_an_entry_superseding_a_stay_opened_at_the_exit_counts_the_car_in(
    runtime: Runtime, gate: GateProbe, lot: Lot, redis: Redis
) -> None:
    """A car with no entry record is held at the exit for the fixed fee (a stay opened there,
    never counted in: `occupancy.takes_a_place`) and gets out without paying (the attendant's
    button). It comes back in and supersedes that stay, which held no place: the car is counted
    in. Before, a superseded stay's place went to the new one: nobody counted the car (live 1,
    rebuilt 2, for good)."""
    await set_car_park(runtime, lot, no_entry_policy="fixed_fee", no_entry_fee_fen=2000)
    await gate.decide(lot.code, "in1", gate.capture("in", unique_plate()))
    stranger = unique_plate()
    command = await gate.decide(lot.code, "out1", gate.capture("out", stranger))
    assert (command["action"], command["fee_fen"]) == ("hold", 2000)
    await backdate_entry(runtime, lot, stranger, timedelta(minutes=10))  # back 10 min later
    back_in = await gate.decide(lot.code, "in1", gate.capture("in", stranger))
    assert back_in["action"] == "open"
    assert await _counted_and_rebuilt(runtime, redis, lot) == (2, 2)
