"""Operator requests and answers about rights (monthly passes, whitelists, discounts, flat fees)
and blacklists. Plates are normalised and checked against the plate grammar of their colour."""

from datetime import datetime, time
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from billing.rights import RightKind
from gate_controller.protocol import PlateColor
from parking.car_parks.schemas import CODE_PATTERN
from parking.text import NO_NUL
from plate_recognition.grammar import is_valid, normalise

Name = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=NO_NUL)
]
Label = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=NO_NUL),
]
Reason = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=NO_NUL),
]
CarParkCode = Annotated[str, StringConstraints(pattern=CODE_PATTERN)]
RightStatus = Literal["active", "suspended", "cancelled"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def plate_of(value: str, color: str | None) -> str:
    """The canonical plate text, or ValueError when it is no plate of that colour (of any
    colour when None)."""
    plate = normalise(value)
    if plate is None or not is_valid(plate, color):
        kind = f"{color} " if color else ""
        raise ValueError(f"not a valid {kind}Chinese licence plate")
    return plate


class Vehicle(_Request):
    """A plate identity: (colour/type, characters)."""

    plate: str = Field(min_length=1, max_length=20)
    color: PlateColor

    @model_validator(mode="after")
    def _grammatical(self) -> "Vehicle":
        self.plate = plate_of(self.plate, self.color)
        return self


class NewRightSpec(_Request):
    """What, where and when: a right specification (APDS)."""

    name: Name
    kind: RightKind
    free_minutes: int | None = Field(default=None, ge=1, le=525_600, strict=True)
    discount_percent: int | None = Field(default=None, ge=1, le=100, strict=True)
    flat_fee_fen: int | None = Field(default=None, ge=0, le=100_000_000, strict=True)
    # None: every car park of the company.
    car_parks: list[CarParkCode] | None = Field(default=None, min_length=1, max_length=500)
    # ISO weekdays (Monday 1 … Sunday 7) on which a window opens.
    weekdays: list[int] = Field(default=[1, 2, 3, 4, 5, 6, 7], min_length=1, max_length=7)
    # An hours window in the car park's time (Asia/Shanghai); start after end crosses midnight.
    window_start: time | None = None
    window_end: time | None = None

    @field_validator("weekdays")
    @classmethod
    def _iso_weekdays(cls, days: list[int]) -> list[int]:
        if any(not 1 <= d <= 7 for d in days):
            raise ValueError("weekdays are 1 (Monday) to 7 (Sunday)")
        return sorted(set(days))

    @model_validator(mode="after")
    def _consistent(self) -> "NewRightSpec":
        amounts = {
            "free_minutes": self.free_minutes,
            "discount": self.discount_percent,
            "flat_fee": self.flat_fee_fen,
        }
        for kind, value in amounts.items():
            if (self.kind == kind) != (value is not None):
                field = {"discount": "discount_percent", "flat_fee": "flat_fee_fen"}.get(kind, kind)
                raise ValueError(f"{field} is required for kind {kind} and only for it")
        if (self.window_start is None) != (self.window_end is None):
            raise ValueError("give both window_start and window_end, or neither")
        if self.window_start is not None and self.window_start == self.window_end:
            raise ValueError("an empty window: leave both out for all day")
        for t in (self.window_start, self.window_end):
            if t is not None and (t.tzinfo is not None or t.second or t.microsecond):
                raise ValueError("windows are local HH:MM times")
        return self


class RightSpec(BaseModel):
    id: int
    name: str
    kind: str
    free_minutes: int | None
    discount_percent: int | None
    flat_fee_fen: int | None
    car_parks: list[str] | None
    weekdays: list[int]
    window_start: time | None
    window_end: time | None
    created_at: datetime


class NewRight(_Request):
    """For whom and how long: an assigned right."""

    spec_id: int = Field(ge=1, le=2**63 - 1)
    vehicles: list[Vehicle] = Field(min_length=1, max_length=20)
    valid_from: AwareDatetime
    valid_until: AwareDatetime
    # At most this many of its vehicles inside at once (None: all of them).
    max_inside: int | None = Field(default=None, ge=1, le=20)
    label: Label | None = None

    @model_validator(mode="after")
    def _period(self) -> "NewRight":
        if self.valid_until <= self.valid_from:
            raise ValueError("valid_until must be after valid_from")
        if len({(v.plate, v.color) for v in self.vehicles}) != len(self.vehicles):
            raise ValueError("a vehicle is listed twice")
        return self


class Renewal(_Request):
    valid_until: AwareDatetime


class Right(BaseModel):
    id: int
    spec_id: int
    spec_name: str
    kind: str
    vehicles: list[dict[str, str]]
    valid_from: datetime
    valid_until: datetime
    max_inside: int | None
    label: str | None
    status: str
    source: str
    created_at: datetime
    updated_at: datetime


class ImportFailure(BaseModel):
    # The CSV line (1 is the header).
    line: int
    # Why, for the console to say in the operator's language: unknown_right_spec,
    # invalid_plate, invalid_date, invalid_row, or the code of the error the row met
    # (e.g. right_status, conflict).
    code: str
    # The cell the row failed on, when one did (the spec's name, the plate, the date).
    value: str | None = None
    # The same in English, with the details.
    error: str


class ImportReport(BaseModel):
    imported: int
    right_ids: list[int]
    failed: list[ImportFailure]


class PassOccupancy(BaseModel):
    car_park: str
    capacity: int
    # Stays inside now holding a place of a right (a pass, a whitelist), and the others.
    pass_holders: int
    visitors: int


class NewBlacklistEntry(Vehicle):
    reason: Reason


class BlacklistEntry(BaseModel):
    id: int
    plate: str
    color: str
    reason: str
    created_by: str
    created_at: datetime
    removed_at: datetime | None
