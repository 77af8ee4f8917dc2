"""The gate edge agent: runs beside one barrier, between its camera and the lane service.

For each camera event it stores a capture in the local outbox (SQLite) and publishes it. The
server's command operates the barrier and the display. When no command comes within
`offline_after_s`, or the broker cannot be reached, the agent decides alone: an entry is let in;
an exit opens when the plate is on the server's signed offline whitelist (a pass holder's free
exit only within its pass's hours, judged by the server's time as the gate knows it,
`server_now`), and is otherwise sent to the booth. The capture is then flagged `offline` with
what was done and uploaded when the link returns. A capture leaves the outbox only when the
server acks it, and unacked ones are resent in seq order, also after a restart.

The barrier opens at most once per capture, whoever asks: a late or redelivered command for a
capture the gate already opened for changes nothing. A late "open" for a capture (a payment booked
after the server's hold, an operator's open, the answer to a hold the gate decided offline)
lifts the barrier only while no newer car has been captured here (the car is still first at the
barrier); later than that, the car was let out another way, and the open would let out the car
behind it.

The gate acts only on commands the server signed (Ed25519, the key that signs its config) for
this very gate, that have not expired; anything else is counted in `command_refusals` and
ignored, whoever managed to publish it. A command's expiry is the server's time, so the gate
judges it by the server's clock as best it knows it (`server_now`), not by its own: each signed
ack it takes carries the server's time of a capture the gate has just sent, and from the latest
one that came back at once (`_CLOCK_ACK_MAX_ROUND_TRIP_S`) the gate reckons the server's time on
its own monotonic clock (a gate clock a minute fast would otherwise refuse every fresh 30 s
command as expired). Before any such answer in a run it takes its own clock, moved back by the
offset learnt in an earlier run if the clock was fast then (so the first commands after a
restart are not refused either). And never earlier than the latest signed server time it has
verified (a config's `issued_at`, a command's, an ack's `received_at`), reckoned on since and
kept on disk: the server has passed that time, so a gate whose clock is behind (or was reset
to the epoch) does not take an old signed open for a fresh one.

An opening no signed command explains (the booth's button: `manual_open`) is reported as a
`manual_open` event, kept on disk until the broker has it, so that operators see every lift of
the barrier.

The gate's status is retained on `.../status`, with an "offline" last will. Its config (the
whitelist and display texts) is read from the retained `.../config` and kept on disk.

Run it as `python -m gate_controller.agent --config agent.toml` (see `AgentConfig`).
"""

import argparse
import asyncio
import base64
import contextlib
import importlib.metadata
import math
import signal
import sys
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import structlog
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    StringConstraints,
    ValidationError,
)

from gate_controller.barrier import Barrier, Display, SimulatedDisplay, SimulatedRelay
from gate_controller.camera import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_SKEW_S,
    CameraEvent,
    CameraSource,
    FolderCameraSource,
    HttpCameraSource,
)
from gate_controller.mqtt import IncomingMessage, MqttClient
from gate_controller.outbox import Outbox
from gate_controller.protocol import (
    DISPLAY_DEFAULTS,
    Ack,
    CameraRead,
    Capture,
    Command,
    Direction,
    GateAddress,
    GateConfig,
    GateEvent,
    GateStatus,
    OfflineAction,
    TopicKind,
    Topics,
    encode,
)
from gate_controller.whitelist import (
    OfflineWhitelist,
    expiry_refusal,
    load_public_key,
    signed_refusal,
)

log = structlog.get_logger(__name__)

try:
    AGENT_VERSION = importlib.metadata.version("parking")
except importlib.metadata.PackageNotFoundError:
    AGENT_VERSION = "dev"

_LINK_TICK_S = 0.1
_PRUNE_EVERY_S = 600.0
# An ack teaches the server's time only when it came back within this of writing the payload it
# answers: its `received_at` (the server's time when it decided) is then at most this old on
# arrival, so the server's time reckoned from it is never later than the truth and at most
# this earlier (a command judged at most this much fresher than it is). An ack that came later
# (a resend, a backlog, a message held up on the way) still acks its capture and teaches nothing.
_CLOCK_ACK_MAX_ROUND_TRIP_S = 5.0
# A change of the reckoned offset (server's time less the gate's) by more than this is logged
# (`agent.clock_offset`); as a warning beyond the clock error the server tolerates in captures
# (PARKING_GATE_CLOCK_TOLERANCE_S, 300 s by default), for an operator to fix the gate's clock.
_CLOCK_OFFSET_LOG_STEP_S = 5.0
_CLOCK_OFFSET_WARN_S = 300.0
# A remote open's id is kept this long beyond its expiry by either clock (against a replay
# after the reckoned offset moved, or the gate's clock was stepped).
_REMOTE_OPEN_KEEP_EXTRA_S = 300.0

Code = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FolderCamera(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["folder"]
    path: Path
    poll_s: float = Field(default=0.1, gt=0)


class HttpCamera(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["http"]
    host: str = "127.0.0.1"
    port: int = Field(default=8088, ge=0, lt=65536)
    # The camera's own key (HMAC-SHA256 of each report) and the addresses it posts from:
    # without both, anyone who reaches the port could report a parked driver's plate at the
    # exit. No defaults: a config without them does not start.
    key: SecretStr = Field(min_length=32)
    allowed_addresses: list[IPvAnyNetwork] = Field(min_length=1)
    # How far a report's time may be from the agent's clock.
    max_skew_s: float = Field(default=DEFAULT_MAX_SKEW_S, gt=0, le=300)


class AgentConfig(BaseModel):
    """The agent's configuration; on the command line a TOML file such as

    lot = "lot-a"
    gate = "out1"
    direction = "out"
    server_public_key = "<the public key `parking gates keygen` printed>"
    outbox_path = "/var/lib/gate-agent/outbox.sqlite3"
    mqtt_url = "mqtts://gate-lot-a-out1:<password>@broker.example:8883"

    [camera]
    kind = "http"    # or: kind = "folder" and path = "/srv/camera/drop"
    host = "192.168.1.10"
    port = 8088
    key = "<32+ random characters, also set in the camera>"
    allowed_addresses = ["192.168.1.20/32"]    # the camera's own address
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    lot: Code
    gate: Code
    # The gate's direction; at a gate that works both ways the camera reports it per car.
    direction: Literal["in", "out", "both"]
    # The server's config key (PEM, or base64 of its 32 raw bytes): `parking gates keygen`.
    server_public_key: str
    outbox_path: Path
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    topic_prefix: str = ""
    # Default: gate-<lot>-<gate>, the gate's broker user (`parking gates provision`).
    client_id: str | None = None
    # No command within this long: the gate decides alone.
    offline_after_s: float = Field(default=1.5, gt=0)
    # The least camera confidence to let a whitelisted plate out offline: a misread that hits
    # another whitelisted plate would charge the wrong driver.
    offline_min_confidence: float = Field(default=0.9, ge=0, le=1)
    heartbeat_s: float = Field(default=30.0, gt=0)
    # Unacked captures are resent after this, doubling per attempt up to resend_max_s.
    resend_after_s: float = Field(default=5.0, gt=0)
    resend_max_s: float = Field(default=60.0, gt=0)
    # Acked captures stay this long in the local journal (against late duplicate commands).
    journal_keep_s: float = Field(default=86_400.0, gt=0)
    firmware: str | None = None
    max_image_bytes: int = Field(default=DEFAULT_MAX_IMAGE_BYTES, gt=0)
    camera: FolderCamera | HttpCamera | None = Field(default=None, discriminator="kind")

    @property
    def camera_direction(self) -> Direction | None:
        return None if self.direction == "both" else self.direction


class GateAgent:
    def __init__(
        self, config: AgentConfig, camera: CameraSource, barrier: Barrier, display: Display
    ) -> None:
        self.config = config
        self.camera = camera
        self.barrier = barrier
        self.display = display
        self.address = GateAddress(config.lot, config.gate)
        self.topics = Topics(config.topic_prefix)
        self.whitelist = OfflineWhitelist(load_public_key(config.server_public_key), config.lot)
        self.outbox: Outbox | None = None
        offline = GateStatus(state="offline", firmware=config.firmware, agent_version=AGENT_VERSION)
        self.mqtt = MqttClient(
            config.mqtt_url,
            config.client_id or f"gate-{config.lot}-{config.gate}",
            will=(self._topic("status"), encode(offline)),
        )
        # Captures waiting for the server's command, by capture_id.
        self._awaiting: dict[uuid.UUID, asyncio.Future[Command]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # The link as the link loop last saw it: up, or down since when (time.monotonic()).
        self._down_since: float | None = None
        # Configs refused since start, by reason (a forged one shows up here).
        self.config_refusals: Counter[str] = Counter()
        # Commands refused since start, by reason (unsigned, forged, another gate's, expired).
        self.command_refusals: Counter[str] = Counter()
        # Acks refused since start, by reason (unsigned, forged, another gate's, another
        # message's: `other_payload`).
        self.ack_refusals: Counter[str] = Counter()
        # Unacked captures by id: when (time.monotonic()) their payload, as it is now, was
        # written in this run (an ack's round trip is counted from there).
        self._written: dict[uuid.UUID, float] = {}
        # The server's time (epoch seconds) in the latest answer that taught it, and when that
        # answer arrived (time.monotonic()); None until one did in this run.
        self._server_clock: tuple[float, float] | None = None
        # The floor of the server's time: the latest signed server time verified (or the floor
        # kept on disk), and when it was taken (time.monotonic()); the server's time is never
        # earlier than it plus the time since. None until there is one.
        self._floor: tuple[float, float] | None = None
        # The offset (server's time less the gate's) learnt in an earlier run, whatever its
        # sign; until this run learns one, `_reckon` carries a fast clock's (<= 0) and
        # `server_now_at_the_latest` a slow clock's too.
        self._saved_offset_s: float | None = None
        # Signed server times too far ahead of the time learnt to be taken (`_raise_floor`).
        self.signed_times_ignored = 0

    @property
    def store(self) -> Outbox:
        assert self.outbox is not None, "start() first"
        return self.outbox

    async def __aenter__(self) -> "GateAgent":
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self.outbox = Outbox(self.config.outbox_path)
        self._load_server_clock()
        abandoned = self.store.abandon_undecided(time.time())
        if abandoned:
            log.warning("agent.undecided_captures_from_last_run", count=abandoned)
        self._load_config()
        # The config first: its retained copy carries a signed server time (a floor) that is
        # then known before the commands the broker delivers are judged.
        await self.mqtt.subscribe(self._topic("config"), self._on_config)
        await self.mqtt.subscribe(self._topic("command"), self._on_command)
        await self.mqtt.subscribe(self._topic("ack"), self._on_ack)
        # The gate works without a broker: do not wait for the connection.
        self._down_since = time.monotonic()
        await self.mqtt.start(wait_connected_s=None)
        self._spawn(self._consume_camera())
        self._spawn(self._link())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.mqtt.connected:
            # A clean disconnect suppresses the last will: say it ourselves.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._publish_status("offline", wait=True)
        await self.mqtt.stop()
        if self.outbox is not None:
            self.outbox.close()
            self.outbox = None

    # Captures

    async def capture(self, event: CameraEvent) -> Capture:
        """Stores the event as a capture, publishes it and starts its decision; returns once it
        is stored (the decision goes on in the background)."""
        capture_id = uuid.uuid4()
        built: list[Capture] = []

        def payload_for(seq: int) -> bytes:
            built.append(self._capture(capture_id, seq, event))
            return encode(built[-1])

        self.store.add(capture_id, time.time(), payload_for)
        self._written[capture_id] = time.monotonic()
        capture = built[-1]
        answer = asyncio.get_running_loop().create_future()
        self._awaiting[capture_id] = answer
        if self.mqtt.connected:
            await self._publish("capture", encode(capture))
        self._spawn(self._decide(capture, answer))
        return capture

    def _capture(self, capture_id: uuid.UUID, seq: int, event: CameraEvent) -> Capture:
        # Only a gate that works both ways takes the camera's word for the direction: an exit
        # must never be decided (offline: opened) as an entry.
        direction = self.config.camera_direction or event.direction
        if direction != event.direction:
            log.warning("agent.direction_overridden", reported=event.direction, gate=direction)
        read = None
        if event.plate is not None:
            # A read without a confidence is not trusted: the server reads the image itself.
            confidence = event.confidence if event.confidence is not None else 0.0
            read = CameraRead(plate=event.plate, color=event.color, confidence=confidence)
        image = base64.b64encode(event.image_jpeg).decode() if event.image_jpeg else None
        return Capture(
            capture_id=capture_id,
            seq=seq,
            direction=direction,
            captured_at=event.captured_at,
            camera_read=read,
            image=image,
        )

    async def _decide(self, capture: Capture, answer: asyncio.Future[Command]) -> None:
        """Waits `offline_after_s` for the server's command, then decides alone. A link down
        for longer than that already is not waited for; one that comes up in the meantime
        (the agent just started, the broker just restarted) still carries the capture."""
        command: Command | None = None
        try:
            if not self._known_unreachable():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.offline_after_s):
                        if not self.mqtt.connected:
                            # The client's own state: the link loop's view lags up to a tick.
                            await self.mqtt.wait_connected()
                            await self._publish("capture", encode(capture))
                        command = await answer
        finally:
            self._awaiting.pop(capture.capture_id, None)
        if command is not None:
            await self._follow(capture, command)
        else:
            await self._decide_offline(capture)

    async def _follow(self, capture: Capture, command: Command) -> None:
        self.store.decide(
            capture.capture_id,
            "server",
            command.action,
            send_at=time.time() + self.config.resend_after_s,
        )
        if command.action == "open":
            await self._open(capture.capture_id, "server")
        await self.display.show(command.display, qr_url=command.payment_qr_url)

    async def _decide_offline(self, capture: Capture) -> None:
        action: OfflineAction = "open"
        if capture.direction == "in":
            text = "offline_entry"
        elif self._whitelisted(capture, self.server_now_at_the_latest()):
            text = "offline_exit"
        else:
            action, text = "hold", "offline_hold"
        flagged = capture.model_copy(update={"offline": True, "offline_action": action})
        self.store.decide(
            capture.capture_id, "offline", action, send_at=time.time(), payload=encode(flagged)
        )
        if capture.capture_id in self._written:  # not acked yet: the payload is the flagged one
            self._written[capture.capture_id] = time.monotonic()
        log.info(
            "agent.decided_offline",
            seq=capture.seq,
            direction=capture.direction,
            action=action,
            broker_connected=self.mqtt.connected,
        )
        if action == "open":
            await self._open(capture.capture_id, text)
        await self.display.show([self.whitelist.display(text, DISPLAY_DEFAULTS[text])])

    def _known_unreachable(self) -> bool:
        down_since = self._down_since
        return (
            down_since is not None and time.monotonic() - down_since >= self.config.offline_after_s
        )

    def _whitelisted(self, capture: Capture, now: datetime) -> bool:
        read = capture.camera_read
        return (
            read is not None
            and read.confidence >= self.config.offline_min_confidence
            and self.whitelist.allows(read.plate, read.color, now)
        )

    async def _open(self, capture_id: uuid.UUID, reason: str) -> bool:
        """Lifts the barrier for the capture unless it already was; True when it lifted."""
        if not self.store.mark_opened(capture_id, time.time()):
            log.info("agent.already_opened", capture_id=str(capture_id), reason=reason)
            return False
        await self._lift(capture_id, reason)
        return True

    async def manual_open(self, reason: str) -> None:
        """The booth's button (or any opening no signed command explains): lifts the barrier and
        reports it as a `manual_open` event, stored first so that it reaches the server even
        when the link is down now."""
        event = GateEvent(
            type="manual_open", at=datetime.now(UTC), reason=reason[:200], event_id=uuid.uuid4()
        )
        self.store.add_event(encode(event))
        # Whoever the button was pressed for, the car first in the lane can go now: a payment
        # of its hold booked later must not lift the barrier for the car behind it.
        self.store.mark_newest_opened(time.time())
        await self.barrier.open("manual")
        log.info("agent.manual_open")
        await self._send_events()

    async def _send_events(self) -> None:
        """Sends the stored events, each dropped only once the broker has acknowledged it."""
        for event_id, payload in self.store.pending_events():
            if not self.mqtt.connected:
                return
            try:
                await self.mqtt.publish(self._topic("event"), payload, wait=True)
            except (RuntimeError, TimeoutError) as exc:
                log.warning("agent.event_publish_failed", error=str(exc))
                return
            self.store.event_sent(event_id)

    async def _lift(self, capture_id: uuid.UUID, reason: str) -> None:
        await self.barrier.open(reason)
        event = GateEvent(
            type="barrier_opened", at=datetime.now(UTC), capture_id=capture_id, reason=reason
        )
        if self.mqtt.connected:
            await self._publish("event", encode(event))

    # Messages from the server

    async def _on_command(self, message: IncomingMessage) -> None:
        try:
            command = Command.model_validate_json(message.payload)
        except ValidationError:
            log.warning("agent.bad_command", size=len(message.payload))
            return
        answer = self._awaiting.get(command.capture_id)
        refusal = signed_refusal(command, self.whitelist.public_key, self.address)
        if refusal is None:
            self._raise_floor(command.issued_at)
            if answer is not None and not answer.done():
                # The server's own answer to the capture just sent: its time, before its
                # expiry is judged by it.
                self._learn_clock(command.issued_at, self._written.get(command.capture_id))
            refusal = expiry_refusal(command, self.server_now())
        if refusal is not None:
            # Whoever can publish on the broker (a shared login, a broker without ACLs) must
            # not be able to lift the barrier: only the server's key can.
            self.command_refusals[refusal] += 1
            log.warning("agent.command_refused", why=refusal, capture_id=str(command.capture_id))
            return
        if answer is not None and not answer.done():
            answer.set_result(command)
            return
        await self._late_command(command)

    async def _late_command(self, command: Command) -> None:
        """A command for a capture that is not waiting for one: a payment made at the gate, an
        operator's open, the answer to a capture decided offline, or a redelivery."""
        if command.action != "open":
            return  # a late hold changes nothing at the barrier
        if command.expires_at <= self.server_now():
            log.info("agent.expired_command_ignored", capture_id=str(command.capture_id))
            return
        record = self.store.record(command.capture_id)
        if record is None:
            if not command.remote:
                # An answer to a capture this gate never took (or no longer keeps): one published
                # by another broker client in this gate's name, which the server answered as
                # any capture. Lifting would let out whoever is at the barrier.
                log.warning(
                    "agent.open_for_unknown_capture_ignored", capture_id=str(command.capture_id)
                )
                return
            # An operator opening the gate for nobody in particular. QoS 1 may deliver it twice.
            # Kept on disk until it expires: a signed open captured off the wire and published
            # again after a restart would otherwise lift the barrier again. The key is kept
            # until the open expired by both clocks, and some more, and forgotten only once both
            # say so: a step of the gate's wall clock forgets none early.
            expires_at = command.expires_at.timestamp()
            if not self.store.use_once(
                "remote_open",
                str(command.capture_id),
                max(expires_at, expires_at - self.clock_offset_s) + _REMOTE_OPEN_KEEP_EXTRA_S,
                min(time.time(), self.server_now().timestamp()),
            ):
                return
            await self._lift(command.capture_id, "remote")
            await self.display.show(command.display)
            return
        if record.seq != self.store.latest_seq():
            # A newer car has been captured here since, whoever decided this one (the server's
            # hold paid late, an operator's open of an old hold, our own offline hold): the car
            # this open is for is no longer first at the barrier, and lifting would let out the
            # one that is.
            log.info(
                "agent.late_open_ignored", capture_id=str(command.capture_id), why="newer_capture"
            )
            return
        if await self._open(command.capture_id, "server_late"):
            await self.display.show(command.display)

    def server_now(self) -> datetime:
        """The server's time as best the gate knows it (see `_reckon`)."""
        return datetime.fromtimestamp(
            self._reckon(datetime.now(UTC).timestamp(), time.monotonic()), UTC
        )

    def server_now_at_the_latest(self) -> datetime:
        """The server's time for a decision whose safe side is a later estimate (a free exit
        from the offline whitelist: the list's expiry, a pass's `free_until`): `server_now`,
        which errs early for a command's expiry, and before this run has learnt the server's
        time, no earlier than the gate's clock plus the offset last learnt, a slow clock's too
        (which `server_now` does not carry: it would refuse fresh commands if the clock had
        been put right since; here it would only hold a car a person then lets out)."""
        now = self.server_now()
        if self._server_clock is None and self._saved_offset_s is not None:
            now = max(now, datetime.now(UTC) + timedelta(seconds=self._saved_offset_s))
        return now

    @property
    def clock_offset_s(self) -> float:
        """The server's time less the gate's, as reckoned (0 while it is the gate's own)."""
        wall = datetime.now(UTC).timestamp()
        return self._reckon(wall, time.monotonic()) - wall

    def _reckon(self, wall: float, monotonic: float) -> float:
        """The server's time (epoch seconds) when the gate's clocks read `wall` and `monotonic`:
        the latest teaching answer's time plus the time elapsed since it arrived, on the
        monotonic clock (a step of the gate's wall clock changes nothing); before any in this
        run, the gate's own clock plus the carried offset. Never earlier than the floor.

        The carried offset (a restart at a fast gate clock needs it) may be wrong: the gate's
        clock may have been stepped while the agent was down. Put back, the reckoning falls
        behind the truth (expired opens look fresh): the floor bounds that, and the offset is
        dropped once it is below the floor by more than its own error. Put forward, the
        reckoning runs ahead (fresh commands are refused) and no signed time can show it, each
        being a lower bound: so only a fast clock's offset (<= 0) is carried, which reckons
        earlier than the gate's clock and never later. A slow clock's is not (the floor covers
        what it would)."""
        floor = self._floor_at(monotonic)
        if self._server_clock is not None:
            server_at, arrived = self._server_clock
            return max(server_at + monotonic - arrived, floor)
        carried = wall + min(self._saved_offset_s or 0.0, 0.0)
        if carried + _CLOCK_ACK_MAX_ROUND_TRIP_S < floor:
            carried = wall  # beyond the offset's own error below the floor: proven wrong
        return max(carried, floor)

    def _floor_at(self, monotonic: float) -> float:
        if self._floor is None:
            return -math.inf
        server_at, taken = self._floor
        return server_at + monotonic - taken

    def _raise_floor(self, server_time: datetime) -> None:
        """A signed server time the gate has verified, whatever the message (late, replayed,
        expired, another capture's): the server's time is at least that from now on. Except a
        time ahead of what this run learnt from a fresh answer (beyond that answer's error):
        signed while a server clock ran ahead, and replayed since by whoever kept it, it would
        make the gate refuse every fresh command until real time caught up."""
        now = time.monotonic()
        if self._server_clock is not None and server_time.timestamp() > (
            self._reckon(datetime.now(UTC).timestamp(), now) + _CLOCK_ACK_MAX_ROUND_TRIP_S
        ):
            self.signed_times_ignored += 1
            log.warning("agent.signed_time_ahead_ignored")
            return
        floor = max(self._floor_at(now), server_time.timestamp())
        self._floor = (floor, now)
        self.store.save_clock_floor(floor)

    def _load_server_clock(self) -> None:
        """What an earlier run knew of the server's clock. Its floor is still a time the server
        has passed: the floor from now (the time the gate was down is not counted). Its offset
        is carried when the gate's clock was fast then (see `_reckon`)."""
        clock = self.store.load_server_clock()
        if clock is None:
            return
        if clock.floor is not None:
            self._floor = (clock.floor, time.monotonic())
        self._saved_offset_s = clock.offset_s

    def _learn_clock(self, server_time: datetime, written: float | None) -> None:
        """Takes the server's time from a signed answer to a capture: the `received_at` of an
        ack the outbox just took, or the `issued_at` of the command a capture awaits (the first
        car after a start need not wait for an ack: its command comes first). Only when it came
        back within `_CLOCK_ACK_MAX_ROUND_TRIP_S` of writing the payload it answers in this run.

        The answer is verified before it gets here, so only the server's key can move the
        clock; and since it answers a payload written moments ago (a command is bound to its
        capture's id, new with the capture), no answer of an earlier send, held up or replayed,
        can teach an old time. Its size is not capped: the offset is the server's
        own clock, on which it signs every command's expiry, so following it is consistent
        however wrong the gate's clock is (a capped offset would refuse every command again at
        exactly the gates whose clocks are worst). A large one is logged as a warning. The
        offset is kept on disk for the next start (`_reckon`)."""
        arrived = time.monotonic()
        if written is None or arrived - written > _CLOCK_ACK_MAX_ROUND_TRIP_S:
            return
        before = self.clock_offset_s
        server_at, wall = server_time.timestamp(), datetime.now(UTC).timestamp()
        self._server_clock = (server_at, arrived)
        if self._floor_at(arrived) > server_at + _CLOCK_ACK_MAX_ROUND_TRIP_S:
            # Above the server's time now: taken from a server clock that has since gone back
            # (or was wrong ahead). The server's clock is what it signs expiries with: follow
            # it, or every command would be refused until its time caught up with the floor.
            self._floor = (server_at, arrived)
            self.store.save_clock_floor(server_at)
        self.store.save_clock_offset(server_at - wall)
        after = self.clock_offset_s
        if abs(after - before) > _CLOCK_OFFSET_LOG_STEP_S:
            report = log.warning if abs(after) > _CLOCK_OFFSET_WARN_S else log.info
            report(
                "agent.clock_offset",
                offset_s=round(after, 1),
                was_s=round(before, 1),
                round_trip_s=round(arrived - written, 3),
            )

    def _on_ack(self, message: IncomingMessage) -> None:
        try:
            ack = Ack.model_validate_json(message.payload)
        except ValidationError:
            log.warning("agent.bad_ack", size=len(message.payload))
            return
        now = time.time()
        refusal = signed_refusal(ack, self.whitelist.public_key, self.address)
        if refusal is None:
            self._raise_floor(ack.received_at)
            outcome = self.store.ack(ack.capture_id, now, ack.payload_sha256)
            if outcome == "absent":
                return
            refusal = None if outcome == "acked" else outcome
        if refusal is not None:
            # The capture stays in the outbox, sent again until the server acknowledges it.
            self.ack_refusals[refusal] += 1
            log.warning("agent.ack_refused", capture_id=str(ack.capture_id), reason=refusal)
            return
        self._learn_clock(ack.received_at, self._written.pop(ack.capture_id, None))
        if ack.rejected:
            log.warning("agent.capture_rejected", capture_id=str(ack.capture_id), why=ack.rejected)
        # The server answers again: captures waiting out their backoff go now.
        self.store.resend_all(now, backing_off_only=True)

    def _on_config(self, message: IncomingMessage) -> None:
        if not message.payload:
            return  # the retained config was cleared: keep the one held
        try:
            config = GateConfig.model_validate_json(message.payload)
        except ValidationError:
            log.warning("agent.bad_config", size=len(message.payload))
            return
        refusal = self._take_config(config)
        if refusal is not None:
            self.config_refusals[refusal] += 1
            log.warning("agent.config_refused", why=refusal)
            return
        self.store.save_config(message.payload)
        log.info(
            "agent.config_accepted",
            entries=len(config.whitelist),
            expires_at=str(config.whitelist_expires_at),
        )

    def _load_config(self) -> None:
        payload = self.store.load_config()
        if payload is None:
            return
        try:
            config = GateConfig.model_validate_json(payload)
        except ValidationError:
            return
        refusal = self._take_config(config)
        if refusal is not None:
            log.info("agent.stored_config_unusable", why=refusal)

    def _take_config(self, config: GateConfig) -> str | None:
        """Offers a config to the whitelist; taken, its signed `issued_at` is a time the server
        has passed (`_raise_floor`). Why it was refused, or None."""
        refusal = self.whitelist.offer(config, self.server_now())
        if refusal is None and config.issued_at is not None:
            self._raise_floor(config.issued_at)
        return refusal

    # The link: resends, status

    async def _consume_camera(self) -> None:
        while True:
            try:
                async for event in self.camera.events():
                    await self.capture(event)
            except Exception:
                # The event was not stored: the camera keeps it and offers it again.
                log.exception("agent.capture_failed")
                await asyncio.sleep(1.0)

    async def _link(self) -> None:
        was_connected = False
        next_heartbeat = next_prune = 0.0
        while True:
            try:
                connected = self.mqtt.connected
                now = time.monotonic()
                if connected and not was_connected:
                    self._down_since = None
                    self.store.resend_all(time.time(), backing_off_only=False)
                    next_heartbeat = now  # online at once
                elif was_connected and not connected:
                    self._down_since = now
                was_connected = connected
                if connected:
                    if now >= next_heartbeat:
                        next_heartbeat = now + self.config.heartbeat_s
                        await self._publish_status("online")
                    await self._send_due()
                    await self._send_events()
                if now >= next_prune:
                    next_prune = now + _PRUNE_EVERY_S
                    self.store.prune(time.time() - self.config.journal_keep_s)
            except Exception:  # must not end: without it nothing is ever resent
                log.exception("agent.link_failed")
            await asyncio.sleep(_LINK_TICK_S)

    async def _send_due(self) -> None:
        now = time.time()
        for capture_id, payload in self.store.due(now):
            if not self.mqtt.connected or not await self._publish("capture", payload):
                return
            self.store.sent(capture_id, now, self.config.resend_after_s, self.config.resend_max_s)

    async def _publish_status(
        self, state: Literal["online", "offline"], wait: bool = False
    ) -> None:
        now = datetime.now(UTC)
        status = GateStatus(
            state=state,
            outbox_length=self.store.length(),
            firmware=self.config.firmware,
            agent_version=AGENT_VERSION,
            at=now,
            whitelist_expires_at=self.whitelist.expires_at(self.server_now()),
        )
        await self.mqtt.publish(self._topic("status"), encode(status), retain=True, wait=wait)

    async def _publish(self, kind: TopicKind, payload: bytes) -> bool:
        """Hands a message to the client without waiting for the broker; False if it refused
        (the outbox still holds what matters)."""
        if not self.mqtt.connected:
            # Never park a message in the client while the link is down: it would go out on
            # reconnect as it was, ahead of what the outbox holds by then (flagged offline).
            return False
        try:
            await self.mqtt.publish(self._topic(kind), payload, wait=False)
        except RuntimeError as exc:
            log.warning("agent.publish_failed", kind=kind, error=str(exc))
            return False
        return True

    def _topic(self, kind: TopicKind) -> str:
        return self.topics.topic(self.address, kind)

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# Command line


def load_config(path: Path) -> AgentConfig:
    with path.open("rb") as handle:
        return AgentConfig.model_validate(tomllib.load(handle))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, required=True, metavar="FILE", help="the agent's TOML file"
    )


async def serve(config: AgentConfig, stop: asyncio.Event) -> None:
    """Runs the agent with the camera its config names, a simulated relay and display (the
    drivers for real relays are not part of this release), until `stop` is set."""
    if config.camera is None:
        raise ValueError("the config has no [camera] section")
    barrier, display = SimulatedRelay(), SimulatedDisplay()
    async with contextlib.AsyncExitStack() as stack:
        camera: CameraSource
        if config.camera.kind == "folder":
            camera = FolderCameraSource(
                config.camera.path,
                config.camera_direction,
                poll_s=config.camera.poll_s,
                max_image_bytes=config.max_image_bytes,
            )
        else:
            camera = await stack.enter_async_context(
                HttpCameraSource(
                    config.camera.host,
                    config.camera.port,
                    config.camera_direction,
                    key=config.camera.key.get_secret_value().encode(),
                    allowed_addresses=[str(a) for a in config.camera.allowed_addresses],
                    outbox_path=config.outbox_path,
                    max_skew_s=config.camera.max_skew_s,
                    max_image_bytes=config.max_image_bytes,
                )
            )
        await stack.enter_async_context(GateAgent(config, camera, barrier, display))
        log.info("agent.started", lot=config.lot, gate=config.gate, version=AGENT_VERSION)
        await stop.wait()


def run(args: argparse.Namespace) -> int:
    """0 after a clean stop (SIGINT/SIGTERM), 2 when the config is unusable."""
    try:
        config = load_config(args.config)
        load_public_key(config.server_public_key)
    except (OSError, tomllib.TOMLDecodeError, ValidationError, ValueError) as exc:
        print(f"gate agent: {args.config}: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(config, stop)

    asyncio.run(main())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="gate-agent", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
