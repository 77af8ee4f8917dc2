from datetime import datetime
from typing import Literal
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
    # The barrier was told to open (the hold was lifted: paid, or opened by an operator).
    gate_open: bool = False


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


class PageDebt(BaseModel):
    # None for the debts a started payment includes, shown as one line.
    created_at: datetime | None
    amount_fen: int


# What the pay page says: `due` (the fee to pay), `paying` (a payment was started), `paid`
# (booked, the barrier about to open), `open` (the barrier was told to open), `settled` (the
# stay was settled some other way), `opened` (staff opened the barrier by hand before any
# payment), `expired` (scanned too late), `no_tariff`, `nothing_due`.
PageState = Literal[
    "due", "paying", "paid", "open", "opened", "settled", "expired", "no_tariff", "nothing_due"
]


class GatePaymentPage(BaseModel):
    """What the page a held gate's QR code opens shows (parking/pages/)."""

    capture_id: UUID
    state: PageState
    car_park: str
    plate_masked: str | None
    entered_at: datetime | None
    stay_fee_fen: int = 0
    gross_fen: int | None = None
    discount_fen: int = 0
    segments: list[QuoteSegment] = []
    debts: list[PageDebt] = []
    amount_fen: int = 0
    pay_url: str | None = None
