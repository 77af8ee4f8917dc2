"""Gate simulator: many gates across many car parks publishing captures like real cameras.

Used by `parking-dev demo`, the benchmarks and the tests. Like a real gate it keeps each capture
until the server's ack and sends it again if none comes; on top of that it injects duplicates
(the same capture published again) and double reads (the same car read twice). Like a real gate
it counts a command only when the server signed it for that gate and it has not expired (the
agent's own check, `gate_controller.whitelist.command_refusal`); anything else is counted by
reason in `SimReport.command_refusals` and logged, so a run that sends unsigned or forged
commands shows them instead of counting them as answers. Acks likewise: one the server did not
sign for the gate is counted in `SimReport.ack_refusals`, and the capture waits for a real one.
"""

import asyncio
import hashlib
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from gate_controller.mqtt import IncomingMessage, MqttClient
from gate_controller.protocol import (
    Ack,
    CameraRead,
    Capture,
    Command,
    GateAddress,
    Topics,
    encode,
)
from gate_controller.whitelist import command_refusal, signed_refusal

log = structlog.get_logger(__name__)

PROVINCES = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼"
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I, no O
DIGITS = "0123456789"


def random_plate(rng: random.Random, green: bool = False, province: str = "浙") -> str:
    """A grammatical plate (GA 36): province, issuing-authority letter, then five characters
    (blue) or, for a small new-energy car, D/F, a letter or digit and four digits (green)."""
    authority = rng.choice("ABCDEFGH")
    if green:
        digits = "".join(rng.choice(DIGITS) for _ in range(4))
        return f"{province}{authority}{rng.choice('DF')}{rng.choice(DIGITS + LETTERS)}{digits}"
    serial = [rng.choice(DIGITS) for _ in range(5)]
    for position in rng.sample(range(5), rng.choice((0, 1, 2))):
        serial[position] = rng.choice(LETTERS)
    return f"{province}{authority}{''.join(serial)}"


@dataclass(frozen=True, slots=True)
class Vehicle:
    plate: str
    color: Literal["blue", "green"]
    bound: bool
    # A photo of the plate (base64 JPEG): captures then carry it instead of a camera read,
    # so that the server reads the plate itself.
    image: str | None = None


@dataclass(frozen=True, slots=True)
class SimGate:
    lot: str
    gate: str
    direction: Literal["in", "out"]


@dataclass(frozen=True, slots=True)
class ExitRecord:
    capture_id: uuid.UUID  # the first read of this exit
    vehicle: Vehicle
    stay_s: float  # by the simulator's own clock, independent of the server


@dataclass
class SimReport:
    sent: int = 0
    resent: int = 0
    duplicates_sent: int = 0
    double_reads_sent: int = 0
    entries: int = 0
    exits: int = 0
    bound_exits: int = 0
    unbound_exits: int = 0
    commands: Counter[str] = field(default_factory=Counter)
    # Commands a real gate would have refused, by reason (unsigned, bad_signature, other_gate,
    # expired, malformed): never counted in `commands`, and their captures stay unanswered.
    command_refusals: Counter[str] = field(default_factory=Counter)
    # Acks a real gate would have refused, by reason (unsigned, bad_signature, other_gate,
    # other_payload, malformed): never counted in `acks`.
    ack_refusals: Counter[str] = field(default_factory=Counter)
    acks: int = 0
    unanswered: int = 0
    round_trip_ms: list[float] = field(default_factory=list)
    exit_log: list[ExitRecord] = field(default_factory=list)


@dataclass
class _Pending:
    address: GateAddress
    payload: bytes
    sent_at: float
    acked: bool = False
    commanded: bool = False


class GateSimulator:
    def __init__(
        self,
        mqtt_url: str,
        gates: list[SimGate],
        inside: dict[str, list[tuple[Vehicle, datetime]]],
        outside: list[Vehicle],
        *,
        server_key: Ed25519PublicKey,
        topic_prefix: str = "",
        duplicate_rate: float = 0.05,
        double_read_rate: float = 0.03,
        exit_share: float = 0.6,
        resend_after_s: float = 3.0,
        seed: int = 7,
    ) -> None:
        self.topics = Topics(topic_prefix)
        # The public key of the server's PARKING_GATE_CONFIG_KEY, as every gate is given.
        self.server_key = server_key
        self.gates_in = [g for g in gates if g.direction == "in"]
        self.gates_out = [g for g in gates if g.direction == "out"]
        self.inside = {lot: list(vs) for lot, vs in inside.items()}
        self.outside = list(outside)
        self.duplicate_rate = duplicate_rate
        self.double_read_rate = double_read_rate
        self.exit_share = exit_share
        self.resend_after_s = resend_after_s
        self.rng = random.Random(seed)
        self.report = SimReport()
        self._seq: Counter[GateAddress] = Counter()
        self._pending: dict[str, _Pending] = {}
        self._mqtt = MqttClient(mqtt_url, f"gate-sim-{uuid.uuid4().hex[:8]}")

    async def __aenter__(self) -> "GateSimulator":
        await self._mqtt.start()
        await self._mqtt.subscribe(self.topics.all_gates("command"), self._on_command)
        await self._mqtt.subscribe(self.topics.all_gates("ack"), self._on_ack)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._mqtt.stop()

    async def run(
        self, rate: float, duration_s: float, keep_going: Callable[[], bool] | None = None
    ) -> SimReport:
        """Publishes about `rate` captures a second for `duration_s` (and on while `keep_going`
        says so), then waits for answers."""
        interval = 1.0 / rate
        started = time.perf_counter()
        n = 0
        last_resend_check = started
        while (elapsed := time.perf_counter() - started) < duration_s or (
            keep_going is not None and keep_going()
        ):
            await self.step()
            n += 1
            await asyncio.sleep(max(0.0, n * interval - elapsed))
            if time.perf_counter() - last_resend_check > 1.0:
                last_resend_check = time.perf_counter()
                await self._resend_overdue()
        await self.drain()
        return self.report

    async def step(self) -> None:
        lots_with_cars = [g for g in self.gates_out if self.inside.get(g.lot)]
        if lots_with_cars and (not self.outside or self.rng.random() < self.exit_share):
            gate = self.rng.choice(lots_with_cars)
            cars = self.inside[gate.lot]
            vehicle, entered_at = cars.pop(self.rng.randrange(len(cars)))
            self.outside.append(vehicle)
            stay_s = (datetime.now(UTC) - entered_at).total_seconds()
            capture_id = await self.capture(gate, vehicle)
            self.report.exit_log.append(ExitRecord(capture_id, vehicle, stay_s))
            self.report.exits += 1
            if vehicle.bound:
                self.report.bound_exits += 1
            else:
                self.report.unbound_exits += 1
        elif self.outside and self.gates_in:
            gate = self.rng.choice(self.gates_in)
            vehicle = self.outside.pop(self.rng.randrange(len(self.outside)))
            self.inside.setdefault(gate.lot, []).append((vehicle, datetime.now(UTC)))
            self.report.entries += 1
            await self.capture(gate, vehicle)
        else:
            return
        if self.rng.random() < self.double_read_rate:
            self.report.double_reads_sent += 1
            await self.capture(gate, vehicle)

    async def capture(
        self, gate: SimGate, vehicle: Vehicle, *, confidence: float = 0.99
    ) -> uuid.UUID:
        """Publishes one capture of `vehicle` at `gate`; returns its capture_id. The simulated
        camera reads every plate right and says so: its reads are certain (at or above the
        lane's default camera threshold, 0.98)."""
        address = GateAddress(gate.lot, gate.gate)
        self._seq[address] += 1
        capture = Capture(
            capture_id=uuid.uuid4(),
            seq=self._seq[address],
            direction=gate.direction,
            captured_at=datetime.now(UTC),
            camera_read=(
                None
                if vehicle.image
                else CameraRead(plate=vehicle.plate, color=vehicle.color, confidence=confidence)
            ),
            image=vehicle.image,
        )
        payload = encode(capture)
        key = str(capture.capture_id)
        self._pending[key] = _Pending(address, payload, time.perf_counter())
        await self._mqtt.publish(self.topics.topic(address, "capture"), payload)
        self.report.sent += 1
        if self.rng.random() < self.duplicate_rate:
            self.report.duplicates_sent += 1
            await self._mqtt.publish(self.topics.topic(address, "capture"), payload)
        return capture.capture_id

    async def drain(self, timeout_s: float = 15.0) -> None:
        deadline = time.perf_counter() + timeout_s
        while self.outstanding() and time.perf_counter() < deadline:
            await asyncio.sleep(0.25)
            await self._resend_overdue()
        self.report.unanswered = self.outstanding()

    def outstanding(self) -> int:
        return len(self._pending)

    async def _resend_overdue(self) -> None:
        now = time.perf_counter()
        for pending in self._pending.values():
            if not pending.acked and now - pending.sent_at > self.resend_after_s:
                pending.sent_at = now
                self.report.resent += 1
                await self._mqtt.publish(
                    self.topics.topic(pending.address, "capture"), pending.payload, wait=False
                )

    def _on_command(self, message: IncomingMessage) -> None:
        command = self._signed_command(message)
        if command is None:
            return
        key = str(command.capture_id)
        pending = self._pending.get(key)
        if pending is None or pending.commanded:
            return
        pending.commanded = True
        self.report.commands[command.action] += 1
        self.report.round_trip_ms.append((message.received_at - pending.sent_at) * 1000)
        self._forget_if_answered(key, pending)

    def _signed_command(self, message: IncomingMessage) -> Command | None:
        """The command, when a real gate on the message's topic would act on it."""
        parsed = self.topics.parse(message.topic)
        try:
            command = Command.model_validate_json(message.payload)
        except ValidationError:
            refusal: str | None = "malformed"
        else:
            refusal = (
                "malformed"
                if parsed is None
                else command_refusal(command, self.server_key, parsed[0], datetime.now(UTC))
            )
        if refusal is None:
            return command
        self.report.command_refusals[refusal] += 1
        log.warning("sim.command_refused", why=refusal, topic=message.topic)
        return None

    def _on_ack(self, message: IncomingMessage) -> None:
        parsed = self.topics.parse(message.topic)
        try:
            ack = Ack.model_validate_json(message.payload)
        except ValidationError:
            refusal: str | None = "malformed"
        else:
            refusal = (
                "malformed" if parsed is None else signed_refusal(ack, self.server_key, parsed[0])
            )
        if refusal is not None:
            self.report.ack_refusals[refusal] += 1
            log.warning("sim.ack_refused", why=refusal, topic=message.topic)
            return
        key = str(ack.capture_id)
        pending = self._pending.get(key)
        if pending is None or pending.acked:
            return
        if hashlib.sha256(pending.payload).hexdigest() != ack.payload_sha256:
            # An ack of another message sent under the capture's id: the capture stays.
            self.report.ack_refusals["other_payload"] += 1
            log.warning("sim.ack_refused", why="other_payload", topic=message.topic)
            return
        pending.acked = True
        self.report.acks += 1
        self._forget_if_answered(key, pending)

    def _forget_if_answered(self, key: str, pending: _Pending) -> None:
        if pending.acked and pending.commanded:
            del self._pending[key]
