"""Payments a driver makes by themselves: a held car's fee plus any debts, through the QR code
the gate shows, or debts in the app.

`mark_paid` books a completed payment once. It pays the held stay's fee in whatever form that
fee has taken since it was priced: a stay still open closes (settlement 'paid_at_gate') and the
gate gets its open command through the outbox; a stay whose car left meanwhile, its fee now a
debt, has that debt settled. The debts it was priced with are settled too, and anything paid
twice (a fee or debt collected otherwise meanwhile, a stay an operator already let out) is
refunded by itself rather than kept.
"""

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

import asyncpg

from billing import audit, captures, debts, ledger, notifications, passes, refunds
from billing.tariff import format_fen


@dataclass(frozen=True, slots=True)
class Payment:
    id: int
    out_trade_no: str
    provider: str
    purpose: str
    account_id: int | None
    session_id: int | None
    capture_id: UUID | None
    stay_fee_fen: int
    debt_fen: int
    debt_ids: list[int]
    amount_fen: int
    status: str
    pay_url: str | None


_COLUMNS = """id, out_trade_no, provider, purpose, account_id, session_id, capture_id,
              stay_fee_fen, debt_fen, debt_ids, amount_fen, status, pay_url"""


def new_out_trade_no() -> str:
    return f"p{uuid.uuid4().hex[:31]}"  # WeChat Pay's out_trade_no: at most 32 characters


async def open_for_capture(conn: asyncpg.Connection, capture_id: UUID) -> Payment | None:
    """The payment the driver at a held exit started, if any (pending or already paid)."""
    row = await conn.fetchrow(
        f"""SELECT {_COLUMNS} FROM payments WHERE capture_id = $1 AND status <> 'closed'
            ORDER BY id DESC LIMIT 1""",
        capture_id,
    )
    return Payment(**dict(row)) if row else None


async def amount_of(conn: asyncpg.Connection, out_trade_no: str) -> int | None:
    amount: int | None = await conn.fetchval(
        "SELECT amount_fen FROM payments WHERE out_trade_no = $1", out_trade_no
    )
    return amount


async def open_debts_payment(conn: asyncpg.Connection, account_id: int) -> Payment | None:
    row = await conn.fetchrow(
        f"""SELECT {_COLUMNS} FROM payments
            WHERE account_id = $1 AND purpose = 'debts' AND status = 'pending'""",
        account_id,
    )
    return Payment(**dict(row)) if row else None


async def create(
    conn: asyncpg.Connection,
    *,
    provider: str,
    purpose: str,
    account_id: int | None,
    session_id: int | None,
    capture: tuple[UUID, datetime] | None,
    stay_fee_fen: int,
    owed: list[debts.Debt],
    pass_fen: int = 0,
) -> Payment:
    """`capture`: the held exit's (capture_id, captured_at), for a payment at the gate.
    `pass_fen`: the price of a pass bought in the app (purpose 'pass')."""
    capture_id, captured_at = capture if capture is not None else (None, None)
    row = await conn.fetchrow(
        f"""INSERT INTO payments (out_trade_no, provider, purpose, account_id, session_id,
                                  capture_id, capture_captured_at, stay_fee_fen, debt_fen,
                                  debt_ids, pass_fen, amount_fen)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,
                    $8::bigint + $9::bigint + $11::bigint)
            RETURNING {_COLUMNS}""",
        new_out_trade_no(),
        provider,
        purpose,
        account_id,
        session_id,
        capture_id,
        captured_at,
        stay_fee_fen,
        sum(d.amount_fen for d in owed),
        [d.id for d in owed],
        pass_fen,
    )
    return Payment(**dict(row))


async def set_pay_url(conn: asyncpg.Connection, payment_id: int, pay_url: str, ref: str) -> bool:
    """Keeps the provider order's page; False when the payment is no longer pending (withdrawn
    while its order was being made): it must not be offered."""
    offered = await conn.fetchval(
        """UPDATE payments SET pay_url = $2, provider_ref = $3
           WHERE id = $1 AND status = 'pending' RETURNING true""",
        payment_id,
        pay_url,
        ref,
    )
    return bool(offered)


async def mark_closed(conn: asyncpg.Connection, out_trade_no: str) -> None:
    await conn.execute(
        "UPDATE payments SET status = 'closed' WHERE out_trade_no = $1 AND status = 'pending'",
        out_trade_no,
    )


async def mark_paid(
    conn: asyncpg.Connection,
    out_trade_no: str,
    provider_ref: str,
    finished_at: datetime | None,
    *,
    language: notifications.Language = "zh",
) -> Payment | None:
    """Books a completed payment once; None when it was already booked or is not ours. The
    driver's message is written in `language`."""
    row = await conn.fetchrow(
        f"""UPDATE payments SET status = 'succeeded', paid_at = now(), provider_ref = $2,
                   provider_finished_at = COALESCE($3, now())
            WHERE out_trade_no = $1 AND status IN ('pending', 'closed') RETURNING {_COLUMNS}""",
        out_trade_no,
        provider_ref,
        finished_at,
    )
    if row is None:
        return None
    payment = Payment(**dict(row))
    if payment.capture_id is not None:
        # As an operator deciding the held capture locks it, before the stay: the booking
        # waits for a decision being made and reads it committed (a vehicle named since is
        # another stay's), and the two never lock in opposite orders (a deadlock, a 500).
        await captures.lock_for_decision(conn, payment.capture_id)
    if payment.purpose == "pass":
        # Deferred revenue, and the pass's right (billing/passes.py).
        await passes.activate(conn, payment.id, payment.provider, datetime.now(UTC))
        return payment
    stay_booked, car_park_id = await _close_stay(conn, payment)
    debt_booked = (
        await debts.settle(conn, payment.account_id, payment.id, payment.debt_ids)
        if payment.account_id is not None
        else 0
    )
    stay_debt = await _settle_stay_debt(conn, payment) if not stay_booked else None
    overpaid = payment.amount_fen - stay_booked - debt_booked - (stay_debt[1] if stay_debt else 0)
    lines = received_lines(
        payment.provider,
        payment.amount_fen,
        stay_fen=stay_booked,
        car_park_id=car_park_id,
        debt_fen=debt_booked,
        account_id=payment.account_id,
        stay_debt=stay_debt,
    )
    await ledger.post(
        conn, "payment_received", lines, session_id=payment.session_id, payment_id=payment.id
    )
    if overpaid:
        await refunds.request_for_payment(
            conn,
            payment_id=payment.id,
            amount_fen=overpaid,
            reason="paid twice: the debt or stay was already settled",
            actor="system",
            kind="overpayment",
        )
    if stay_booked:
        await conn.execute(
            "INSERT INTO outbox (kind, ref_id) VALUES ('gate_command', $1)", payment.id
        )
        await _resolve_held_exception(conn, payment)
    if payment.account_id is not None:
        await notifications.enqueue(
            conn,
            account_id=payment.account_id,
            kind="payment_received",
            source_key=f"payment:{payment.id}:succeeded",
            body=notifications.render(
                "payment_received", language, amount=format_fen(payment.amount_fen)
            ),
        )
    return payment


async def _resolve_held_exception(conn: asyncpg.Connection, payment: Payment) -> None:
    """The held exit's open exception (an 'uncertain' hold waits for an operator while the
    driver may pay) is settled by the payment that closed its stay: resolved in the same
    transaction, audit-logged, and gone from the operator's queue."""
    if payment.capture_id is None:
        return
    row = await conn.fetchrow(
        """UPDATE lane_exceptions SET status = 'resolved', resolved_by = $2, resolved_at = now()
           WHERE capture_id = $1 AND status = 'open' RETURNING id, reason""",
        payment.capture_id,
        f"payment:{payment.id}",
    )
    if row is not None:
        await audit.record(
            conn,
            "system",
            "lane_exception.resolved",
            f"lane_exception:{row['id']}",
            {
                "capture_id": str(payment.capture_id),
                "reason": row["reason"],
                "settled_by": "gate_payment",
                "payment_id": payment.id,
                "session_id": payment.session_id,
                "fee_fen": payment.stay_fee_fen,
            },
        )


def received_lines(
    provider: str,
    amount_fen: int,
    *,
    stay_fen: int,
    car_park_id: int | None,
    debt_fen: int,
    account_id: int | None,
    stay_debt: tuple[int, int] | None = None,
) -> list[tuple[str, int]]:
    """A booked payment: the provider collected `amount_fen` for the stay's fee (the car park's
    revenue), the debts it settled (the driver's receivable) and, for the rest, money paid twice
    (owed back to the driver). `stay_debt`: (account, fen) when the stay's fee had become a
    debt before the payment was booked; its revenue was booked at that debt's accrual, so the
    payment settles the receivable of the account that owes it."""
    stay_debt_fen = stay_debt[1] if stay_debt is not None else 0
    overpaid = amount_fen - stay_fen - debt_fen - stay_debt_fen
    lines = [(ledger.clearing(provider), amount_fen)]
    if stay_fen and car_park_id is not None:
        lines.append((ledger.revenue(car_park_id), -stay_fen))
    receivables: dict[int, int] = {}
    if debt_fen and account_id is not None:
        receivables[account_id] = debt_fen
    if stay_debt is not None:
        receivables[stay_debt[0]] = receivables.get(stay_debt[0], 0) + stay_debt_fen
    lines.extend((ledger.receivable(owner), -fen) for owner, fen in receivables.items())
    if overpaid:
        lines.append((ledger.overpaid(account_id), -overpaid))
    return lines


async def _close_stay(conn: asyncpg.Connection, payment: Payment) -> tuple[int, int | None]:
    """Closes the held stay the payment was for, if it is still open and still the stay its
    capture was decided for; (fen booked, car park). A person may have named another vehicle
    on the capture since (a doubtful read): the car that paid was that one, whose stay left
    otherwise, and this stay's car is still inside; the stay part then goes back as overpaid."""
    if payment.session_id is None or payment.stay_fee_fen == 0:
        return 0, None
    row = await conn.fetchrow(
        """UPDATE sessions SET status = 'closed', exited_at = now(), exit_capture_id = $2,
                  fee_fen = $3, account_id = $4, settlement = 'paid_at_gate'
           WHERE id = $1 AND status = 'open'
             AND ($2::uuid IS NULL OR EXISTS (
                 SELECT 1 FROM captures c WHERE c.capture_id = $2 AND c.session_id = $1))
           RETURNING car_park_id""",
        payment.session_id,
        payment.capture_id,
        payment.stay_fee_fen,
        payment.account_id,
    )
    return (payment.stay_fee_fen, row["car_park_id"]) if row else (0, None)


async def _settle_stay_debt(conn: asyncpg.Connection, payment: Payment) -> tuple[int, int] | None:
    """The held stay the payment was for is no longer open: if its fee has become a debt
    meanwhile (its car left before the payment was booked), the payment pays that debt rather
    than going back as paid twice; (account, fen settled). Only a fee collected otherwise (a
    booth, a charge, another payment) leaves the stay part to be refunded."""
    if payment.session_id is None or payment.stay_fee_fen == 0:
        return None
    return await debts.settle_stay(conn, payment.session_id, payment.id, payment.stay_fee_fen)
