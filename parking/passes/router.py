"""Passes: the company's offers (admins create, staff read, with the revenue report) and the
driver's side (a car park's offers, buying one, their passes)."""

from typing import Annotated

from fastapi import APIRouter, Query

from parking.auth.principal import DriverDep, OperatorAdminDep, OperatorDep
from parking.car_parks.schemas import CODE_PATTERN
from parking.deps import ConnectionDep, RuntimeDep
from parking.passes import service
from parking.passes.schemas import (
    NewPassOffer,
    NewPassPurchase,
    PassOffer,
    PassPurchase,
    PassRevenue,
)

operator_router = APIRouter(prefix="/api/v1/operator", tags=["operator", "passes"])
driver_router = APIRouter(prefix="/api/v1/me", tags=["driver", "passes"])


@operator_router.post("/pass-offers", status_code=201)
async def create_pass_offer(
    request: NewPassOffer, operator: OperatorAdminDep, conn: ConnectionDep
) -> PassOffer:
    """A right specification sold to drivers in the app, for a period at a price."""
    return await service.create_offer(conn, operator, request)


@operator_router.get("/pass-offers")
async def list_pass_offers(operator: OperatorDep, conn: ConnectionDep) -> list[PassOffer]:
    return await service.list_offers(conn, operator)


@operator_router.get("/reports/pass-revenue")
async def pass_revenue(operator: OperatorDep, conn: ConnectionDep) -> list[PassRevenue]:
    """Per offer: passes paid for, and how much of it is earned (revenue) or still deferred."""
    return await service.revenue(conn, operator)


@driver_router.get("/pass-offers")
async def pass_offers(
    driver: DriverDep,
    conn: ConnectionDep,
    car_park: Annotated[str, Query(pattern=CODE_PATTERN)],
) -> list[PassOffer]:
    return await service.offers_at(conn, car_park)


@driver_router.post("/passes", status_code=201)
async def buy_pass(
    request: NewPassPurchase, driver: DriverDep, runtime: RuntimeDep
) -> PassPurchase:
    """Buys (or renews) a pass for one of the driver's bound vehicles: pay at `pay_url`."""
    assert driver.account_id is not None
    return await service.buy(runtime, driver.account_id, request)


@driver_router.get("/passes")
async def my_passes(driver: DriverDep, conn: ConnectionDep) -> list[PassPurchase]:
    assert driver.account_id is not None
    return await service.my_passes(conn, driver.account_id)
