"""The provider as an ASGI app: its state, its error answers and its routers."""

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from parking_dev.sandbox.errors import error
from parking_dev.sandbox.faults import FaultConfig
from parking_dev.sandbox.provider import Sandbox
from parking_dev.sandbox.routes import ROUTERS


def create_app(
    faults: FaultConfig | None = None, *, secret: str, db_path: str = ":memory:"
) -> FastAPI:
    """The provider as an ASGI app; its state is `app.state.sandbox` (a `Sandbox`).

    The lifespan must run (uvicorn does by default): it starts the notification client and
    finishes charges left processing in a file database, and on shutdown stops all background
    work and closes the database.
    """
    if not secret:
        raise ValueError("a notification signing secret is required")
    sandbox = Sandbox(faults or FaultConfig(), secret, db_path)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        sandbox.start()
        try:
            yield
        finally:
            await sandbox.stop()

    app = FastAPI(title="Sandbox pay-later provider", lifespan=lifespan)
    app.state.sandbox = sandbox

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return error(400, "invalid_request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, code, str(exc.detail))

    for router in ROUTERS:
        app.include_router(router)
    return app
