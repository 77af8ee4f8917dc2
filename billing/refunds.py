"""Refunds: new money movements, never edits. An operator gives a fee back with a reason (the
request is audit-logged); money taken twice goes back by itself. The provider call runs from
the outbox with the refund's own number as idempotency key; on success the ledger gets
reversing lines and the driver a message."""

import uuid
from dataclasses import dataclass

import asyncpg

from billing import audit, ledger, notifications
from billing.tariff import format_fen


class RefundNotAllowed(ValueError):
    """The refund asked for is more than what is left of the order, or the order took no money."""


@dataclass(frozen=True, slots=True)
class Refund:
    id: int
    out_refund_no: str
    provider: str
    out_trade_no: str
    charge_id: int | None
    payment_id: int | None
    car_park_id: int
    account_id: int | None
    amount_fen: int
    kind: str
    reason: str
    status: str


_COLUMNS = """id, out_refund_no, provider, out_trade_no, charge_id, payment_id, car_park_id,
              account_id, amount_fen, kind, reason, status"""


def refusal_ends_refund(status_code: int | None) -> bool:
    """Whether a provider's refusal of a refund ends it: asking again with the same request
    cannot succeed (no such order, not refundable, less left than asked, a request the
    provider cannot take). A refusal of who asks (401: credentials, signature; 403:
    permission, the merchant's balance) is the car park's to put right, and the refund stays
    owed meanwhile."""
    return status_code not in (401, 403)


async def request_for_charge(
    conn: asyncpg.Connection,
    *,
    charge_id: int,
    amount_fen: int,
    reason: str,
    actor: str,
    kind: str = "operator",
) -> Refund:
    """A refund of a charged fee: an operator's, or (kind 'overpayment') money the charge
    collected after the debt it had become was paid otherwise, or after it was cancelled.
    Locks the charge so concurrent requests cannot together refund more than was charged."""
    row = await conn.fetchrow(
        """SELECT c.id, c.idempotency_key, c.amount_fen, c.status, c.account_id, s.car_park_id,
                  a.provider, c.settled_at IS NOT NULL AS collected
           FROM charges c JOIN sessions s ON s.id = c.session_id
           JOIN pay_later_agreements a ON a.id = c.agreement_id
           WHERE c.id = $1 FOR UPDATE OF c""",
        charge_id,
    )
    # A cancelled charge the provider collected anyway (charges.mark_collected_after_cancel)
    # took money too.
    if row is None or not (
        row["status"] == "succeeded" or (row["status"] == "cancelled" and row["collected"])
    ):
        raise RefundNotAllowed("only a charge the provider collected can be refunded")
    return await _request(
        conn,
        provider=row["provider"],
        out_trade_no=row["idempotency_key"],
        order_amount_fen=row["amount_fen"],
        charge_id=row["id"],
        payment_id=None,
        car_park_id=row["car_park_id"],
        account_id=row["account_id"],
        amount_fen=amount_fen,
        kind=kind,
        reason=reason,
        actor=actor,
    )


async def request_for_payment(
    conn: asyncpg.Connection,
    *,
    payment_id: int,
    amount_fen: int,
    reason: str,
    actor: str,
    kind: str = "operator",
    stay_id: int | None = None,
) -> Refund:
    """A refund of a completed payment. One payment may have paid fees of stays at several car
    parks (a gate's stay with debts from elsewhere, an app payment of several debts), each
    booked to its own car park's revenue, so a refund taking a fee back (kind 'operator') names
    `stay_id`, the stay whose fee it gives back: the payment's own held stay or one whose debt
    it settled. It comes out of that stay's car park's revenue. Money paid twice (kind
    'overpayment') comes out of the driver's overpaid account; its car park (the payment's
    stay's, else its first debt's) only places it in the refund lists. Locks the payment so
    concurrent requests cannot together refund more than was paid."""
    if kind != "overpayment" and stay_id is None:
        raise ValueError("a refund of a fee names the stay whose fee it gives back")
    row = await conn.fetchrow(
        """SELECT p.id, p.out_trade_no, p.amount_fen, p.status, p.account_id, p.provider,
                  p.session_id, p.debt_ids,
                  COALESCE(s.car_park_id, c.car_park_id) AS car_park_id
           FROM payments p LEFT JOIN sessions s ON s.id = p.session_id
           LEFT JOIN captures c
                ON c.capture_id = p.capture_id AND c.captured_at = p.capture_captured_at
           WHERE p.id = $1 FOR UPDATE OF p""",
        payment_id,
    )
    if row is None or row["status"] != "succeeded":
        raise RefundNotAllowed("only a payment the driver completed can be refunded")
    if stay_id is not None:
        car_park_id = await _car_park_of_paid_stay(conn, row, stay_id)
    else:
        car_park_id = row["car_park_id"]
        if car_park_id is None:
            # A debt payment made in the app: its first debt's car park.
            car_park_id = await conn.fetchval(
                """SELECT s.car_park_id FROM debts d
                   JOIN sessions s ON s.id = d.session_id WHERE d.id = ANY($1::bigint[])
                   ORDER BY d.id LIMIT 1""",
                row["debt_ids"],
            )
    return await _request(
        conn,
        provider=row["provider"],
        out_trade_no=row["out_trade_no"],
        order_amount_fen=row["amount_fen"],
        charge_id=None,
        payment_id=row["id"],
        car_park_id=car_park_id,
        account_id=row["account_id"],
        amount_fen=amount_fen,
        kind=kind,
        reason=reason,
        actor=actor,
    )


async def _car_park_of_paid_stay(
    conn: asyncpg.Connection, payment: asyncpg.Record, stay_id: int
) -> int:
    """The car park of a stay whose fee the payment paid: its own held stay (whether closed by
    it or settled as the debt it became), or a stay whose debt it was priced with or settled.
    A stay it paid nothing for is refused: its fee was never this payment's money."""
    car_park_id: int | None = await conn.fetchval(
        """SELECT s.car_park_id FROM sessions s
           WHERE s.id = $1 AND (s.id = $2 OR EXISTS (
               SELECT 1 FROM debts d WHERE d.session_id = s.id
                 AND (d.payment_id = $3 OR d.id = ANY($4::bigint[]))))""",
        stay_id,
        payment["session_id"],
        payment["id"],
        payment["debt_ids"],
    )
    if car_park_id is None:
        raise RefundNotAllowed("the payment paid nothing for that stay")
    return car_park_id


async def _request(
    conn: asyncpg.Connection,
    *,
    provider: str,
    out_trade_no: str,
    order_amount_fen: int,
    charge_id: int | None,
    payment_id: int | None,
    car_park_id: int,
    account_id: int | None,
    amount_fen: int,
    kind: str,
    reason: str,
    actor: str,
) -> Refund:
    if not 3 <= len(reason.strip()) <= 500:
        raise RefundNotAllowed("give a reason of 3 to 500 characters")
    already: int = await conn.fetchval(
        "SELECT COALESCE(sum(amount_fen), 0)::bigint FROM refunds "
        "WHERE out_trade_no = $1 AND status <> 'failed'",
        out_trade_no,
    )
    if amount_fen <= 0 or already + amount_fen > order_amount_fen:
        raise RefundNotAllowed(
            f"{format_fen(amount_fen)} is more than the {format_fen(order_amount_fen - already)} "
            "left to refund"
        )
    row = await conn.fetchrow(
        f"""WITH refund AS (
                INSERT INTO refunds (out_refund_no, provider, out_trade_no, charge_id, payment_id,
                                     car_park_id, account_id, amount_fen, kind, reason,
                                     requested_by)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING {_COLUMNS}),
            job AS (INSERT INTO outbox (kind, ref_id) SELECT 'refund', id FROM refund)
            SELECT {_COLUMNS} FROM refund""",
        f"r{uuid.uuid4().hex}",
        provider,
        out_trade_no,
        charge_id,
        payment_id,
        car_park_id,
        account_id,
        amount_fen,
        kind,
        reason,
        actor,
    )
    await audit.record(
        conn,
        actor,
        "refund.requested",
        f"refund:{row['id']}",
        {"out_trade_no": out_trade_no, "amount_fen": amount_fen, "reason": reason},
    )
    return Refund(**dict(row))


async def load(conn: asyncpg.Connection, refund_id: int) -> Refund | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM refunds WHERE id = $1", refund_id)
    return Refund(**dict(row)) if row else None


async def amount_of(conn: asyncpg.Connection, out_refund_no: str) -> int | None:
    amount: int | None = await conn.fetchval(
        "SELECT amount_fen FROM refunds WHERE out_refund_no = $1", out_refund_no
    )
    return amount


async def mark_succeeded(
    conn: asyncpg.Connection,
    out_refund_no: str,
    provider_ref: str,
    finished_at: object,
    *,
    style: notifications.MessageStyle | None = None,
) -> Refund | None:
    """Books a refund the provider made, once; None when it was already booked or unknown."""
    row = await conn.fetchrow(
        f"""UPDATE refunds SET status = 'succeeded', provider_ref = $2, finished_at = now(),
                   provider_finished_at = COALESCE($3, now()), last_error = NULL
            WHERE out_refund_no = $1 AND status = 'pending' RETURNING {_COLUMNS}""",
        out_refund_no,
        provider_ref,
        finished_at,
    )
    if row is None:
        return None
    refund = Refund(**dict(row))
    given_back_from = (
        ledger.revenue(refund.car_park_id)
        if refund.kind == "operator"
        else ledger.overpaid(refund.account_id)
    )
    await ledger.post(
        conn,
        "refund",
        [
            (given_back_from, refund.amount_fen),
            (ledger.clearing(refund.provider), -refund.amount_fen),
        ],
        charge_id=refund.charge_id,
        payment_id=refund.payment_id,
        refund_id=refund.id,
    )
    if refund.account_id is not None:
        await notifications.enqueue(
            conn,
            account_id=refund.account_id,
            kind="refund",
            source_key=f"refund:{refund.id}:succeeded",
            body=notifications.render(
                "refund",
                (style or notifications.MessageStyle()).language,
                amount=format_fen(refund.amount_fen),
                reason=refund.reason,
            ),
        )
    return refund


async def mark_failed(conn: asyncpg.Connection, refund_id: int, error: str) -> None:
    """The provider refused the refund: nothing moved, an operator looks at it."""
    await conn.execute(
        """UPDATE refunds SET status = 'failed', last_error = $2
           WHERE id = $1 AND status = 'pending'""",
        refund_id,
        error[:500],
    )


async def record_error(conn: asyncpg.Connection, refund_id: int, error: str) -> None:
    await conn.execute("UPDATE refunds SET last_error = $2 WHERE id = $1", refund_id, error[:500])
