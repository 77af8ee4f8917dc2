"""APDS v4 routes (`/apds/v4/…`), a faithful second face of our data for APDS clients (the
city's integrators); our own Chinese-first public API (`/api/v1/public`) stays as it is.

Places (with occupancy) and rates are public like `/api/v1/public`: anyone, or the city's key;
the same per-client limit; built once per PARKING_PUBLIC_CACHE_SECONDS per process and query,
with ETags. Sessions and assigned rights carry plates, right specifications are the company's own
arrangements (APDS asks for a client's credentials on both): only the company's own staff.
Errors on these routes are APDS `ResponseStatus` objects (`parking.errors`).
"""

import uuid
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from parking.apds import service
from parking.apds.repository import AssignedFilter, Near, Page, Period, SessionFilter
from parking.apds.schemas import (
    AssignedRightList,
    HierarchyElementList,
    Json,
    RateTableList,
    ResponseStatus,
    RightSpecificationList,
    SessionList,
)
from parking.auth.principal import MaybePrincipalDep, OperatorAdminDep, OperatorDep, Principal
from parking.deps import ConnectionDep, ReadConnectionDep, RuntimeDep
from parking.feeds import service as feeds
from parking.feeds.schemas import CreatedSubscription, EventSubscription, Subscription
from parking.public.cache import Answer, AnswerCache
from parking.public.router import AnswerCacheDep, PublicLimit, answer_of, cached, respond

router = APIRouter(prefix="/apds/v4", tags=["apds"])

Latitude = Annotated[float | None, Query(ge=-90, le=90)]
Longitude = Annotated[float | None, Query(ge=-180, le=180)]
Radius = Annotated[int | None, Query(ge=0, le=50_000, description="metres")]
# Unix epoch seconds, as APDS's filters are.
Epoch = Annotated[int | None, Query(ge=0, le=10**10)]
PageNumber = Annotated[int, Query(ge=1, le=1_000_000)]
CommaList = Annotated[str | None, Query(max_length=2000, description="comma-separated")]


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


@dataclass(frozen=True, slots=True)
class Listing:
    """The query parameters every APDS list takes (hashable: part of a cached answer's key)."""

    near: Near | None
    # Unix epoch seconds, as given.
    modified_since: int | None
    expand: tuple[str, ...]
    page: Page

    @property
    def since(self) -> datetime | None:
        return service.instant(self.modified_since)


def listing(
    runtime: RuntimeDep,
    latitude: Latitude = None,
    longitude: Longitude = None,
    radius: Radius = None,
    modified_since: Epoch = None,
    expand: CommaList = None,
    page: PageNumber = 1,
) -> Listing:
    return Listing(
        service.near(latitude, longitude, radius),
        modified_since,
        tuple(_names(expand) or ()),
        service.page_of(page, runtime.settings.apds_page_size),
    )


ListingDep = Annotated[Listing, Depends(listing)]


def period(
    start_after: Epoch = None,
    start_before: Epoch = None,
    end_after: Epoch = None,
    end_before: Epoch = None,
) -> Period:
    return Period(
        service.instant(start_after),
        service.instant(start_before),
        service.instant(end_after),
        service.instant(end_before),
    )


PeriodDep = Annotated[Period, Depends(period)]


def _company(principal: Principal) -> int:
    assert principal.operator_id is not None
    return principal.operator_id


async def _answer(
    request: Request,
    expand: Iterable[str],
    known: frozenset[str],
    build: Callable[[frozenset[str]], Awaitable[Json]],
    cache: tuple[AnswerCache[Answer], Hashable] | None = None,
    *,
    public: bool,
) -> Response:
    """Every APDS answer: `expand` checked against the resource's `known` expansions (an APDS
    error otherwise), then built from them. Public answers (places, rates) carry an ETag and
    may be cached by anyone; lists are also built once per PARKING_PUBLIC_CACHE_SECONDS per
    process (`cache`: the cache and the key of the query, the expansions added). The company's
    own (they name plates or its arrangements) are neither."""
    expanded = service.expansions(expand, known)
    if not public:
        return Response(answer_of(await build(expanded)).body, media_type="application/json")
    if cache is not None:
        answers, key = cache
        return await cached(request, answers, (key, expanded), lambda: build(expanded))
    return respond(request, answer_of(await build(expanded)))


@router.get("/places", response_model=HierarchyElementList, dependencies=[PublicLimit])
async def list_places(
    _: MaybePrincipalDep,
    request: Request,
    conn: ReadConnectionDep,
    runtime: RuntimeDep,
    answers: AnswerCacheDep,
    listed: ListingDep,
    name: Annotated[str | None, Query(max_length=200)] = None,
    type: CommaList = None,  # APDS's name for the place types
    layer: Annotated[int | None, Query(ge=0)] = None,
) -> Response:
    """Car parks as APDS places (layer 0; `layer` filters nothing); `expand=occupancy` adds
    their live occupancy."""
    types = frozenset(_names(type) or [])
    return await _answer(
        request,
        listed.expand,
        service.PLACE_EXPANSIONS,
        lambda expanded: service.places(
            conn,
            runtime,
            near=listed.near,
            modified_since=listed.since,
            name=name,
            types=types,
            expand=expanded,
            page=listed.page,
        ),
        (answers, ("apds-places", listed, name, types)),
        public=True,
    )


@router.get("/places/{place_id}", response_model=Json, dependencies=[PublicLimit])
async def get_place(
    place_id: str,
    _: MaybePrincipalDep,
    request: Request,
    conn: ReadConnectionDep,
    runtime: RuntimeDep,
    expand: CommaList = None,
) -> Response:
    return await _answer(
        request,
        _names(expand) or [],
        service.PLACE_EXPANSIONS,
        lambda expanded: service.place(conn, runtime, place_id, expanded),
        public=True,
    )


@router.get("/rates", response_model=RateTableList, dependencies=[PublicLimit])
async def list_rates(
    _: MaybePrincipalDep,
    request: Request,
    conn: ReadConnectionDep,
    answers: AnswerCacheDep,
    listed: ListingDep,
    place: CommaList = None,
) -> Response:
    """Tariff versions in force now or later as APDS rate tables; `place` takes car park
    codes."""
    places = _names(place)
    return await _answer(
        request,
        listed.expand,
        service.RATE_EXPANSIONS,
        lambda _: service.rates(
            conn,
            near=listed.near,
            car_parks=places,
            modified_since=listed.since,
            page=listed.page,
        ),
        (answers, ("apds-rates", listed, tuple(places) if places is not None else None)),
        public=True,
    )


@router.get("/rates/{rate_id}", response_model=Json, dependencies=[PublicLimit])
async def get_rate(
    rate_id: str,
    _: MaybePrincipalDep,
    request: Request,
    conn: ReadConnectionDep,
    expand: CommaList = None,
) -> Response:
    return await _answer(
        request,
        _names(expand) or [],
        service.RATE_EXPANSIONS,
        lambda _: service.rate(conn, rate_id),
        public=True,
    )


@router.get("/sessions", response_model=SessionList)
async def list_sessions(
    operator: OperatorDep,
    request: Request,
    conn: ReadConnectionDep,
    listed: ListingDep,
    during: PeriodDep,
    place: CommaList = None,
) -> Response:
    """The company's stays as APDS sessions, newest first (they name plates: staff only)."""
    wanted = SessionFilter(
        near=listed.near, car_parks=_names(place), period=during, modified_since=listed.since
    )
    return await _answer(
        request,
        listed.expand,
        service.SESSION_EXPANSIONS,
        lambda _: service.sessions(conn, _company(operator), wanted, listed.page),
        public=False,
    )


@router.get("/sessions/{session_id}", response_model=Json)
async def get_session(
    session_id: str,
    operator: OperatorDep,
    request: Request,
    conn: ReadConnectionDep,
    expand: CommaList = None,
) -> Response:
    return await _answer(
        request,
        _names(expand) or [],
        service.SESSION_EXPANSIONS,
        lambda _: service.session(conn, _company(operator), session_id),
        public=False,
    )


@router.get("/rights/specs", response_model=RightSpecificationList)
async def list_right_specs(
    operator: OperatorDep,
    request: Request,
    conn: ReadConnectionDep,
    listed: ListingDep,
    place: CommaList = None,
) -> Response:
    """The company's right specifications (`place` takes car park codes)."""
    return await _answer(
        request,
        listed.expand,
        service.RIGHT_SPEC_EXPANSIONS,
        lambda _: service.right_specs(
            conn,
            _company(operator),
            near=listed.near,
            car_parks=_names(place),
            modified_since=listed.since,
            page=listed.page,
        ),
        public=False,
    )


@router.get("/rights/specs/{right_spec_id}", response_model=Json)
async def get_right_spec(
    right_spec_id: str,
    operator: OperatorDep,
    request: Request,
    conn: ReadConnectionDep,
    expand: CommaList = None,
) -> Response:
    return await _answer(
        request,
        _names(expand) or [],
        service.RIGHT_SPEC_EXPANSIONS,
        lambda _: service.right_spec(conn, _company(operator), right_spec_id),
        public=False,
    )


@router.get("/rights/assigned", response_model=AssignedRightList)
async def list_assigned_rights(
    operator: OperatorDep,
    request: Request,
    conn: ReadConnectionDep,
    listed: ListingDep,
    during: PeriodDep,
    place: CommaList = None,
    right_spec: CommaList = None,
    credential_id: CommaList = None,
) -> Response:
    """The company's assigned rights (they name plates: staff only); `credential_id` takes
    plates, `right_spec` specification ids."""

    def wanted() -> AssignedFilter:
        specs = _names(right_spec)
        if specs is not None and not all(
            spec.isascii() and spec.isdigit() and len(spec) <= 18 for spec in specs
        ):
            raise service.BadRequest("right_spec takes right specification ids")
        return AssignedFilter(
            near=listed.near,
            car_parks=_names(place),
            specs=[int(spec) for spec in specs] if specs is not None else None,
            plates=_names(credential_id),
            period=during,
            modified_since=listed.since,
        )

    return await _answer(
        request,
        listed.expand,
        service.ASSIGNED_EXPANSIONS,
        lambda _: service.assigned_rights(conn, _company(operator), wanted(), listed.page),
        public=False,
    )


@router.get("/rights/assigned/{assigned_right_id}", response_model=Json)
async def get_assigned_right(
    assigned_right_id: str,
    operator: OperatorDep,
    request: Request,
    conn: ReadConnectionDep,
    expand: CommaList = None,
) -> Response:
    return await _answer(
        request,
        _names(expand) or [],
        service.ASSIGNED_EXPANSIONS,
        lambda _: service.assigned_right(conn, _company(operator), assigned_right_id),
        public=False,
    )


# ===== Subscriptions (push) =====


@router.post("/webhooks", response_model=CreatedSubscription)
async def subscribe(
    wanted: EventSubscription, admin: OperatorAdminDep, conn: ConnectionDep, runtime: RuntimeDep
) -> CreatedSubscription:
    """An APDS subscription of the company (admins): each event of its topics at its car parks
    is POSTed to `endpoint`, signed with the returned `secret` (shown this once). An endpoint
    that is or resolves to a loopback, private, link-local, multicast or unspecified address
    is refused (422 endpoint_refused), and checked again at every delivery."""
    return await feeds.subscribe(conn, admin, wanted, runtime.settings)


@router.get("/webhooks")
async def list_subscriptions(operator: OperatorDep, conn: ConnectionDep) -> list[Subscription]:
    return await feeds.subscriptions(conn, operator)


@router.delete("/webhooks/{subscription_id}", response_model=ResponseStatus)
async def unsubscribe(
    subscription_id: uuid.UUID, admin: OperatorAdminDep, conn: ConnectionDep
) -> ResponseStatus:
    await feeds.unsubscribe(conn, admin, subscription_id)
    return ResponseStatus(status="ok", code=200, message="subscription deleted")


@router.post("/webhooks/{subscription_id}/resume")
async def resume_subscription(
    subscription_id: uuid.UUID, admin: OperatorAdminDep, conn: ConnectionDep
) -> Subscription:
    """A paused subscription (too many failed deliveries in a row) gets deliveries again."""
    return await feeds.resume(conn, admin, subscription_id)
