"""Deductions under a pay-later agreement (`POST /v1/charges`) and the order query."""

import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from parking_dev.sandbox.errors import error, not_found
from parking_dev.sandbox.routes.common import (
    AmountFen,
    IdempotencyKey,
    NotifyUrl,
    SandboxDep,
    base_url,
)
from parking_dev.sandbox.store import Order, now_iso

router = APIRouter()


class ChargeRequest(BaseModel):
    agreement_no: str = Field(min_length=1, max_length=64)
    amount_fen: AmountFen
    description: str = Field(default="", max_length=200)
    notify_url: NotifyUrl


@router.post("/v1/charges")
async def create_charge(
    charge: ChargeRequest, idempotency_key: IdempotencyKey, request: Request, sandbox: SandboxDep
) -> JSONResponse:
    """A deduction under a pay-later agreement, finished asynchronously."""
    if (failure := await sandbox.fail_before_effect()) is not None:
        return failure
    book = sandbox.book
    order = book.order(idempotency_key)
    if order is None and charge.agreement_no in sandbox.faults.unknown_agreements:
        return error(404, "agreement_not_found", f"no agreement {charge.agreement_no}")
    if order is None and charge.agreement_no in sandbox.faults.paused_agreements:
        return error(403, "agreement_paused", "the user paused the pay-later service")
    if order is None:
        order = Order(
            order_id=f"sbx_{uuid.uuid4().hex}",
            out_trade_no=idempotency_key,
            kind="charge",
            agreement_no=charge.agreement_no,
            amount_fen=charge.amount_fen,
            description=charge.description,
            status="processing",
            reason=None,
            created_at=now_iso(),
            finished_at=None,
            refunded_fen=0,
            notify_url=charge.notify_url,
            voided=False,
        )
        book.add_order(order)
        order = sandbox.finish_charge(order)
    elif (order.kind, order.agreement_no, order.amount_fen) != (
        "charge",
        charge.agreement_no,
        charge.amount_fen,
    ):
        return await sandbox.fail_after_effect(
            error(409, "idempotency_key_reused", "this key was used for a different order")
        )
    status_code = 202 if order.status == "processing" else 200
    response = JSONResponse(order.body(base_url(request)), status_code=status_code)
    return await sandbox.fail_after_effect(response)


@router.get("/v1/orders/{out_trade_no}")
async def query_order(out_trade_no: str, request: Request, sandbox: SandboxDep) -> JSONResponse:
    """The order query merchants use when a notification is missing."""
    if sandbox.chance(sandbox.faults.error_rate):
        return error(503, "service_unavailable", "injected error")
    order = sandbox.book.order(out_trade_no)
    if order is None:
        return not_found(f"order {out_trade_no}")
    return JSONResponse(order.body(base_url(request)))
