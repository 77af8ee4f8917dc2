"""Double-entry ledger: append-only lines, each transaction summing to zero.

Ledger accounts:
  receivable:account:{id}   what a driver owes (debit) until the provider pays it
  revenue:car_park:{id}     a car park's earned fees (credit)
  clearing:provider:{name}  money the provider has collected for us (debit)
  overpaid:account:{id}     money a driver paid twice, owed back until refunded (credit)
  clearing:{cash|card}:car_park:{id}  money an attendant took at the car park's booth (debit)
  deferred:pass_purchase:{id}  a pass paid for and not yet earned (credit), recognised into
                            the car park's revenue over the pass's period (billing/passes.py)
"""

import uuid
from collections.abc import Sequence

import asyncpg


def receivable(account_id: int) -> str:
    return f"receivable:account:{account_id}"


def revenue(car_park_id: int) -> str:
    return f"revenue:car_park:{car_park_id}"


def clearing(provider: str) -> str:
    return f"clearing:provider:{provider}"


def booth_clearing(method: str, car_park_id: int) -> str:
    """Cash in the booth's till, or card takings the acquirer owes the car park."""
    return f"clearing:{method}:car_park:{car_park_id}"


def deferred_pass(purchase_id: int) -> str:
    return f"deferred:pass_purchase:{purchase_id}"


def overpaid(account_id: int | None) -> str:
    return f"overpaid:account:{account_id if account_id is not None else 'anonymous'}"


class UnbalancedTransaction(ValueError):
    pass


def balanced(kind: str, lines: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """The lines of one transaction as they are booked: zero amounts left out; raises
    UnbalancedTransaction unless the rest sum to zero (and there is any)."""
    kept = [(account, amount) for account, amount in lines if amount != 0]
    if sum(amount for _, amount in kept) != 0 or not kept:
        raise UnbalancedTransaction(f"{kind}: {kept}")
    return kept


async def post(
    conn: asyncpg.Connection,
    kind: str,
    lines: Sequence[tuple[str, int]],
    *,
    session_id: int | None = None,
    charge_id: int | None = None,
    payment_id: int | None = None,
    refund_id: int | None = None,
) -> uuid.UUID:
    """Appends one balanced transaction; the database re-checks the balance at commit."""
    lines = balanced(kind, lines)
    transaction_id = uuid.uuid4()
    await conn.executemany(
        """INSERT INTO ledger_entries
               (transaction_id, ledger_account, amount_fen, kind, session_id, charge_id,
                payment_id, refund_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
        [
            (transaction_id, account, amount, kind, session_id, charge_id, payment_id, refund_id)
            for account, amount in lines
        ],
    )
    return transaction_id


async def is_balanced(conn: asyncpg.Connection) -> bool:
    """True when the whole ledger and every transaction in it sum to zero."""
    unbalanced = await conn.fetchval(
        """SELECT count(*) FROM (SELECT transaction_id FROM ledger_entries
                                 GROUP BY transaction_id HAVING sum(amount_fen) <> 0) t"""
    )
    total = await conn.fetchval("SELECT COALESCE(sum(amount_fen), 0)::bigint FROM ledger_entries")
    return bool(unbalanced == 0 and total == 0)


async def balance(conn: asyncpg.Connection, ledger_account: str) -> int:
    value: int = await conn.fetchval(
        "SELECT COALESCE(sum(amount_fen), 0)::bigint FROM ledger_entries WHERE ledger_account = $1",
        ledger_account,
    )
    return value
