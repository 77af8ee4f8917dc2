"""What the driver app sends and gets. Plates and the phone are shown in clear: they are the
driver's own."""

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from parking.disputes.schemas import DisputeView

PlateColor = Literal["blue", "green", "yellow", "white", "black"]
StayStatus = Literal["open", "closed"]
# The most a driver may let one stay cost without stopping (¥10,000).
MAX_PER_SESSION_LIMIT_FEN = 1_000_000


def _in_utc(value: datetime) -> datetime:
    """A time without an offset is UTC; one that is not a time in UTC's calendar is invalid."""
    try:
        return value.replace(tzinfo=value.tzinfo or UTC).astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("the time is out of range") from exc


# `before` of the stays list: the `next_before` of the previous page.
StayCursor = Annotated[datetime, AfterValidator(_in_utc)]


class Binding(BaseModel):
    id: int
    plate: str
    color: str
    bound_at: datetime
    verified_by: str | None
    # Another driver claims this vehicle: it stays bound here until an operator decides.
    disputed: bool = False
    # The plate's pay-later service with the agreement's provider, as last learned (None: no
    # agreement, or the provider has not answered yet), what it means for the driver in
    # Chinese, and when it was learned. Only "normal" leaves without stopping at the barrier.
    service_state: Literal["normal", "paused", "overdue", "not_opened"] | None = None
    service_note: str | None = None
    service_checked_at: datetime | None = None


class PlateClaimState(BaseModel):
    """The driver's claim on a vehicle bound to another account (409 `plate_disputed`)."""

    id: int
    plate: str
    color: str
    # open, upheld (the vehicle is now the driver's), rejected or withdrawn.
    status: str
    created_at: datetime
    resolved_at: datetime | None


class PlateClaim(BaseModel):
    """A plate to bind, with the vehicle licence (行驶证) data that proves ownership."""

    plate: str = Field(min_length=1, max_length=20)
    color: PlateColor
    licence_no: str = Field(min_length=1, max_length=64)
    owner_name: str = Field(min_length=1, max_length=100)


class Agreement(BaseModel):
    id: int
    provider: str
    agreement_no: str
    per_session_limit_fen: int
    signed_at: datetime


class AgreementLimit(BaseModel):
    per_session_limit_fen: int = Field(gt=0, le=MAX_PER_SESSION_LIMIT_FEN)


class AgreementRequest(AgreementLimit):
    # The code of the driver's WeChat sign-in in the mini program (wx.login): on the WeChat
    # provider the server exchanges it for the driver's openid, the agreement's number (never
    # an openid the app names: anyone could name another's); other providers ignore it.
    wechat_code: str | None = Field(default=None, pattern=r"^\S{1,128}$")


class Me(BaseModel):
    account_id: int
    phone: str
    display_name: str | None
    blocked_for_arrears: bool
    plates: list[Binding]
    agreement: Agreement | None
    open_debt_fen: int
    plate_claims: list[PlateClaimState] = []


class Stay(BaseModel):
    id: int
    car_park: str
    plate: str
    status: str
    entered_at: datetime
    exited_at: datetime | None
    fee_fen: int | None
    settlement: str | None
    # The pass (or other right) the stay held a place of or was priced under.
    pass_name: str | None = None


class StayPage(BaseModel):
    items: list[Stay]
    # Pass as `before` for the next (older) page; null on the last page.
    next_before: datetime | None


class ChargeView(BaseModel):
    amount_fen: int
    status: str
    created_at: datetime
    settled_at: datetime | None


class RefundView(BaseModel):
    amount_fen: int
    kind: str
    reason: str
    status: str
    created_at: datetime
    finished_at: datetime | None


class Receipt(BaseModel):
    id: int
    car_park: str
    plate: str
    status: str
    entered_at: datetime
    exited_at: datetime | None
    # Until the exit, or until now while the car is still inside.
    duration_minutes: int
    fee_fen: int | None
    settlement: str | None
    charge: ChargeView | None
    refunds: list[RefundView]
    # Whether the entry and exit frames are still kept (GET .../frames/entry|exit).
    entry_frame: bool = False
    exit_frame: bool = False
    # "Not my car" on the stay's charge, if the driver raised it.
    dispute: DisputeView | None = None
    # Whether "not my car" has something to dispute now (a charge, or a debt still owed).
    disputable: bool = False
    # The pass (or other right) the stay held a place of or was priced under.
    pass_name: str | None = None


class DebtView(BaseModel):
    id: int
    car_park: str
    stay_id: int
    entered_at: datetime
    exited_at: datetime | None
    amount_fen: int
    created_at: datetime


class Debts(BaseModel):
    total_fen: int
    debts: list[DebtView]


class DebtPayment(BaseModel):
    out_trade_no: str
    amount_fen: int
    pay_url: str | None
    status: str


class NotificationView(BaseModel):
    id: int
    kind: str
    body: str
    status: str
    created_at: datetime


class Export(BaseModel):
    """Everything held about an account, as stored (GET /api/v1/me/export)."""

    exported_at: datetime
    account: dict[str, Any]
    bindings: list[dict[str, Any]]
    agreements: list[dict[str, Any]]
    stays: list[dict[str, Any]]
    charges: list[dict[str, Any]]
    payments: list[dict[str, Any]]
    debts: list[dict[str, Any]]
    refunds: list[dict[str, Any]]
    notifications: list[dict[str, Any]]
    disputes: list[dict[str, Any]]
