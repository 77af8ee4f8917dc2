"""Fixed-window rate limits in Redis. Losing Redis resets the windows, which only makes the
limits briefly lenient: nothing that matters depends on them being exact."""

from fastapi import Request
from redis.asyncio import Redis

from parking.errors import AppError


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
    async with redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, window_s, nx=True)
        pipe.ttl(key)
        count, _, ttl = await pipe.execute()
    if count > limit:
        raise RateLimited(max(1, int(ttl)))


def client_address(request: Request) -> str:
    """What per-client limits are counted by."""
    return request.client.host if request.client else "unknown"
