"""What operators see of an ownership claim (a plate dispute) and what they decide."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from parking.text import NO_NUL

ClaimStatus = Literal["open", "upheld", "rejected", "withdrawn"]


class ClaimantEvidence(BaseModel):
    account_id: int
    # The registry adapter that accepted the claimant's licence, and when they claimed.
    verified_by: str | None
    claimed_at: datetime
    # Whether the claimant presented the very licence that proved the holder's binding.
    same_licence_as_holder: bool | None
    # The claimant's binding once the claim was upheld (its `bound_at` is the proof time).
    binding_id: int | None
    bound_at: datetime | None


class HolderEvidence(BaseModel):
    account_id: int
    binding_id: int | None
    verified_by: str | None
    bound_at: datetime | None
    # Set when the binding ended (at the proof time when the claim was upheld).
    unbound_at: datetime | None


class ClaimStay(BaseModel):
    """A stay of the vehicle between the claim and the proof (or now), for review."""

    id: int
    car_park_code: str
    car_park: str
    plate_color: str | None
    status: str
    entered_at: datetime
    exited_at: datetime | None
    fee_fen: int | None
    settlement: str | None
    # Whose account it was charged to: "holder", "claimant", "other" or null (nobody's).
    charged_to: Literal["holder", "claimant", "other"] | None


class OwnershipClaim(BaseModel):
    id: int
    plate: str
    color: str
    status: ClaimStatus
    created_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None
    resolution_note: str | None
    claimant: ClaimantEvidence
    holder: HolderEvidence


class OwnershipClaimDetail(OwnershipClaim):
    stays_since_claim: list[ClaimStay]


class OwnershipDecision(BaseModel):
    in_favour_of: Literal["claimant", "holder"]
    reason: str = Field(min_length=1, max_length=500, pattern=NO_NUL)
