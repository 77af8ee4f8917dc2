"""Operator routes of rights and blacklists: staff of the company read them, admins change them
(every change audit-logged)."""

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from gate_controller.protocol import PlateColor
from parking.auth.principal import OperatorAdminDep, OperatorDep
from parking.deps import ConnectionDep
from parking.errors import AppError
from parking.operators.schemas import MAX_ID
from parking.rights import service
from parking.rights.schemas import (
    BlacklistEntry,
    ImportReport,
    NewBlacklistEntry,
    NewRight,
    NewRightSpec,
    PassOccupancy,
    Renewal,
    Right,
    RightSpec,
    RightStatus,
    plate_of,
)

router = APIRouter(prefix="/api/v1/operator", tags=["operator", "rights"])
RightId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.post("/right-specs", status_code=201)
async def create_right_spec(
    request: NewRightSpec, operator: OperatorAdminDep, conn: ConnectionDep
) -> RightSpec:
    """What (free passage, free minutes, a discount, a flat fee), where (car parks; none: all
    of the company's) and when (weekdays, an hours window that may cross midnight)."""
    return await service.create_spec(conn, operator, request)


@router.get("/right-specs")
async def list_right_specs(operator: OperatorDep, conn: ConnectionDep) -> list[RightSpec]:
    return await service.list_specs(conn, operator)


@router.post("/rights", status_code=201)
async def create_right(request: NewRight, operator: OperatorAdminDep, conn: ConnectionDep) -> Right:
    """A specification given to vehicles (plate, colour) for a period, with how many of them
    may be inside at once."""
    return await service.create_right(conn, operator, request)


@router.get("/rights")
async def list_rights(
    operator: OperatorDep,
    conn: ConnectionDep,
    status: RightStatus | None = None,
    plate: Annotated[str | None, Query(min_length=1, max_length=20)] = None,
    color: PlateColor | None = None,
    after_id: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[Right]:
    """The company's rights by id (page with `after_id`), optionally of one status, or of one
    vehicle: `plate` and `color` (a blue and a yellow 浙A12345 are two vehicles; without
    `color`, the rights of the characters in any colour)."""
    if plate is not None:
        try:
            plate = plate_of(plate, color)
        except ValueError as exc:
            raise AppError(422, "invalid_request", str(exc)) from exc
    return await service.list_rights(
        conn, operator, status=status, plate=plate, color=color, after_id=after_id, limit=limit
    )


@router.post("/rights/import")
async def import_rights(
    request: Request, operator: OperatorAdminDep, conn: ConnectionDep
) -> ImportReport:
    """A CSV (UTF-8, header `spec,plates,valid_from,valid_until,max_inside,label`): the good rows
    are imported, each bad one reported with its line and why."""
    return await service.import_csv(conn, operator, await request.body())


@router.post("/rights/{right_id}/renew")
async def renew_right(
    right_id: RightId, request: Renewal, operator: OperatorAdminDep, conn: ConnectionDep
) -> Right:
    return await service.renew(conn, operator, right_id, request)


@router.post("/rights/{right_id}/suspend")
async def suspend_right(
    right_id: RightId, operator: OperatorAdminDep, conn: ConnectionDep
) -> Right:
    return await service.change_status(conn, operator, right_id, "suspend")


@router.post("/rights/{right_id}/resume")
async def resume_right(right_id: RightId, operator: OperatorAdminDep, conn: ConnectionDep) -> Right:
    return await service.change_status(conn, operator, right_id, "resume")


@router.post("/rights/{right_id}/cancel")
async def cancel_right(right_id: RightId, operator: OperatorAdminDep, conn: ConnectionDep) -> Right:
    return await service.change_status(conn, operator, right_id, "cancel")


@router.get("/reports/pass-occupancy")
async def pass_occupancy(operator: OperatorDep, conn: ConnectionDep) -> list[PassOccupancy]:
    """Per car park: the cars inside now holding a place of a pass or whitelist, and the
    visitors (a pass's vehicle beyond its "at most N inside" is a visitor)."""
    return await service.pass_occupancy(conn, operator)


@router.get("/blacklist")
async def list_blacklist(
    operator: OperatorDep,
    conn: ConnectionDep,
    include_removed: bool = False,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[BlacklistEntry]:
    return await service.list_blacklist(
        conn, operator, include_removed=include_removed, limit=limit
    )


@router.post("/blacklist", status_code=201)
async def add_to_blacklist(
    request: NewBlacklistEntry, operator: OperatorAdminDep, conn: ConnectionDep
) -> BlacklistEntry:
    """The vehicle is held at the company's gates, entry and exit, with this reason shown to
    the attendant (an exception in the queue and the dashboard's feed)."""
    return await service.add_to_blacklist(conn, operator, request)


@router.delete("/blacklist/{blacklist_id}")
async def remove_from_blacklist(
    blacklist_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    operator: OperatorAdminDep,
    conn: ConnectionDep,
) -> BlacklistEntry:
    return await service.remove_from_blacklist(conn, operator, blacklist_id)
