"""What the operator's dispute review sends and gets. Plates are in clear here: judging a
dispute means comparing the read with the frames."""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from parking.confirmations.schemas import CameraReadSummary
from parking.text import NO_NUL

# `withdrawn`: the driver deleted their account before an operator decided.
DisputeStatus = Literal["open", "driver_right", "charge_stands", "withdrawn"]
Outcome = Literal["driver_right", "charge_stands"]
# What is disputed: a stay's charge, a missed stay's debt (no charge behind it), or a charge
# that was awaiting and was deleted when the driver was right (its stay opened again).
DisputeKind = Literal["charge", "missed_stay_debt", "charge_discarded"]


class DisputeView(BaseModel):
    """A dispute as the driver sees it (receipt, app)."""

    id: int
    status: DisputeStatus
    # The charge had not been sent when it was disputed: it waits for the decision.
    held: bool
    opened_at: datetime
    decided_at: datetime | None
    refund_id: int | None


class Read(BaseModel):
    plate: str | None
    confidence: float | None
    source: str | None
    match_status: str | None
    # The exception's candidates when a person had to choose the plate.
    candidates: list[Any]
    # With source 'ocr' (the server's reader decided): what the camera itself read, if it sent
    # a read; None otherwise.
    camera: CameraReadSummary | None = None


class Evidence(BaseModel):
    """One side of the stay: the capture, what the lane read, and its frame."""

    capture_id: str
    gate: str
    captured_at: datetime
    read: Read
    frame_url: str | None


class ChargeSummary(BaseModel):
    id: int
    amount_fen: int
    status: str


class OperatorDispute(BaseModel):
    id: int
    status: DisputeStatus
    held: bool
    via: str
    opened_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    note: str | None
    refund_id: int | None
    car_park: str
    stay_id: int
    plate: str
    entered_at: datetime
    exited_at: datetime | None
    kind: DisputeKind
    amount_fen: int
    # None unless `kind` is 'charge'.
    charge: ChargeSummary | None
    entry: Evidence | None
    exit: Evidence | None


class Decision(BaseModel):
    outcome: Outcome
    note: str | None = Field(default=None, max_length=500, pattern=NO_NUL)
