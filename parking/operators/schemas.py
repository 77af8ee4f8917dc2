from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from billing.money import PositiveFen
from gate_controller.protocol import PlateColor
from parking.car_parks.schemas import (
    CAR_PARK_NAME_MAX_CHARS,
    CODE_PATTERN,
    CarParkOccupancy,
    printable_name,
)
from parking.lanes.rules import identity_color
from parking.text import NO_NUL
from plate_recognition.grammar import is_valid, normalise, settled_color

# Ids are bigint: a larger number is a request error, not a database error.
MAX_ID = 2**63 - 1


def _utc(value: datetime) -> datetime:
    """An instant in UTC; one that UTC cannot represent (year 9999 west of Greenwich) is a
    request error, not a database error."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the instant is out of range") from None


Instant = Annotated[AwareDatetime, AfterValidator(_utc)]
Code = Annotated[str, StringConstraints(pattern=CODE_PATTERN)]
Reason = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=3, max_length=500, pattern=NO_NUL)
]
Name = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=NO_NUL)
]
# A car park's name goes into every charge's description, which the payment providers limit
# (200 characters, see billing.providers.DESCRIPTION_MAX_CHARS) and show to the driver: short,
# printable, on one line.
CarParkName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=CAR_PARK_NAME_MAX_CHARS),
    AfterValidator(printable_name),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OperatorCarPark(CarParkOccupancy):
    no_entry_policy: str
    no_entry_fee_fen: int
    # Closed to the public for now (the APDS place says so; gates keep working).
    closed: bool = False


class CarParkChange(_Request):
    name: CarParkName | None = None
    capacity: Annotated[int, Field(ge=0, le=100_000)] | None = None
    closed: bool | None = None


class Gate(BaseModel):
    code: str
    direction: str
    created_at: datetime


class NewGate(_Request):
    code: Code
    direction: Literal["in", "out", "both"]


class TariffVersion(BaseModel):
    id: int
    effective_from: datetime
    rules: dict[str, Any]
    created_at: datetime


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


class NewTariff(_Request):
    effective_from: Instant
    # Validated by billing.tariff.Tariff; its errors are answered as 422 `invalid_tariff`.
    rules: dict[str, Any]

    @field_validator("rules")
    @classmethod
    def _storable(cls, rules: dict[str, Any]) -> dict[str, Any]:
        # Stored as jsonb through orjson: integers of 64 bits at most, and no NUL in text.
        try:
            orjson.dumps(rules)
        except orjson.JSONEncodeError:
            raise ValueError("numbers in a tariff must fit in 64 bits") from None
        if _has_nul(rules):
            raise ValueError("text in a tariff cannot contain NUL")
        return rules


class Stay(BaseModel):
    id: int
    car_park: str
    # Masked: staff are not the plate's owner (search by the exact plate to find a car).
    plate: str
    plate_color: str | None
    status: str
    entered_at: datetime
    exited_at: datetime | None
    fee_fen: int | None
    settlement: str | None
    charge_id: int | None
    charge_status: str | None


class CaptureConflict(BaseModel):
    """A resend whose content differed from the capture stored under its id."""

    id: int
    capture_id: UUID
    car_park: str
    gate: str
    received_at: datetime
    # What the resend said (without frames), and what the stored capture decided.
    resent: dict[str, Any]
    stored_command: dict[str, Any]
    stored_captured_at: datetime


class GateOpening(BaseModel):
    """A barrier lifted without a signed command (the booth's button), as its gate reported."""

    id: int
    event_id: UUID
    car_park: str
    gate: str
    type: str
    reason: str | None
    at: datetime
    received_at: datetime


class LaneException(BaseModel):
    """One entry of the exception queue (the operator dashboard depends on these fields)."""

    id: int
    car_park: str
    gate: str
    reason: str
    created_at: datetime
    # What the readers proposed and the closest parked plates, as the lane stored them.
    candidates: list[dict[str, Any]]
    has_image: bool
    image_url: str | None
    status: str
    resolved_plate: str | None
    # The held capture: a manual open with it (`.../gates/{gate}/open`) resolves the exception.
    capture_id: UUID | None = None


class Resolution(_Request):
    """The vehicle an attendant names for a held capture: its characters and its plate's colour
    (a blue and a yellow 浙A12345 are two vehicles, and the camera's colour is only its guess),
    which only a green plate's eight characters may leave out."""

    plate: str
    color: PlateColor | None = None

    @field_validator("plate")
    @classmethod
    def _grammatical(cls, value: str) -> str:
        plate = normalise(value)
        if plate is None or not is_valid(plate):
            raise ValueError("not a valid Chinese licence plate")
        return plate

    @model_validator(mode="after")
    def _colour_named(self) -> "Resolution":
        if self.color is None and settled_color(self.plate) is None:
            raise ValueError(
                "give the plate's colour (color: blue, green, yellow, white or black): plates "
                "of the same characters in two colours are two vehicles"
            )
        if self.color is not None and not is_valid(self.plate, self.color):
            raise ValueError(f"{self.plate} is not a valid {self.color} plate")
        return self

    @property
    def identity(self) -> tuple[str, str]:
        """(plate, colour): the colour named, else the one the characters settle."""
        return self.plate, identity_color(self.plate, self.color)


class Resolved(BaseModel):
    outcome: str
    action: str
    fee_fen: int | None
    # False for an exit whose car left long ago (a rejected charge's): no gate is commanded.
    gate_commanded: bool = True


class ManualOpen(_Request):
    reason: Reason
    # The held capture the car is standing at the barrier for, if any.
    capture_id: UUID | None = None


class Opened(BaseModel):
    # The capture the open command was sent for: the held one, or a new id of its own.
    capture_id: UUID
    # The held stay that was closed by this open (settlement 'operator', fee not charged).
    session_id: int | None
    fee_fen: int | None


class GhostStayEnd(_Request):
    # Why the operator knows the car is gone (checked on site, seen elsewhere...).
    reason: Reason


class GhostStayEnded(BaseModel):
    session_id: int
    exception_id: int
    # When the operator ended it: the car left at a time nobody knows, before then.
    exited_at: datetime


class NewRefund(_Request):
    # Strict: 600.0, "600" and true are refused, not read as fen.
    amount_fen: PositiveFen
    reason: Reason


class Refund(BaseModel):
    id: int
    charge_id: int | None
    amount_fen: int
    kind: str
    reason: str
    status: str


class RefundLine(BaseModel):
    id: int
    created_at: datetime
    car_park: str
    amount_fen: int
    kind: str
    reason: str
    requested_by: str
    status: str
    out_refund_no: str


class RevenueLine(BaseModel):
    day: str
    car_park: str
    car_park_name: str
    pay_later_fen: int
    paid_at_gate_fen: int
    paid_at_booth_fen: int
    # The part of passes bought in the app earned that day.
    passes_fen: int
    refunded_fen: int
    # Pay-later fees accrued and then cancelled (never charged), on the day of cancellation.
    cancelled_fen: int
    net_fen: int


class DebtBucket(BaseModel):
    age_days: str
    debts: int
    accounts: int
    amount_fen: int


class ChargeException(BaseModel):
    """A charge the provider refused for the car park's own reason: pending, no debt, waiting
    for an operator to fix the cause and retry it."""

    id: int
    charge_id: int
    car_park: str
    amount_fen: int
    charge_status: str
    provider: str
    http_status: int | None
    code: str
    reason: str
    status: str
    created_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None


class OutboxJob(BaseModel):
    """A job of the outbox that needs a person: dead (its attempts used up) or stuck (due long
    ago, or tried many times). A dead charge is pending, not a debt: retry it, or refund or
    settle it otherwise."""

    id: int
    # charge, refund, gate_command or feed_delivery; `ref_id` is the charge's, refund's,
    # payment's or delivery's id.
    kind: str
    ref_id: int
    car_park: str
    state: Literal["due", "stuck", "dead"]
    # Attempts since an operator last retried it (the limit counts these), and ever.
    attempts: int
    total_attempts: int
    last_error: str | None
    created_at: datetime
    available_at: datetime
    locked_until: datetime | None
    dead_at: datetime | None


class AuditEntry(BaseModel):
    """One line of the audit log: which staff member did what to which record."""

    id: int
    actor: str
    actor_name: str
    actor_email: str
    action: str
    subject: str | None
    detail: dict[str, Any] | None
    created_at: datetime


class AuditPage(BaseModel):
    entries: list[AuditEntry]
    # Pass as `before` for the next (older) page; null on the last page.
    next_before: int | None
