"""The guidance signs' endpoint (`/api/v1/public/signs`): a network of thousands of signs
polling costs no database or Redis work per request.

The numbers come from a board of every car park built at most once per
PARKING_PUBLIC_CACHE_SECONDS per process, each sign's JSON serialised once per board and each
list of car parks asked for answered from bytes kept with the board; the ETag covers the
numbers, so a sign whose numbers did not change gets a 304. Signs carry the city's key (not
rate-limited), read from the process's key cache (`auth.apikeys`: a revoked key is dropped as
soon as the revocation is heard). Anonymous callers are limited like the rest of the public
API.
"""

from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.datastructures import Headers, State
from starlette.types import ASGIApp, Receive, Scope, Send

from parking.auth.principal import CITY_KEY_PREFIX, optional_principal
from parking.auth.tokens import digest
from parking.deps import RuntimeDep, read_transaction
from parking.public import service
from parking.public.cache import AnswerCache, app_cache
from parking.public.router import NOT_MODIFIED, public_client_limit, respond
from parking.public.schemas import Signs
from parking.public.service import SignBoard

router = APIRouter(prefix="/api/v1/public", tags=["public"])
PATH = "/api/v1/public/signs"
# The route's limit on `car_parks` (longer: the route answers, with its 422).
CAR_PARKS_MAX_LENGTH = 4000


def _boards(request: Request, runtime: RuntimeDep) -> AnswerCache[SignBoard]:
    """The app's board of every car park's sign numbers (one entry)."""
    return app_cache(request, "sign_boards", runtime.settings.public_cache_seconds)


async def sign_caller(request: Request, runtime: RuntimeDep) -> None:
    """The public API's limit for anonymous callers; a city key (read from the process's key
    cache, `auth.apikeys`, which hears revocations at once) lifts it."""
    await public_client_limit(await optional_principal(request), request, runtime)


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
        str | None,
        Query(max_length=CAR_PARKS_MAX_LENGTH, description="comma-separated car park codes"),
    ] = None,
) -> Response:
    """What guidance signs show: free spaces and open/full/closed per car park (the ones
    asked for, or all), from a board rebuilt at most once per PARKING_PUBLIC_CACHE_SECONDS
    per process (a connection only to rebuild it)."""

    async def build() -> SignBoard:
        async with read_transaction(runtime) as conn:
            return await service.sign_board(conn, runtime)

    board = await boards.get("signs", build)
    return respond(request, service.signs(board, _codes(car_parks)))


def _codes(car_parks: str | None) -> list[str] | None:
    return [code.strip() for code in car_parks.split(",") if code.strip()] if car_parks else None


class SignsFastPath:
    """ASGI middleware: a sign's poll with a city key this process has checked (within
    PARKING_PUBLIC_CACHE_SECONDS), while the board is fresh, answered as the route answers it
    (bytes, ETag, 304) without routing, dependencies or a request object's parsing."""

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        # The app's state, where the route keeps the board and the keys checked.
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == PATH:
            answer = self._answer(scope)
            if answer is not None:
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _answer(self, scope: Scope) -> Response | None:
        boards: AnswerCache[SignBoard] | None = getattr(self.state, "sign_boards", None)
        runtime = getattr(self.state, "runtime", None)
        if boards is None or runtime is None:
            return None
        scheme, _, credential = Headers(scope=scope).get("authorization", "").partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential.startswith(CITY_KEY_PREFIX):
            return None
        key = runtime.api_keys.known(digest(credential))
        if key is None or key.kind != "city":
            return None
        board = boards.fresh("signs")
        if board is None:
            return None
        # As the framework reads the query; a repeated or over-long `car_parks` goes to the
        # route (which takes the last one, or refuses it).
        asked = [
            value
            for name, value in parse_qsl(scope["query_string"].decode("latin-1"), True)
            if name == "car_parks"
        ]
        if len(asked) > 1 or (asked and len(asked[0]) > CAR_PARKS_MAX_LENGTH):
            return None
        return respond(Request(scope), service.signs(board, _codes(asked[0] if asked else None)))
