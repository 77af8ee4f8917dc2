"""All SQL of merchants and their validations. Every function runs on the caller's connection."""

from datetime import datetime

import asyncpg

_MERCHANT_COLUMNS = """m.id, m.name,
    CASE WHEN m.car_park_ids IS NULL THEN NULL ELSE
        COALESCE((SELECT array_agg(cp.code ORDER BY cp.code) FROM car_parks cp
                  WHERE cp.id = ANY (m.car_park_ids)), '{}') END AS car_parks,
    m.budget_fen, m.spent_fen, m.budget_fen - m.spent_fen AS remaining_fen, m.created_at"""


async def insert_merchant(
    conn: asyncpg.Connection,
    *,
    operator_id: int,
    name: str,
    car_park_ids: list[int] | None,
    budget_fen: int,
    created_by: str,
) -> int | None:
    """None when the company has a merchant of that name."""
    merchant_id: int | None = await conn.fetchval(
        """INSERT INTO merchants (operator_id, name, car_park_ids, budget_fen, created_by)
           VALUES ($1, $2, $3, $4, $5) ON CONFLICT (operator_id, name) DO NOTHING
           RETURNING id""",
        operator_id,
        name,
        car_park_ids,
        budget_fen,
        created_by,
    )
    return merchant_id


async def merchant(
    conn: asyncpg.Connection, operator_id: int, merchant_id: int
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {_MERCHANT_COLUMNS} FROM merchants m WHERE m.id = $1 AND m.operator_id = $2",
        merchant_id,
        operator_id,
    )
    return row


async def merchants(conn: asyncpg.Connection, operator_id: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {_MERCHANT_COLUMNS} FROM merchants m WHERE m.operator_id = $1 ORDER BY m.id",
        operator_id,
    )
    return rows


async def top_up(conn: asyncpg.Connection, operator_id: int, merchant_id: int, add: int) -> bool:
    done = await conn.fetchval(
        """UPDATE merchants SET budget_fen = budget_fen + $3
           WHERE id = $1 AND operator_id = $2 RETURNING id""",
        merchant_id,
        operator_id,
        add,
    )
    return done is not None


async def open_stay(
    conn: asyncpg.Connection,
    *,
    operator_id: int,
    merchant_id: int,
    car_park_code: str,
    plate: str,
    color: str,
) -> asyncpg.Record | None:
    """The vehicle's open stay in a car park of the merchant's (its company's, within its
    scope), locked."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """SELECT s.id, s.car_park_id, s.entered_at, s.plate_color, s.fixed_fee_fen,
                  EXISTS (SELECT 1 FROM payments p
                          WHERE p.session_id = s.id AND p.status = 'pending') AS being_paid
           FROM sessions s
           JOIN car_parks cp ON cp.id = s.car_park_id
           JOIN merchants m ON m.id = $2 AND m.operator_id = cp.operator_id
           WHERE cp.code = $3 AND cp.operator_id = $1 AND s.plate = $4 AND s.plate_color = $5
             AND s.status = 'open'
             AND (m.car_park_ids IS NULL OR cp.id = ANY (m.car_park_ids))
           FOR UPDATE OF s""",
        operator_id,
        merchant_id,
        car_park_code,
        plate,
        color,
    )
    return row


_VALIDATION_COLUMNS = """v.id, m.name AS merchant, cp.code AS car_park, v.session_id,
    v.merchant_id, v.free_minutes, v.amount_fen, v.cost_fen, v.returned_fen, v.created_at"""


async def insert_validation(
    conn: asyncpg.Connection,
    *,
    merchant_id: int,
    session_id: int,
    car_park_id: int,
    free_minutes: int | None,
    amount_fen: int | None,
    cost_fen: int,
    created_by: str,
) -> int | None:
    """None when the stay has a validation already (one per stay)."""
    validation_id: int | None = await conn.fetchval(
        """INSERT INTO validations (merchant_id, session_id, car_park_id, free_minutes,
                                    amount_fen, cost_fen, created_by)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (session_id) DO NOTHING RETURNING id""",
        merchant_id,
        session_id,
        car_park_id,
        free_minutes,
        amount_fen,
        cost_fen,
        created_by,
    )
    return validation_id


async def spend(conn: asyncpg.Connection, merchant_id: int, cost_fen: int) -> bool:
    """Takes `cost_fen` from the merchant's budget; False when too little is left."""
    done = await conn.fetchval(
        """UPDATE merchants SET spent_fen = spent_fen + $2
           WHERE id = $1 AND spent_fen + $2 <= budget_fen RETURNING id""",
        merchant_id,
        cost_fen,
    )
    return done is not None


async def validation_for_update(conn: asyncpg.Connection, session_id: int) -> asyncpg.Record | None:
    """The stay's validation, locked: (id, merchant_id, worth_fen: what it still cost)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """SELECT id, merchant_id, cost_fen - returned_fen AS worth_fen FROM validations
           WHERE session_id = $1 FOR UPDATE""",
        session_id,
    )
    return row


async def give_back(
    conn: asyncpg.Connection, validation_id: int, merchant_id: int, fen: int
) -> None:
    """`fen` of what the validation cost goes back to the merchant's budget."""
    await conn.execute(
        "UPDATE validations SET returned_fen = returned_fen + $2 WHERE id = $1",
        validation_id,
        fen,
    )
    await conn.execute(
        "UPDATE merchants SET spent_fen = spent_fen - $2 WHERE id = $1", merchant_id, fen
    )


async def validation(conn: asyncpg.Connection, *, session_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {_VALIDATION_COLUMNS} FROM validations v
            JOIN merchants m ON m.id = v.merchant_id JOIN car_parks cp ON cp.id = v.car_park_id
            WHERE v.session_id = $1""",
        session_id,
    )
    return row


async def validations(
    conn: asyncpg.Connection, merchant_id: int, *, limit: int
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_VALIDATION_COLUMNS} FROM validations v
            JOIN merchants m ON m.id = v.merchant_id JOIN car_parks cp ON cp.id = v.car_park_id
            WHERE v.merchant_id = $1 ORDER BY v.id DESC LIMIT $2""",
        merchant_id,
        limit,
    )
    return rows


async def report(
    conn: asyncpg.Connection, operator_id: int, since: datetime, until: datetime
) -> list[asyncpg.Record]:
    """Per merchant of the company: validations given in [since, until), their cost and what of
    it went back, and the budget as it stands."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT m.id AS merchant_id, m.name AS merchant, count(v.id) AS validations,
                  COALESCE(sum(v.cost_fen), 0)::bigint AS cost_fen,
                  COALESCE(sum(v.returned_fen), 0)::bigint AS returned_fen,
                  m.budget_fen, m.spent_fen, m.budget_fen - m.spent_fen AS remaining_fen
           FROM merchants m
           LEFT JOIN validations v ON v.merchant_id = m.id
                AND v.created_at >= $2 AND v.created_at < $3
           WHERE m.operator_id = $1
           GROUP BY m.id ORDER BY m.id""",
        operator_id,
        since,
        until,
    )
    return rows
