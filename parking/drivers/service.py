"""The driver app's use cases. Every function is scoped to the signed-in driver's account:
another driver's objects are not found (404), never forbidden."""

import asyncpg

from parking.drivers import repository as repo
from parking.drivers.schemas import Me
from parking.errors import NotFound


async def me(conn: asyncpg.Connection, account_id: int) -> Me:
    row = await repo.account(conn, account_id)
    if row is None:
        raise NotFound("account")
    return Me(
        account_id=row["id"], phone=row["phone"], blocked_for_arrears=row["blocked_for_arrears"]
    )
