"""The operator dashboard: one page served by the app, fed live by server-sent events."""

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, StreamingResponse

from parking.auth.principal import Forbidden, OperatorDep, Principal
from parking.dashboard import service
from parking.dashboard.page import dashboard_page
from parking.dashboard.schemas import DashboardSummary
from parking.deps import ReadConnectionDep, RuntimeDep

router = APIRouter(tags=["dashboard"])


def _operator_id(principal: Principal) -> int:
    if principal.operator_id is None:  # a staff token always names its company
        raise Forbidden("the token names no operator")
    return principal.operator_id


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    """The page signs in and then calls the API below with its bearer token."""
    served = dashboard_page()
    return HTMLResponse(
        served.html,
        headers={
            "Content-Security-Policy": served.content_security_policy,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


@router.get("/api/v1/operator/dashboard/summary")
async def summary(
    principal: OperatorDep, conn: ReadConnectionDep, runtime: RuntimeDep
) -> DashboardSummary:
    """The operator's car parks with live occupancy and today's revenue, today's entries and
    exits per local hour, and the number of open lane exceptions."""
    return await service.summary(conn, runtime, _operator_id(principal))


@router.get(
    "/api/v1/operator/dashboard/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def events(principal: OperatorDep, runtime: RuntimeDep) -> StreamingResponse:
    """Server-sent events: `snapshot` (the counts now), then `occupancy` and `lane` events of
    the operator's own car parks, and a keep-alive comment every 15 s."""
    return StreamingResponse(
        service.live_events(runtime, _operator_id(principal)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
