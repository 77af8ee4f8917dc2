"""A gate as the tests see it: publishes captures and collects the server's answers."""

import asyncio
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import orjson

from gate_controller.mqtt import IncomingMessage, MqttClient
from gate_controller.protocol import CameraRead, Capture, GateAddress, Topics, encode


class SubAcks:
    """The broker's SUBACKs to one client, counted from paho's on_subscribe: a test waits for
    its subscriptions to be in place (a message published after the SUBACK reaches it) instead
    of sleeping. Install it before the client subscribes; a refused subscription fails."""

    def __init__(self, mqtt: MqttClient) -> None:
        self.acked = 0
        self.refused: list[str] = []
        self._changed = asyncio.Event()
        mqtt._client.on_subscribe = self._on_subscribe

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reason_codes: Any, _p: Any) -> None:
        # Called on the event loop (the client's socket is read there), once per SUBACK.
        self.refused += [str(code) for code in reason_codes if code.is_failure]
        self.acked += 1
        self._changed.set()

    async def wait(self, count: int, timeout_s: float = 10.0) -> None:
        """Until `count` SUBACKs have come since the client was handed to us."""
        async with asyncio.timeout(timeout_s):
            while self.acked < count:
                self._changed.clear()
                await self._changed.wait()
        assert not self.refused, f"the broker refused subscriptions: {self.refused}"


class GateProbe:
    def __init__(self, mqtt_url: str, topic_prefix: str) -> None:
        self.topics = Topics(topic_prefix)
        self.mqtt = MqttClient(mqtt_url, f"probe-{uuid.uuid4().hex[:8]}")
        self.commands: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.acks: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._changed = asyncio.Event()
        self._seq = 0
        self._subacks = SubAcks(self.mqtt)

    async def __aenter__(self) -> "GateProbe":
        await self.mqtt.start()
        await self.mqtt.subscribe(self.topics.all_gates("command"), self._collect(self.commands))
        await self.mqtt.subscribe(self.topics.all_gates("ack"), self._collect(self.acks))
        # Commands and acks published from now on reach us.
        await self._subacks.wait(2)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.mqtt.stop()

    def _collect(self, into: dict[str, list[dict[str, Any]]]) -> Any:
        def handler(message: IncomingMessage) -> None:
            data = orjson.loads(message.payload)
            data["_topic"] = message.topic
            into[data["capture_id"]].append(data)
            self._changed.set()

        return handler

    def capture(
        self,
        direction: str,
        plate: str | None,
        *,
        confidence: float = 0.98,
        color: str = "blue",
    ) -> Capture:
        self._seq += 1
        return Capture(
            capture_id=uuid.uuid4(),
            seq=self._seq,
            direction=direction,  # type: ignore[arg-type]
            captured_at=datetime.now(UTC),
            camera_read=(
                CameraRead(plate=plate, color=color, confidence=confidence)  # type: ignore[arg-type]
                if plate
                else None
            ),
        )

    async def publish_raw(self, lot: str, gate: str, payload: bytes) -> None:
        await self.mqtt.publish(self.topics.topic(GateAddress(lot, gate), "capture"), payload)

    async def send(self, lot: str, gate: str, capture: Capture) -> None:
        await self.publish_raw(lot, gate, encode(capture))

    async def wait_for(
        self, capture: Capture, *, commands: int = 1, acks: int = 1, timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """Waits until the capture has that many commands and acks; returns the first command."""
        key = str(capture.capture_id)

        async def done() -> bool:
            while len(self.commands[key]) < commands or len(self.acks[key]) < acks:
                self._changed.clear()
                await self._changed.wait()
            return True

        await asyncio.wait_for(done(), timeout_s)
        return self.commands[key][0] if commands else {}

    async def decide(self, lot: str, gate: str, capture: Capture) -> dict[str, Any]:
        await self.send(lot, gate, capture)
        return await self.wait_for(capture)
