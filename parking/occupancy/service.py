"""Live occupancy counters in Redis, rebuilt from PostgreSQL whenever Redis has lost them.

A counter is only ever changed by INCRBY on an existing key (a Lua script), so after a
FLUSHALL the first reader or writer rebuilds it from the open stays instead of counting from 0.

A change committed in PostgreSQL reaches its counter after the commit, at most once (the lane's
resend of a capture is a duplicate and changes nothing). So when Redis fails during a change,
applied or not, the counter is dropped, and the next reader rebuilds it from the record rather
than keep it one off for good. Each car park also has a count of changes made to it
(`…occupancy-changes:<id>`): a rebuild stores what it read only when no change (nor drop) came
in between its read and its write, so a slow reader's count, read before a change committed,
cannot win over the change's.

One race is left: a rebuild that reads a change just committed but not yet applied, and is
stored before the change is applied, counts it twice (the window is the committer's own time
from its commit to its adjust). Any later drop or FLUSHALL mends it.
"""

import contextlib

import asyncpg
from redis.asyncio import Redis

from parking.occupancy import repository

# Counts the change, adjusts an existing counter, announces it to dashboards and returns it
# (one round trip); returns nil when the counter is missing.
_INCR_IF_EXISTS = """
redis.call('INCR', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  local value = redis.call('INCRBY', KEYS[1], ARGV[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3] .. ':' .. value)
  return value
end
return false
"""
# A count read from PostgreSQL when the car park had seen ARGV[2] changes: stored if no change
# came since (and, with ARGV[3] = 'nx', no other rebuild stored one first), dropped otherwise.
# Returns the counter as stored, or nil when it was not.
_STORE_REBUILT = """
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[2] then
  if ARGV[3] ~= 'nx' then redis.call('DEL', KEYS[1]) end
  return false
end
if ARGV[3] == 'nx' then
  redis.call('SET', KEYS[1], ARGV[1], 'NX')
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return redis.call('GET', KEYS[1])
"""
# Drops a counter a failed change may have left off, and counts that as a change so that no
# rebuild read before it is stored after it.
_DROP = """
redis.call('INCR', KEYS[2])
redis.call('DEL', KEYS[1])
return 1
"""


class Occupancy:
    def __init__(self, redis: Redis, pool: asyncpg.Pool, key_prefix: str = "parking:") -> None:
        self.redis = redis
        self.pool = pool
        self._key = f"{key_prefix}occupancy:{{}}"
        self._changes_key = f"{key_prefix}occupancy-changes:{{}}"
        self.channel = f"{key_prefix}occupancy"
        self._incr = redis.register_script(_INCR_IF_EXISTS)
        self._store = redis.register_script(_STORE_REBUILT)
        self._drop = redis.register_script(_DROP)
        # Counters a failed change could not drop (Redis was down): dropped at the next call.
        self._to_drop: set[int] = set()

    def _keys(self, car_park_id: int) -> list[str]:
        return [self._key.format(car_park_id), self._changes_key.format(car_park_id)]

    async def adjust(self, car_park_id: int, delta: int) -> int:
        """Applies a committed change; rebuilds the counter if Redis had lost it. When Redis
        fails meanwhile (the change applied or not), the counter is dropped for the next reader
        to rebuild, and the error raised."""
        try:
            await self._drop_pending()
            value = await self._incr(
                keys=self._keys(car_park_id), args=[delta, self.channel, car_park_id]
            )
            if value is None:
                # The rebuilt count already includes the committed change.
                value = await self._rebuild(car_park_id)
                await self.redis.publish(self.channel, f"{car_park_id}:{value}")
        except BaseException:
            self._to_drop.add(car_park_id)
            # Redis down: dropped at the next call (or lost with Redis itself).
            with contextlib.suppress(Exception):
                await self._drop_pending()
            raise
        return int(value)

    async def get(self, car_park_id: int) -> int:
        return (await self.get_many([car_park_id]))[car_park_id]

    async def get_many(self, car_park_ids: list[int]) -> dict[int, int]:
        if not car_park_ids:
            return {}
        await self._drop_pending()
        values = await self.redis.mget([self._key.format(i) for i in car_park_ids])
        result: dict[int, int] = {}
        for car_park_id, value in zip(car_park_ids, values, strict=True):
            result[car_park_id] = (
                int(value) if value is not None else await self._rebuild(car_park_id)
            )
        return result

    async def rebuild_all(self) -> dict[int, int]:
        """Resets every counter from PostgreSQL (start-up, or an operator asking for it); one
        changed meanwhile is dropped instead, for its next reader to rebuild."""
        async with self.pool.acquire() as conn:
            ids = await repository.car_park_ids(conn)
            if not ids:
                return {}
            changes = await self.redis.mget([self._changes_key.format(i) for i in ids])
            counts = await repository.open_counts(conn)
        async with self.redis.pipeline(transaction=False) as pipe:
            for car_park_id, changed in zip(ids, changes, strict=True):
                await self._store(
                    keys=self._keys(car_park_id),
                    args=[counts.get(car_park_id, 0), _text(changed), "set"],
                    client=pipe,
                )
            await pipe.execute()
        return counts

    async def _rebuild(self, car_park_id: int) -> int:
        keys = self._keys(car_park_id)
        changes = await self.redis.get(keys[1])
        async with self.pool.acquire() as conn:
            count = await repository.open_count(conn, car_park_id)
        stored = await self._store(keys=keys, args=[count, _text(changes), "nx"])
        # Not stored: a change came since the read; this count is still what the record said.
        return int(stored) if stored is not None else count

    async def _drop_pending(self) -> None:
        while self._to_drop:
            car_park_id = next(iter(self._to_drop))
            await self._drop(keys=self._keys(car_park_id))
            self._to_drop.discard(car_park_id)


def _text(changes: bytes | str | None) -> str:
    if changes is None:
        return "0"
    return changes.decode() if isinstance(changes, bytes) else changes
