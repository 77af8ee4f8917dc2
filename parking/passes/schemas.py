from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from gate_controller.protocol import PlateColor
from parking.car_parks.schemas import CODE_PATTERN
from parking.operators.schemas import MAX_ID
from parking.rights.schemas import plate_of
from parking.text import NO_NUL

CarParkCode = Annotated[str, StringConstraints(pattern=CODE_PATTERN)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewPassOffer(_Request):
    """A right specification sold in the app for `period_days` at `price_fen`."""

    spec_id: int = Field(ge=1, le=MAX_ID)
    car_park: CarParkCode
    name: Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=NO_NUL),
    ]
    price_fen: int = Field(ge=1, le=100_000_000, strict=True)
    period_days: int = Field(ge=1, le=366, strict=True)


class PassOffer(BaseModel):
    id: int
    spec_id: int
    car_park: str
    name: str
    kind: str
    price_fen: int
    period_days: int
    active: bool


class NewPassPurchase(_Request):
    offer_id: int = Field(ge=1, le=MAX_ID)
    plate: str = Field(min_length=1, max_length=20)
    color: PlateColor = "blue"

    @model_validator(mode="after")
    def _grammatical(self) -> "NewPassPurchase":
        self.plate = plate_of(self.plate, self.color)
        return self


class PassPurchase(BaseModel):
    id: int
    offer: str
    car_park: str
    plate: str
    color: str
    amount_fen: int
    # Null until paid.
    starts_at: datetime | None
    ends_at: datetime | None
    status: str
    pay_url: str | None
    created_at: datetime


class PassRevenue(BaseModel):
    offer_id: int
    offer: str
    car_park: str
    sold: int
    amount_fen: int
    # Earned so far (the car park's revenue) and still owed as service (deferred).
    recognised_fen: int
    deferred_fen: int
