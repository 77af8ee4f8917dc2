"""The API keys (`ck_…`, `gk_…`) a process has looked up, kept in memory: a guidance sign's or
the city platform's every poll would otherwise be a database query. Keys found unknown are kept
too (a sign configured with a wrong key asks again and again), for as long.

A revoked key stops working at once in every process: `parking admin api-key revoke` publishes
the key's id on a Redis channel (`revoked_channel`) once its transaction has committed, and each
process's cache, subscribed to that channel, drops the key. The cache answers only while its
subscription stands (a revocation published while it was down would be missed), is emptied
whenever the subscription is made again, and keeps no lookup that began before a revocation it
heard. PARKING_API_KEY_CACHE_SECONDS bounds an entry's life anyway: the backstop for a
revocation no message announced (a lost publish, an UPDATE by hand), and how long a key that was
tried before it was created stays unknown.
"""

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from parking.auth.repository import ApiKey
from parking.logging import get_logger

log = get_logger(__name__)

# Keys kept at most (a city has a few: its platform, its signs' controllers, its gates).
MAX_KEYS = 10_000
# How long a lost subscription waits before it is made again.
RESUBSCRIBE_S = 1.0
# How often an idle subscription checks that its connection still answers.
PING_S = 5.0


def revoked_channel(redis_key_prefix: str) -> str:
    return f"{redis_key_prefix}api-keys:revoked"


async def announce_revoked(redis: Redis, redis_key_prefix: str, key_id: int) -> int:
    """Tells every process's cache that the key is revoked; how many processes heard it."""
    heard: int = await redis.publish(revoked_channel(redis_key_prefix), str(key_id))
    return heard


class ApiKeyCache:
    """API keys by their digest (None: no valid key), for at most `ttl_s` (0: none kept), while
    subscribed to revocations."""

    def __init__(self, redis: Redis, redis_key_prefix: str, ttl_s: float) -> None:
        self.redis = redis
        self.channel = revoked_channel(redis_key_prefix)
        self.ttl_s = ttl_s
        self._keys: dict[str, tuple[ApiKey | None, float]] = {}
        # Moves on with every revocation heard and every (re)subscription: a lookup that began
        # before one of them may have read a key that is now revoked, and is not kept.
        self._generation = 0
        self._reader: asyncio.Task[None] | None = None
        # Set while subscribed (tests wait for it).
        self.subscribed = asyncio.Event()

    async def lookup(
        self, key_hash: str, load: Callable[[], Awaitable[ApiKey | None]]
    ) -> ApiKey | None:
        """The valid key of this digest, or None: from memory, or `load`ed (the database) and
        kept."""
        if self.ttl_s <= 0:
            return await load()
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read())
        kept = self._fresh(key_hash)
        if kept is not None:
            return kept[0]
        generation = self._generation
        key = await load()
        self._keys.pop(key_hash, None)
        if self.subscribed.is_set() and generation == self._generation:
            if len(self._keys) >= MAX_KEYS:
                self._keys.clear()
            self._keys[key_hash] = (key, time.monotonic() + self.ttl_s)
        return key

    def known(self, key_hash: str) -> ApiKey | None:
        """The valid key of this digest when memory holds it, fresh and covered by the
        revocations heard; None otherwise (no lookup: for a path that awaits nothing)."""
        kept = self._fresh(key_hash)
        return kept[0] if kept is not None else None

    def _fresh(self, key_hash: str) -> tuple[ApiKey | None, float] | None:
        if not self.subscribed.is_set():
            return None
        kept = self._keys.get(key_hash)
        return kept if kept is not None and kept[1] > time.monotonic() else None

    def _forget(self, key_id: int | None) -> None:
        """Forgets a key (None: every key)."""
        self._generation += 1
        if key_id is None:
            self._keys.clear()
            return
        for digest in [d for d, (key, _) in self._keys.items() if key and key.id == key_id]:
            del self._keys[digest]

    async def _read(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self._forget(None)
                self.subscribed.set()
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=PING_S
                    )
                    if message is None:
                        await pubsub.ping()
                    elif str(message["data"]).isdigit():
                        self._forget(int(message["data"]))
            except (RedisError, OSError):
                log.warning("auth.api_key_revocations_lost", retry_in_s=RESUBSCRIBE_S)
            finally:
                self.subscribed.clear()
                self._forget(None)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(RESUBSCRIBE_S)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
