"""A gate as the tests see it: publishes captures and collects the server's answers."""

import asyncio
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import orjson

from gate_controller.mqtt import IncomingMessage, MqttClient
from gate_controller.protocol import CameraRead, Capture, GateAddress, Topics, encode


class GateProbe:
    def __init__(self, mqtt_url: str, topic_prefix: str) -> None:
        self.topics = Topics(topic_prefix)
        self.mqtt = MqttClient(mqtt_url, f"probe-{uuid.uuid4().hex[:8]}")
        self.commands: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.acks: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._changed = asyncio.Event()
        self._seq = 0

    async def __aenter__(self) -> "GateProbe":
        await self.mqtt.start()
        await self.mqtt.subscribe(self.topics.all_gates("command"), self._collect(self.commands))
        await self.mqtt.subscribe(self.topics.all_gates("ack"), self._collect(self.acks))
        # Subscriptions are sent on connect; give the broker a moment to register them.
        await asyncio.sleep(0.1)
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
