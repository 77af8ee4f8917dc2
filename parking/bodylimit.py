"""Request bodies are bounded before anything reads them (issue #17): a route's body is read
whole by FastAPI before its dependencies run, authentication included, so without this an
anonymous client could make the process hold any number of megabytes.

`BodyLimit` is a pure ASGI middleware, outside the app's routing: a declared Content-Length over
the route's limit is answered 413 at once, and a body without one (chunked) is counted as it
streams and cut off at the limit. Either way the answer is the one JSON error shape.
"""

import re
from collections.abc import Sequence

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parking.errors import error_body


class _TooLarge(Exception):
    pass


def _answer(status: int, code: str, message: str) -> tuple[Message, Message]:
    body = orjson.dumps(error_body(code, message))
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            # The rest of the body is not read: the connection cannot be reused.
            (b"connection", b"close"),
        ],
    }
    return start, {"type": "http.response.body", "body": body}


class BodyLimit:
    """`default` bytes for every route, or the first of `routes` (path pattern, bytes) whose
    pattern matches the path."""

    def __init__(self, app: ASGIApp, default: int, routes: Sequence[tuple[str, int]] = ()) -> None:
        self.app = app
        self.default = default
        self.routes = [(re.compile(pattern), limit) for pattern, limit in routes]

    def limit_for(self, path: str) -> int:
        for pattern, limit in self.routes:
            if pattern.fullmatch(path):
                return limit
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = [v for k, v in scope["headers"] if k == b"content-length"]
        if declared:
            if len(declared) > 1 or not declared[0].isdigit():
                await self._send(send, 400, "invalid_content_length", "bad Content-Length")
                return
            if int(declared[0]) > limit:
                await self._too_large(send, limit)
                return
        received = 0
        tripped = False
        started = False

        async def counted() -> Message:
            nonlocal received, tripped
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    tripped = True
                    raise _TooLarge
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if tripped:
                return  # whatever the app made of the cut-off body is replaced by the 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            # The app may turn the cut into its own error (a 400, a 500) or let it through.
            if not tripped:
                raise
        if tripped and not started:
            await self._too_large(send, limit)

    async def _too_large(self, send: Send, limit: int) -> None:
        await self._send(send, 413, "payload_too_large", f"the body may have at most {limit} bytes")

    async def _send(self, send: Send, status: int, code: str, message: str) -> None:
        for part in _answer(status, code, message):
            await send(part)
