"""paho-mqtt driven by the asyncio event loop itself (no network thread).

paho's socket is watched with loop.add_reader/add_writer and its housekeeping (keepalive,
retries) runs from a task, so every callback runs on the event loop: no locks, no thread
hand-offs, no GIL contention on the gate's hot path. This wrapper keeps its own reconnect loop,
re-subscribes on every connect, and turns QoS 1 PUBACKs into futures awaited with a timeout.
Malformed or unexpected messages are the handlers' business: a handler that raises is logged
and the connection carries on.
"""

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    topic: str
    payload: bytes
    received_at: float  # time.perf_counter() when the message was read off the socket
    retain: bool


MessageHandler = Callable[[IncomingMessage], Awaitable[None] | None]


class PublishTimeout(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        parts = urlparse(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp"):
            raise ValueError(f"unsupported MQTT URL scheme {parts.scheme!r}")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8883 if tls else 1883),
            username=parts.username,
            password=parts.password,
            tls=tls,
        )


class MqttClient:
    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        ack_timeout_s: float = 5.0,
        clean_session: bool = True,
        will: tuple[str, bytes] | None = None,
        keepalive_s: int = 30,
    ) -> None:
        self.address = BrokerAddress.parse(url)
        self.client_id = client_id
        self.ack_timeout_s = ack_timeout_s
        self.keepalive_s = keepalive_s
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv311,
            clean_session=clean_session,
        )
        if self.address.username:
            self._client.username_pw_set(self.address.username, self.address.password)
        if self.address.tls:
            self._client.tls_set()
        if will:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        # connect() runs on the event loop: never let an unreachable broker block it for long.
        self._client.connect_timeout = 2.0
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_socket_open = self._on_socket_open
        self._client.on_socket_close = self._on_socket_close
        self._client.on_socket_register_write = self._on_socket_register_write
        self._client.on_socket_unregister_write = self._on_socket_unregister_write
        self._subscriptions: dict[str, MessageHandler] = {}
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = asyncio.Event()
        self._socket_closed = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Future[Any]] = set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def start(self, wait_connected_s: float | None = 10.0) -> None:
        self._loop = asyncio.get_running_loop()
        self._spawn(self._maintain_connection())
        self._spawn(self._housekeeping())
        if wait_connected_s:
            async with asyncio.timeout(wait_connected_s):
                await self._connected.wait()

    async def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(Exception):
            self._client.disconnect()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for future in self._pending.values():
            if not future.done():
                future.cancel()

    async def subscribe(self, topic_filter: str, handler: MessageHandler) -> None:
        self._subscriptions[topic_filter] = handler
        if self.connected:
            self._client.subscribe(topic_filter, qos=1)

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, wait: bool = True
    ) -> None:
        """Publishes at QoS 1; with `wait`, returns once the broker acknowledged it. While
        disconnected the message waits in paho's queue and goes out on reconnect."""
        assert self._loop is not None, "start() first"
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise RuntimeError(f"publish failed: {paho.error_string(info.rc)}")
        if not wait:
            return
        # Callbacks run on this loop, so the PUBACK cannot arrive before the future exists.
        future = self._pending.setdefault(info.mid, self._loop.create_future())
        try:
            # shield: a late PUBACK still finds (and resolves) the future instead of leaking.
            async with asyncio.timeout(self.ack_timeout_s):
                await asyncio.shield(future)
        except TimeoutError as exc:
            raise PublishTimeout(f"no PUBACK for {topic} within {self.ack_timeout_s}s") from exc

    async def _maintain_connection(self) -> None:
        delay = 1.0
        first = True
        while not self._stopping:
            try:
                # paho connects synchronously on this loop: only let it once the broker is
                # known to answer, so an unreachable host never stalls the loop.
                async with asyncio.timeout(2.0):
                    _, writer = await asyncio.open_connection(self.address.host, self.address.port)
                writer.close()
                if first:
                    self._client.connect(self.address.host, self.address.port, self.keepalive_s)
                else:
                    self._client.reconnect()
                first = False
            except (OSError, TimeoutError, paho.WebsocketConnectionError) as exc:
                log.warning("mqtt.connect_failed", client_id=self.client_id, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 1.0
            await self._socket_closed.wait()
            self._socket_closed.clear()
            if not self._stopping:
                await asyncio.sleep(0.5)

    async def _housekeeping(self) -> None:
        """Keepalive pings and retries, which paho's own thread would otherwise do."""
        while True:
            await asyncio.sleep(1.0)
            try:
                self._client.loop_misc()
            except Exception:  # must not end: without it, keepalive and retries stop
                log.exception("mqtt.housekeeping_failed", client_id=self.client_id)

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Socket plumbing: paho tells us which socket to watch.

    def _on_socket_open(self, client: paho.Client, _u: Any, sock: Any) -> None:
        assert self._loop is not None
        # paho writes a packet in pieces; with Nagle on, the second piece waits for the peer's
        # delayed ACK (~40 ms on Linux), which would dominate the gate's latency.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Drain bursts in one wake-up instead of one packet per readiness event.
        self._loop.add_reader(sock, client.loop_read, 100)

    def _on_socket_close(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._socket_closed.set()

    def _on_socket_register_write(self, client: paho.Client, _u: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_writer(sock, client.loop_write)

    def _on_socket_unregister_write(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_writer(sock)

    # Protocol callbacks, all on the event loop.

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("mqtt.connect_refused", client_id=self.client_id, reason=str(reason))
            return
        for topic_filter in self._subscriptions:
            client.subscribe(topic_filter, qos=1)
        log.info("mqtt.connected", client_id=self.client_id, host=self.address.host)
        self._connected.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        log.warning("mqtt.disconnected", client_id=self.client_id, reason=str(reason))
        self._connected.clear()

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        incoming = IncomingMessage(
            message.topic, bytes(message.payload), time.perf_counter(), bool(message.retain)
        )
        for topic_filter, handler in self._subscriptions.items():
            if paho.topic_matches_sub(_strip_share(topic_filter), message.topic):
                try:
                    result = handler(incoming)
                except Exception:
                    log.exception("mqtt.handler_failed", topic=message.topic)
                    return
                if asyncio.iscoroutine(result):
                    self._spawn(result)
                return

    def _on_publish(self, _c: Any, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        future = self._pending.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(None)


def _strip_share(topic_filter: str) -> str:
    """`$share/group/a/b` matches messages published on `a/b`."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter
