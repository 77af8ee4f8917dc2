"""The operator API: staff see and change only their own company's car parks.

Attendants and admins (`OperatorDep`) read everything of their company, resolve exceptions and
open gates; changing a car park, its gates and tariffs, and refunding, is for admins
(`OperatorAdminDep`). Another company's objects are answered 404.

The routes that command a gate commit their own transaction before they publish: the
connection of `ConnectionDep` commits only after the response has been sent. The stays search
and the revenue and debt reports read from the read replica when there is one
(`ReadConnectionDep`): they may trail the primary by a moment.
"""

from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Response

from parking.auth.principal import OperatorAdminDep, OperatorDep
from parking.car_parks.schemas import CarParkCode
from parking.deps import ConnectionDep, ReadConnectionDep, RuntimeDep
from parking.operators import service
from parking.operators.schemas import (
    CODE_PATTERN,
    MAX_ID,
    AuditPage,
    CaptureConflict,
    CarParkChange,
    ChargeException,
    DebtBucket,
    Gate,
    GateOpening,
    GhostStayEnd,
    GhostStayEnded,
    Instant,
    LaneException,
    ManualOpen,
    NewGate,
    NewRefund,
    NewTariff,
    Opened,
    OperatorCarPark,
    OutboxJob,
    Refund,
    RefundLine,
    Resolution,
    Resolved,
    RevenueLine,
    Stay,
    TariffVersion,
)

router = APIRouter(prefix="/api/v1/operator", tags=["operator"])

GateCode = Annotated[str, Path(pattern=CODE_PATTERN)]
CarParkFilter = Annotated[str | None, Query(pattern=CODE_PATTERN, description="a car park's code")]
Id = Annotated[int, Path(ge=1, le=MAX_ID)]
From = Annotated[
    date | None, Query(alias="from", description="first local day (default: 29 days before 'to')")
]
To = Annotated[date | None, Query(alias="to", description="last local day (default: today)")]


@router.get("/car-parks")
async def list_car_parks(
    operator: OperatorDep, conn: ConnectionDep, runtime: RuntimeDep
) -> list[OperatorCarPark]:
    """The company's car parks with their live occupancy."""
    return await service.list_car_parks(conn, runtime.occupancy, operator)


@router.get("/car-parks/{code}")
async def get_car_park(
    code: CarParkCode, operator: OperatorDep, conn: ConnectionDep, runtime: RuntimeDep
) -> OperatorCarPark:
    return await service.get_car_park(conn, runtime.occupancy, operator, code)


@router.patch("/car-parks/{code}")
async def update_car_park(
    code: CarParkCode,
    change: CarParkChange,
    admin: OperatorAdminDep,
    conn: ConnectionDep,
    runtime: RuntimeDep,
) -> OperatorCarPark:
    """Renames a car park or changes its capacity (admins)."""
    return await service.update_car_park(conn, runtime.occupancy, admin, code, change)


@router.get("/car-parks/{code}/gates")
async def list_gates(code: CarParkCode, operator: OperatorDep, conn: ConnectionDep) -> list[Gate]:
    return await service.list_gates(conn, operator, code)


@router.post("/car-parks/{code}/gates", status_code=201)
async def add_gate(
    code: CarParkCode, new: NewGate, admin: OperatorAdminDep, conn: ConnectionDep
) -> Gate:
    """Adds a gate (admins); 409 `gate_exists` when the code is taken."""
    return await service.add_gate(conn, admin, code, new)


@router.get("/car-parks/{code}/tariffs")
async def list_tariffs(
    code: CarParkCode, operator: OperatorDep, conn: ConnectionDep
) -> list[TariffVersion]:
    """Tariff versions, newest first; a stay is priced by the version in force when it began."""
    return await service.list_tariffs(conn, operator, code)


@router.post(
    "/car-parks/{code}/tariffs",
    status_code=201,
    responses={
        201: {
            "description": "The new version. Exit lanes cache a car park's tariffs for up to "
            "60 s: until their cache expires they price with the versions they already had."
        }
    },
)
async def add_tariff(
    code: CarParkCode, new: NewTariff, admin: OperatorAdminDep, conn: ConnectionDep
) -> TariffVersion:
    """Adds a tariff version (admins). `rules` is a `billing.tariff.Tariff` (422
    `invalid_tariff` with the validation errors in `details`). `effective_from` may not lie
    more than a minute in the past (422 `effective_from_in_past`): that would change the price
    of stays already begun. The exit lanes read tariffs at most once a minute, so a version
    that starts within the next minute may apply up to 60 s late."""
    return await service.add_tariff(conn, admin, code, new, datetime.now(UTC))


@router.get("/stays")
async def list_stays(
    operator: OperatorDep,
    conn: ReadConnectionDep,
    car_park: CarParkFilter = None,
    plate: Annotated[str | None, Query(description="the exact plate", max_length=32)] = None,
    entered_from: Annotated[Instant | None, Query(alias="from")] = None,
    entered_to: Annotated[Instant | None, Query(alias="to")] = None,
    status: Literal["open", "closed"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[Stay]:
    """Stays at the company's car parks by entry time, newest first (plates masked). `from`
    is inclusive, `to` exclusive."""
    return await service.list_stays(
        conn,
        operator,
        car_park=car_park,
        plate=plate,
        entered_from=entered_from,
        entered_to=entered_to,
        status=status,
        limit=limit,
    )


@router.get("/exceptions")
async def list_exceptions(
    operator: OperatorDep,
    conn: ConnectionDep,
    car_park: CarParkFilter = None,
    status: Literal["open", "resolved"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[LaneException]:
    """The exception queue: captures the lane held for a person, newest first."""
    return await service.list_exceptions(
        conn, operator, car_park=car_park, status=status, limit=limit
    )


@router.get("/capture-conflicts")
async def list_capture_conflicts(
    operator: OperatorDep,
    conn: ConnectionDep,
    car_park: CarParkFilter = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[CaptureConflict]:
    """Resends that said something else than the capture stored under their id: each was
    answered with the stored decision and never decided; newest first."""
    return await service.list_capture_conflicts(conn, operator, car_park=car_park, limit=limit)


@router.get("/gate-events")
async def list_gate_events(
    operator: OperatorDep,
    conn: ConnectionDep,
    car_park: CarParkFilter = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[GateOpening]:
    """Barriers lifted without a signed command of ours (the booth's button), as the gates
    reported them; newest first."""
    return await service.list_gate_openings(conn, operator, car_park=car_park, limit=limit)


@router.get("/audit-log")
async def audit_log(
    admin: OperatorAdminDep,
    conn: ConnectionDep,
    before: Annotated[int | None, Query(ge=1, le=MAX_ID, description="older than this id")] = None,
    action: Annotated[
        str | None, Query(pattern=r"^[a-z_]+\.[a-z_]+$", description="e.g. charge.confirmed")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> AuditPage:
    """What the company's staff did (confirmed, refunded, resolved, opened, decided...),
    newest first, `limit` a page; `next_before` asks for the next page. Admins."""
    return await service.audit_log(conn, admin, before=before, action=action, limit=limit)


@router.get(
    "/exceptions/{exception_id}/image",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}},
)
async def exception_image(exception_id: Id, operator: OperatorDep, conn: ConnectionDep) -> Response:
    """The capture's frame; 404 when there was none or it has been erased."""
    image = await service.exception_image(conn, operator, exception_id)
    return Response(image, media_type="image/jpeg", headers={"Cache-Control": "private, no-store"})


@router.post("/exceptions/{exception_id}/resolve")
async def resolve_exception(
    exception_id: Id, resolution: Resolution, operator: OperatorDep, runtime: RuntimeDep
) -> Resolved:
    """The attendant chooses or types the plate and names its colour (a green plate's eight
    characters may leave it out): the held capture is decided again with that vehicle
    and the gate gets the new command (not for a rejected charge's exit: that car left long
    ago, `gate_commanded` false). Naming its own vehicle on a rejected exit its stay's
    vehicle entered again after ends the stay it is parked on. 409 `already_resolved`; 409
    `no_open_stay` when no car with that plate is parked there (check the plate, or open the
    gate by hand); 409 `stay_ended` for a ghost stay's exception once the stay has ended."""
    async with runtime.pool.acquire() as conn, conn.transaction():
        resolved, effect = await service.resolve_exception(
            conn,
            runtime.lanes.service,
            operator,
            exception_id,
            resolution.identity,
            datetime.now(UTC),
        )
    await service.apply(runtime, effect)
    return resolved


@router.post("/exceptions/{exception_id}/end-stay")
async def end_ghost_stay(
    exception_id: Id, request: GhostStayEnd, operator: OperatorDep, runtime: RuntimeDep
) -> GhostStayEnded:
    """Ends a ghost stay's stay, for the reason given (audit-logged `stay.ended`): its car
    left at a time nobody knows. It closes with settlement 'operator', no fee, nobody charged;
    the car is counted out and the exception resolved; no gate is commanded. 409
    `not_a_ghost_stay` for another exception, 409 `stay_ended` once the stay has ended."""
    async with runtime.pool.acquire() as conn, conn.transaction():
        ended, effect = await service.end_ghost_stay(
            conn, operator, exception_id, request, datetime.now(UTC)
        )
    await service.apply(runtime, effect)
    return ended


@router.post("/car-parks/{code}/gates/{gate}/open")
async def open_gate(
    code: CarParkCode,
    gate: GateCode,
    request: ManualOpen,
    operator: OperatorDep,
    runtime: RuntimeDep,
) -> Opened:
    """Opens a gate by hand, for the reason given (audit-logged). With the `capture_id` of a
    held exit, its stay is closed with settlement 'operator': the fee is recorded, not
    charged. 409 `stay_ended` with the capture of a ghost stay that has ended since."""
    async with runtime.pool.acquire() as conn, conn.transaction():
        opened, effect = await service.open_gate(
            conn,
            operator,
            code,
            gate,
            request,
            command_ttl=timedelta(seconds=runtime.settings.command_ttl_s),
            now=datetime.now(UTC),
        )
    await service.apply(runtime, effect)
    return opened


@router.get("/charge-exceptions")
async def list_charge_exceptions(
    operator: OperatorDep,
    conn: ConnectionDep,
    car_park: CarParkFilter = None,
    status: Literal["open", "retried", "resolved"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[ChargeException]:
    """Charges the payment provider refused for the car park's own reason (a bad request, an
    over-long field, credentials, an unknown agreement or order, a conflicting key), newest
    first. They are not the driver's debt: the charge stays pending until retried."""
    return await service.list_charge_exceptions(
        conn, operator, car_park=car_park, status=status, limit=limit
    )


@router.post("/charge-exceptions/{charge_exception_id}/retry")
async def retry_charge_exception(
    charge_exception_id: Id, admin: OperatorAdminDep, conn: ConnectionDep
) -> ChargeException:
    """Sends the charge again once its cause is fixed (admins); audit-logged. 409
    `already_handled` when it is no longer open."""
    return await service.retry_charge_exception(conn, admin, charge_exception_id)


@router.post("/charges/{charge_id}/refunds", status_code=201)
async def refund_charge(
    charge_id: Id, request: NewRefund, admin: OperatorAdminDep, conn: ConnectionDep
) -> Refund:
    """Refunds (part of) a collected charge (admins); the provider is asked by the outbox
    worker. 409 `refund_not_allowed` when the charge was not collected or too much is asked."""
    return await service.refund_charge(conn, admin, charge_id, request)


@router.get("/refunds")
async def list_refunds(
    operator: OperatorDep,
    conn: ConnectionDep,
    runtime: RuntimeDep,
    start: From = None,
    end: To = None,
) -> list[RefundLine]:
    timezone = runtime.settings.timezone
    first, last = service.period(start, end, timezone)
    return await service.list_refunds(conn, operator, first, last, timezone)


@router.get(
    "/reports/revenue",
    response_model=list[RevenueLine],
    responses={200: {"content": {"text/csv": {}}}},
)
async def revenue_report(
    operator: OperatorDep,
    conn: ReadConnectionDep,
    runtime: RuntimeDep,
    start: From = None,
    end: To = None,
    output: Annotated[Literal["json", "csv"], Query(alias="format")] = "json",
) -> Response | list[dict[str, object]]:
    """Revenue per car park and local day: pay-later fees, fees paid at the gate, refunds,
    net. `format=csv` answers a CSV attachment."""
    timezone = runtime.settings.timezone
    first, last = service.period(start, end, timezone)
    rows = await service.revenue(conn, operator, first, last, timezone)
    if output == "json":
        return rows
    return Response(
        service.revenue_csv(rows),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="revenue-{first}-{last}.csv"'},
    )


@router.get("/reports/debts")
async def debts_report(operator: OperatorDep, conn: ReadConnectionDep) -> list[DebtBucket]:
    """Open debts of stays at the company's car parks, by age in days."""
    return await service.debts_by_age(conn, operator, datetime.now(UTC))


@router.get("/jobs")
async def list_jobs(
    operator: OperatorDep,
    conn: ConnectionDep,
    car_park: CarParkFilter = None,
    state: Literal["stuck", "dead"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[OutboxJob]:
    """Charges, refunds, gate commands and feed deliveries (webhooks, the city platform) of the
    company's car parks that need a person, oldest
    first: `dead` (every attempt failed; never tried again unless retried) and `stuck` (not
    done 15 minutes after it was due, or tried 5 times). A dead charge is not a debt."""
    return await service.list_jobs(
        conn, operator, car_park=car_park, state=state, limit=limit, now=datetime.now(UTC)
    )


@router.post("/jobs/{job_id}/retry")
async def retry_job(job_id: Id, admin: OperatorAdminDep, conn: ConnectionDep) -> OutboxJob:
    """Makes a dead job due now with its attempts afresh (admins; audit-logged). 409
    `job_not_dead` when it is not dead."""
    return await service.retry_job(conn, admin, job_id, datetime.now(UTC))
