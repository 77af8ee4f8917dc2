from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from gate_controller.protocol import PlateColor
from parking.car_parks.schemas import CODE_PATTERN
from parking.rights.schemas import plate_of
from parking.text import NO_NUL

CarParkCode = Annotated[str, StringConstraints(pattern=CODE_PATTERN)]
Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=NO_NUL),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MerchantUser(_Request):
    """The merchant's sign-in (role 'merchant': it can only validate stays)."""

    email: str = Field(min_length=3, max_length=200, pattern=r"^[^\s\x00@]+@[^\s\x00@]+$")
    name: Name
    password: str = Field(min_length=12, max_length=200)


class NewMerchant(_Request):
    name: Name
    budget_fen: int = Field(ge=0, le=10_000_000_000, strict=True)
    # None: every car park of the company.
    car_parks: list[CarParkCode] | None = Field(default=None, min_length=1, max_length=500)
    user: MerchantUser


class BudgetTopUp(_Request):
    add_fen: int = Field(gt=0, le=10_000_000_000, strict=True)


class Merchant(BaseModel):
    id: int
    name: str
    car_parks: list[str] | None
    budget_fen: int
    spent_fen: int
    remaining_fen: int
    created_at: datetime


class NewValidation(_Request):
    """A visitor's stay validated before the exit: free minutes or an amount, once per stay."""

    car_park: CarParkCode
    plate: str = Field(min_length=1, max_length=20)
    color: PlateColor = "blue"
    free_minutes: int | None = Field(default=None, ge=1, le=1440, strict=True)
    amount_fen: int | None = Field(default=None, ge=1, le=100_000_000, strict=True)

    @model_validator(mode="after")
    def _one_kind(self) -> "NewValidation":
        if (self.free_minutes is None) == (self.amount_fen is None):
            raise ValueError("give exactly one of free_minutes and amount_fen")
        self.plate = plate_of(self.plate, self.color)
        return self


class Validation(BaseModel):
    id: int
    merchant: str
    car_park: str
    session_id: int
    free_minutes: int | None
    amount_fen: int | None
    # What it cost the merchant's budget when given, and what went back to the budget when the
    # stay's final fee left it less to take off.
    cost_fen: int
    returned_fen: int
    created_at: datetime


class MerchantReport(BaseModel):
    merchant_id: int
    merchant: str
    validations: int
    cost_fen: int
    returned_fen: int
    budget_fen: int
    spent_fen: int
    remaining_fen: int
