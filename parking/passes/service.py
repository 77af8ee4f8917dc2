"""Passes sold in the app: the company's offers, a driver's purchase through the payment
provider (booked when paid by billing/passes.py: deferred revenue and the pass's right), and the
pass revenue report."""

import asyncpg

from billing import audit, payments
from parking.auth.principal import Principal
from parking.errors import AppError, NotFound
from parking.passes import repository as repo
from parking.passes.schemas import (
    NewPassOffer,
    NewPassPurchase,
    PassOffer,
    PassPurchase,
    PassRevenue,
)
from parking.payments.service import open_at_provider
from parking.rights.service import company_of
from parking.runtime import Runtime


async def create_offer(
    conn: asyncpg.Connection, principal: Principal, request: NewPassOffer
) -> PassOffer:
    operator_id = company_of(principal)
    offer_id = await repo.insert_offer(
        conn,
        operator_id=operator_id,
        spec_id=request.spec_id,
        car_park_code=request.car_park,
        name=request.name,
        price_fen=request.price_fen,
        period_days=request.period_days,
        created_by=principal.actor,
    )
    if offer_id is None:
        raise NotFound("right_spec_or_car_park")
    await audit.record(
        conn, principal.actor, "pass_offer.created", f"pass_offer:{offer_id}", request.model_dump()
    )
    row = await repo.active_offer(conn, offer_id)
    assert row is not None
    return PassOffer(**{k: v for k, v in row.items() if k != "car_park_id"})


async def list_offers(conn: asyncpg.Connection, principal: Principal) -> list[PassOffer]:
    rows = await repo.offers(conn, operator_id=company_of(principal))
    return [PassOffer(**dict(r)) for r in rows]


async def offers_at(conn: asyncpg.Connection, car_park_code: str) -> list[PassOffer]:
    return [PassOffer(**dict(r)) for r in await repo.offers(conn, car_park_code=car_park_code)]


async def buy(runtime: Runtime, account_id: int, request: NewPassPurchase) -> PassPurchase:
    """A payment for the pass at the provider; the pass starts when it is paid (or when the
    vehicle's pass of this offer ends: a renewal)."""
    async with runtime.pool.acquire() as conn, conn.transaction():
        offer = await repo.active_offer(conn, request.offer_id)
        if offer is None:
            raise NotFound("pass_offer")
        if not await repo.bound(conn, account_id, request.plate, request.color):
            raise AppError(409, "plate_not_bound", "bind the plate to your account first")
        payment = await payments.create(
            conn,
            provider=runtime.provider.name,
            purpose="pass",
            account_id=account_id,
            session_id=None,
            capture=None,
            stay_fee_fen=0,
            owed=[],
            pass_fen=offer["price_fen"],
        )
        purchase_id = await repo.insert_purchase(
            conn,
            offer_id=offer["id"],
            account_id=account_id,
            plate=request.plate,
            color=request.color,
            payment_id=payment.id,
            car_park_id=offer["car_park_id"],
            amount_fen=offer["price_fen"],
        )
    await open_at_provider(runtime, payment, f"pass {offer['name']}")
    async with runtime.pool.acquire() as conn:
        row = await repo.purchase(conn, purchase_id)
    assert row is not None
    return PassPurchase(**dict(row))


async def my_passes(conn: asyncpg.Connection, account_id: int) -> list[PassPurchase]:
    return [PassPurchase(**dict(r)) for r in await repo.purchases(conn, account_id)]


async def revenue(conn: asyncpg.Connection, principal: Principal) -> list[PassRevenue]:
    return [PassRevenue(**dict(r)) for r in await repo.revenue(conn, company_of(principal))]
