"""Who is calling: the bearer credential of a request, resolved once, and the dependency
aliases routes declare to say who may call them.

- drivers and operator staff carry JWT access tokens (`parking.auth.tokens`);
- the city platform and guidance signs carry a `ck_…` API key, gates a `gk_…` key.
A route that needs a kind of caller answers 401 to an anonymous or invalid credential and 403
to a valid credential of another kind. Objects of another driver or another operator's car
park are answered 404, never 403: their existence is not disclosed.
"""

import contextlib
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Annotated, Literal

import asyncpg
from fastapi import Depends, Request
from redis.exceptions import RedisError

from parking.auth import repository as repo
from parking.auth.tokens import InvalidToken, TokenSigner, digest
from parking.errors import AppError
from parking.ratelimit import client_address, hit, refuse_if_spent

PrincipalKind = Literal["driver", "operator", "city", "gate"]
CITY_KEY_PREFIX = "ck_"
GATE_KEY_PREFIX = "gk_"


@dataclass(frozen=True, slots=True)
class Principal:
    kind: PrincipalKind
    account_id: int | None = None
    operator_id: int | None = None
    operator_user_id: int | None = None
    role: str | None = None
    gate_id: int | None = None
    # A merchant's staff (role 'merchant'): the merchant they validate stays for.
    merchant_id: int | None = None
    # Staff tokens: the sign-in they belong to and when they expire (long-lived streams).
    session: uuid.UUID | None = None
    expires_at: int | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        if self.kind == "operator":
            return f"operator_user:{self.operator_user_id}"
        if self.kind == "driver":
            return f"account:{self.account_id}"
        return self.kind


class Unauthenticated(AppError):
    def __init__(self, message: str = "a valid bearer token is required") -> None:
        super().__init__(401, "unauthenticated", message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(AppError):
    def __init__(self, message: str = "not allowed for this caller") -> None:
        super().__init__(403, "forbidden", message)


def signer(request: Request) -> TokenSigner:
    token_signer: TokenSigner = request.app.state.signer
    return token_signer


async def _principal(request: Request) -> Principal | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, credential = header.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise Unauthenticated("use 'Authorization: Bearer <token>'")
    credential = credential.strip()
    runtime = request.app.state.runtime
    pool = runtime.pool
    if credential.startswith((CITY_KEY_PREFIX, GATE_KEY_PREFIX)):
        key_hash = digest(credential)
        settings = runtime.settings
        misses = f"{settings.redis_key_prefix}ratelimit:bad-api-key:{client_address(request)}"

        async def load() -> repo.ApiKey | None:
            # Made-up keys would each cost a query: a client that sent too many waits. Without
            # Redis the count is skipped, not the key: signs keep working through its outage.
            with contextlib.suppress(RedisError, OSError):
                await refuse_if_spent(
                    runtime.redis, misses, settings.bad_api_keys_per_minute_per_client
                )
            async with pool.acquire() as conn:
                found = await repo.api_key(conn, key_hash)
            if found is None:
                with contextlib.suppress(RedisError, OSError):
                    await hit(
                        runtime.redis, misses, settings.bad_api_keys_per_minute_per_client, 60
                    )
            return found

        # A sign polls every few seconds: its key is read from memory, not the database.
        key = await runtime.api_keys.lookup(key_hash, load)
        if key is None:
            raise Unauthenticated("unknown or revoked API key")
        return Principal(key.kind, gate_id=key.gate_id)
    try:
        claims = signer(request).decode(credential)
    except InvalidToken as exc:
        raise Unauthenticated(f"invalid token: {exc}") from exc
    kind, _, raw_id = claims.subject.partition(":")
    if not raw_id.isdigit():
        raise Unauthenticated("invalid token subject")
    if claims.role == "driver" and kind == "account":
        async with pool.acquire() as conn:
            if not await repo.account_active(conn, int(raw_id)):
                raise Unauthenticated("the account no longer exists")
        return Principal("driver", account_id=int(raw_id))
    if kind == "operator_user":
        try:
            session = uuid.UUID(claims.session) if claims.session else None
        except ValueError as exc:
            raise Unauthenticated("invalid token session") from exc
        async with pool.acquire() as conn:
            user = await repo.operator_user_by_id(conn, int(raw_id), session)
        if user is None:
            raise Unauthenticated("the user is disabled or signed out")
        # Role and company as they are now, not as the token was issued: a demoted or moved
        # user loses the rights at once.
        return Principal(
            "operator",
            operator_id=user.operator_id,
            operator_user_id=user.id,
            role=user.role,
            merchant_id=user.merchant_id,
            session=session,
            expires_at=claims.expires_at,
        )
    raise Unauthenticated("invalid token subject")


async def still_staff(pool: asyncpg.Pool, principal: Principal, roles: Collection[str]) -> bool:
    """Whether a staff caller resolved a while ago still has the rights of the route that
    resolved them: enabled, in the same company, in one of the route's `roles`, and (for a
    signed-in token) not signed out. Long-lived streams ask this."""
    if principal.operator_user_id is None:
        return False
    async with pool.acquire() as conn:
        user = await repo.operator_user_by_id(conn, principal.operator_user_id, principal.session)
    return user is not None and user.operator_id == principal.operator_id and user.role in roles


def _require(
    *kinds: PrincipalKind, roles: tuple[str, ...] = ()
) -> Callable[[Request], Awaitable[Principal]]:
    async def dependency(request: Request) -> Principal:
        principal = await _principal(request)
        if principal is None:
            raise Unauthenticated()
        if principal.kind not in kinds or (roles and principal.role not in roles):
            raise Forbidden()
        return principal

    return dependency


async def optional_principal(request: Request) -> Principal | None:
    """Public routes: anyone, but a credential that is presented must be valid."""
    return await _principal(request)


DriverDep = Annotated[Principal, Depends(_require("driver"))]
# The company's staff. A merchant's staff sign in the same way but are none of them: they may
# only validate stays (MerchantDep).
COMPANY_STAFF_ROLES = ("admin", "attendant")
OperatorDep = Annotated[Principal, Depends(_require("operator", roles=COMPANY_STAFF_ROLES))]
OperatorAdminDep = Annotated[Principal, Depends(_require("operator", roles=("admin",)))]
MerchantDep = Annotated[Principal, Depends(_require("operator", roles=("merchant",)))]
# The city platform's staff (role 'platform'): plate ownership, which is the city's and no car
# park company's. They pass no company route, and no company's staff pass theirs.
PlatformDep = Annotated[Principal, Depends(_require("operator", roles=("platform",)))]
# Staff of a company or of the platform, about themselves (their password).
SelfStaffDep = Annotated[
    Principal, Depends(_require("operator", roles=("admin", "attendant", "platform")))
]
GateDep = Annotated[Principal, Depends(_require("gate"))]
MaybePrincipalDep = Annotated[Principal | None, Depends(optional_principal)]
