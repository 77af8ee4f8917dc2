"""Merchants: the company's admins create them (with a budget and a sign-in) and staff read
their report; a merchant's staff validate visitors' stays and see their own budget."""

import asyncio
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from parking.auth.principal import MerchantDep, OperatorAdminDep, OperatorDep
from parking.auth.tokens import hash_password
from parking.deps import ConnectionDep, RuntimeDep
from parking.errors import AppError
from parking.merchants import service
from parking.merchants.schemas import (
    BudgetTopUp,
    Merchant,
    MerchantReport,
    NewMerchant,
    NewValidation,
    Validation,
)
from parking.operators.schemas import MAX_ID
from parking.rights.service import LOCAL_ZONE

operator_router = APIRouter(prefix="/api/v1/operator", tags=["operator", "merchants"])
merchant_router = APIRouter(prefix="/api/v1/merchant", tags=["merchant"])
MerchantId = Annotated[int, Path(ge=1, le=MAX_ID)]


@operator_router.post("/merchants", status_code=201)
async def create_merchant(
    request: NewMerchant, operator: OperatorAdminDep, runtime: RuntimeDep
) -> Merchant:
    """A merchant (a shop in the company's car parks) with a budget for validations and its
    sign-in (role 'merchant', which can do nothing else)."""
    # scrypt off the event loop, before a connection is taken.
    password_hash = await asyncio.to_thread(hash_password, request.user.password)
    async with runtime.pool.acquire() as conn, conn.transaction():
        return await service.create(conn, operator, request, password_hash)


@operator_router.get("/merchants")
async def list_merchants(operator: OperatorDep, conn: ConnectionDep) -> list[Merchant]:
    return await service.list_merchants(conn, operator)


@operator_router.post("/merchants/{merchant_id}/budget")
async def add_budget(
    merchant_id: MerchantId, request: BudgetTopUp, operator: OperatorAdminDep, conn: ConnectionDep
) -> Merchant:
    return await service.top_up(conn, operator, merchant_id, request.add_fen)


@operator_router.get("/reports/validations")
async def validations_report(
    operator: OperatorDep,
    conn: ConnectionDep,
    first: Annotated[date | None, Query(alias="from")] = None,
    last: Annotated[date | None, Query(alias="to")] = None,
) -> list[MerchantReport]:
    """Validations per merchant of the local days [from, to] (default: the last 30 days), with
    their cost and each merchant's budget."""
    today = datetime.now(UTC).astimezone(LOCAL_ZONE).date()
    last = last or today
    first = first or last - timedelta(days=29)
    if first > last or (last - first).days > 366:
        raise AppError(422, "invalid_request", "from must be at most 366 days before to")
    since = datetime.combine(first, time(0), tzinfo=LOCAL_ZONE)
    until = datetime.combine(last + timedelta(days=1), time(0), tzinfo=LOCAL_ZONE)
    return await service.report(conn, operator, since, until)


@merchant_router.get("")
async def my_merchant(merchant: MerchantDep, conn: ConnectionDep) -> Merchant:
    """The merchant's budget: granted, spent, remaining."""
    return await service.me(conn, merchant)


@merchant_router.post("/validations", status_code=201)
async def validate_stay(
    request: NewValidation, merchant: MerchantDep, conn: ConnectionDep, response: Response
) -> Validation:
    """Validates the vehicle's stay in the car park before it leaves: free minutes or an
    amount off its fee, once (the same request again answers 200 with the same validation)."""
    validation, created = await service.validate(conn, merchant, request)
    if not created:
        response.status_code = 200
    return validation


@merchant_router.get("/validations")
async def my_validations(
    merchant: MerchantDep,
    conn: ConnectionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[Validation]:
    return await service.list_validations(conn, merchant, limit=limit)
