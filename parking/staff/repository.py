"""SQL of the company's staff list (sign-ins themselves: parking/auth/repository.py)."""

import asyncpg

_COLUMNS = """u.id, u.email, u.name, u.role, m.name AS merchant, u.created_at, u.disabled_at"""


async def staff(conn: asyncpg.Connection, operator_id: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM operator_users u LEFT JOIN merchants m ON m.id = u.merchant_id
            WHERE u.operator_id = $1 ORDER BY u.disabled_at IS NOT NULL, u.id""",
        operator_id,
    )
    return rows


async def member(conn: asyncpg.Connection, operator_id: int, user_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {_COLUMNS} FROM operator_users u LEFT JOIN merchants m ON m.id = u.merchant_id
            WHERE u.operator_id = $1 AND u.id = $2""",
        operator_id,
        user_id,
    )
    return row


async def disable(conn: asyncpg.Connection, operator_id: int, user_id: int) -> bool:
    """Disables an enabled member of the company; False when there is none (or already off)."""
    done: str = await conn.execute(
        """UPDATE operator_users SET disabled_at = now()
           WHERE operator_id = $1 AND id = $2 AND disabled_at IS NULL""",
        operator_id,
        user_id,
    )
    return done == "UPDATE 1"
