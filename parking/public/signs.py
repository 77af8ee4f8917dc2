"""The guidance signs' endpoint (`/api/v1/public/signs`): a network of thousands of signs
polling costs no database or Redis work per request.

The numbers come from a board of every car park built at most once per
PARKING_PUBLIC_CACHE_SECONDS per process, each sign's JSON serialised once per board and each
list of car parks asked for answered from bytes kept with the board; the ETag covers the
numbers, so a sign whose numbers did not change gets a 304. Signs carry the city's key (not
rate-limited), looked up once per PARKING_PUBLIC_CACHE_SECONDS per process: the key only lifts
the limit on public numbers, so a revoked one is refused that much later at most. Anonymous
callers are limited like the rest of the public API.
"""

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from parking.auth.principal import CITY_KEY_PREFIX, Principal, optional_principal
from parking.auth.tokens import digest
from parking.deps import RuntimeDep, read_transaction
from parking.public import service
from parking.public.cache import AnswerCache
from parking.public.router import NOT_MODIFIED, public_client_limit, respond
from parking.public.schemas import Signs
from parking.public.service import SignBoard

router = APIRouter(prefix="/api/v1/public", tags=["public"])


def _boards(request: Request, runtime: RuntimeDep) -> AnswerCache[SignBoard]:
    """The app's board of every car park's sign numbers (one entry)."""
    boards: AnswerCache[SignBoard] | None = getattr(request.app.state, "sign_boards", None)
    if boards is None:
        boards = AnswerCache(runtime.settings.public_cache_seconds)
        request.app.state.sign_boards = boards
    return boards


def _city_keys(request: Request, runtime: RuntimeDep) -> AnswerCache[Principal | None]:
    """City keys found valid, by digest (an unknown key is refused, and not kept)."""
    keys: AnswerCache[Principal | None] | None = getattr(request.app.state, "sign_keys", None)
    if keys is None:
        keys = AnswerCache(runtime.settings.public_cache_seconds)
        request.app.state.sign_keys = keys
    return keys


async def sign_caller(request: Request, runtime: RuntimeDep) -> None:
    """The public API's limit for anonymous callers; a city key, checked, lifts it."""
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    credential = credential.strip()
    if scheme.lower() == "bearer" and credential.startswith(CITY_KEY_PREFIX):
        principal = await _city_keys(request, runtime).get(
            digest(credential), lambda: optional_principal(request)
        )
    else:
        principal = await optional_principal(request)
    await public_client_limit(principal, request, runtime)


@router.get(
    "/signs",
    response_model=Signs,
    responses=NOT_MODIFIED,
    dependencies=[Depends(sign_caller)],
)
async def signs(
    request: Request,
    runtime: RuntimeDep,
    boards: Annotated[AnswerCache[SignBoard], Depends(_boards)],
    car_parks: Annotated[
        str | None, Query(max_length=4000, description="comma-separated car park codes")
    ] = None,
) -> Response:
    """What guidance signs show: free spaces and open/full/closed per car park (the ones
    asked for, or all), from a board rebuilt at most once per PARKING_PUBLIC_CACHE_SECONDS
    per process (a connection only to rebuild it)."""

    async def build() -> SignBoard:
        async with read_transaction(runtime) as conn:
            return await service.sign_board(conn, runtime)

    board = await boards.get("signs", build)
    codes = [code.strip() for code in car_parks.split(",") if code.strip()] if car_parks else None
    return respond(request, service.signs(board, codes))
