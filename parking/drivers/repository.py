"""SQL of the driver app: a driver's own account, plates, stays, money and messages."""

import asyncpg


async def account(conn: asyncpg.Connection, account_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """SELECT id, phone, blocked_for_arrears FROM accounts
           WHERE id = $1 AND deleted_at IS NULL""",
        account_id,
    )
