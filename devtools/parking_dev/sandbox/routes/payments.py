"""Orders a driver pays by scanning a QR code: the merchant creates (`POST /v1/payments`) and
withdraws them; the driver's side is in `payer`."""

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


class PaymentRequest(BaseModel):
    amount_fen: AmountFen
    description: str = Field(default="", max_length=200)
    notify_url: NotifyUrl


@router.post("/v1/payments")
async def create_payment(
    payment: PaymentRequest, idempotency_key: IdempotencyKey, request: Request, sandbox: SandboxDep
) -> JSONResponse:
    """An order the driver pays by scanning a QR code (the pay_url) in a wallet app."""
    if (failure := await sandbox.fail_before_effect()) is not None:
        return failure
    book = sandbox.book
    order = book.order(idempotency_key)
    if order is None:
        order = Order(
            order_id=f"sbx_{uuid.uuid4().hex}",
            out_trade_no=idempotency_key,
            kind="payment",
            agreement_no=None,
            amount_fen=payment.amount_fen,
            description=payment.description,
            status="pending_payment",
            reason=None,
            created_at=now_iso(),
            finished_at=None,
            refunded_fen=0,
            notify_url=payment.notify_url,
            voided=False,
        )
        book.add_order(order)
        response = JSONResponse(order.body(base_url(request)), status_code=201)
    elif (order.kind, order.amount_fen) != ("payment", payment.amount_fen):
        response = error(409, "idempotency_key_reused", "this key was used for a different order")
    else:
        response = JSONResponse(order.body(base_url(request)))
    return await sandbox.fail_after_effect(response)


@router.post("/v1/payments/{out_trade_no}/close")
async def close_payment(out_trade_no: str, request: Request, sandbox: SandboxDep) -> JSONResponse:
    """The merchant withdraws an unpaid payment, so it can no longer be paid."""
    book = sandbox.book
    order = book.order(out_trade_no)
    if order is None or order.kind != "payment":
        return not_found(f"payment {out_trade_no}")
    if order.status == "succeeded":
        return error(409, "order_paid", "the payment was already paid")
    if order.status == "pending_payment":
        order = book.finish(out_trade_no, "closed", None)
    return JSONResponse(order.body(base_url(request)))
