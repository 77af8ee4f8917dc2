"""One Redis subscription per process, fanned out to every open dashboard stream.

A subscription holds a Redis connection for as long as it lasts; one per stream let a few
staff members' browser tabs take the process's whole Redis pool from the lane and the quotes
(issue #17). Here the first stream starts a single reader, every stream gets its own bounded
buffer, and the last one to leave closes the subscription.

A stream that cannot keep up (its buffer full) is ended rather than allowed to grow: its page
reconnects and starts again from a fresh snapshot. When the subscription itself fails every
stream is ended the same way.
"""

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Sequence

import anyio
from redis.asyncio import Redis

from parking.lanes.worker import lane_events_channel
from parking.logging import get_logger
from parking.runtime import Runtime

log = get_logger(__name__)

# Messages a stream may have waiting: a second or two of a busy city's traffic.
BUFFER = 1000
# How long closing the subscription may take once the last stream has gone.
_CLOSE_TIMEOUT_S = 2.0


def feed_channels(runtime: Runtime) -> list[str]:
    return [runtime.occupancy.channel, lane_events_channel(runtime.settings)]


class Listener:
    """One stream's view of the feed: the messages since it last looked, and why it ended."""

    def __init__(self, size: int) -> None:
        self.messages: deque[tuple[str, str]] = deque()
        self.size = size
        self.ended: str | None = None
        self.wake = asyncio.Event()

    def deliver(self, channel: str, data: str) -> None:
        if self.ended is not None:
            return
        if len(self.messages) >= self.size:
            self.end("too_slow")
            return
        self.messages.append((channel, data))
        self.wake.set()

    def end(self, reason: str) -> None:
        self.ended = self.ended or reason
        self.messages.clear()
        self.wake.set()

    async def wait(self, timeout_s: float) -> None:
        """Until there is something to read or `timeout_s` passed."""
        if not self.messages and self.ended is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, timeout_s)):
                    await self.wake.wait()
        self.wake.clear()


class Feed:
    def __init__(self, redis: Redis, channels: Sequence[str], buffer: int = BUFFER) -> None:
        self.redis = redis
        self.channels = list(channels)
        self.buffer = buffer
        self._listeners: set[Listener] = set()
        self._reader: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Event | None = None
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def listen(self) -> AsyncIterator[Listener]:
        """A listener that receives every message published from the moment this returns."""
        listener = Listener(self.buffer)
        async with self._lock:
            self._listeners.add(listener)
            if self._reader is None or self._reader.done():
                self._subscribed = asyncio.Event()
                self._reader = asyncio.create_task(self._read(self._subscribed))
            subscribed, reader = self._subscribed, self._reader
        try:
            assert subscribed is not None
            waiting = asyncio.ensure_future(subscribed.wait())
            await asyncio.wait({waiting, reader}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if not subscribed.is_set():
                listener.end("feed_lost")
            yield listener
        finally:
            # Shielded: this runs while the stream's task is being cancelled.
            with anyio.CancelScope(shield=True):
                await self._leave(listener)

    async def _leave(self, listener: Listener) -> None:
        async with self._lock:
            self._listeners.discard(listener)
            if self._listeners or self._reader is None:
                return
            reader, self._reader = self._reader, None
        reader.cancel()
        with anyio.move_on_after(_CLOSE_TIMEOUT_S):
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, subscribed: asyncio.Event) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(*self.channels)
            subscribed.set()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                if message is None:
                    continue
                for listener in list(self._listeners):
                    listener.deliver(message["channel"], message["data"])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("dashboard.feed_lost")
            for listener in list(self._listeners):
                listener.end("feed_lost")
        finally:
            with anyio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
                await pubsub.aclose()
