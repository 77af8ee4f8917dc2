"""The company's city platform feed (operator routes). APDS webhook subscriptions are served
with the APDS routes (`parking.apds.router`, /apds/v4/webhooks)."""

from fastapi import APIRouter, Response

from parking.auth.principal import OperatorAdminDep, OperatorDep
from parking.deps import ConnectionDep, RuntimeDep
from parking.feeds import service
from parking.feeds.schemas import CityPlatform, CityPlatformChange

router = APIRouter(prefix="/api/v1/operator/city-platform", tags=["operator"])


@router.get("")
async def get_city_platform(operator: OperatorDep, conn: ConnectionDep) -> CityPlatform | None:
    """Where the company's entries, exits and free spaces are pushed (null: nowhere)."""
    return await service.city_platform(conn, operator)


@router.put("")
async def set_city_platform(
    change: CityPlatformChange, admin: OperatorAdminDep, conn: ConnectionDep, runtime: RuntimeDep
) -> CityPlatform:
    """Pushes every entry, exit and change of free spaces of the company's car parks to the
    endpoint, each a JSON POST signed with the key (admins; audit-logged). An endpoint that
    is or resolves to a loopback, private, link-local, multicast or unspecified address is
    refused (422 endpoint_refused)."""
    return await service.set_city_platform(conn, admin, change, runtime.settings)


@router.delete("", status_code=204)
async def remove_city_platform(admin: OperatorAdminDep, conn: ConnectionDep) -> Response:
    await service.remove_city_platform(conn, admin)
    return Response(status_code=204)
