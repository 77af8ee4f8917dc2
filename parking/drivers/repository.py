"""SQL of the driver app: a driver's own account, plates, stays, money and messages.

Every query takes the signed-in driver's account id and returns only what belongs to it.
"""

from datetime import datetime
from typing import Any

import asyncpg

from billing import debts

# The stays a driver may see: every stay charged to the account, and a stay charged to nobody
# of a vehicle (plate and colour) while it was bound to the account (a new binding sees no
# history from before it) when its entry read named the vehicle surely (`entry_certain`).
# Otherwise the stay may be another car's: its characters may be misread, or its colour a
# guess (a blue and a yellow 浙A12345 are two vehicles). Characters that settle the colour (a
# small new-energy plate's eight) say nothing of whether they were read right. $1 is the
# account id.
_VISIBLE_STAYS = """
    SELECT s.id, s.car_park_id, s.plate, s.plate_color, s.status, s.entered_at, s.exited_at,
           s.fee_fen, s.settlement, s.account_id, s.entry_capture_id, s.exit_capture_id,
           COALESCE(s.applied_right_id, s.assigned_right_id) AS right_id
    FROM plate_bindings b
    JOIN sessions s ON s.plate = b.plate AND s.plate_color = b.color
                   AND s.entry_certain
                   AND s.entered_at >= b.bound_at
                   AND (b.unbound_at IS NULL OR s.entered_at < b.unbound_at)
    WHERE b.account_id = $1 AND s.account_id IS NULL
    UNION
    SELECT s.id, s.car_park_id, s.plate, s.plate_color, s.status, s.entered_at, s.exited_at,
           s.fee_fen, s.settlement, s.account_id, s.entry_capture_id, s.exit_capture_id,
           COALESCE(s.applied_right_id, s.assigned_right_id) AS right_id
    FROM sessions s WHERE s.account_id = $1"""

_STAY_COLUMNS = """v.id, cp.name AS car_park, v.plate, v.status, v.entered_at, v.exited_at,
                   v.fee_fen, v.settlement,
                   (SELECT sp.name FROM assigned_rights ar JOIN right_specs sp ON sp.id = ar.spec_id
                    WHERE ar.id = v.right_id) AS pass_name"""


async def account(
    conn: asyncpg.Connection, account_id: int, *, lock: bool = False
) -> asyncpg.Record | None:
    """The account unless deleted; locked, it serialises plate and debt changes of the account
    (billing.debts locks the same row)."""
    lock_clause = "FOR UPDATE" if lock else ""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT id, phone, display_name, blocked_for_arrears FROM accounts
            WHERE id = $1 AND deleted_at IS NULL {lock_clause}""",
        account_id,
    )
    return row


async def active_bindings(conn: asyncpg.Connection, account_id: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT b.id, b.plate, b.color, b.bound_at, b.verified_by,
                  EXISTS (SELECT 1 FROM plate_disputes d WHERE d.status = 'open'
                          AND d.holder_account_id = b.account_id AND d.plate = b.plate
                          AND d.color = b.color) AS disputed,
                  ps.state AS service_state, ps.recorded_at AS service_checked_at,
                  a.id IS NOT NULL AS pay_later
           FROM plate_bindings b
           LEFT JOIN pay_later_agreements a
                  ON a.account_id = b.account_id AND a.cancelled_at IS NULL
           LEFT JOIN plate_services ps
                  ON ps.provider = a.provider AND ps.plate = b.plate AND ps.plate_color = b.color
           WHERE b.account_id = $1 AND b.unbound_at IS NULL ORDER BY b.bound_at, b.id""",
        account_id,
    )
    return rows


async def binding(
    conn: asyncpg.Connection, account_id: int, binding_id: int
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        """SELECT id, plate, color, bound_at, verified_by FROM plate_bindings
           WHERE id = $2 AND account_id = $1""",
        account_id,
        binding_id,
    )
    return row


async def active_binding(conn: asyncpg.Connection, plate: str, color: str) -> asyncpg.Record | None:
    """The vehicle's (plate, colour) active binding: id, account_id, licence_ref."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """SELECT id, account_id, licence_ref FROM plate_bindings
           WHERE plate = $1 AND color = $2 AND unbound_at IS NULL""",
        plate,
        color,
    )
    return row


async def insert_binding(
    conn: asyncpg.Connection,
    account_id: int,
    plate: str,
    color: str,
    *,
    verified_by: str,
    licence_ref: str,
) -> asyncpg.Record | None:
    """The new binding; None when the vehicle (plate, colour) is actively bound already (waits
    for a concurrent claim of it to commit or roll back, so at most one of them binds it)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """INSERT INTO plate_bindings (account_id, plate, color, verified_by, licence_ref)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (plate, color) WHERE unbound_at IS NULL DO NOTHING
           RETURNING id, plate, color, bound_at, verified_by""",
        account_id,
        plate,
        color,
        verified_by,
        licence_ref,
    )
    return row


async def open_dispute(
    conn: asyncpg.Connection,
    *,
    plate: str,
    color: str,
    claimant_account_id: int,
    holder_account_id: int,
    holder_binding_id: int,
    verified_by: str,
    licence_ref: str,
    same_licence_as_holder: bool | None,
) -> int:
    """The claimant's open dispute of the vehicle: opened now, or the one open already, which
    takes this claim's evidence (the registry's latest answer, the licence shown) and the
    current holder."""
    dispute_id: int = await conn.fetchval(
        """INSERT INTO plate_disputes (plate, color, claimant_account_id, holder_account_id,
                                       holder_binding_id, claimant_verified_by,
                                       claimant_licence_ref, same_licence_as_holder)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
           ON CONFLICT (plate, color, claimant_account_id) WHERE status = 'open' DO UPDATE
               SET holder_account_id = EXCLUDED.holder_account_id,
                   holder_binding_id = EXCLUDED.holder_binding_id,
                   claimant_verified_by = EXCLUDED.claimant_verified_by,
                   claimant_licence_ref = EXCLUDED.claimant_licence_ref,
                   same_licence_as_holder = EXCLUDED.same_licence_as_holder
           RETURNING id""",
        plate,
        color,
        claimant_account_id,
        holder_account_id,
        holder_binding_id,
        verified_by,
        licence_ref,
        same_licence_as_holder,
    )
    return dispute_id


async def unbind(conn: asyncpg.Connection, account_id: int, binding_id: int) -> bool:
    """Ends one of the account's active bindings; False when it has no such binding."""
    unbound = await conn.fetchval(
        """UPDATE plate_bindings SET unbound_at = now()
           WHERE id = $2 AND account_id = $1 AND unbound_at IS NULL RETURNING id""",
        account_id,
        binding_id,
    )
    return unbound is not None


async def active_agreement(conn: asyncpg.Connection, account_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        """SELECT id, provider, agreement_no, per_session_limit_fen, signed_at
           FROM pay_later_agreements WHERE account_id = $1 AND cancelled_at IS NULL""",
        account_id,
    )
    return row


async def open_debt_total(conn: asyncpg.Connection, account_id: int) -> int:
    """Everything owed, disputed debts included: what unbinding a plate and deleting the
    account wait for (a debt whose charge stands must still find its account)."""
    total: int = await conn.fetchval(
        """SELECT COALESCE(sum(amount_fen), 0)::bigint FROM debts
           WHERE account_id = $1 AND settled_at IS NULL""",
        account_id,
    )
    return total


async def stays(
    conn: asyncpg.Connection,
    account_id: int,
    *,
    status: str | None,
    before: datetime | None,
    limit: int,
) -> list[asyncpg.Record]:
    """The account's visible stays, newest entry first; `closed` is every stay that ended."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_STAY_COLUMNS}
            FROM ({_VISIBLE_STAYS}) v JOIN car_parks cp ON cp.id = v.car_park_id
            WHERE ($2::text IS NULL OR (v.status = 'open') = ($2 = 'open'))
              AND ($3::timestamptz IS NULL OR v.entered_at < $3)
            ORDER BY v.entered_at DESC, v.id DESC LIMIT $4""",
        account_id,
        status,
        before,
        limit,
    )
    return rows


async def stay(conn: asyncpg.Connection, account_id: int, stay_id: int) -> asyncpg.Record | None:
    """One visible stay with its charge, if any."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {_STAY_COLUMNS}, v.entry_capture_id, v.exit_capture_id,
                   c.id AS charge_id, c.amount_fen AS charge_amount_fen,
                   c.status AS charge_status, c.created_at AS charge_created_at,
                   c.settled_at AS charge_settled_at
            FROM ({_VISIBLE_STAYS}) v JOIN car_parks cp ON cp.id = v.car_park_id
            LEFT JOIN charges c ON c.session_id = v.id
            WHERE v.id = $2""",
        account_id,
        stay_id,
    )
    return row


async def refunds_of_stay(conn: asyncpg.Connection, stay_id: int) -> list[asyncpg.Record]:
    """Refunds of the stay's charge and of payments made for the stay."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT amount_fen, kind, reason, status, created_at, finished_at FROM refunds
           WHERE charge_id IN (SELECT id FROM charges WHERE session_id = $1)
              OR payment_id IN (SELECT id FROM payments WHERE session_id = $1)
           ORDER BY id""",
        stay_id,
    )
    return rows


async def open_debts(conn: asyncpg.Connection, account_id: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT d.id, cp.name AS car_park, s.id AS stay_id, s.entered_at, s.exited_at,
                  d.amount_fen, d.created_at
           FROM debts d
           JOIN sessions s ON s.id = d.session_id JOIN car_parks cp ON cp.id = s.car_park_id
           WHERE d.account_id = $1 AND d.settled_at IS NULL AND {debts.UNDISPUTED.format(d="d")}
           ORDER BY d.created_at, d.id""",
        account_id,
    )
    return rows


async def notifications(
    conn: asyncpg.Connection, account_id: int, limit: int
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT id, kind, body, status, created_at FROM notifications
           WHERE account_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2""",
        account_id,
        limit,
    )
    return rows


async def has_pending_charges(
    conn: asyncpg.Connection, account_id: int, *, binding_id: int | None = None
) -> bool:
    """A charge not yet settled for the account, or for a stay of one of its bound plates (only
    the binding `binding_id`'s, when given), whoever it is charged to: pending, or still
    awaiting the server's verification or an operator's confirmation (which a "not my car"
    dispute can hold for as long as the operator takes), since either may yet become a debt."""
    return bool(
        await conn.fetchval(
            """SELECT 1 FROM charges
               WHERE status IN ('pending', 'awaiting_verification', 'awaiting_confirmation') AND (
                   ($2::bigint IS NULL AND account_id = $1)
                   OR session_id IN (
                       SELECT s.id FROM plate_bindings b
                       JOIN sessions s ON s.plate = b.plate AND s.plate_color = b.color
                       WHERE b.account_id = $1 AND b.unbound_at IS NULL
                         AND ($2::bigint IS NULL OR b.id = $2)))
               LIMIT 1""",
            account_id,
            binding_id,
        )
    )


# The data export: what is held about an account, table by table, in explicit columns (so
# nothing internal such as provider idempotency keys leaks out by a new column).


async def _dicts(conn: asyncpg.Connection, sql: str, account_id: int) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(sql, account_id)]


async def export_account(conn: asyncpg.Connection, account_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(
        """SELECT id, phone, display_name, blocked_for_arrears, created_at FROM accounts
           WHERE id = $1""",
        account_id,
    )
    assert row is not None
    return dict(row)


async def export_bindings(conn: asyncpg.Connection, account_id: int) -> list[dict[str, Any]]:
    return await _dicts(
        conn,
        """SELECT id, plate, color, bound_at, unbound_at, verified_by, licence_ref
           FROM plate_bindings WHERE account_id = $1 ORDER BY bound_at, id""",
        account_id,
    )


async def export_agreements(conn: asyncpg.Connection, account_id: int) -> list[dict[str, Any]]:
    return await _dicts(
        conn,
        """SELECT id, provider, agreement_no, per_session_limit_fen, signed_at, cancelled_at
           FROM pay_later_agreements WHERE account_id = $1 ORDER BY signed_at, id""",
        account_id,
    )


async def export_stays(conn: asyncpg.Connection, account_id: int) -> list[dict[str, Any]]:
    """The account's visible stays, oldest first."""
    rows = await conn.fetch(
        f"""SELECT {_STAY_COLUMNS}, cp.code AS car_park_code, v.plate_color
            FROM ({_VISIBLE_STAYS}) v JOIN car_parks cp ON cp.id = v.car_park_id
            ORDER BY v.entered_at, v.id""",
        account_id,
    )
    return [dict(r) for r in rows]


async def export_charges(conn: asyncpg.Connection, account_id: int) -> list[dict[str, Any]]:
    return await _dicts(
        conn,
        """SELECT id, session_id AS stay_id, amount_fen, status, provider_ref, created_at,
                  settled_at
           FROM charges WHERE account_id = $1 ORDER BY id""",
        account_id,
    )


async def export_payments(conn: asyncpg.Connection, account_id: int) -> list[dict[str, Any]]:
    return await _dicts(
        conn,
        """SELECT id, out_trade_no, provider, purpose, session_id AS stay_id, stay_fee_fen,
                  debt_fen, amount_fen, status, created_at, paid_at
           FROM payments WHERE account_id = $1 ORDER BY id""",
        account_id,
    )


async def export_debts(conn: asyncpg.Connection, account_id: int) -> list[dict[str, Any]]:
    return await _dicts(
        conn,
        """SELECT id, charge_id, amount_fen, created_at, settled_at, payment_id, reminders_sent
           FROM debts WHERE account_id = $1 ORDER BY id""",
        account_id,
    )


async def export_refunds(conn: asyncpg.Connection, account_id: int) -> list[dict[str, Any]]:
    return await _dicts(
        conn,
        """SELECT id, charge_id, payment_id, amount_fen, kind, reason, status, created_at,
                  finished_at
           FROM refunds WHERE account_id = $1 ORDER BY id""",
        account_id,
    )


async def export_notifications(conn: asyncpg.Connection, account_id: int) -> list[dict[str, Any]]:
    return await _dicts(
        conn,
        """SELECT id, kind, body, status, created_at, sent_at FROM notifications
           WHERE account_id = $1 ORDER BY created_at, id""",
        account_id,
    )


async def export_disputes(conn: asyncpg.Connection, account_id: int) -> list[dict[str, Any]]:
    """The account's disputes, as claimant or as holder (the other party is not named)."""
    return await _dicts(
        conn,
        """SELECT id, plate, color,
                  CASE WHEN claimant_account_id = $1 THEN 'claimant' ELSE 'holder' END AS role,
                  status, created_at, resolved_at
           FROM plate_disputes WHERE claimant_account_id = $1 OR holder_account_id = $1
           ORDER BY id""",
        account_id,
    )


# Account deletion: personal data goes, money records stay (unlinked from the phone).


async def erase_account(conn: asyncpg.Connection, account_id: int) -> None:
    await conn.execute(
        """UPDATE accounts SET deleted_at = now(), phone = 'deleted:' || id, display_name = NULL
           WHERE id = $1""",
        account_id,
    )


async def unbind_all(conn: asyncpg.Connection, account_id: int) -> None:
    await conn.execute(
        "UPDATE plate_bindings SET unbound_at = now() WHERE account_id = $1 AND unbound_at IS NULL",
        account_id,
    )


async def withdraw_plate_disputes(
    conn: asyncpg.Connection, account_id: int
) -> list[asyncpg.Record]:
    """Open ownership disputes the account made or was the holder in (its bindings are gone):
    withdrawn; their id, vehicle and the claimant's account."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """UPDATE plate_disputes SET status = 'withdrawn', resolved_at = now(),
                  resolved_by = 'account_deleted'
           WHERE status = 'open' AND (claimant_account_id = $1 OR holder_account_id = $1)
           RETURNING id, plate, color, claimant_account_id""",
        account_id,
    )
    return rows


async def erase_notifications(conn: asyncpg.Connection, account_id: int) -> None:
    """Message texts, and the fields kept for an SMS template beside them, name plates, places
    and receipt links; those not yet sent are not sent any more."""
    await conn.execute(
        """UPDATE notifications SET body = '', params = NULL,
                  status = CASE WHEN status = 'pending' THEN 'failed' ELSE status END
           WHERE account_id = $1""",
        account_id,
    )


async def delete_sign_in_codes(conn: asyncpg.Connection, phone: str) -> None:
    await conn.execute("DELETE FROM login_codes WHERE phone = $1", phone)


async def plate_claims(conn: asyncpg.Connection, account_id: int) -> list[asyncpg.Record]:
    """The account's claims on vehicles bound to someone else (plate ownership disputes),
    newest first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT id, plate, color, status, created_at, resolved_at FROM plate_disputes
           WHERE claimant_account_id = $1 ORDER BY created_at DESC, id DESC LIMIT 20""",
        account_id,
    )
    return rows
