"""FastAPI dependency aliases."""

from collections.abc import AsyncIterator
from typing import Annotated

import asyncpg
from fastapi import Depends, Request

from parking.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_connection(request: Request) -> AsyncIterator[asyncpg.Connection]:
    """One connection and one transaction per request: the request owns its unit of work."""
    async with get_runtime(request).pool.acquire() as conn, conn.transaction():
        yield conn


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
# scope="function": the transaction commits (or fails) before the response is sent, so a
# client is never told "done" about something that did not commit.
ConnectionDep = Annotated[asyncpg.Connection, Depends(get_connection, scope="function")]
