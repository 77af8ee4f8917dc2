"""The receipt behind a driver's message: the page (`/r/{token}`), its frames (signed URLs
that expire), its JSON twin for the app, and "not my car" from either. The token is the
credential: no sign-in."""

from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from parking.deps import ConnectionDep, RuntimeDep
from parking.disputes.schemas import DisputeView
from parking.messages import message_style
from parking.receipts import page, service
from parking.receipts.schemas import ReceiptView
from parking.receipts.signing import FrameSigner, Which

router = APIRouter(tags=["receipts"])

Token = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{16,64}$")]
Lang = Annotated[page.Lang, Query(description="zh (default) or en")]
_ERROR: dict[str, Any] = {"description": "error", "content": {"application/json": {}}}
_PAGE_HEADERS = {
    "Content-Security-Policy": page.CONTENT_SECURITY_POLICY,
    "Cache-Control": "private, no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _signer(request: Request) -> FrameSigner | None:
    signer: FrameSigner | None = request.app.state.frame_signer
    return signer


SignerDep = Annotated[FrameSigner | None, Depends(_signer)]


@router.get("/r/{receipt_token}", response_class=HTMLResponse, responses={404: _ERROR})
async def receipt_page(
    receipt_token: Token,
    conn: ConnectionDep,
    runtime: RuntimeDep,
    signer: SignerDep,
    lang: Lang = "zh",
) -> HTMLResponse:
    """The receipt page the charge message links to (Chinese; `?lang=en` for English)."""
    receipt = await service.receipt(conn, receipt_token, signer)
    html = page.render(receipt, receipt_token, lang, ZoneInfo(runtime.settings.timezone))
    return HTMLResponse(html, headers=_PAGE_HEADERS)


@router.get(
    "/r/{receipt_token}/frames/{which}",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, 403: _ERROR, 404: _ERROR, 410: _ERROR},
)
async def receipt_frame(
    receipt_token: Token,
    which: Which,
    conn: ConnectionDep,
    signer: SignerDep,
    exp: Annotated[int, Query(ge=0, le=2**62)],
    sig: Annotated[str, Query(pattern=r"^[A-Za-z0-9_-]{1,100}$")],
) -> Response:
    """The entry or exit frame behind a signed link: 403 `bad_signature`, 410
    `link_expired`, 404 when the receipt is unknown or the frame erased."""
    image = await service.frame(conn, receipt_token, which, exp, sig, signer)
    return Response(image, media_type="image/jpeg", headers={"Cache-Control": "private, no-store"})


@router.post("/r/{receipt_token}/dispute", status_code=303, responses={404: _ERROR})
async def dispute_from_page(
    receipt_token: Token, conn: ConnectionDep, runtime: RuntimeDep, lang: Lang = "zh"
) -> RedirectResponse:
    """The page's "not my car" button: disputes the charge (once), then shows the page."""
    await service.dispute(conn, receipt_token, message_style(runtime.settings))
    return RedirectResponse(f"/r/{receipt_token}?lang={lang}", status_code=303)


@router.get("/api/v1/receipts/{receipt_token}", responses={404: _ERROR})
async def receipt_json(receipt_token: Token, conn: ConnectionDep, signer: SignerDep) -> ReceiptView:
    """The receipt page's content for the app (plate masked, frame links that expire)."""
    return await service.receipt(conn, receipt_token, signer)


@router.post("/api/v1/receipts/{receipt_token}/dispute", responses={404: _ERROR, 409: _ERROR})
async def dispute_receipt(
    receipt_token: Token, conn: ConnectionDep, runtime: RuntimeDep
) -> DisputeView:
    """ "Not my car" for the receipt's charge; the same dispute when asked again."""
    return await service.dispute(conn, receipt_token, message_style(runtime.settings))
