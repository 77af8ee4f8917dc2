"""Sign-in routes (OAuth2-style token endpoint with three grants)."""

from typing import Annotated

from fastapi import APIRouter, Body, Request, Response

from parking.auth import service
from parking.auth.principal import OperatorDep, signer
from parking.auth.schemas import (
    CodeGrant,
    CodeRequest,
    CodeSent,
    Logout,
    PasswordChange,
    PasswordGrant,
    RefreshGrant,
    TokenPair,
)
from parking.deps import RuntimeDep
from parking.ratelimit import client_address

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])

Grant = Annotated[CodeGrant | RefreshGrant | PasswordGrant, Body(discriminator="grant_type")]


@router.post("/sign-in-codes", status_code=202)
async def request_sign_in_code(
    body: CodeRequest, request: Request, runtime: RuntimeDep
) -> CodeSent:
    """Texts a six-digit code to the phone (rate-limited per phone and per client)."""
    client = client_address(request)
    return await service.request_code(runtime, request.app.state.sms, body.phone, client)


@router.post("/token")
async def token(
    grant: Grant, request: Request, runtime: RuntimeDep, response: Response
) -> TokenPair:
    """Drivers: `sign_in_code`; operator staff: `password`; both: `refresh_token` (rotates)."""
    response.headers["Cache-Control"] = "no-store"
    token_signer = signer(request)
    if isinstance(grant, CodeGrant):
        return await service.sign_in_with_code(runtime, token_signer, grant.phone, grant.code)
    if isinstance(grant, PasswordGrant):
        client = client_address(request)
        return await service.sign_in_with_password(
            runtime,
            token_signer,
            request.app.state.password_checks,
            grant.email,
            grant.password,
            client,
        )
    return await service.refresh(runtime, token_signer, grant.refresh_token)


@router.post("/sign-out", status_code=204)
async def sign_out(body: Logout, runtime: RuntimeDep) -> None:
    """Revokes the refresh token and every token rotated from the same sign-in."""
    await service.sign_out(runtime, body.refresh_token)


@router.post("/password", status_code=204)
async def change_password(
    body: PasswordChange, staff: OperatorDep, runtime: RuntimeDep, request: Request
) -> None:
    """Staff change their own password (the current one, and a new one of 12 or more
    characters); every other sign-in of theirs ends. 403 `wrong_password`."""
    await service.change_password(
        runtime,
        request.app.state.password_checks,
        staff,
        body.current_password,
        body.new_password,
    )
