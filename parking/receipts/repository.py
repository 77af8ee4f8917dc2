"""SQL of the receipt page: a receipt token's charge, stay, car park and dispute."""

import asyncpg


async def by_token_hash(conn: asyncpg.Connection, token_hash: bytes) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        """SELECT c.id AS charge_id, c.account_id, c.amount_fen, c.status AS charge_status,
                  s.id AS stay_id, s.car_park_id, s.plate, s.plate_color, s.entered_at,
                  s.exited_at, s.fixed_fee_fen, s.entry_capture_id, s.exit_capture_id,
                  cp.name AS car_park,
                  (SELECT COALESCE(sum(amount_fen), 0)::bigint FROM refunds
                   WHERE charge_id = c.id AND status = 'succeeded') AS refunded_fen
           FROM receipts r JOIN charges c ON c.id = r.charge_id
           JOIN sessions s ON s.id = c.session_id JOIN car_parks cp ON cp.id = s.car_park_id
           -- A deleted account's links lead nowhere: its stays and frames are nobody's to see.
           JOIN accounts a ON a.id = c.account_id AND a.deleted_at IS NULL
           WHERE r.token_hash = $1""",
        token_hash,
    )
    return row
