"""Sandbox-only administration (`/_sandbox/…`): make the provider's books disagree with the
merchant's for reconciliation tests, inspect notifications, change the faults at runtime."""

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, Field, TypeAdapter, ValidationError

from parking_dev.sandbox.errors import error, not_found
from parking_dev.sandbox.faults import FAULT_FIELDS, FaultConfig
from parking_dev.sandbox.routes.common import KEY_PATTERN, AmountFen, SandboxDep, base_url
from parking_dev.sandbox.store import Order, OrderKind, now_iso, utc_iso

router = APIRouter(prefix="/_sandbox")


class ExtraOrderRequest(BaseModel):
    """A succeeded order the merchant never asked for, as found in a real provider's books."""

    out_trade_no: str = Field(min_length=1, max_length=64, pattern=KEY_PATTERN)
    amount_fen: AmountFen
    kind: OrderKind = "charge"
    agreement_no: str | None = Field(default=None, max_length=64)
    description: str = Field(default="", max_length=200)
    finished_at: AwareDatetime | None = None  # default now; lets a test pick the statement day


class AmountChange(BaseModel):
    amount_fen: AmountFen


@router.post("/orders")
async def add_extra_order(
    extra: ExtraOrderRequest, request: Request, sandbox: SandboxDep
) -> JSONResponse:
    """Money the provider took that the merchant never asked for."""
    book = sandbox.book
    if book.order(extra.out_trade_no) is not None:
        return error(409, "order_exists", f"order {extra.out_trade_no} exists")
    finished_at = utc_iso(extra.finished_at) if extra.finished_at else now_iso()
    order = Order(
        order_id=f"sbx_{uuid.uuid4().hex}",
        out_trade_no=extra.out_trade_no,
        kind=extra.kind,
        agreement_no=extra.agreement_no,
        amount_fen=extra.amount_fen,
        description=extra.description,
        status="succeeded",
        reason=None,
        created_at=finished_at,
        finished_at=finished_at,
        refunded_fen=0,
        notify_url=None,
        voided=False,
    )
    book.add_order(order)
    return JSONResponse(order.body(base_url(request)), status_code=201)


@router.post("/orders/{out_trade_no}/amount")
async def change_amount(
    out_trade_no: str, change: AmountChange, request: Request, sandbox: SandboxDep
) -> JSONResponse:
    """The provider recorded another amount than the merchant asked for."""
    book = sandbox.book
    if book.order(out_trade_no) is None:
        return not_found(f"order {out_trade_no}")
    order = book.set_amount(out_trade_no, change.amount_fen)
    return JSONResponse(order.body(base_url(request)))


@router.post("/orders/{out_trade_no}/succeed")
async def succeed_late(out_trade_no: str, request: Request, sandbox: SandboxDep) -> JSONResponse:
    """Late news: a declined (or still processing) charge collected after all; the merchant
    hears of it by notification or order query like any outcome."""
    book = sandbox.book
    order = book.order(out_trade_no)
    if order is None or order.kind != "charge":
        return not_found(f"charge {out_trade_no}")
    if order.status != "succeeded":
        order = book.finish(out_trade_no, "succeeded", None)
        sandbox.notify_order(order)
    return JSONResponse(order.body(base_url(request)))


@router.post("/orders/{out_trade_no}/void")
async def void_order(out_trade_no: str, request: Request, sandbox: SandboxDep) -> JSONResponse:
    """The order stays queryable but is missing from the statement files."""
    book = sandbox.book
    if book.order(out_trade_no) is None:
        return not_found(f"order {out_trade_no}")
    order = book.void(out_trade_no)
    return JSONResponse(order.body(base_url(request)))


@router.get("/notifications")
async def list_notifications(sandbox: SandboxDep, out_trade_no: str | None = None) -> JSONResponse:
    """Every notification produced, oldest first, with how its delivery went."""
    return JSONResponse(
        [
            event.to_json()
            for event in sandbox.notifications
            if out_trade_no is None or event.out_trade_no == out_trade_no
        ]
    )


@router.post("/faults")
async def replace_faults(
    config: Annotated[dict[str, Any], Body()], sandbox: SandboxDep
) -> JSONResponse:
    """Replaces the whole fault config; fields left out take their defaults."""
    unknown = sorted(set(config) - FAULT_FIELDS)
    if unknown:
        return error(400, "invalid_request", f"unknown fault fields: {', '.join(unknown)}")
    try:
        faults = TypeAdapter(FaultConfig).validate_python(config)
    except ValidationError as exc:
        return error(400, "invalid_request", str(exc))
    sandbox.replace_faults(faults)
    return JSONResponse(faults.to_json())
