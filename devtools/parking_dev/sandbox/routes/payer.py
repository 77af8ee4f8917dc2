"""The driver's wallet app: the page a payment's QR code opens, and paying it."""

import html

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse

from parking_dev.sandbox.errors import error, not_found
from parking_dev.sandbox.routes.common import SandboxDep, base_url

router = APIRouter()


def _yuan(fen: int) -> str:
    return f"¥{fen // 100}.{fen % 100:02d}"


@router.post("/v1/payments/{out_trade_no}/pay")
async def pay(out_trade_no: str, request: Request, sandbox: SandboxDep) -> JSONResponse:
    """The driver completes the payment in the wallet app."""
    book = sandbox.book
    order = book.order(out_trade_no)
    if order is None or order.kind != "payment":
        return not_found(f"payment {out_trade_no}")
    if order.status == "closed":
        return error(409, "order_closed", "the payment was closed before it was paid")
    if order.status == "pending_payment":
        order = book.finish(out_trade_no, "succeeded", None)
        sandbox.notify_order(order)
    return JSONResponse(order.body(base_url(request)))


@router.get("/pay/{out_trade_no}", response_class=HTMLResponse)
async def pay_page(out_trade_no: str, sandbox: SandboxDep) -> HTMLResponse:
    """What the QR code opens: the wallet app's confirmation page."""
    order = sandbox.book.order(out_trade_no)
    if order is None or order.kind != "payment":
        return HTMLResponse("<p>No such payment.</p>", status_code=404)
    action = (
        f'<form method="post" action="/v1/payments/{html.escape(out_trade_no)}/pay">'
        "<button>Pay</button></form>"
        if order.status == "pending_payment"
        else f"<p>{html.escape(order.status)}</p>"
    )
    return HTMLResponse(
        f"<!doctype html><title>Sandbox wallet</title>"
        f"<h1>{html.escape(_yuan(order.amount_fen))}</h1>"
        f"<p>{html.escape(order.description)}</p>{action}"
    )
