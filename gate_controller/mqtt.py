"""paho-mqtt inside asyncio.

paho's network loop runs in its own thread (loop_start) and reconnects by itself; this wrapper
re-subscribes on every connect, hands received messages to the event loop, and turns QoS 1
PUBACKs into awaitable futures with a timeout.
"""

import asyncio
import contextlib
import socket
import threading
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
    received_at: float  # time.perf_counter() when paho's thread got it
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
    ) -> None:
        self.address = BrokerAddress.parse(url)
        self.client_id = client_id
        self.ack_timeout_s = ack_timeout_s
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
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        self._client.on_socket_open = _disable_nagle
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._subscriptions: dict[str, MessageHandler] = {}
        self._lock = threading.Lock()
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._acked_early: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = asyncio.Event()
        self._tasks: set[asyncio.Future[None]] = set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self, wait_connected_s: float | None = 10.0) -> None:
        self._loop = asyncio.get_running_loop()
        self._client.connect_async(self.address.host, self.address.port, keepalive=30)
        self._client.loop_start()
        if wait_connected_s:
            await asyncio.wait_for(self._connected.wait(), wait_connected_s)

    async def stop(self) -> None:
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
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
        """Publishes at QoS 1; with `wait`, returns once the broker acknowledged it."""
        assert self._loop is not None, "start() first"
        future: asyncio.Future[None] = self._loop.create_future()
        # Never call into paho while holding our lock: paho's thread holds its own lock when it
        # calls _on_publish, which takes ours. The PUBACK may therefore arrive before the future
        # is registered; _on_publish then leaves the mid in _acked_early.
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise RuntimeError(f"publish failed: {paho.error_string(info.rc)}")
        with self._lock:
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
                future.set_result(None)
            else:
                self._pending[info.mid] = future
        if not wait:
            return
        try:
            # shield: a late PUBACK still finds (and resolves) the future instead of leaking.
            await asyncio.wait_for(asyncio.shield(future), self.ack_timeout_s)
        except TimeoutError as exc:
            raise PublishTimeout(f"no PUBACK for {topic} within {self.ack_timeout_s}s") from exc

    # paho callbacks: these run on paho's network thread.

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("mqtt.connect_failed", client_id=self.client_id, reason=str(reason))
            return
        for topic_filter in self._subscriptions:
            client.subscribe(topic_filter, qos=1)
        log.info("mqtt.connected", client_id=self.client_id, host=self.address.host)
        self._call_in_loop(self._connected.set)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        log.warning("mqtt.disconnected", client_id=self.client_id, reason=str(reason))
        self._call_in_loop(self._connected.clear)

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        incoming = IncomingMessage(
            message.topic, bytes(message.payload), time.perf_counter(), bool(message.retain)
        )
        for topic_filter, handler in self._subscriptions.items():
            if paho.topic_matches_sub(_strip_share(topic_filter), message.topic):
                self._call_in_loop(self._dispatch, handler, incoming)
                return

    def _on_publish(self, _c: Any, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        with self._lock:
            future = self._pending.pop(mid, None)
            if future is None:
                self._acked_early.add(mid)
                return
        self._call_in_loop(_resolve, future)

    def _call_in_loop(self, callback: Callable[..., Any], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, *args)

    def _dispatch(self, handler: MessageHandler, incoming: IncomingMessage) -> None:
        result = handler(incoming)
        if asyncio.iscoroutine(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _disable_nagle(_c: Any, _u: Any, sock: Any) -> None:
    """paho writes a packet in pieces; with Nagle on, the second piece waits for the peer's
    delayed ACK (~40 ms on Linux), which would dominate the gate's latency."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _strip_share(topic_filter: str) -> str:
    """`$share/group/a/b` matches messages published on `a/b`."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter
