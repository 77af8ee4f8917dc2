"""SQL of the SMS adapters: where a driver's notification goes."""

import asyncpg


async def phone_of(conn: asyncpg.Connection, account_id: int) -> str | None:
    """The phone of an account that still exists (a deleted one is texted nothing)."""
    phone: str | None = await conn.fetchval(
        "SELECT phone FROM accounts WHERE id = $1 AND deleted_at IS NULL", account_id
    )
    return phone
