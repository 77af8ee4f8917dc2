"""Sign-in routes (OAuth2-style token endpoint with three grants)."""

from typing import Annotated, Any
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import Field, TypeAdapter, ValidationError

from parking.auth import service
from parking.auth.principal import SelfStaffDep, signer
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

GrantBody = Annotated[CodeGrant | RefreshGrant | PasswordGrant, Field(discriminator="grant_type")]
_GRANT: TypeAdapter[CodeGrant | RefreshGrant | PasswordGrant] = TypeAdapter(GrantBody)
FORM = "application/x-www-form-urlencoded"


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """The grant's JSON Schema with its `$defs` written in place (for the OpenAPI document)."""
    defs = schema.pop("$defs", {})
    schema.pop("discriminator", None)

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    return inlined


_GRANT_SCHEMA = _inline_defs(_GRANT.json_schema())


def _form_fields(body: bytes) -> dict[str, str]:
    """An OAuth2 token request's form (RFC 6749 §4.3: `username` is the staff e-mail). A
    repeated or undecodable field is refused, as the RFC asks."""
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise RequestValidationError(
            [{"type": "form_invalid", "loc": ("body",), "msg": "not a URL-encoded form"}]
        ) from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name in fields:
            raise RequestValidationError(
                [{"type": "form_repeated", "loc": ("body", name), "msg": "field given twice"}]
            )
        fields[name] = value
    if fields.get("grant_type") == "password" and "email" not in fields and "username" in fields:
        fields["email"] = fields.pop("username")
    return fields


async def _grant(request: Request) -> CodeGrant | RefreshGrant | PasswordGrant:
    """The grant, as JSON or as an OAuth2 form (`application/x-www-form-urlencoded`)."""
    body = await request.body()
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    data: Any
    if media_type == FORM:
        data = _form_fields(body)
    else:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise RequestValidationError(
                [{"type": "json_invalid", "loc": ("body", 0), "msg": "JSON decode error"}]
            ) from None
    try:
        return _GRANT.validate_python(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        ) from None


Grant = Annotated[CodeGrant | RefreshGrant | PasswordGrant, Depends(_grant)]


@router.post("/sign-in-codes", status_code=202)
async def request_sign_in_code(
    body: CodeRequest, request: Request, runtime: RuntimeDep
) -> CodeSent:
    """Texts a six-digit code to the phone (rate-limited per phone and per client); the answer's
    `challenge_id` goes with the code to `/token`."""
    client = client_address(request)
    return await service.request_code(
        runtime, request.app.state.sms, signer(request), body.phone, client
    )


@router.post(
    "/token",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _GRANT_SCHEMA},
                # OAuth2 clients: the same fields, `username` for the staff e-mail.
                FORM: {"schema": _GRANT_SCHEMA},
            },
        }
    },
)
async def token(
    grant: Grant, request: Request, runtime: RuntimeDep, response: Response
) -> TokenPair:
    """Drivers: `sign_in_code`; operator staff: `password`; both: `refresh_token` (rotates)."""
    response.headers["Cache-Control"] = "no-store"
    token_signer = signer(request)
    if isinstance(grant, CodeGrant):
        return await service.sign_in_with_code(
            runtime,
            token_signer,
            grant.phone,
            grant.code,
            grant.challenge_id,
            client_address(request),
        )
    if isinstance(grant, PasswordGrant):
        client = client_address(request)
        return await service.sign_in_with_password(
            runtime,
            token_signer,
            request.app.state.password_checks,
            grant.email,
            grant.password,
            client,
            grant.device_token,
        )
    return await service.refresh(runtime, token_signer, grant.refresh_token)


@router.post("/sign-out", status_code=204)
async def sign_out(body: Logout, runtime: RuntimeDep) -> None:
    """Revokes the refresh token and every token rotated from the same sign-in."""
    await service.sign_out(runtime, body.refresh_token)


@router.post("/password", status_code=204)
async def change_password(
    body: PasswordChange, staff: SelfStaffDep, runtime: RuntimeDep, request: Request
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
