from datetime import datetime
from uuid import UUID

from pydantic import BaseModel


class GatePayment(BaseModel):
    """What the phone that scanned a held gate's QR code shows."""

    capture_id: UUID
    car_park: str
    status: str
    stay_fee_fen: int
    debt_fen: int
    amount_fen: int
    pay_url: str | None


class QuoteSegment(BaseModel):
    start: datetime
    end: datetime
    band: str
    day_type: str
    fee_fen: int


class Quote(BaseModel):
    car_park: str
    plate: str
    # The plate colour of the stay quoted (null when the camera read none).
    color: str | None
    parked_minutes: int
    fee_fen: int
    gross_fen: int
    discount_fen: int
    # The right (pass, whitelist, free minutes, discount, flat fee) the fee is reduced by, and
    # by how much: fee_fen is the tariff's fee less this.
    right: str | None = None
    right_reduction_fen: int = 0
    # What a merchant's validation took off (after the right).
    validation_fen: int = 0
    segments: list[QuoteSegment]


class NotificationAccepted(BaseModel):
    effect: str
