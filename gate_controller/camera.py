"""Where the gate agent's captures come from: one interface over the lane's camera.

A `CameraSource` yields `CameraEvent`s. The agent asks for the next event only once it has
stored the previous one in its outbox, so a source treats an event as handled at that moment:
the folder source moves its files to `done/` then, the HTTP source answers the camera's POST
with 202 then. A crash before that leaves the event with the camera, to be delivered again.

- `FolderCameraSource`: cameras (or their vendor software) that drop a JSON sidecar per pass,
  optionally with a JPEG of the same stem, into a folder.
- `HttpCameraSource`: cameras that POST their reads, ANPR-style, to `POST /events`. Only the
  gate's own camera may: each report carries a timestamp and an HMAC-SHA256 of it and the body
  under the camera's key (`camera_signature_headers`), is at most `max_skew_s` away from the
  agent's clock, is taken once (a replay is refused, also after a restart: the signatures
  taken are kept in the agent's outbox), and comes from an allowed address.
- `QueueCameraSource`: events handed in by code (tests, the simulator's vehicles).
"""

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import shutil
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, Self

import structlog
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from gate_controller.outbox import Outbox
from gate_controller.protocol import Direction, PlateColor, PlateText
from gate_controller.simulator import Vehicle

log = structlog.get_logger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024
TIMESTAMP_HEADER = "X-Camera-Timestamp"
SIGNATURE_HEADER = "X-Camera-Signature"
# How far a report's signing time (and the pass time it reports) may be from the agent's clock.
DEFAULT_MAX_SKEW_S = 30.0


def camera_signature(key: bytes, body: bytes, timestamp: str) -> str:
    """Hex HMAC-SHA256 over `<timestamp>\n<body>`: the time is signed with the report, so an
    old report cannot be sent again under a new time."""
    return hmac.new(key, timestamp.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def camera_signature_headers(key: bytes, body: bytes, at: float) -> dict[str, str]:
    """The headers a camera sends with `body` at Unix time `at`."""
    timestamp = f"{at:.3f}"
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: camera_signature(key, body, timestamp)}


@dataclass(frozen=True, slots=True)
class CameraEvent:
    """One pass of a vehicle in front of the camera."""

    direction: Direction
    captured_at: datetime
    plate: str | None = None
    color: PlateColor | None = None
    confidence: float | None = None
    image_jpeg: bytes | None = None

    @classmethod
    def of_vehicle(
        cls, vehicle: Vehicle, direction: Direction, *, confidence: float = 0.99
    ) -> "CameraEvent":
        """A simulated vehicle as the camera would report it: its plate read, or only its photo
        when it has one (the server then reads the plate itself)."""
        if vehicle.image is not None:
            return cls(direction, datetime.now(UTC), image_jpeg=base64.b64decode(vehicle.image))
        return cls(direction, datetime.now(UTC), vehicle.plate, vehicle.color, confidence)


class CameraSource(Protocol):
    def events(self) -> AsyncIterator[CameraEvent]:
        """The camera's events, forever; the next one is asked for once the last is stored."""
        ...


class InvalidCameraReport(ValueError):
    pass


class CameraReport(BaseModel):
    """What a camera reports, in a sidecar file or a POST body. Unknown fields are ignored:
    cameras send plenty of their own."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    plate: PlateText | None = None
    color: PlateColor | None = None
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    direction: Direction | None = None
    captured_at: AwareDatetime | None = None
    # base64 JPEG (POST only; a folder camera puts the JPEG beside its sidecar).
    image: str | None = None

    @model_validator(mode="after")
    def _something_to_read(self) -> Self:
        if self.plate is None and self.image is None:
            raise ValueError("a report needs a plate read or an image")
        return self

    def to_event(
        self,
        default_direction: Direction | None,
        image_jpeg: bytes | None,
        max_image_bytes: int,
        *,
        max_age: timedelta | None = None,
    ) -> CameraEvent:
        """The report as an event. Its pass time is bounded by the agent's clock: never later
        than now, and with `max_age` never earlier than that before now (the agent's time is
        used instead), so that a camera's clock cannot stretch or shift a stay's fee."""
        # The gate's own direction rules: at an exit-only gate, a report saying "in" would
        # otherwise open the barrier offline as an entry (entries always open).
        if default_direction is not None and self.direction not in (None, default_direction):
            raise InvalidCameraReport(
                f"direction {self.direction!r} at a gate that only works {default_direction!r}"
            )
        direction = default_direction or self.direction
        if direction is None:
            raise InvalidCameraReport("direction is required at a gate that works both ways")
        if self.image is not None:
            try:
                image_jpeg = base64.b64decode(self.image, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise InvalidCameraReport(f"image is not valid base64: {exc}") from None
        if image_jpeg is not None:
            if not image_jpeg.startswith(JPEG_MAGIC):
                raise InvalidCameraReport("image is not a JPEG")
            if len(image_jpeg) > max_image_bytes:
                raise InvalidCameraReport(
                    f"image of {len(image_jpeg)} bytes is over the {max_image_bytes}-byte limit"
                )
        now = datetime.now(UTC)
        captured_at = self.captured_at
        too_old = max_age is not None and captured_at is not None and captured_at < now - max_age
        if captured_at is None or captured_at > now or too_old:
            captured_at = now
        return CameraEvent(
            direction=direction,
            captured_at=captured_at,
            plate=self.plate,
            color=self.color,
            confidence=self.confidence,
            image_jpeg=image_jpeg,
        )


class _HandOff:
    """Events handed to the agent one at a time; each producer learns when its event is stored."""

    def __init__(self, capacity: int = 64) -> None:
        self._queue = asyncio.Queue[tuple[CameraEvent, asyncio.Future[None]]](capacity)

    async def put(self, event: CameraEvent, timeout_s: float) -> None:
        """Returns once the agent has stored the event; TimeoutError when it has not in time."""
        stored = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await self._queue.put((event, stored))
                await asyncio.shield(stored)
        except TimeoutError:
            stored.cancel()  # the producer gave up: an event still queued is skipped
            raise

    async def events(self) -> AsyncIterator[CameraEvent]:
        while True:
            event, stored = await self._queue.get()
            if stored.cancelled():
                continue
            yield event
            if not stored.done():
                stored.set_result(None)


class QueueCameraSource:
    """Events put in by code: `await source.put(event)` returns once the agent stored it."""

    def __init__(self, timeout_s: float = 10.0) -> None:
        self._handoff = _HandOff()
        self.timeout_s = timeout_s

    async def put(self, event: CameraEvent) -> None:
        await self._handoff.put(event, self.timeout_s)

    def events(self) -> AsyncIterator[CameraEvent]:
        return self._handoff.events()


class FolderCameraSource:
    """Watches `folder` for `<stem>.json` sidecars (a `CameraReport`), each with an optional
    `<stem>.jpg`, oldest first. Handled files move to `done/`; files that are not a valid
    report move to `rejected/`. A sidecar that does not parse yet may still be being written:
    it is retried until it is `settle_s` old."""

    def __init__(
        self,
        folder: Path,
        default_direction: Direction | None,
        *,
        poll_s: float = 0.1,
        settle_s: float = 2.0,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ) -> None:
        self.folder = folder
        self.done = folder / "done"
        self.rejected = folder / "rejected"
        self.default_direction = default_direction
        self.poll_s = poll_s
        self.settle_s = settle_s
        self.max_image_bytes = max_image_bytes

    async def events(self) -> AsyncGenerator[CameraEvent, None]:
        self.done.mkdir(parents=True, exist_ok=True)
        self.rejected.mkdir(parents=True, exist_ok=True)
        while True:
            for sidecar in self._waiting():
                try:
                    event = self._read(sidecar)
                except (OSError, ValueError) as exc:
                    if time.time() - _mtime(sidecar) < self.settle_s:
                        continue
                    log.warning("camera.sidecar_rejected", file=sidecar.name, error=str(exc))
                    self._move(sidecar, self.rejected)
                    continue
                yield event
                self._move(sidecar, self.done)
            await asyncio.sleep(self.poll_s)

    def _waiting(self) -> list[Path]:
        sidecars = [path for path in self.folder.glob("*.json") if path.is_file()]
        return sorted(sidecars, key=lambda path: (_mtime(path), path.name))

    def _read(self, sidecar: Path) -> CameraEvent:
        try:
            report = CameraReport.model_validate_json(sidecar.read_bytes())
        except ValidationError as exc:
            raise InvalidCameraReport(_errors_text(exc)) from None
        photo = sidecar.with_suffix(".jpg")
        image = photo.read_bytes() if photo.exists() else None
        return report.to_event(self.default_direction, image, self.max_image_bytes)

    @staticmethod
    def _move(sidecar: Path, into: Path) -> None:
        for path in (sidecar.with_suffix(".jpg"), sidecar):
            with contextlib.suppress(FileNotFoundError):
                shutil.move(path, into / path.name)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _errors_text(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())


def _error(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    # The same error shape as the parking API.
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status)


class HttpCameraSource:
    """`POST /events` with a `CameraReport` as JSON and the camera's signature headers: 202 once
    the capture is stored; 403 from an address not in `allowed_addresses`; 401 for a missing,
    wrong, stale (over `max_skew_s` off the agent's clock) or replayed signature; 413 for a body
    no report with an allowed image can be (refused by its declared length, or once that much
    has arrived, before the signature is checked); 422 for a report that cannot be a capture;
    503 when the agent does not take it in time. Serves on `host:port` while inside
    `async with`; port 0 picks a free one (see `url`)."""

    def __init__(
        self,
        host: str,
        port: int,
        default_direction: Direction | None,
        *,
        key: bytes,
        allowed_addresses: Sequence[str],
        outbox_path: Path,
        max_skew_s: float = DEFAULT_MAX_SKEW_S,
        store_timeout_s: float = 5.0,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ) -> None:
        if len(key) < 16:
            raise ValueError("the camera key must be at least 16 bytes")
        if not allowed_addresses:
            raise ValueError("no camera address is allowed")
        self.host = host
        self.port = port
        self.default_direction = default_direction
        self.key = key
        self.allowed = [ipaddress.ip_network(a, strict=False) for a in allowed_addresses]
        self.max_skew_s = max_skew_s
        self.store_timeout_s = store_timeout_s
        self.max_image_bytes = max_image_bytes
        # The agent's store, where the signatures taken are kept until an older replay would
        # fail the time check anyway: a restart must not make a replay new again.
        self.outbox_path = outbox_path
        self._outbox: Outbox | None = None
        self._handoff = _HandOff()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.app = self._build_app()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def events(self) -> AsyncIterator[CameraEvent]:
        return self._handoff.events()

    async def __aenter__(self) -> Self:
        self._outbox = Outbox(self.outbox_path)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        # The camera talks to the agent directly: an X-Forwarded-For header is the caller's
        # claim, and trusting it from 127.0.0.1 (uvicorn's default) would pass the address list.
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            proxy_headers=False,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = None

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="gate agent camera input", docs_url=None, redoc_url=None)

        @app.post("/events", status_code=202)
        async def post_event(request: Request) -> Any:
            if not self._address_allowed(request):
                log.warning("camera.address_refused")
                return _error(403, "forbidden", "this address may not report cars here")
            # Bounded before anything is read: a caller without the key must not make the
            # agent hold (or even receive) a body larger than any report can be.
            body = await self._bounded_body(request)
            if body is None:
                return _error(413, "too_large", "the report is larger than any allowed image")
            refusal = self._authentication_refusal(request, body)
            if refusal is not None:
                log.warning("camera.report_refused", why=refusal)
                return _error(401, "unauthenticated", f"camera report refused: {refusal}")
            try:
                report = CameraReport.model_validate_json(body)
            except ValidationError as exc:
                details = [
                    {"field": ".".join(map(str, e["loc"])) or "body", "message": e["msg"]}
                    for e in exc.errors()
                ]
                return _error(422, "invalid_request", "the camera report is not valid", details)
            try:
                event = report.to_event(
                    self.default_direction,
                    None,
                    max_image_bytes=self.max_image_bytes,
                    max_age=timedelta(seconds=self.max_skew_s),
                )
            except InvalidCameraReport as exc:
                return _error(422, "invalid_request", str(exc))
            try:
                await self._handoff.put(event, self.store_timeout_s)
            except TimeoutError:
                return _error(503, "busy", "the gate agent did not take the capture in time")
            return {"status": "accepted"}

        return app

    async def _bounded_body(self, request: Request) -> bytes | None:
        """The body, or None as soon as its declared length or the bytes received so far
        (a chunked body declares none) are over what a report can be."""
        # base64 grows an image by a third; plus room for the read itself.
        limit = self.max_image_bytes * 4 // 3 + 4096
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return None
        return bytes(body)

    def _address_allowed(self, request: Request) -> bool:
        if request.client is None:
            return False
        try:
            address = ipaddress.ip_address(request.client.host)
        except ValueError:
            return False
        return any(address in network for network in self.allowed)

    def _authentication_refusal(self, request: Request, body: bytes) -> str | None:
        """Why the report is not the camera's own, fresh and new; None when it is. The
        signature is checked before the time, so an unsigned caller learns nothing else."""
        timestamp = request.headers.get(TIMESTAMP_HEADER)
        signature = request.headers.get(SIGNATURE_HEADER)
        if timestamp is None or signature is None:
            return "unsigned"
        expected = camera_signature(self.key, body, timestamp)
        if not hmac.compare_digest(expected, signature.strip().lower()):
            return "bad_signature"
        try:
            signed_at = float(timestamp)
        except ValueError:
            return "bad_timestamp"
        now = time.time()
        if not abs(now - signed_at) <= self.max_skew_s:  # also refuses nan
            return "stale"
        assert self._outbox is not None, "serve it with `async with` first"
        if not self._outbox.use_once(
            "camera_signature", expected, signed_at + self.max_skew_s, now
        ):
            return "replayed"
        return None
