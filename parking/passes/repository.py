"""All SQL of pass offers and purchases (the booking itself is billing/passes.py)."""

import asyncpg

_OFFER_COLUMNS = """o.id, o.spec_id, cp.code AS car_park, o.name, sp.kind, o.price_fen,
    o.period_days, o.active"""
_OFFER_FROM = """pass_offers o JOIN car_parks cp ON cp.id = o.car_park_id
    JOIN right_specs sp ON sp.id = o.spec_id"""


async def insert_offer(
    conn: asyncpg.Connection,
    *,
    operator_id: int,
    spec_id: int,
    car_park_code: str,
    name: str,
    price_fen: int,
    period_days: int,
    created_by: str,
) -> int | None:
    """None when the specification or the car park is not the company's."""
    offer_id: int | None = await conn.fetchval(
        """INSERT INTO pass_offers (operator_id, spec_id, car_park_id, name, price_fen,
                                    period_days, created_by)
           SELECT $1, sp.id, cp.id, $4, $5, $6, $7
           FROM right_specs sp, car_parks cp
           WHERE sp.id = $2 AND sp.operator_id = $1 AND cp.code = $3 AND cp.operator_id = $1
           RETURNING id""",
        operator_id,
        spec_id,
        car_park_code,
        name,
        price_fen,
        period_days,
        created_by,
    )
    return offer_id


async def offers(
    conn: asyncpg.Connection, *, operator_id: int | None = None, car_park_code: str | None = None
) -> list[asyncpg.Record]:
    """The company's offers, or the active offers of one car park (what drivers see)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_OFFER_COLUMNS} FROM {_OFFER_FROM}
            WHERE ($1::bigint IS NULL OR o.operator_id = $1)
              AND ($2::text IS NULL OR (cp.code = $2 AND o.active))
            ORDER BY o.id""",
        operator_id,
        car_park_code,
    )
    return rows


async def active_offer(conn: asyncpg.Connection, offer_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {_OFFER_COLUMNS}, o.car_park_id FROM {_OFFER_FROM}
            WHERE o.id = $1 AND o.active""",
        offer_id,
    )
    return row


async def bound(conn: asyncpg.Connection, account_id: int, plate: str, color: str) -> bool:
    return bool(
        await conn.fetchval(
            """SELECT EXISTS (SELECT 1 FROM plate_bindings WHERE account_id = $1 AND plate = $2
                              AND color = $3 AND unbound_at IS NULL)""",
            account_id,
            plate,
            color,
        )
    )


async def insert_purchase(
    conn: asyncpg.Connection,
    *,
    offer_id: int,
    account_id: int,
    plate: str,
    color: str,
    payment_id: int,
    car_park_id: int,
    amount_fen: int,
) -> int:
    purchase_id: int = await conn.fetchval(
        """INSERT INTO pass_purchases (offer_id, account_id, plate, color, payment_id,
                                       car_park_id, amount_fen)
           VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id""",
        offer_id,
        account_id,
        plate,
        color,
        payment_id,
        car_park_id,
        amount_fen,
    )
    return purchase_id


_PURCHASE_COLUMNS = """p.id, o.name AS offer, cp.code AS car_park, p.plate, p.color,
    p.amount_fen, p.starts_at, p.ends_at,
    CASE WHEN p.right_id IS NOT NULL THEN 'paid' ELSE pay.status END AS status,
    pay.pay_url, p.created_at"""


async def purchases(conn: asyncpg.Connection, account_id: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_PURCHASE_COLUMNS}
            FROM pass_purchases p JOIN pass_offers o ON o.id = p.offer_id
            JOIN car_parks cp ON cp.id = p.car_park_id JOIN payments pay ON pay.id = p.payment_id
            WHERE p.account_id = $1 ORDER BY p.id DESC LIMIT 100""",
        account_id,
    )
    return rows


async def purchase(conn: asyncpg.Connection, purchase_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {_PURCHASE_COLUMNS}
            FROM pass_purchases p JOIN pass_offers o ON o.id = p.offer_id
            JOIN car_parks cp ON cp.id = p.car_park_id JOIN payments pay ON pay.id = p.payment_id
            WHERE p.id = $1""",
        purchase_id,
    )
    return row


async def revenue(conn: asyncpg.Connection, operator_id: int) -> list[asyncpg.Record]:
    """Per offer of the company: passes paid for, their amount, what is earned and deferred."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT o.id AS offer_id, o.name AS offer, cp.code AS car_park,
                  count(p.id) AS sold, COALESCE(sum(p.amount_fen), 0)::bigint AS amount_fen,
                  COALESCE(sum(p.recognised_fen), 0)::bigint AS recognised_fen,
                  COALESCE(sum(p.amount_fen - p.recognised_fen), 0)::bigint AS deferred_fen
           FROM pass_offers o JOIN car_parks cp ON cp.id = o.car_park_id
           LEFT JOIN pass_purchases p ON p.offer_id = o.id AND p.right_id IS NOT NULL
           WHERE o.operator_id = $1
           GROUP BY o.id, cp.code ORDER BY o.id""",
        operator_id,
    )
    return rows
