"""SQL of "not my car": a driver's dispute of a stay's charge (or of a missed stay's debt, which
has no charge) and an operator's decision."""

from datetime import datetime
from uuid import UUID

import asyncpg

from billing import charges

_DISPUTE = """d.id, d.charge_id, d.debt_id, d.session_id, d.account_id, d.car_park_id,
              d.amount_fen, d.exit_capture_id, d.exited_at, d.via, d.held, d.status,
              d.opened_at, d.decided_at, d.decided_by, d.note, d.refund_id"""


async def lock_charge(conn: asyncpg.Connection, charge_id: int) -> asyncpg.Record | None:
    """The charge, locked (the outbox worker takes the same lock before sending it), with
    what its messages say and whether no money can move for it (`unsent`)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT c.id, c.session_id, c.account_id, c.amount_fen, c.status,
                   {charges.NOT_WITH_PROVIDER.format(c="c")} AS unsent,
                   s.car_park_id, cp.name AS car_park, s.exit_capture_id, s.exited_at
            FROM charges c JOIN sessions s ON s.id = c.session_id
            JOIN car_parks cp ON cp.id = s.car_park_id
            WHERE c.id = $1 FOR UPDATE OF c""",
        charge_id,
    )
    return row


async def charge_of_stay(conn: asyncpg.Connection, account_id: int, stay_id: int) -> int | None:
    """The charge of one of the account's stays (charged to it)."""
    charge_id: int | None = await conn.fetchval(
        "SELECT id FROM charges WHERE session_id = $1 AND account_id = $2", stay_id, account_id
    )
    return charge_id


async def missed_stay(
    conn: asyncpg.Connection, account_id: int, stay_id: int
) -> asyncpg.Record | None:
    """One of the account's stays that it owes as a missed stay's debt (no charge), with what
    its messages say."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """SELECT s.id, s.car_park_id, cp.name AS car_park, s.exit_capture_id, s.exited_at
           FROM sessions s
           JOIN car_parks cp ON cp.id = s.car_park_id
           WHERE s.id = $1 AND s.account_id = $2 AND s.settlement = 'debt'""",
        stay_id,
        account_id,
    )
    return row


async def disputable(conn: asyncpg.Connection, account_id: int, stay_id: int) -> bool:
    """Whether "not my car" on the stay has something to dispute (`service.dispute_stay`): its
    charge to the account, not cancelled, and while a failed one's debt is owed; or a missed
    stay's debt of the account, while owed."""
    found: bool | None = await conn.fetchval(
        """SELECT CASE WHEN c.id IS NOT NULL
                       THEN c.status <> 'cancelled'
                            AND (c.status <> 'failed' OR d.settled_at IS NULL)
                       ELSE d.id IS NOT NULL AND d.settled_at IS NULL END
           FROM sessions s
           LEFT JOIN charges c ON c.session_id = s.id AND c.account_id = $2
           LEFT JOIN debts d ON d.session_id = s.id AND d.account_id = $2
           WHERE s.id = $1""",
        stay_id,
        account_id,
    )
    return bool(found)


async def dispute_of_charge(conn: asyncpg.Connection, charge_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {_DISPUTE} FROM charge_disputes d WHERE d.charge_id = $1", charge_id
    )
    return row


async def dispute_of_debt(conn: asyncpg.Connection, debt_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {_DISPUTE} FROM charge_disputes d WHERE d.debt_id = $1", debt_id
    )
    return row


async def dispute_of_stay(conn: asyncpg.Connection, stay_id: int) -> asyncpg.Record | None:
    """The dispute of the stay's charge or missed stay's debt (not one whose awaiting charge
    was deleted when the driver was right: the stay was opened again since)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {_DISPUTE} FROM charge_disputes d
            WHERE d.session_id = $1 AND (d.charge_id IS NOT NULL OR d.debt_id IS NOT NULL)""",
        stay_id,
    )
    return row


async def insert_dispute(
    conn: asyncpg.Connection,
    *,
    stay_id: int,
    charge_id: int | None,
    debt_id: int | None,
    amount_fen: int,
    exit_capture_id: UUID | None,
    exited_at: datetime | None,
    account_id: int,
    car_park_id: int,
    via: str,
    held: bool,
) -> asyncpg.Record:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""INSERT INTO charge_disputes AS d
                (session_id, charge_id, debt_id, amount_fen, exit_capture_id, exited_at,
                 account_id, car_park_id, via, held)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING {_DISPUTE}""",
        stay_id,
        charge_id,
        debt_id,
        amount_fen,
        exit_capture_id,
        exited_at,
        account_id,
        car_park_id,
        via,
        held,
    )
    assert row is not None
    return row


# The exit as it was disputed (`d.exit_capture_id`, `d.exited_at`): a stay opened again when
# the driver was right about a charge that was awaiting has lost its own.
_LISTED = f"""
    SELECT {_DISPUTE}, c.status AS charge_status, s.id AS stay_id, s.plate,
           s.entered_at, s.entry_capture_id,
           cp.code AS car_park_code, cp.name AS car_park
    FROM charge_disputes d JOIN car_parks cp ON cp.id = d.car_park_id
    JOIN sessions s ON s.id = d.session_id LEFT JOIN charges c ON c.id = d.charge_id
    WHERE cp.operator_id = $1"""


async def list_disputes(
    conn: asyncpg.Connection,
    operator_id: int,
    *,
    status: str | None,
    car_park: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    """The company's disputes, oldest first (the queue's order)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""{_LISTED} AND ($2::text IS NULL OR d.status = $2)
              AND ($3::text IS NULL OR cp.code = $3)
            ORDER BY d.opened_at, d.id LIMIT $4""",
        operator_id,
        status,
        car_park,
        limit,
    )
    return rows


async def dispute(
    conn: asyncpg.Connection, operator_id: int, dispute_id: int, *, lock: bool = False
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"{_LISTED} AND d.id = $2 {'FOR UPDATE OF d' if lock else ''}", operator_id, dispute_id
    )
    return row


async def captures(conn: asyncpg.Connection, capture_ids: list[UUID]) -> list[asyncpg.Record]:
    """What the lane read on these captures (the exception's candidates when a person was
    asked, the camera's own read when the server's reader decided), and whether their frame is
    still kept."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT k.capture_id, c.captured_at, g.code AS gate, c.plate, c.read_confidence,
                  c.plate_source, c.match_status, c.outcome, e.candidates,
                  c.camera_plate, c.camera_color, c.camera_confidence,
                  (f.image IS NOT NULL OR e.image IS NOT NULL) AS has_frame
           FROM capture_keys k
           JOIN captures c ON c.capture_id = k.capture_id AND c.captured_at = k.captured_at
           JOIN gates g ON g.id = c.gate_id
           LEFT JOIN capture_frames f ON f.capture_id = k.capture_id
           LEFT JOIN lane_exceptions e ON e.capture_id = k.capture_id
           WHERE k.capture_id = ANY($1::uuid[])""",
        capture_ids,
    )
    return rows


async def frame(conn: asyncpg.Connection, capture_id: UUID) -> bytes | None:
    """The capture's kept frame: its evidence frame, else the one its exception kept."""
    image: bytes | None = await conn.fetchval(
        """SELECT COALESCE(
               (SELECT image FROM capture_frames WHERE capture_id = $1),
               (SELECT image FROM lane_exceptions WHERE capture_id = $1))""",
        capture_id,
    )
    return image


async def refundable_fen(conn: asyncpg.Connection, charge_id: int) -> int:
    """What is left to refund of a collected charge."""
    left: int = await conn.fetchval(
        """SELECT c.amount_fen - COALESCE(sum(r.amount_fen), 0)::bigint FROM charges c
           LEFT JOIN refunds r ON r.out_trade_no = c.idempotency_key AND r.status <> 'failed'
           WHERE c.id = $1 GROUP BY c.amount_fen""",
        charge_id,
    )
    return left


async def debt_payment_left(conn: asyncpg.Connection, session_id: int) -> tuple[int, int] | None:
    """The payment that settled the stay's debt (in the app, or with a gate's QR code), and
    what of that debt is left to refund of it: the stay's fee paid the second way, when its
    charge was collected late (`billing.settlement`: one of the two then goes back)."""
    row = await conn.fetchrow(
        """SELECT p.id, LEAST(d.amount_fen, p.amount_fen - COALESCE(
                      (SELECT sum(r.amount_fen) FROM refunds r
                       WHERE r.out_trade_no = p.out_trade_no AND r.status <> 'failed'), 0)
                  )::bigint AS left_fen
           FROM debts d JOIN payments p ON p.id = d.payment_id
           WHERE d.session_id = $1 AND d.settled_at IS NOT NULL AND NOT d.waived
             AND p.status = 'succeeded'""",
        session_id,
    )
    return (row["id"], row["left_fen"]) if row is not None and row["left_fen"] > 0 else None


async def withdraw_of_account(conn: asyncpg.Connection, account_id: int) -> list[int]:
    """Withdraws the account's open disputes as it is deleted; their ids."""
    rows = await conn.fetch(
        """UPDATE charge_disputes SET status = 'withdrawn', decided_at = now(),
                  decided_by = 'account_deleted'
           WHERE account_id = $1 AND status = 'open' RETURNING id""",
        account_id,
    )
    return [r["id"] for r in rows]


async def mark_decided(
    conn: asyncpg.Connection,
    dispute_id: int,
    *,
    status: str,
    actor: str,
    note: str | None,
    refund_id: int | None,
    detach_charge: bool = False,
) -> asyncpg.Record | None:
    """Decides an open dispute once; None when it was decided already. `detach_charge`: its
    charge is about to be deleted (it keeps its stay and amount)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""UPDATE charge_disputes AS d SET status = $2, decided_at = now(), decided_by = $3,
                   note = $4, refund_id = $5,
                   charge_id = CASE WHEN $6 THEN NULL ELSE charge_id END
            WHERE d.id = $1 AND d.status = 'open' RETURNING {_DISPUTE}""",
        dispute_id,
        status,
        actor,
        note,
        refund_id,
        detach_charge,
    )
    return row
