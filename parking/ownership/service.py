"""Ownership disputes end.

A claim of a vehicle (plate, colour) bound to another account opens a dispute (parking.drivers).
It ends one of two ways:
- the vehicle registry's own record proves the claimant the owner (`uphold` from the claim), or
- the city platform's staff (role 'platform') decide for the claimant or the holder
  (`decide`), audit-logged.
An upheld dispute moves the binding at the proof time, the dispute's `resolved_at`: the
holder's binding ends and the claimant's begins at that same instant, so every stay that enters
from then on is the claimant's and never the previous holder's. The stays between the claim and
the proof are listed with the dispute for review. Both drivers are told either way.
"""

import asyncpg

from billing import audit, notifications
from parking.auth.principal import Principal
from parking.errors import AppError, NotFound
from parking.logging import get_logger
from parking.ownership import repository as repo
from parking.ownership.schemas import (
    ClaimantEvidence,
    ClaimStay,
    HolderEvidence,
    OwnershipClaim,
    OwnershipClaimDetail,
    OwnershipDecision,
)

log = get_logger(__name__)

_COLOR_NAMES = {"blue": "蓝", "yellow": "黄", "green": "绿", "white": "白", "black": "黑"}


def vehicle_text(plate: str, color: str) -> str:
    """How a driver's message names the vehicle: 浙A12345（蓝牌）."""
    return f"{plate}（{_COLOR_NAMES.get(color, color)}牌）"


def _claim(row: asyncpg.Record) -> OwnershipClaim:
    return OwnershipClaim(
        id=row["id"],
        plate=row["plate"],
        color=row["color"],
        status=row["status"],
        created_at=row["created_at"],
        resolved_at=row["resolved_at"],
        resolved_by=row["resolved_by"],
        resolution_note=row["resolution_note"],
        claimant=ClaimantEvidence(
            account_id=row["claimant_account_id"],
            verified_by=row["claimant_verified_by"],
            claimed_at=row["created_at"],
            same_licence_as_holder=row["same_licence_as_holder"],
            binding_id=row["claimant_binding_id"],
            bound_at=row["claimant_bound_at"],
        ),
        holder=HolderEvidence(
            account_id=row["holder_account_id"],
            binding_id=row["holder_binding_id"],
            verified_by=row["holder_verified_by"],
            bound_at=row["holder_bound_at"],
            unbound_at=row["holder_unbound_at"],
        ),
    )


def _charged_to(row: asyncpg.Record, claim: OwnershipClaim) -> str | None:
    account_id = row["account_id"]
    if account_id is None:
        return None
    if account_id == claim.holder.account_id:
        return "holder"
    if account_id == claim.claimant.account_id:
        return "claimant"
    return "other"


async def open_claims(conn: asyncpg.Connection, limit: int) -> list[OwnershipClaim]:
    return [_claim(row) for row in await repo.open_claims(conn, limit)]


async def claim_detail(conn: asyncpg.Connection, dispute_id: int) -> OwnershipClaimDetail:
    row = await repo.claim(conn, dispute_id)
    if row is None:
        raise NotFound("ownership_claim")
    claim = _claim(row)
    # From the claim to the proof; an open claim up to now, a rejected or withdrawn one up to
    # its end.
    stays = await repo.stays_between(
        conn, claim.plate, claim.color, claim.created_at, claim.resolved_at
    )
    return OwnershipClaimDetail(
        **claim.model_dump(),
        stays_since_claim=[
            ClaimStay(
                id=s["id"],
                car_park_code=s["car_park_code"],
                car_park=s["car_park"],
                plate_color=s["plate_color"],
                status=s["status"],
                entered_at=s["entered_at"],
                exited_at=s["exited_at"],
                fee_fen=s["fee_fen"],
                settlement=s["settlement"],
                charged_to=_charged_to(s, claim),  # type: ignore[arg-type]
            )
            for s in stays
        ],
    )


async def claims_follow_binding(
    conn: asyncpg.Connection, plate: str, color: str, account_id: int, binding_id: int
) -> None:
    """The vehicle was just bound to `account_id` (a free plate bound, or a claim upheld): the
    other open claims of it are against this holder now, and this account's own is moot. A
    claim left against an account that gave the plate up could never be upheld (its binding
    gone, the vehicle bound elsewhere: `plate_rebound`), not even on the registry's proof."""
    await repo.repoint_open_disputes(conn, plate, color, account_id, binding_id)


async def uphold(
    conn: asyncpg.Connection, dispute_id: int, *, resolved_by: str, note: str | None
) -> int:
    """Ends the open dispute for the claimant and moves the binding at the proof time; the
    claimant's new binding id. 409 when the dispute is no longer open or another account has
    bound the vehicle meanwhile (nothing changes: the caller's transaction rolls back)."""
    dispute = await repo.lock_claim(conn, dispute_id)
    if dispute is None:
        raise NotFound("ownership_claim")
    proved_at = await repo.close(
        conn, dispute_id, status="upheld", resolved_by=resolved_by, note=note
    )
    if proved_at is None:
        raise AppError(409, "ownership_claim_decided", "this ownership claim was already decided")
    plate, color = dispute["plate"], dispute["color"]
    await repo.end_binding(conn, dispute["holder_account_id"], plate, color, proved_at)
    binding_id = await repo.bind_from(
        conn,
        dispute["claimant_account_id"],
        plate,
        color,
        at=proved_at,
        verified_by=dispute["claimant_verified_by"],
        licence_ref=dispute["claimant_licence_ref"],
    )
    if binding_id is None:
        raise AppError(
            409,
            "plate_rebound",
            "车辆已被其他账户绑定 / the vehicle is bound to a third account now",
        )
    await repo.set_claimant_binding(conn, dispute_id, binding_id)
    await claims_follow_binding(conn, plate, color, dispute["claimant_account_id"], binding_id)
    vehicle = vehicle_text(plate, color)
    await notifications.enqueue(
        conn,
        account_id=dispute["claimant_account_id"],
        kind="plate_ownership_moved",
        source_key=f"plate-dispute:{dispute_id}:claimant",
        body=f"{vehicle}的归属已核实，车牌已绑定到您的账户，此后的停车费由您支付。",
    )
    await notifications.enqueue(
        conn,
        account_id=dispute["holder_account_id"],
        kind="plate_ownership_lost",
        source_key=f"plate-dispute:{dispute_id}:holder",
        body=(
            f"{vehicle}已核实归他人所有，已从您的账户解绑；"
            "此后该车的停车费不再向您收取，如有异议请联系客服。"
        ),
    )
    log.info(
        "ownership.claim_upheld",
        dispute_id=dispute_id,
        resolved_by=resolved_by,
        binding_id=binding_id,
    )
    return binding_id


async def _reject(
    conn: asyncpg.Connection, dispute: asyncpg.Record, *, resolved_by: str, note: str
) -> None:
    if (
        await repo.close(conn, dispute["id"], status="rejected", resolved_by=resolved_by, note=note)
        is None
    ):
        raise AppError(409, "ownership_claim_decided", "this ownership claim was already decided")
    vehicle = vehicle_text(dispute["plate"], dispute["color"])
    await notifications.enqueue(
        conn,
        account_id=dispute["claimant_account_id"],
        kind="plate_ownership_claim_rejected",
        source_key=f"plate-dispute:{dispute['id']}:claimant",
        body=f"您对{vehicle}的绑定申请未获支持，车牌仍由原账户持有。",
    )
    await notifications.enqueue(
        conn,
        account_id=dispute["holder_account_id"],
        kind="plate_ownership_kept",
        source_key=f"plate-dispute:{dispute['id']}:holder",
        body=f"他人对{vehicle}的归属申请未获支持，车牌仍绑定在您的账户。",
    )
    log.info("ownership.claim_rejected", dispute_id=dispute["id"], resolved_by=resolved_by)


async def decide(
    conn: asyncpg.Connection, staff: Principal, dispute_id: int, decision: OwnershipDecision
) -> OwnershipClaimDetail:
    """The platform staff's decision of an open claim, audit-logged."""
    dispute = await repo.lock_claim(conn, dispute_id)
    if dispute is None:
        raise NotFound("ownership_claim")
    if dispute["status"] != "open":
        raise AppError(409, "ownership_claim_decided", "this ownership claim was already decided")
    if decision.in_favour_of == "claimant":
        await uphold(conn, dispute_id, resolved_by=staff.actor, note=decision.reason)
    else:
        await _reject(conn, dispute, resolved_by=staff.actor, note=decision.reason)
    await audit.record(
        conn,
        actor=staff.actor,
        action="plate_dispute.decided",
        subject=f"plate_dispute:{dispute_id}",
        detail={"in_favour_of": decision.in_favour_of, "reason": decision.reason},
    )
    return await claim_detail(conn, dispute_id)
