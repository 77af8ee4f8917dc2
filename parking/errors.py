"""One error type for the whole service and the handlers that render it as one JSON shape.

Every HTTP error the API returns looks like:
    {"error": {"code": "car_park_not_found", "message": "...", "details": ...}}
except on the APDS routes (/apds/…), which answer in APDS v4's `ResponseStatus` shape:
    {"status": "error", "code": 404, "message": "..."}
"""

from collections.abc import Mapping
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class AppError(Exception):
    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


class NotFound(AppError):
    def __init__(self, what: str) -> None:
        super().__init__(404, f"{what}_not_found", f"{what.replace('_', ' ')} not found")


# Routes answering errors in APDS's shape (parking.apds).
APDS_PREFIX = "/apds/"


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def error_response(
    request: Request,
    status_code: int,
    code: str,
    message: str,
    details: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The one error of a request, in the shape its route speaks."""
    if request.url.path.startswith(APDS_PREFIX):
        return JSONResponse(
            {"status": "error", "code": status_code, "message": message},
            status_code=status_code,
            headers=headers,
        )
    return JSONResponse(
        error_body(code, message, details), status_code=status_code, headers=headers
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError) -> JSONResponse:
        return error_response(
            request, exc.status_code, exc.code, exc.message, exc.details, exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
            for e in exc.errors()
        ]
        message = "request failed validation"
        if request.url.path.startswith(APDS_PREFIX):
            # APDS's shape has no details: they go into the message.
            where = "; ".join(
                f"{'.'.join(str(part) for part in d['loc'][1:])}: {d['msg']}" for d in details
            )
            message = f"{message}: {where}"
        return error_response(request, 422, "invalid_request", message, details)

    @app.exception_handler(asyncpg.CharacterNotInRepertoireError)
    @app.exception_handler(asyncpg.UntranslatableCharacterError)
    async def _unstorable_text(request: Request, exc: asyncpg.DataError) -> JSONResponse:
        # Text PostgreSQL cannot hold (a NUL) that a schema let through: the request's fault,
        # and its transaction rolled back. Schemas refuse it first (parking/text.py); this
        # keeps one they miss from being a 500.
        return error_response(
            request, 422, "invalid_request", "the request holds text that cannot be stored"
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Still the one JSON shape; the error itself is logged by the server, masked
        # (parking.logging.server_log_config).
        return error_response(
            request, 500, "internal_error", "something went wrong; it has been logged"
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, code, str(exc.detail), headers=exc.headers)
