"""Built public answers shared between requests for a moment, so that a city of guidance signs
polling the whole list costs one build per interval rather than one per request."""

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from starlette.requests import Request


@dataclass(frozen=True, slots=True)
class Answer:
    """A serialised answer and its ETag."""

    body: bytes
    etag: str


T = TypeVar("T")


@dataclass(slots=True)
class _Build:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    callers: int = 0


class AnswerCache(Generic[T]):
    """Answers by key, each served for `ttl_s` seconds after it was built (0: never cached).
    An answer is an `Answer` (serialised, with its ETag) unless the cache is made for another
    type (the guidance signs' board of every car park, which each request slices).

    An answer is therefore at most `ttl_s` older than the data (on top of the replica's lag),
    and a key must hold everything the answer depends on. Concurrent misses of one key build it
    once; each build runs in its caller's task, on the caller's connection, so a caller that
    goes away takes only its own build with it and the next waiter builds instead.
    """

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        # In the order built, hence of expiry (one ttl for all): expired ones leave from the front.
        self._answers: dict[Hashable, tuple[float, T]] = {}
        self._builds: dict[Hashable, _Build] = {}

    async def get(self, key: Hashable, build: Callable[[], Awaitable[T]]) -> T:
        if self.ttl_s <= 0:
            return await build()
        cached = self.fresh(key)
        if cached is not None:
            return cached
        pending = self._builds.setdefault(key, _Build())
        pending.callers += 1
        try:
            async with pending.lock:
                cached = self.fresh(key)
                if cached is not None:
                    return cached
                answer = await build()
                self._answers.pop(key, None)
                self._answers[key] = (self._clock() + self.ttl_s, answer)
                return answer
        finally:
            pending.callers -= 1
            if pending.callers == 0:
                del self._builds[key]

    def fresh(self, key: Hashable) -> T | None:
        """The answer kept for `key` while it is fresh, else None (nothing is built)."""
        now = self._clock()
        # Every key asked for (nearby: any point) is kept only until it expires.
        while self._answers:
            oldest = next(iter(self._answers))
            if self._answers[oldest][0] > now:
                break
            del self._answers[oldest]
        cached = self._answers.get(key)
        return cached[1] if cached is not None else None


def app_cache(request: Request, name: str, ttl_s: float) -> "AnswerCache[Any]":
    """The app's cache called `name` (one per app, as the data is one per runtime), made at
    its first use."""
    cache: AnswerCache[Any] | None = getattr(request.app.state, name, None)
    if cache is None:
        cache = AnswerCache(ttl_s)
        setattr(request.app.state, name, cache)
    return cache
