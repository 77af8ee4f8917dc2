"""The receipt's JSON (the app's twin of the page). The plate is masked: the link travels in
a text message and may be forwarded."""

from datetime import datetime

from pydantic import BaseModel

from parking.disputes.schemas import DisputeView


class Segment(BaseModel):
    start: datetime
    end: datetime
    band: str
    day_type: str
    fen: int


class Fee(BaseModel):
    total_fen: int
    # Before the daily and stay caps and the discount; None for a fixed fee.
    gross_fen: int | None
    discount_fen: int
    # The right the fee was reduced by (a pass, free minutes, a discount, a flat fee).
    right: str | None = None
    right_reduction_fen: int = 0
    # What a merchant's validation took off.
    validation_fen: int = 0
    segments: list[Segment]


class ChargeState(BaseModel):
    amount_fen: int
    # pending, succeeded, failed (owed as a debt) or cancelled (not owed)
    status: str


class Frames(BaseModel):
    """Same-origin paths that expire (signed); null when the frame is gone or none was kept."""

    entry: str | None
    exit: str | None


class ReceiptView(BaseModel):
    car_park: str
    plate: str
    stay_id: int
    entered_at: datetime
    exited_at: datetime | None
    duration_minutes: int
    fee: Fee
    charge: ChargeState
    refunded_fen: int
    frames: Frames
    dispute: DisputeView | None
