"""Refunds of (part of) a succeeded order (`POST /v1/refunds`)."""

import uuid

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from parking_dev.sandbox.errors import error, not_found
from parking_dev.sandbox.provider import Sandbox
from parking_dev.sandbox.routes.common import AmountFen, IdempotencyKey, SandboxDep
from parking_dev.sandbox.store import Refund, now_iso

router = APIRouter()


class RefundRequest(BaseModel):
    out_trade_no: str = Field(min_length=1, max_length=64)
    amount_fen: AmountFen
    reason: str = Field(default="", max_length=200)


def _refund_once(sandbox: Sandbox, refund: RefundRequest, out_refund_no: str) -> JSONResponse:
    book = sandbox.book
    existing = book.refund(out_refund_no)
    if existing is not None:
        if (existing.out_trade_no, existing.amount_fen) != (
            refund.out_trade_no,
            refund.amount_fen,
        ):
            return error(409, "idempotency_key_reused", "this key was used for a different refund")
        return JSONResponse(existing.body())
    order = book.order(refund.out_trade_no)
    if order is None:
        return not_found(f"order {refund.out_trade_no}")
    if order.status != "succeeded":
        return error(409, "order_not_refundable", f"the order is {order.status}")
    remaining_fen = order.amount_fen - order.refunded_fen
    if refund.amount_fen > remaining_fen:
        return error(
            409,
            "refund_exceeds_order",
            f"{refund.amount_fen} fen asked, {remaining_fen} fen left to refund",
        )
    made = Refund(
        refund_id=f"sbx_refund_{uuid.uuid4().hex}",
        out_refund_no=out_refund_no,
        out_trade_no=order.out_trade_no,
        amount_fen=refund.amount_fen,
        reason=refund.reason,
        status="succeeded",
        finished_at=now_iso(),
    )
    book.add_refund(made)
    sandbox.notify_refund(made, order)
    return JSONResponse(made.body())


@router.post("/v1/refunds")
async def create_refund(
    refund: RefundRequest, idempotency_key: IdempotencyKey, sandbox: SandboxDep
) -> JSONResponse:
    """Gives back part or all of a succeeded order; the key is the merchant's out_refund_no."""
    if (failure := await sandbox.fail_before_effect()) is not None:
        return failure
    response = _refund_once(sandbox, refund, idempotency_key)
    return await sandbox.fail_after_effect(response)
