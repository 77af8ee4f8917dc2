"""Charges awaiting an operator's confirmation (staff of the car park's company)."""

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response

from parking.auth.principal import OperatorDep
from parking.confirmations import service
from parking.confirmations.schemas import Confirmation, ConfirmationDecision, Decided
from parking.deps import ConnectionDep, RuntimeDep
from parking.operators.schemas import CODE_PATTERN, MAX_ID

router = APIRouter(prefix="/api/v1/operator/confirmations", tags=["operator"])

ConfirmationId = Annotated[int, Path(ge=1, le=MAX_ID)]
_IMAGE: dict[int | str, dict[str, Any]] = {200: {"content": {"image/jpeg": {}}}}
_PRIVATE = {"Cache-Control": "private, no-store"}


@router.get("")
async def list_confirmations(
    operator: OperatorDep,
    conn: ConnectionDep,
    car_park: Annotated[str | None, Query(pattern=CODE_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[Confirmation]:
    """Pay-later charges waiting for a person because the stay's entry and exit reads were not
    both certain, oldest first, with both reads and their frames' URLs."""
    return await service.list_awaiting(conn, operator, car_park=car_park, limit=limit)


@router.get("/{confirmation_id}/entry-image", response_class=Response, responses=_IMAGE)
async def entry_image(
    confirmation_id: ConfirmationId, operator: OperatorDep, conn: ConnectionDep
) -> Response:
    """The stay's entry frame; 404 when none was kept or it has been erased."""
    image = await service.frame(conn, operator, confirmation_id, entry=True)
    return Response(image, media_type="image/jpeg", headers=_PRIVATE)


@router.get("/{confirmation_id}/exit-image", response_class=Response, responses=_IMAGE)
async def exit_image(
    confirmation_id: ConfirmationId, operator: OperatorDep, conn: ConnectionDep
) -> Response:
    """The stay's exit frame; 404 when none was kept or it has been erased."""
    image = await service.frame(conn, operator, confirmation_id, entry=False)
    return Response(image, media_type="image/jpeg", headers=_PRIVATE)


@router.post("/{confirmation_id}/confirm")
async def confirm(
    confirmation_id: ConfirmationId,
    decision: ConfirmationDecision,
    operator: OperatorDep,
    conn: ConnectionDep,
) -> Decided:
    """Both frames show the bound vehicle: the charge is queued to the provider (once).
    409 `not_awaiting_confirmation` when it was decided already."""
    return await service.confirm(conn, operator, confirmation_id, decision.reason)


@router.post("/{confirmation_id}/reject")
async def reject(
    confirmation_id: ConfirmationId,
    decision: ConfirmationDecision,
    operator: OperatorDep,
    runtime: RuntimeDep,
) -> Decided:
    """Not the bound vehicle: no charge; the exit waits in the exception queue for the right
    plate. 409 `not_awaiting_confirmation` when it was decided already."""
    async with runtime.pool.acquire() as conn, conn.transaction():
        rejection = await service.reject(conn, operator, confirmation_id, decision.reason)
    if rejection.occupancy_delta:
        # After commit: the reopened stay's car counts as inside again.
        await runtime.occupancy.adjust(rejection.car_park_id, rejection.occupancy_delta)
    return rejection.decided
