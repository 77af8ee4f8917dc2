"""The gates' reports of what they did on their own: kept for operators.

A gate agent lifts its barrier for a signed command, or for a person at the booth
(`manual_open`). The latter is the only opening no record of ours explains, so each such event
is stored once (`gate_events`, by the event's id) and listed at
`GET /api/v1/operator/gate-events`. Barrier events that follow a command are not stored: the
capture and its command already record them. Malformed events and events of unknown gates are
dead letters, like bad captures.
"""

import asyncpg
import orjson
from pydantic import ValidationError

from billing import dead_letters
from gate_controller.mqtt import IncomingMessage, MqttClient
from gate_controller.protocol import GateEvent, Topics
from parking.gates import repository
from parking.logging import get_logger
from parking.settings import Settings

log = get_logger(__name__)
# Events are small: anything larger is not one.
MAX_EVENT_BYTES = 4096
STORED_TYPES = frozenset({"manual_open"})


class GateEventRecorder:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, mqtt: MqttClient) -> None:
        self.settings = settings
        self.pool = pool
        self.mqtt = mqtt
        self.topics = Topics(settings.mqtt_topic_prefix)

    async def start(self) -> None:
        topic_filter = self.topics.all_gates("event")
        if self.settings.mqtt_shared_group:
            topic_filter = f"$share/{self.settings.mqtt_shared_group}/{topic_filter}"
        await self.mqtt.subscribe(topic_filter, self.handle)

    async def handle(self, message: IncomingMessage) -> None:
        try:
            await self._handle(message)
        except asyncpg.DataError as exc:
            # A value the store refuses (a NUL in its reason): the event's own fault, kept for
            # an operator with the reason rather than dropped (nothing resends it).
            await self._dead_letter(message, "invalid_message", str(exc)[:500])
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            # QoS 1 was acknowledged already: the gate does not send it again.
            log.exception("gates.event_not_stored", topic=message.topic)

    async def _handle(self, message: IncomingMessage) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed is None or parsed[1] != "event":
            return
        address = parsed[0]
        if len(message.payload) > MAX_EVENT_BYTES:
            await self._dead_letter(message, "oversized", f"{len(message.payload)} bytes")
            return
        try:
            event = GateEvent.model_validate(orjson.loads(message.payload))
        except (orjson.JSONDecodeError, ValidationError) as exc:
            await self._dead_letter(message, "invalid_message", str(exc)[:500])
            return
        if event.type not in STORED_TYPES:
            return
        if event.event_id is None:
            await self._dead_letter(message, "invalid_message", "a manual_open needs an event_id")
            return
        async with self.pool.acquire() as conn:
            stored = await repository.insert_gate_event(
                conn,
                lot=address.lot,
                gate=address.gate,
                event_id=event.event_id,
                type=event.type,
                reason=event.reason,
                at=event.at,
            )
        if stored is None:
            await self._dead_letter(message, "unknown_gate", f"{address.lot}/{address.gate}")
            return
        log.warning("gates.manual_open", lot=address.lot, gate=address.gate, new=stored)

    async def _dead_letter(self, message: IncomingMessage, reason: str, detail: str) -> None:
        async with self.pool.acquire() as conn:
            await dead_letters.insert_dead_letter(
                conn,
                source="mqtt",
                topic=message.topic,
                reason=reason,
                detail=detail,
                payload=message.payload,
            )
        log.warning("gates.event_dead_letter", reason=reason)
