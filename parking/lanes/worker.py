"""The lane service's MQTT side: consumes captures, owns each one's transaction, and only after
commit publishes the command and the ack and updates occupancy.

Captures are spread over `lane_concurrency` queues by car park, so one car park's captures are
decided in order while different car parks proceed in parallel.
"""

import asyncio
import contextlib
import hashlib
import time
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from pydantic import ValidationError

from billing import dead_letters
from gate_controller.mqtt import IncomingMessage, MqttClient
from gate_controller.protocol import Ack, Capture, GateAddress, Topics
from parking.gates.commands import publish_ack, publish_command
from parking.lanes import repository as repo
from parking.lanes.reading import PlateReader, PlateReading, camera_own_read, decode_frames
from parking.lanes.repository import GateInfo
from parking.lanes.rules import (
    better_entry_read,
    entry_wants_second_reader,
    wants_second_reader,
)
from parking.lanes.service import Decision, LaneService
from parking.logging import correlation_id, get_logger, mask_plate
from parking.occupancy.service import Occupancy
from parking.settings import Settings

log = get_logger(__name__)
_GATE_CACHE_TTL_S = 60.0
# How soon the tariff listener connects again after losing its connection.
_TARIFF_LISTENER_RETRY_S = 1.0


def lane_events_channel(settings: Settings) -> str:
    return f"{settings.redis_key_prefix}lane-events"


@dataclass
class LaneStats:
    captures: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    failures: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    # Capture received -> command acknowledged by the broker, in ms (recent window).
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=200_000))


# Failures of a decision that the payload itself causes (a value the store refuses, a time
# whose arithmetic overflows): a resend fails the same way, so the capture is dead-lettered and
# acknowledged as rejected. Anything else (PostgreSQL, Redis or the broker down) leaves it
# unacknowledged, and the gate sends it again.
_UNDECIDABLE = (asyncpg.DataError, OverflowError)


class _ReadAgain(Exception):
    """Rolls a decision back so that the capture's frames are read by the server first."""


class InvalidMessage(Exception):
    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def content_fingerprint(gate: GateInfo, capture: Capture) -> bytes:
    """What makes two messages with one capture_id the same capture: the gate, direction,
    sequence number, camera read and frames. Not the time (a gate may re-stamp a resend) nor
    the offline flags (a capture first sent online may be uploaded again from the outbox)."""
    digest = hashlib.sha256()
    camera = capture.camera_read.model_dump(mode="json") if capture.camera_read else None
    if camera is not None and camera.get("model") is None:
        # Captures fingerprinted before cameras could name their model: the same bytes.
        camera.pop("model", None)
    digest.update(orjson.dumps([gate.gate_id, capture.direction, capture.seq, camera]))
    for frame in capture.frames():
        digest.update(b"\0")
        digest.update(frame.encode())
    return digest.digest()


class LaneWorker:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        mqtt: MqttClient,
        occupancy: Occupancy,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.mqtt = mqtt
        self.occupancy = occupancy
        self.service = LaneService(settings)
        self.reader = PlateReader(settings)
        self.topics = Topics(settings.mqtt_topic_prefix)
        self.lane_events_channel = lane_events_channel(settings)
        self.stats = LaneStats()
        self._gates: dict[GateAddress, tuple[float, GateInfo]] = {}
        self._queues = [
            asyncio.Queue[IncomingMessage | None]() for _ in range(settings.lane_concurrency)
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._tariff_listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Listening before the warm-up reads the tariffs: no change can fall in between.
        listening = asyncio.Event()
        self._tariff_listener = asyncio.create_task(self._listen_for_tariffs(listening))
        await listening.wait()
        await self.warm_up()
        self._tasks = [asyncio.create_task(self._consume(q)) for q in self._queues]
        topic_filter = self.topics.all_gates("capture")
        if self.settings.mqtt_shared_group:
            topic_filter = f"$share/{self.settings.mqtt_shared_group}/{topic_filter}"
        await self.mqtt.subscribe(topic_filter, self._enqueue)

    async def warm_up(self) -> None:
        """Reads before the first car what its decision would otherwise wait for: every gate and
        tariff (one query each; the caches expire as before), a decision's lookups prepared on
        every idle connection of the pool, and a Redis connection per decision queue. Cold, the
        first ~100 decisions after a start took several times the steady state's latency."""
        started = time.perf_counter()
        async with self.pool.acquire() as conn:
            gates = await repo.all_gates(conn)
            self.service.cache_tariffs(await repo.all_tariff_versions(conn))
        loaded = time.monotonic()
        self._gates = {
            GateAddress(lot=lot, gate=gate): (loaded, info) for (lot, gate), info in gates.items()
        }
        idle = [await self.pool.acquire() for _ in range(self.pool.get_idle_size())]
        try:
            await asyncio.gather(*(repo.prepare_lookups(conn) for conn in idle))
        finally:
            for conn in idle:
                await self.pool.release(conn)
        # Concurrent commands each open a connection of the client's pool.
        await asyncio.gather(*(self.occupancy.redis.ping() for _ in self._queues))
        log.info(
            "lane.warmed_up", gates=len(gates), ms=round((time.perf_counter() - started) * 1000, 1)
        )

    async def stop(self) -> None:
        """Lets each queue finish the capture in hand, then stops. A sentinel rather than only
        cancel(): a cancellation landing inside a client library's own timeout handling can be
        absorbed, leaving a consumer waiting on its queue forever."""
        for queue in self._queues:
            queue.put_nowait(None)
        _, unfinished = await asyncio.wait(self._tasks, timeout=5.0) if self._tasks else ((), ())
        for task in unfinished:
            task.cancel()
        if self._tariff_listener is not None:
            self._tariff_listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tariff_listener
        self.reader.close()

    async def _listen_for_tariffs(self, listening: asyncio.Event) -> None:
        """Drops a car park's cached tariffs as soon as a version is added or changed (migration
        0016 announces it), so that an exit is priced by the version the fee quote shows. While
        the listening connection is down nothing is announced: every cache is dropped when it
        is back."""

        def changed(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            self.service.forget_tariffs(int(payload))

        while True:
            try:
                async with self.pool.acquire() as listener:
                    closed = asyncio.Event()

                    def lost(_conn: object, closed: asyncio.Event = closed) -> None:
                        closed.set()

                    listener.add_termination_listener(lost)
                    await listener.add_listener("tariffs", changed)
                    if listening.is_set():
                        self.service.forget_tariffs()
                    listening.set()
                    try:
                        await closed.wait()
                    finally:
                        listener.remove_termination_listener(lost)
                        if not listener.is_closed():
                            await listener.remove_listener("tariffs", changed)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.warning("lane.tariff_listener_lost")
            await asyncio.sleep(_TARIFF_LISTENER_RETRY_S)

    def pending(self) -> int:
        return sum(q.qsize() for q in self._queues)

    def _enqueue(self, message: IncomingMessage) -> None:
        parsed = self.topics.parse(message.topic)
        lot = parsed[0].lot if parsed else message.topic
        self._queues[zlib.crc32(lot.encode()) % len(self._queues)].put_nowait(message)

    async def _consume(self, queue: asyncio.Queue[IncomingMessage | None]) -> None:
        while (message := await queue.get()) is not None:
            try:
                await self.handle(message)
            except Exception:
                # Not acked: the gate keeps the capture in its outbox and sends it again.
                self.stats.failures += 1
                log.exception("lane.capture_failed", topic=message.topic)
            finally:
                correlation_id.set(None)

    async def handle(self, message: IncomingMessage) -> None:
        try:
            address, capture = self._parse(message)
            correlation_id.set(str(capture.capture_id))
            gate = await self._gate(address)
            if gate.direction not in ("both", capture.direction):
                raise InvalidMessage(
                    "direction_mismatch", f"{capture.direction} capture on a {gate.direction} gate"
                )
            try:
                frames = decode_frames(capture)
            except ValueError as exc:
                raise InvalidMessage("invalid_image", str(exc)) from exc
        except InvalidMessage as exc:
            await self._dead_letter(message, exc)
            return

        # Reading (OCR, in the process pool) happens before the transaction, never inside it.
        reading = await self.reader.read(capture, frames)
        if (
            capture.direction == "in"
            and frames
            and entry_wants_second_reader(reading, self.service.certainty)
        ):
            reading = better_entry_read(
                reading, await self.reader.read_again(capture, frames), self.service.verification
            )
        now = datetime.now(UTC)
        started_db = time.perf_counter()
        try:
            decided = await self._decided(
                message, gate, capture, reading, now, frames, may_read_again=bool(frames)
            )
        except _ReadAgain:
            # A camera read that found no stay: the frames are read by the server (rolled back
            # first, so the OCR is outside any transaction) and the capture decided again.
            reading = await self.reader.read_again(capture, frames)
            decided = await self._decided(message, gate, capture, reading, now, frames)
        if decided is None:
            return
        decision, command, conflict = decided
        if decision is not None and decision.occupancy_delta:
            # Before publishing: a publish that fails after commit must not lose the change.
            await self.occupancy.adjust(gate.car_park_id, decision.occupancy_delta)
        started_publish = time.perf_counter()
        if command is not None:
            await publish_command(self.mqtt, self.settings, address, command)
        done = time.perf_counter()
        latency_ms = (done - message.received_at) * 1000
        # Bound to the very message it answers: the gate drops the capture it holds only when
        # that is what it sent. A conflicting resend is acknowledged as nothing the gate holds:
        # the capture stored under its id may be another sender's, and the gate's must not go.
        ack = Ack(
            capture_id=capture.capture_id,
            received_at=now,
            duplicate=decision is None,
            payload_sha256=None if conflict else hashlib.sha256(message.payload).hexdigest(),
        )
        await publish_ack(self.mqtt, self.settings, address, ack)

        self.stats.captures += 1
        if decision is None:
            self.stats.duplicates += 1
            log.info("lane.duplicate_capture", gate=address.gate, lot=address.lot)
            return
        self.stats.latencies_ms.append(latency_ms)
        self.stats.outcomes[decision.outcome] += 1
        await self._announce(gate, address, capture, decision, latency_ms, now)
        log.info(
            "lane.decided",
            lot=address.lot,
            gate=address.gate,
            direction=capture.direction,
            outcome=decision.outcome,
            action=decision.command.action,
            fee_fen=decision.fee_fen,
            latency_ms=round(latency_ms, 2),
            queued_ms=round((started_db - message.received_at) * 1000, 2),
            db_ms=round((started_publish - started_db) * 1000, 2),
            publish_ms=round((done - started_publish) * 1000, 2),
        )

    async def _announce(
        self,
        gate: GateInfo,
        address: GateAddress,
        capture: Capture,
        decision: Decision,
        latency_ms: float,
        now: datetime,
    ) -> None:
        """The live lane feed of the operator dashboard (Redis pub/sub, plate masked)."""
        event = {
            "car_park_id": gate.car_park_id,
            "lot": address.lot,
            "gate": address.gate,
            "direction": capture.direction,
            "plate": mask_plate(decision.plate) if decision.plate else None,
            "outcome": decision.outcome,
            "action": decision.command.action,
            "fee_fen": decision.fee_fen,
            "latency_ms": round(latency_ms, 1),
            "at": now.isoformat(),
        }
        if decision.alert:
            event["alert"] = decision.alert
        try:
            await self.occupancy.redis.publish(self.lane_events_channel, orjson.dumps(event))
        except Exception:  # the feed is a view; a Redis hiccup must not fail the capture
            log.warning("lane.feed_publish_failed")

    async def _decided(
        self,
        message: IncomingMessage,
        gate: GateInfo,
        capture: Capture,
        reading: PlateReading,
        now: datetime,
        frames: list[bytes] | None = None,
        *,
        may_read_again: bool = False,
    ) -> tuple[Decision | None, bytes | None, bool] | None:
        """`_decide`; None when the payload itself makes it fail (`_UNDECIDABLE`): rolled back,
        nothing of it stored, dead-lettered and rejected. The server's reading of the frames is
        not in here: a reader's failure is no fault of the capture's."""
        try:
            return await self._decide(
                gate, capture, reading, now, frames, may_read_again=may_read_again
            )
        except _UNDECIDABLE as exc:
            # With its traceback: the payload may have found a bug rather than been bad.
            log.warning("lane.capture_undecidable", exc_info=True)
            await self._dead_letter(message, InvalidMessage("undecidable", repr(exc)))
            return None

    async def _decide(
        self,
        gate: GateInfo,
        capture: Capture,
        reading: PlateReading,
        now: datetime,
        frames: list[bytes] | None = None,
        *,
        may_read_again: bool = False,
    ) -> tuple[Decision | None, bytes | None, bool]:
        """Decides in one transaction; a redelivered capture gets its stored command again.

        Returns (decision, command, False), or (None, command, conflict) for a duplicate: any
        capture whose id was stored before, whatever its captured_at or content (`conflict`: a
        resend that says something else than the capture stored under its id, recorded for an
        operator and never decided). A duplicate's command is None unless its content is the
        stored capture's (`content_fingerprint`, which names the gate): the stored decision is
        signed for no gate but the capture's own, so a capture id seen opened at one gate and
        published on another gate's topic lifts nothing there. Duplicates are detected by the
        capture's key at insert, not by a lookup first: that saves every capture a round trip,
        and the duplicate's decision is rolled back with its transaction. A unique violation for
        any other reason means a concurrent worker changed the same stay first: the second
        attempt sees its committed result.
        """
        fingerprint = content_fingerprint(gate, capture)
        async with self.pool.acquire() as conn:
            for attempt in (1, 2):
                try:
                    async with conn.transaction():
                        decision = await self.service.decide(conn, gate, capture, reading, now)
                        if may_read_again and wants_second_reader(
                            reading, decision.outcome, self.service.certainty
                        ):
                            raise _ReadAgain
                        command_json: dict[str, Any] = decision.command.model_dump(
                            mode="json", exclude_none=True
                        )
                        camera = camera_own_read(capture.camera_read, reading)
                        await repo.insert_capture(
                            conn,
                            content_sha256=fingerprint,
                            frame=frames[0] if frames else None,
                            more_frames=frames[1:] if frames else None,
                            capture_id=capture.capture_id,
                            gate_id=gate.gate_id,
                            car_park_id=gate.car_park_id,
                            seq=capture.seq,
                            direction=capture.direction,
                            plate=decision.plate,
                            plate_color=reading.color,
                            read_confidence=reading.best.score if reading.best else None,
                            read_certain=self.service.certain(reading),
                            read_proven=self.service.proven(reading),
                            plate_source=reading.source,
                            camera_plate=camera.text if camera else None,
                            camera_color=camera.color if camera else None,
                            camera_confidence=camera.confidence if camera else None,
                            camera_model=camera.model if camera else None,
                            match_status=decision.match_status,
                            captured_at=capture.captured_at,
                            received_at=now,
                            offline=capture.offline,
                            offline_action=capture.offline_action,
                            outcome=decision.outcome,
                            session_id=decision.session_id,
                            command=command_json,
                        )
                    return decision, orjson.dumps(command_json), False
                except asyncpg.UniqueViolationError:
                    stored = await repo.stored_capture(conn, capture.capture_id)
                    if stored is not None:
                        conflict = stored.content_sha256 not in (None, fingerprint)
                        if conflict:
                            await self._record_conflict(conn, gate, capture)
                        # A capture stored before fingerprints (None) cannot show its gate:
                        # its command, long expired, is sent to nobody.
                        command = (
                            orjson.dumps(stored.command)
                            if stored.content_sha256 == fingerprint
                            else None
                        )
                        return None, command, conflict
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    @staticmethod
    async def _record_conflict(conn: asyncpg.Connection, gate: GateInfo, capture: Capture) -> None:
        """A resend that says something else than the capture stored under its id: never
        decided (the stored command answers it), kept for an operator."""
        resent = capture.model_dump(mode="json", exclude={"image", "images"})
        resent["frames"] = len(capture.frames())
        await repo.insert_capture_conflict(
            conn,
            capture_id=capture.capture_id,
            car_park_id=gate.car_park_id,
            gate_id=gate.gate_id,
            resent=resent,
        )
        log.warning("lane.conflicting_resend", gate_id=gate.gate_id)

    def _parse(self, message: IncomingMessage) -> tuple[GateAddress, Capture]:
        parsed = self.topics.parse(message.topic)
        if parsed is None or parsed[1] != "capture":
            raise InvalidMessage("bad_topic", message.topic)
        if len(message.payload) > self.settings.max_capture_bytes:
            raise InvalidMessage(
                "oversized",
                f"{len(message.payload)} bytes > {self.settings.max_capture_bytes}",
            )
        try:
            data = orjson.loads(message.payload)
        except orjson.JSONDecodeError as exc:
            raise InvalidMessage("malformed_json", str(exc)) from exc
        try:
            return parsed[0], Capture.model_validate(data)
        except ValidationError as exc:
            detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise InvalidMessage("invalid_message", detail) from exc

    async def _gate(self, address: GateAddress) -> GateInfo:
        cached = self._gates.get(address)
        if cached and time.monotonic() - cached[0] < _GATE_CACHE_TTL_S:
            return cached[1]
        async with self.pool.acquire() as conn:
            gate = await repo.load_gate(conn, address.lot, address.gate)
        if gate is None:
            raise InvalidMessage("unknown_gate", f"{address.lot}/{address.gate}")
        self._gates[address] = (time.monotonic(), gate)
        return gate

    async def _dead_letter(self, message: IncomingMessage, exc: InvalidMessage) -> None:
        self.stats.dead_letters += 1
        async with self.pool.acquire() as conn:
            await dead_letters.insert_dead_letter(
                conn,
                source="mqtt",
                topic=message.topic,
                reason=exc.reason,
                detail=exc.detail,
                payload=message.payload,
            )
        log.warning("lane.dead_letter", reason=exc.reason, size=len(message.payload))
        await self._ack_rejected(message, exc.reason)

    async def _ack_rejected(self, message: IncomingMessage, reason: str) -> None:
        """Tells the gate its capture is kept as a dead letter, so that it stops resending."""
        parsed = self.topics.parse(message.topic)
        if parsed is None or len(message.payload) > self.settings.max_capture_bytes:
            return
        try:
            capture_id = UUID(str(orjson.loads(message.payload)["capture_id"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return  # nothing to acknowledge it by
        ack = Ack(
            capture_id=capture_id,
            received_at=datetime.now(UTC),
            rejected=reason,
            payload_sha256=hashlib.sha256(message.payload).hexdigest(),
        )
        await publish_ack(self.mqtt, self.settings, parsed[0], ack)
