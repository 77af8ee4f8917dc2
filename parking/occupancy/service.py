"""Live occupancy counters in Redis, rebuilt from PostgreSQL whenever Redis has lost them.

A counter is only ever changed by INCRBY on an existing key (a Lua script), so after a
FLUSHALL the first reader or writer rebuilds it from the open stays instead of counting from 0.
"""

import asyncpg
from redis.asyncio import Redis

from parking.occupancy import repository

# Adjusts an existing counter, announces it to dashboards and returns it (one round trip);
# returns nil when the counter is missing.
_INCR_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local value = redis.call('INCRBY', KEYS[1], ARGV[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3] .. ':' .. value)
  return value
end
return false
"""


class Occupancy:
    def __init__(self, redis: Redis, pool: asyncpg.Pool, key_prefix: str = "parking:") -> None:
        self.redis = redis
        self.pool = pool
        self._key = f"{key_prefix}occupancy:{{}}"
        self.channel = f"{key_prefix}occupancy"
        self._incr = redis.register_script(_INCR_IF_EXISTS)

    async def adjust(self, car_park_id: int, delta: int) -> int:
        """Applies a committed change; rebuilds the counter if Redis had lost it."""
        value = await self._incr(
            keys=[self._key.format(car_park_id)], args=[delta, self.channel, car_park_id]
        )
        if value is None:
            # The rebuilt count already includes the committed change.
            value = await self._rebuild(car_park_id)
            await self.redis.publish(self.channel, f"{car_park_id}:{value}")
        return int(value)

    async def get(self, car_park_id: int) -> int:
        return (await self.get_many([car_park_id]))[car_park_id]

    async def get_many(self, car_park_ids: list[int]) -> dict[int, int]:
        if not car_park_ids:
            return {}
        values = await self.redis.mget([self._key.format(i) for i in car_park_ids])
        result: dict[int, int] = {}
        for car_park_id, value in zip(car_park_ids, values, strict=True):
            result[car_park_id] = (
                int(value) if value is not None else await self._rebuild(car_park_id)
            )
        return result

    async def rebuild_all(self) -> dict[int, int]:
        """Resets every counter from PostgreSQL (start-up, or an operator asking for it)."""
        async with self.pool.acquire() as conn:
            counts = await repository.open_counts(conn)
        if counts:
            await self.redis.mset({self._key.format(k): v for k, v in counts.items()})
        return counts

    async def _rebuild(self, car_park_id: int) -> int:
        async with self.pool.acquire() as conn:
            count = await repository.open_count(conn, car_park_id)
        # NX: a concurrent rebuild that already set it wins; both read the same committed state.
        await self.redis.set(self._key.format(car_park_id), count, nx=True)
        return count
