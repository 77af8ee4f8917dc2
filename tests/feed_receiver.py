"""A subscriber's endpoint for the push feed tests: a real HTTP server on a free loopback port
that records every POST and answers 500 while told to fail."""

import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from billing import signing
from parking.feeds.service import EVENT_ID_HEADER, SIGNATURE_HEADER, TOPIC_HEADER


@dataclass
class Received:
    event_id: str
    topic: str
    signature: str
    body: bytes
    answered: int

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    def signed_with(self, secret: str) -> bool:
        return signing.verify(secret, self.body, self.signature, now=int(time.time()))


@dataclass
class Receiver:
    # Answer 500 to this many more requests (then 200), or to all while `down`.
    failures_left: int = 0
    down: bool = False
    received: list[Received] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        failing = self.down or self.failures_left > 0
        if self.failures_left > 0:
            self.failures_left -= 1
        status = 500 if failing else 200
        self.received.append(
            Received(
                request.headers.get(EVENT_ID_HEADER, ""),
                request.headers.get(TOPIC_HEADER, ""),
                request.headers.get(SIGNATURE_HEADER, ""),
                await request.read(),
                status,
            )
        )
        return web.Response(status=status)

    def taken(self, topic: str | None = None) -> list[Received]:
        """What was answered 200 (of `topic`)."""
        return [r for r in self.received if r.answered == 200 and topic in (None, r.topic)]

    async def __aenter__(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
