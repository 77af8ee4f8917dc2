"""Platform routes of ownership claims (plate disputes): the open ones with both parties'
evidence, one with the stays since the claim, and the decision.

A vehicle's ownership is the city's, not one company's: the claims (drivers' evidence and
stays in every company's car parks) are listed to and decided by the city platform's staff
only (role 'platform'); every company's staff is refused, every decision audit-logged.
"""

from typing import Annotated

from fastapi import APIRouter, Path, Query

from parking.auth.principal import PlatformDep
from parking.deps import ConnectionDep
from parking.ownership import service
from parking.ownership.schemas import OwnershipClaim, OwnershipClaimDetail, OwnershipDecision

router = APIRouter(prefix="/api/v1/operator/ownership-claims", tags=["operator"])

ClaimId = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.get("")
async def list_open_claims(
    staff: PlatformDep,
    conn: ConnectionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[OwnershipClaim]:
    """Open ownership claims, oldest first, with the claimant's and the holder's evidence."""
    return await service.open_claims(conn, limit)


@router.get("/{ownership_claim_id}")
async def get_claim(
    ownership_claim_id: ClaimId, staff: PlatformDep, conn: ConnectionDep
) -> OwnershipClaimDetail:
    """One claim, with the vehicle's stays from the claim to the proof (or now) for review."""
    return await service.claim_detail(conn, ownership_claim_id)


@router.post("/{ownership_claim_id}/decision")
async def decide_claim(
    ownership_claim_id: ClaimId,
    decision: OwnershipDecision,
    staff: PlatformDep,
    conn: ConnectionDep,
) -> OwnershipClaimDetail:
    """For the claimant: the binding moves to them now (the proof time) and the holder's ends.
    For the holder: nothing moves. Both drivers are told; 409 `ownership_claim_decided`."""
    return await service.decide(conn, staff, ownership_claim_id, decision)
