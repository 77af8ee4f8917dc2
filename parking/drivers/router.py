"""The driver app's API: everything under /api/v1/me is the signed-in driver's own."""

from fastapi import APIRouter

from parking.auth.principal import DriverDep
from parking.deps import ConnectionDep
from parking.drivers import service
from parking.drivers.schemas import Me

router = APIRouter(prefix="/api/v1/me", tags=["driver"])


@router.get("")
async def get_me(driver: DriverDep, conn: ConnectionDep) -> Me:
    assert driver.account_id is not None
    return await service.me(conn, driver.account_id)
