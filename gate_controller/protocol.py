"""Gate protocol v1: topics and message models shared by the server and the gates.

MQTT 3.1.1 compatible, JSON payloads, QoS 1. See ../shared/DESIGN.md, "Gate protocol".
"""

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Literal
from uuid import UUID

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

PROTOCOL_ROOT = "parking/v1"
QOS = 1

Direction = Literal["in", "out"]
PlateColor = Literal["blue", "green", "yellow", "white", "black"]
Action = Literal["open", "hold", "deny"]
# What a gate did on its own when the server did not answer in time (see gate_controller.agent).
OfflineAction = Literal["open", "hold"]
TopicKind = Literal["capture", "command", "ack", "event", "status", "config"]
_CODE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

PlateText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=2, max_length=16)]

# What a capture may say, so that the server can store and reckon with every capture it takes
# (one outside is dead-lettered as invalid and acknowledged, not resent for ever): a sequence
# number fits PostgreSQL's bigint, and a time is one a gate's clock can show, wrong clocks
# included: reset to the Unix epoch (a dead clock battery), wrapped back to 1901 (a 32-bit
# time_t past 2038), or years ahead. The lane takes such clocks (a live capture is placed by the
# server's clock, an offline one within what the server can prove: parking.lanes.edges), so the
# bounds are no tighter than that: outside them is no clock, only a time whose arithmetic
# (windows of minutes to days added or taken away) could overflow.
MAX_SEQ = 2**63 - 1
EARLIEST_CAPTURE_TIME = datetime(1900, 1, 1, tzinfo=UTC)
LATEST_CAPTURE_TIME = datetime(2200, 1, 1, tzinfo=UTC)


class _Message(BaseModel):
    # Unknown fields are ignored so that newer gate firmware can add fields without breaking v1.
    model_config = ConfigDict(extra="ignore", frozen=True)


class CameraRead(_Message):
    plate: PlateText
    color: PlateColor | None = None
    confidence: float = Field(ge=0.0, le=1.0)
    # The camera's make/model: its confidence is calibrated per model (the server's
    # `camera_certain_scores`). Optional, so v1 gates that do not send it still work.
    model: Annotated[str, StringConstraints(max_length=64)] | None = None


class Capture(_Message):
    capture_id: UUID
    seq: int = Field(ge=0, le=MAX_SEQ)
    direction: Direction
    captured_at: AwareDatetime = Field(ge=EARLIEST_CAPTURE_TIME, lt=LATEST_CAPTURE_TIME)
    camera_read: CameraRead | None = None
    image: str | None = Field(default=None, description="base64 JPEG, size-capped")
    # Further frames of the same pass; the server reads them all and lets them vote.
    images: list[str] = Field(default_factory=list, max_length=8)
    offline: bool = False
    # With `offline`: what the gate already did. "open": the car has passed; "hold": it was sent
    # to the booth.
    offline_action: OfflineAction | None = None

    def frames(self) -> list[str]:
        return ([self.image] if self.image else []) + self.images


class Command(_Message):
    capture_id: UUID
    action: Action
    display: list[str]
    fee_fen: int | None = Field(default=None, ge=0)
    payment_qr_url: str | None = None
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    # An operator's open of the gate, for a person at it: the only open the agent acts on for a
    # capture it has no record of. Anything else answers a capture, and an answer to one the
    # gate never took (a capture published by another broker client) lifts nothing.
    remote: bool = False
    # Signed commands (parking.gates.commands): the gate they are for and the server's Ed25519
    # signature (base64) over `signed_bytes()`. Optional so that older messages still parse;
    # the gate agent acts on none without a valid signature for itself that has not expired.
    lot: str | None = None
    gate: str | None = None
    signature: str | None = None

    def signed_bytes(self) -> bytes:
        """What the signature covers: the gate, the capture, what to do and show, and until
        when, as canonical JSON. `"kind": "command"` keeps it from ever reading as a config."""
        document = {
            "v": 1,
            "kind": "command",
            "lot": self.lot,
            "gate": self.gate,
            "capture_id": str(self.capture_id),
            "action": self.action,
            "display": self.display,
            "fee_fen": self.fee_fen,
            "payment_qr_url": self.payment_qr_url,
            "issued_at": _utc_text(self.issued_at),
            "expires_at": _utc_text(self.expires_at),
        }
        if self.remote:
            # Only when set: the signatures of every other command are as before.
            document["remote"] = True
        return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


class Ack(_Message):
    capture_id: UUID
    received_at: AwareDatetime
    duplicate: bool = False
    # Set when the server refused the capture (it is in the dead letters with this reason):
    # the gate must drop it from its outbox rather than resend it forever.
    rejected: str | None = None
    # The SHA-256 (hex) of the very message this answers: the gate drops its capture only when
    # it is what the gate sent, never on the answer to another message sent under its id.
    payload_sha256: str | None = None
    # Signed as commands are (parking.gates.commands): an ack makes the gate drop its only copy
    # of the capture, so one anybody else published would lose an offline exit for good.
    lot: str | None = None
    gate: str | None = None
    signature: str | None = None

    def signed_bytes(self) -> bytes:
        """What the signature covers, as canonical JSON; `"kind": "ack"` keeps it from ever
        reading as a command or a config."""
        document = {
            "v": 1,
            "kind": "ack",
            "lot": self.lot,
            "gate": self.gate,
            "capture_id": str(self.capture_id),
            "received_at": _utc_text(self.received_at),
            "duplicate": self.duplicate,
            "rejected": self.rejected,
            "payload_sha256": self.payload_sha256,
        }
        return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


class GateEvent(_Message):
    type: Literal["barrier_opened", "barrier_closed", "vehicle_passed", "manual_open"]
    at: AwareDatetime
    capture_id: UUID | None = None
    reason: str | None = Field(default=None, max_length=200)
    # The event's own id: QoS 1 may deliver it twice, the server keeps it once.
    event_id: UUID | None = None


class GateStatus(_Message):
    state: Literal["online", "offline"]
    outbox_length: int = Field(default=0, ge=0)
    firmware: str | None = None
    agent_version: str | None = None
    at: AwareDatetime | None = None
    # Until when the gate holds a valid offline whitelist (None: it has none).
    whitelist_expires_at: AwareDatetime | None = None


class WhitelistEntry(_Message):
    """A vehicle an offline gate may let out. `per_session_limit_fen`: it leaves on pay-later
    (the lane charges it). `free_until`: a pass holder, free until this instant by the server's
    clock (its pass's hours or validity end then) and, after it, only on pay-later. With
    neither, a pass holder free for the whole life of the list."""

    plate: PlateText
    color: PlateColor | None = None
    per_session_limit_fen: int | None = Field(default=None, gt=0)
    free_until: AwareDatetime | None = None

    def signed_fields(self) -> list[object]:
        fields: list[object] = [self.plate, self.color, self.per_session_limit_fen]
        # Only when set: a list without any still verifies on gates that predate the field.
        return fields if self.free_until is None else [*fields, _utc_text(self.free_until)]


# The display texts of a gate's own (offline) decisions, as keys of GateConfig.display, with
# what a gate shows when its config has none.
DISPLAY_DEFAULTS = {
    "offline_entry": "欢迎光临",
    "offline_exit": "一路顺风",
    "offline_hold": "请到岗亭缴费",
}


class GateConfig(_Message):
    whitelist: list[WhitelistEntry] = []
    whitelist_expires_at: AwareDatetime | None = None
    display: dict[str, str] = {}
    # Signed configs (parking.gates.config): the car park they are for, when they were made, and
    # the server's Ed25519 signature (base64) over `signed_bytes()`.
    lot: str | None = None
    issued_at: AwareDatetime | None = None
    signature: str | None = None

    def signed_bytes(self) -> bytes:
        """What the signature covers: every field that steers the gate, as canonical JSON
        (sorted keys, no blanks, times in UTC). Built field by field rather than from the
        model's dump, so that a field a newer server adds cannot break older gates' checks."""
        document = {
            "v": 1,
            "lot": self.lot,
            "issued_at": _utc_text(self.issued_at),
            "whitelist_expires_at": _utc_text(self.whitelist_expires_at),
            "whitelist": [entry.signed_fields() for entry in self.whitelist],
            "display": self.display,
        }
        return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True, slots=True)
class GateAddress:
    lot: str
    gate: str


class Topics:
    """Builds and parses gate topics under an optional deployment prefix."""

    def __init__(self, prefix: str = "") -> None:
        self.root = f"{prefix.rstrip('/')}/{PROTOCOL_ROOT}" if prefix else PROTOCOL_ROOT
        self._depth = self.root.count("/") + 1

    def topic(self, address: GateAddress, kind: TopicKind) -> str:
        return f"{self.root}/{address.lot}/{address.gate}/{kind}"

    def all_gates(self, kind: TopicKind) -> str:
        return f"{self.root}/+/+/{kind}"

    def parse(self, topic: str) -> tuple[GateAddress, str] | None:
        """The gate and message kind of a topic, or None when it is not a well-formed gate topic."""
        if not topic.startswith(self.root + "/"):
            return None
        parts = topic.split("/")[self._depth :]
        if len(parts) != 3 or not _CODE.match(parts[0]) or not _CODE.match(parts[1]):
            return None
        return GateAddress(parts[0], parts[1]), parts[2]


def _utc_text(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat() if moment is not None else None


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json(exclude_none=True).encode()
