from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

from billing.money import PositiveFen
from parking.operators.schemas import MAX_ID


class NewBoothPayment(BaseModel):
    """Cash or a card an attendant took at the booth, for a held exit (`capture_id`, the car at
    the barrier) or a stay (`session_id`: a car that left while the gate was offline)."""

    model_config = ConfigDict(extra="forbid")

    capture_id: UUID | None = None
    session_id: int | None = Field(default=None, ge=1, le=MAX_ID)
    method: Literal["cash", "card"]
    # Exactly the stay's fee (integer fen): the gate showed it, the books need it exact.
    amount_fen: PositiveFen

    @model_validator(mode="after")
    def _one_target(self) -> "NewBoothPayment":
        if (self.capture_id is None) == (self.session_id is None):
            raise ValueError("give exactly one of capture_id and session_id")
        return self


class BoothPayment(BaseModel):
    id: int
    car_park: str
    session_id: int
    capture_id: UUID | None
    method: str
    amount_fen: int
    recorded_by: str
    created_at: datetime
    # True when the held gate was sent its open command.
    gate_opened: bool


class ClockSkew(BaseModel):
    id: int
    car_park: str
    gate: str
    capture_id: UUID
    direction: str
    session_id: int | None
    # The gate's time, the moment we received the capture, and the time the stay was taken at.
    gate_time: datetime
    received_at: datetime
    taken_at: datetime
    kind: Literal["ahead", "behind"]
    # Gate time minus what bounds it (receipt or entry): positive ahead, negative behind.
    skew_s: int
    created_at: datetime
