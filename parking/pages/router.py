"""The pages' routes: HTML for people; the data behind them comes from the JSON API."""

from datetime import UTC, datetime
from typing import Annotated
from uuid import UUID
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from parking.deps import RuntimeDep
from parking.pages.render import Lang, render
from parking.payments import service as payments

router = APIRouter(tags=["pages"], include_in_schema=False)
# The pages' stylesheet and scripts, shipped in the package (no CDN).
STATIC_ASSETS = StaticFiles(packages=[("parking.pages", "static")])
LangQuery = Annotated[Lang, Query(description="zh (default) or en")]


@router.get("/pay/{capture_id}", response_class=HTMLResponse)
async def pay_page(capture_id: UUID, runtime: RuntimeDep, lang: LangQuery = "zh") -> HTMLResponse:
    """What a held gate's QR code opens: the stay, the fee with its breakdown and any debts,
    a pay button through the provider's payer page, then "请通行" once the barrier opens."""
    view = await payments.gate_payment_page(runtime, capture_id)
    return render(
        "pay.html",
        lang,
        ZoneInfo(runtime.settings.timezone),
        status_code=200 if view is not None else 404,
        capture_id=capture_id,
        view=view,
        state=view.state if view is not None else "unknown",
        now=datetime.now(UTC),
    )


@router.get("/app", response_class=HTMLResponse)
async def driver_app(runtime: RuntimeDep, lang: LangQuery = "zh") -> HTMLResponse:
    """The driver's app (mobile web): signs in with a phone code, then uses /api/v1/me."""
    timezone = runtime.settings.timezone
    return render("app.html", lang, ZoneInfo(timezone), timezone=timezone)
