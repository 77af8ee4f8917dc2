"""Use cases of charge confirmations. Scoped to the caller's operator company (another
company's charges are not found, 404); every decision is audit-logged and runs in the caller's
transaction. A confirmation queues the charge once (conditional on its status); a rejection
deletes it (never booked nor sent), opens the stay again when its vehicle may still be inside,
and puts the exit in the exception queue for the right plate."""

from dataclasses import dataclass

import asyncpg

from billing import audit, charges
from parking.auth.principal import Principal
from parking.confirmations import repository as repo
from parking.confirmations.schemas import CameraReadSummary, Confirmation, Decided, ReadSummary
from parking.errors import AppError, NotFound
from parking.logging import get_logger
from parking.operators import repository as operators_repo

log = get_logger(__name__)


def image_url(charge_id: int, which: str) -> str:
    return f"/api/v1/operator/confirmations/{charge_id}/{which}-image"


def _operator_id(principal: Principal) -> int:
    if principal.operator_id is None:  # OperatorDep only lets staff tokens through
        raise AppError(403, "forbidden", "not a member of an operator company")
    return principal.operator_id


def _camera_read(row: asyncpg.Record, end: str) -> CameraReadSummary | None:
    return CameraReadSummary.of(
        row[f"{end}_camera_plate"], row[f"{end}_camera_color"], row[f"{end}_camera_confidence"]
    )


async def list_awaiting(
    conn: asyncpg.Connection, principal: Principal, *, car_park: str | None, limit: int
) -> list[Confirmation]:
    operator_id = _operator_id(principal)
    car_park_id = None
    if car_park is not None:
        row = await operators_repo.car_park(conn, operator_id, car_park)
        if row is None:
            raise NotFound("car_park")
        car_park_id = row["id"]
    rows = await repo.awaiting(conn, operator_id, car_park_id=car_park_id, limit=limit)
    return [
        Confirmation(
            id=r["id"],
            car_park=r["car_park"],
            plate=r["plate"],
            plate_color=r["plate_color"],
            entered_at=r["entered_at"],
            exited_at=r["exited_at"],
            amount_fen=r["amount_fen"],
            created_at=r["created_at"],
            match_status=r["match_status"],
            entry=ReadSummary(
                source=r["entry_source"],
                confidence=r["entry_confidence"],
                certain=r["entry_certain"],
                image_url=image_url(r["id"], "entry") if r["entry_image"] else None,
                camera=_camera_read(r, "entry"),
            ),
            exit=ReadSummary(
                source=r["exit_source"],
                confidence=r["exit_confidence"],
                certain=r["exit_certain"],
                image_url=image_url(r["id"], "exit") if r["exit_image"] else None,
                camera=_camera_read(r, "exit"),
            ),
            verification=r["verification"],
            left_again_at=r["left_again_at"],
        )
        for r in rows
    ]


async def frame(
    conn: asyncpg.Connection, principal: Principal, charge_id: int, *, entry: bool
) -> bytes:
    row = await repo.frame(conn, _operator_id(principal), charge_id, entry=entry)
    if row is None:
        raise NotFound("confirmation")
    if row["image"] is None:
        raise NotFound("image")
    image: bytes = row["image"]
    return image


async def _awaiting(
    conn: asyncpg.Connection, principal: Principal, charge_id: int
) -> repo.AwaitingCharge:
    charge = await repo.charge_for_update(conn, _operator_id(principal), charge_id)
    if charge is None:
        raise NotFound("confirmation")
    if charge.status != "awaiting_confirmation":
        raise AppError(
            409, "not_awaiting_confirmation", "this charge is no longer awaiting confirmation"
        )
    if await repo.disputed(conn, charge_id):
        raise AppError(
            409,
            "charge_disputed",
            "the driver says it was not their car: decide it in the disputes queue",
        )
    return charge


async def confirm(
    conn: asyncpg.Connection, principal: Principal, charge_id: int, reason: str
) -> Decided:
    """The frames show the bound vehicle at both ends: the charge is queued (once)."""
    charge = await _awaiting(conn, principal, charge_id)
    confirmed = await charges.confirm(conn, charge_id)
    assert confirmed is not None  # locked and awaiting above
    await audit.record(
        conn,
        principal.actor,
        "charge.confirmed",
        f"charge:{charge_id}",
        {
            "session_id": charge.session_id,
            "account_id": charge.account_id,
            "amount_fen": charge.amount_fen,
            "reason": reason,
        },
    )
    log.info("confirmation.confirmed", charge_id=charge_id, amount_fen=charge.amount_fen)
    return Decided(id=charge_id, status="pending", session_id=charge.session_id)


@dataclass(frozen=True, slots=True)
class Disowned:
    """What became of a stay whose unconfirmed charge was not the vehicle's: `counted_in`
    whether it was reopened and counted in at its entry (None: not reopened), and the exit's
    'rejected' exception."""

    counted_in: bool | None
    exception_id: int | None

    @property
    def occupancy_delta(self) -> int:
        """+1 after commit when the reopened stay's car counts as inside again."""
        return 1 if self.counted_in else 0


async def disown_stay(conn: asyncpg.Connection, charge: repo.AwaitingCharge) -> Disowned:
    """A charge that was awaiting was not the bound vehicle's (an operator rejected it, or
    agreed with the driver's "not my car"): its stay is opened again (its car may still be
    inside; its entry no longer counts as certain nor proven) unless its vehicle has another
    open stay here, in which case it stays closed and nobody's; the exit capture is no longer
    the stay's and waits in the exception queue ('rejected') for an operator to give the right
    plate (its own vehicle's: then it ends the stay the car is parked on, as the lane decides)."""
    counted_in = await repo.reopen_stay(conn, charge.session_id)
    if counted_in is None:
        await repo.unattribute_stay(conn, charge.session_id)
    exception_id = None
    if charge.exit_capture_id is not None:
        exception_id = await repo.open_rejection_exception(
            conn,
            charge.exit_capture_id,
            [{"plate": charge.plate, "kind": "rejected", "fee_fen": charge.amount_fen}],
        )
    return Disowned(counted_in, exception_id)


@dataclass(frozen=True, slots=True)
class Rejection:
    decided: Decided
    car_park_id: int
    # +1 when the stay was opened again and had been counted in at its entry (after commit).
    occupancy_delta: int


async def reject(
    conn: asyncpg.Connection, principal: Principal, charge_id: int, reason: str
) -> Rejection:
    """The frames do not show the bound vehicle: nobody is charged, and the stay is disowned
    (`disown_stay`)."""
    charge = await _awaiting(conn, principal, charge_id)
    await charges.discard_unconfirmed(conn, charge_id)
    disowned = await disown_stay(conn, charge)
    counted_in, exception_id = disowned.counted_in, disowned.exception_id
    await audit.record(
        conn,
        principal.actor,
        "charge.rejected",
        f"charge:{charge_id}",
        {
            "session_id": charge.session_id,
            "account_id": charge.account_id,
            "amount_fen": charge.amount_fen,
            "reason": reason,
            "reopened": counted_in is not None,
            "exception_id": exception_id,
        },
    )
    log.info("confirmation.rejected", charge_id=charge_id, reopened=counted_in is not None)
    decided = Decided(
        id=charge_id,
        status="rejected",
        session_id=charge.session_id,
        exception_id=exception_id,
        reopened=counted_in is not None,
    )
    return Rejection(decided, charge.car_park_id, disowned.occupancy_delta)
