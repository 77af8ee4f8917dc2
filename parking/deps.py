"""FastAPI dependency aliases."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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


async def get_read_connection(request: Request) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the read pool (PARKING_DATABASE_READ_URL's replica, else the primary) in
    a read-only transaction. Only for reads that may lag the primary by a moment: public
    availability, operator reports and searches. Never for an exit decision, money, auth or
    anything read in order to write."""
    async with read_transaction(get_runtime(request)) as conn:
        yield conn


@asynccontextmanager
async def read_transaction(runtime: Runtime) -> AsyncIterator[asyncpg.Connection]:
    """What `ReadConnectionDep` gives, for a route that reads only now and then (the signs
    rebuild their board once per interval, and take no connection otherwise)."""
    async with runtime.read_pool.acquire() as conn, conn.transaction(readonly=True):
        yield conn


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
# scope="function": the transaction commits (or fails) before the response is sent, so a
# client is never told "done" about something that did not commit.
ConnectionDep = Annotated[asyncpg.Connection, Depends(get_connection, scope="function")]
ReadConnectionDep = Annotated[asyncpg.Connection, Depends(get_read_connection, scope="function")]
