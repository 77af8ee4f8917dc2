"""The operator's review of "not my car" disputes: staff of the car park's company see them
with both frames; admins decide (a decision may refund, like the refund route)."""

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Response

from parking.auth.principal import DriverDep, OperatorAdminDep, OperatorDep
from parking.deps import ConnectionDep, RuntimeDep
from parking.disputes import service
from parking.disputes.schemas import Decision, DisputeStatus, DisputeView, OperatorDispute
from parking.messages import message_style
from parking.operators.schemas import CODE_PATTERN, MAX_ID

router = APIRouter(prefix="/api/v1/operator/disputes", tags=["operator"])

Id = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.get("")
async def list_disputes(
    operator: OperatorDep,
    conn: ConnectionDep,
    status: DisputeStatus | None = None,
    car_park: Annotated[str | None, Query(pattern=CODE_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[OperatorDispute]:
    """Disputes at the company's car parks, oldest first, each with the entry and exit
    captures (what the lane read, the frames' URLs). `status=driver_right`: stays whose real
    car is still to be found."""
    return await service.list_disputes(
        conn, operator, status=status, car_park=car_park, limit=limit
    )


@router.get("/{dispute_id}")
async def get_dispute(
    dispute_id: Id, operator: OperatorDep, conn: ConnectionDep
) -> OperatorDispute:
    return await service.get_dispute(conn, operator, dispute_id)


@router.get(
    "/{dispute_id}/frames/{which}",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}},
)
async def dispute_frame(
    dispute_id: Id, which: Literal["entry", "exit"], operator: OperatorDep, conn: ConnectionDep
) -> Response:
    """The entry or exit frame; 404 when there was none or it has been erased."""
    image = await service.frame(conn, operator, dispute_id, which)
    return Response(image, media_type="image/jpeg", headers={"Cache-Control": "private, no-store"})


@router.post("/{dispute_id}/decision")
async def decide(
    dispute_id: Id,
    decision: Decision,
    admin: OperatorAdminDep,
    runtime: RuntimeDep,
) -> OperatorDispute:
    """`driver_right`: a held charge is cancelled (one that was awaiting is deleted and its stay
    reopened, as the confirmation queue's reject does), a collected one refunded in full, a
    debt waived; `charge_stands`: a held charge goes to the provider, a debt is owed again.
    Admins; audit-logged; the driver is told. 409 `already_decided`; 409 `charge_in_flight`
    while the provider may have a charge sent before the dispute and has not answered."""
    async with runtime.pool.acquire() as conn, conn.transaction():
        decided = await service.decide(
            conn, admin, dispute_id, decision, message_style(runtime.settings)
        )
    if decided.occupancy_delta:
        # After commit: the reopened stay's car counts as inside again.
        await runtime.occupancy.adjust(decided.car_park_id, decided.occupancy_delta)
    return decided.dispute


driver_router = APIRouter(prefix="/api/v1/me", tags=["driver"])


@driver_router.post("/stays/{dispute_stay_id}/dispute")
async def dispute_stay(
    dispute_stay_id: Id, driver: DriverDep, conn: ConnectionDep, runtime: RuntimeDep
) -> DisputeView:
    """ "Not my car" on a stay charged to the account, or owed by it as a missed stay's debt (a
    held stay whose car left without paying): a charge no money has moved for, or a debt, is
    held until an operator decides; a collected charge is refunded in full if they agree.
    The same dispute when asked again; 404 for a stay neither charged to nor owed by the
    account; 409 `charge_not_disputable` when nothing is left to dispute (cancelled, or its
    debt paid)."""
    assert driver.account_id is not None  # DriverDep admits only drivers
    return await service.dispute_stay(
        conn, driver.account_id, dispute_stay_id, message_style(runtime.settings)
    )
