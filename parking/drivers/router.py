"""The driver app's API: everything under /api/v1/me is the signed-in driver's own."""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from parking.auth.principal import DriverDep, Principal
from parking.deps import ConnectionDep, RuntimeDep
from parking.drivers import service
from parking.drivers.schemas import (
    Agreement,
    AgreementLimit,
    AgreementRequest,
    Binding,
    DebtPayment,
    Debts,
    Export,
    Me,
    NotificationView,
    PlateClaim,
    Receipt,
    StayCursor,
    StayPage,
    StayStatus,
)
from parking.drivers.verification import VehicleRegistry, registry_of
from parking.errors import error_body

router = APIRouter(prefix="/api/v1/me", tags=["driver"])


def _vehicle_registry(request: Request) -> VehicleRegistry:
    return registry_of(request.app)


RegistryDep = Annotated[VehicleRegistry, Depends(_vehicle_registry)]
# Row ids are bigint: a larger number names nothing (and must not reach the database).
RowId = Annotated[int, Path(ge=1, le=2**63 - 1)]

_ERROR: dict[str, Any] = {"description": "error", "content": {"application/json": {}}}


def _account(driver: Principal) -> int:
    assert driver.account_id is not None  # DriverDep admits only drivers
    return driver.account_id


@router.get("")
async def get_me(driver: DriverDep, conn: ConnectionDep) -> Me:
    """The account (phone in clear: it is the driver's own), its plates, agreement and debts."""
    return await service.me(conn, _account(driver))


@router.delete("", status_code=204, responses={409: _ERROR})
async def delete_me(driver: DriverDep, conn: ConnectionDep) -> None:
    """Deletes the account: 409 `settle_debts_first` while anything is owed."""
    await service.delete_account(conn, _account(driver))


@router.get("/plates")
async def list_plates(driver: DriverDep, conn: ConnectionDep) -> list[Binding]:
    return await service.plates(conn, _account(driver))


@router.post(
    "/plates",
    status_code=201,
    response_model=Binding,
    responses={409: _ERROR, 422: _ERROR, 429: _ERROR},
)
async def bind_plate(
    claim: PlateClaim,
    driver: DriverDep,
    conn: ConnectionDep,
    runtime: RuntimeDep,
    registry: RegistryDep,
) -> Binding | JSONResponse:
    """Binds a vehicle (plate, colour: a yellow 浙A12345 is another vehicle than the blue
    one) once the vehicle registry confirms the licence and owner. 422 `invalid_plate`,
    `ownership_not_proven`; 409 `already_bound`. When another account holds the vehicle and the
    registry's own record names the driver as its owner, the binding moves to the driver now
    (201); when the registry cannot tell, 409 `plate_disputed` (details.dispute_id) and the
    vehicle stays where it is until an operator decides."""
    outcome = await service.claim_plate(conn, runtime, registry, _account(driver), claim)
    if isinstance(outcome, service.PlateDisputed):
        # Answered, not raised: the dispute is committed with the request's transaction.
        return JSONResponse(
            error_body(
                "plate_disputed",
                "the plate is bound to another account; a dispute was opened",
                {"dispute_id": outcome.dispute_id},
            ),
            status_code=409,
        )
    return outcome


@router.delete("/plates/{binding_id}", status_code=204, responses={404: _ERROR})
async def unbind_plate(binding_id: RowId, driver: DriverDep, conn: ConnectionDep) -> None:
    await service.unbind_plate(conn, _account(driver), binding_id)


@router.get("/agreement", responses={404: _ERROR})
async def get_agreement(driver: DriverDep, conn: ConnectionDep) -> Agreement:
    return await service.agreement(conn, _account(driver))


@router.put("/agreement", status_code=201, responses={409: _ERROR, 422: _ERROR})
async def sign_agreement(
    body: AgreementRequest, driver: DriverDep, conn: ConnectionDep, runtime: RuntimeDep
) -> Agreement:
    """Signs a pay-later agreement with the payment provider; 409 while one is active. On
    WeChat `wechat_code` (the mini program's wx.login code) is required (422
    `wechat_code_required`); WeChat names the driver's openid for it, the agreement's number
    (422 `wechat_code_invalid` when WeChat refuses the code, 503 `wechat_unavailable` when it
    cannot answer; 409 `openid_in_use` when another account has pay-later under that openid).
    The bound plates' service states are looked up with the provider (see GET /api/v1/me)."""
    return await service.sign_agreement(conn, runtime, _account(driver), body)


@router.patch("/agreement", responses={404: _ERROR})
async def change_agreement_limit(
    body: AgreementLimit, driver: DriverDep, conn: ConnectionDep
) -> Agreement:
    return await service.set_agreement_limit(conn, _account(driver), body.per_session_limit_fen)


@router.delete("/agreement", status_code=204, responses={404: _ERROR})
async def cancel_agreement(driver: DriverDep, conn: ConnectionDep) -> None:
    """From now on exits hold with the fee and a payment QR code."""
    await service.cancel_agreement(conn, _account(driver))


@router.get("/stays")
async def list_stays(
    driver: DriverDep,
    conn: ConnectionDep,
    status: StayStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    before: StayCursor | None = None,
) -> StayPage:
    """The driver's stays, newest entry first; the next page is `before=<next_before>`."""
    return await service.stays(conn, _account(driver), status=status, before=before, limit=limit)


@router.get("/stays/{stay_id}", responses={404: _ERROR})
async def get_stay(stay_id: RowId, driver: DriverDep, conn: ConnectionDep) -> Receipt:
    """A stay's receipt: where, when, how long, the fee, how it was settled, refunds."""
    return await service.receipt(conn, _account(driver), stay_id)


@router.get(
    "/stays/{stay_id}/frames/{which}",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, 404: _ERROR},
)
async def stay_frame(
    stay_id: RowId, which: Literal["entry", "exit"], driver: DriverDep, conn: ConnectionDep
) -> Response:
    """The entry or exit frame of one of the driver's stays (their own car, as the receipt
    shows it); 404 when none was kept or it has been erased."""
    image = await service.stay_frame(conn, _account(driver), stay_id, which)
    return Response(image, media_type="image/jpeg", headers={"Cache-Control": "private, no-store"})


@router.get("/debts")
async def list_debts(driver: DriverDep, conn: ConnectionDep) -> Debts:
    return await service.debts(conn, _account(driver))


@router.post("/debts/payment", responses={409: _ERROR, 503: _ERROR})
async def pay_debts(driver: DriverDep, runtime: RuntimeDep) -> DebtPayment:
    """Starts (or returns the unpaid) payment of everything owed; 409 `no_debts`."""
    return await service.pay_debts(runtime, _account(driver))


@router.get("/notifications")
async def list_notifications(
    driver: DriverDep, conn: ConnectionDep, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> list[NotificationView]:
    return await service.notifications(conn, _account(driver), limit)


@router.get("/export")
async def export(driver: DriverDep, conn: ConnectionDep, response: Response) -> Export:
    """Everything held about the account, as one JSON file."""
    account_id = _account(driver)
    response.headers["Content-Disposition"] = (
        f'attachment; filename="parking-account-{account_id}.json"'
    )
    response.headers["Cache-Control"] = "no-store"
    return await service.export(conn, account_id)
