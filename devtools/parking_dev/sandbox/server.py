"""Running the sandbox: in the current event loop (`running`) or in the foreground (`serve`)."""

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI

from parking_dev.sandbox.app import create_app
from parking_dev.sandbox.faults import FaultConfig
from parking_dev.sandbox.provider import Sandbox


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Server(uvicorn.Server):
    """Cuts injected hangs short on shutdown, so that stopping never waits out a timeout_s
    (uvicorn finishes in-flight requests before it stops)."""

    def __init__(self, app: FastAPI, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._sandbox: Sandbox = app.state.sandbox

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._sandbox.interrupt_hangs()
        await super().shutdown(sockets)


@contextlib.asynccontextmanager
async def running(
    faults: FaultConfig | None = None,
    *,
    secret: str,
    port: int | None = None,
    db_path: str = ":memory:",
) -> AsyncIterator[tuple[str, FastAPI]]:
    """Serves the sandbox on 127.0.0.1 inside the current event loop; yields (url, app)."""
    app = create_app(faults, secret=secret, db_path=db_path)
    server = _Server(
        app,
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port or 0,  # 0: the OS picks a free port, read back once listening
            log_level="warning",
            lifespan="on",
        ),
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the sandbox provider stopped while starting")
        await asyncio.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{bound_port}", app
    finally:
        server.should_exit = True
        await task


def serve(port: int, faults: FaultConfig, secret: str, db_path: str) -> None:
    """Runs the sandbox in the foreground on 127.0.0.1:`port` until interrupted."""
    app = create_app(faults, secret=secret, db_path=db_path)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="info",
        access_log=False,  # a load run would print a line per charge
    )
    _Server(app, config).run()
