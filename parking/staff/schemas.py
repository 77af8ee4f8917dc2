from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from parking.merchants.schemas import MerchantUser


class NewStaff(MerchantUser):
    """An admin or attendant of the caller's company (a merchant's sign-in is made with the
    merchant: POST /api/v1/operator/merchants)."""

    role: Literal["admin", "attendant"]


class StaffMember(BaseModel):
    id: int
    email: str
    name: str
    role: str
    merchant: str | None = Field(description="the merchant of a 'merchant' sign-in")
    created_at: datetime
    disabled_at: datetime | None
