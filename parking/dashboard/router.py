"""The operator dashboard: one page served by the app, fed live by server-sent events."""

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from parking.auth.principal import (
    COMPANY_STAFF_ROLES,
    Forbidden,
    OperatorDep,
    Principal,
    still_staff,
)
from parking.dashboard import service
from parking.dashboard.feed import Feed, feed_channels
from parking.dashboard.page import dashboard_page
from parking.dashboard.schemas import DashboardSummary
from parking.deps import ReadConnectionDep, RuntimeDep

router = APIRouter(tags=["dashboard"])


def get_feed(request: Request, runtime: RuntimeDep) -> Feed:
    """The app's one subscription to the live feed, shared by all its streams."""
    feed: Feed | None = getattr(request.app.state, "dashboard_feed", None)
    if feed is None:
        feed = Feed(runtime.redis, feed_channels(runtime))
        request.app.state.dashboard_feed = feed
    return feed


FeedDep = Annotated[Feed, Depends(get_feed)]


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
async def events(principal: OperatorDep, runtime: RuntimeDep, feed: FeedDep) -> StreamingResponse:
    """Server-sent events: `snapshot` (the counts now), then `occupancy` and `lane` events of
    the operator's own car parks, and a keep-alive comment every 15 s. A staff member may have
    PARKING_DASHBOARD_STREAMS_PER_USER open (429 `too_many_streams` beyond). A stream ends
    with an `end` event when the token expires, or when the user is disabled, moved, signed
    out or given a role the route refuses (checked every PARKING_DASHBOARD_RECHECK_S); the
    page reconnects with a fresh token."""
    operator_id = _operator_id(principal)
    assert principal.operator_user_id is not None  # a staff principal names its user
    place = service.StreamPlace(runtime, principal.operator_user_id)
    await place.claim()

    async def still_allowed() -> bool:
        allowed = await still_staff(runtime.pool, principal, COMPANY_STAFF_ROLES)
        if allowed:
            await place.renew()
        return allowed

    async def stream() -> AsyncIterator[str]:
        try:
            async for event in service.live_events(
                runtime,
                feed,
                operator_id,
                expires_at=principal.expires_at,
                recheck_s=runtime.settings.dashboard_recheck_s,
                still_allowed=still_allowed,
            ):
                yield event
        finally:
            # The response task is being cancelled: only a shielded await can still run.
            with anyio.move_on_after(2.0, shield=True):
                await place.release()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
