"""Arrears: a charge that finally failed is a debt of its account, and so is the fee of a held
stay whose car left without paying (a debt with no charge behind it).

A debt is settled by a payment (one priced with it, or the one made for its stay before the
stay's fee became a debt: `settle_stay`), by its own charge when the provider's success comes
late, or waived when an operator agrees with the driver's "not my car" on its stay (while that
dispute is open the debt is on hold: `UNDISPUTED`).

While an account has an open debt it loses pay-later (the exit holds and shows the debt with
the stay's fee, collected together through the gate's QR code), the driver can settle in the
app, and reminders go out at a fixed interval. The receivable of a debt stays open in the
ledger until a payment settles it.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from billing import notifications
from billing.tariff import format_fen

# Age buckets for the ageing report, in days: (label, lower bound inclusive).
AGE_BUCKETS: tuple[tuple[str, int], ...] = (
    ("0-7", 0),
    ("8-30", 8),
    ("31-90", 31),
    ("91+", 91),
)


@dataclass(frozen=True, slots=True)
class Debt:
    id: int
    account_id: int
    # None for the debt of a held stay left without paying (no charge was ever made).
    charge_id: int | None
    amount_fen: int
    created_at: datetime


# A debt whose stay the driver disputes ("not my car", parking/disputes/) is on hold until an
# operator decides: it blocks no pay-later, is not reminded of, asked for at a gate nor paid in
# the app. `{d}`: the debts row's alias.
UNDISPUTED = """NOT EXISTS (SELECT 1 FROM charge_disputes held_by
    WHERE (held_by.charge_id = {d}.charge_id OR held_by.debt_id = {d}.id)
      AND held_by.status = 'open')"""


async def _lock_account(conn: asyncpg.Connection, account_id: int) -> None:
    """Serialises every change of an account's debts, so that the arrears flag written last
    sees every debt committed before it."""
    await conn.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account_id)


async def open_debt(
    conn: asyncpg.Connection, account_id: int, charge_id: int, amount_fen: int
) -> None:
    await _lock_account(conn, account_id)
    await conn.execute(
        """INSERT INTO debts (account_id, charge_id, session_id, amount_fen)
           SELECT $1, $2, c.session_id, $3 FROM charges c WHERE c.id = $2
           ON CONFLICT DO NOTHING""",
        account_id,
        charge_id,
        amount_fen,
    )
    await _refresh_arrears(conn, account_id)


async def open_stay_debt(
    conn: asyncpg.Connection, account_id: int, session_id: int, amount_fen: int
) -> bool:
    """A held stay whose car left without paying: its fee is a debt with no charge behind it
    (the caller books the accrual). True when it was new; pay-later is blocked like any debt."""
    await _lock_account(conn, account_id)
    debt_id = await conn.fetchval(
        """INSERT INTO debts (account_id, session_id, amount_fen) VALUES ($1, $2, $3)
           ON CONFLICT DO NOTHING RETURNING id""",
        account_id,
        session_id,
        amount_fen,
    )
    await _refresh_arrears(conn, account_id)
    return debt_id is not None


async def open_debts(
    conn: asyncpg.Connection, account_id: int, *, lock: bool = False
) -> list[Debt]:
    lock_clause = "FOR UPDATE" if lock else ""
    rows = await conn.fetch(
        f"""SELECT id, account_id, charge_id, amount_fen, created_at FROM debts d
            WHERE account_id = $1 AND settled_at IS NULL AND {UNDISPUTED.format(d="d")}
            ORDER BY id {lock_clause}""",
        account_id,
    )
    return [Debt(**dict(r)) for r in rows]


async def settle(
    conn: asyncpg.Connection, account_id: int, payment_id: int, debt_ids: list[int]
) -> int:
    """Settles the listed debts that are still open with a payment; returns the fen settled.
    A debt disputed since the payment was priced is left on hold (the caller refunds what was
    paid for it). Pay-later comes back when nothing is left open (checked even with no debts
    listed)."""
    await _lock_account(conn, account_id)
    settled: int = await conn.fetchval(
        f"""WITH settled AS (
               UPDATE debts d SET settled_at = now(), payment_id = $2
               WHERE account_id = $1 AND id = ANY($3::bigint[]) AND settled_at IS NULL
                 AND {UNDISPUTED.format(d="d")}
               RETURNING amount_fen)
           SELECT COALESCE(sum(amount_fen), 0)::bigint FROM settled""",
        account_id,
        payment_id,
        debt_ids,
    )
    await _refresh_arrears(conn, account_id)
    return settled


async def settle_stay(
    conn: asyncpg.Connection, session_id: int, payment_id: int, paid_fen: int
) -> tuple[int, int] | None:
    """A payment made for a stay whose fee has since become a debt (its car left while the
    payment was on its way, `end_missed_stay`; or its pay-later charge failed) paid that fee:
    it settles the stay's debt, whichever account owes it. (that account, fen settled); None
    when nothing of the stay is owed (settled otherwise, waived), the debt is on hold for a
    dispute, or it is more than `paid_fen` (a debt is settled whole): the caller refunds the
    payment's stay part. Pay-later comes back when nothing else is open."""
    account_id: int | None = await conn.fetchval(
        "SELECT account_id FROM debts WHERE session_id = $1", session_id
    )
    if account_id is None:
        return None
    await _lock_account(conn, account_id)
    settled: int | None = await conn.fetchval(
        f"""UPDATE debts d SET settled_at = now(), payment_id = $2
            WHERE session_id = $1 AND settled_at IS NULL AND amount_fen <= $3
              AND {UNDISPUTED.format(d="d")}
            RETURNING amount_fen""",
        session_id,
        payment_id,
        paid_fen,
    )
    await _refresh_arrears(conn, account_id)
    return (account_id, settled) if settled is not None else None


async def settle_by_charge(conn: asyncpg.Connection, account_id: int, charge_id: int) -> bool:
    """The charge a debt came from was collected after all (late news): its debt is settled by
    it, unless a payment settled it before; True when it was still open. Pay-later comes back
    when nothing else is open."""
    await _lock_account(conn, account_id)
    settled = await conn.fetchval(
        """UPDATE debts SET settled_at = now(), settled_by_charge = true
           WHERE charge_id = $1 AND settled_at IS NULL RETURNING id""",
        charge_id,
    )
    await _refresh_arrears(conn, account_id)
    return settled is not None


async def _refresh_arrears(conn: asyncpg.Connection, account_id: int) -> None:
    """Pay-later is blocked while a debt is open and not disputed (the account is locked)."""
    await conn.execute(
        f"""UPDATE accounts SET blocked_for_arrears = EXISTS (
               SELECT 1 FROM debts d WHERE d.account_id = $1 AND d.settled_at IS NULL
                 AND {UNDISPUTED.format(d="d")})
            WHERE id = $1""",
        account_id,
    )


async def refresh_arrears(conn: asyncpg.Connection, account_id: int) -> None:
    """After a dispute of a debt's charge opened or was decided: the arrears block follows."""
    await _lock_account(conn, account_id)
    await _refresh_arrears(conn, account_id)


async def of_stay(
    conn: asyncpg.Connection, account_id: int, session_id: int
) -> asyncpg.Record | None:
    """The account's debt for the stay: its id, amount, charge (None for a missed stay's) and
    `owed` (not paid, not waived). Answered under the account's lock, so a payment settling it
    waits until the caller's transaction ends."""
    await _lock_account(conn, account_id)
    row: asyncpg.Record | None = await conn.fetchrow(
        """SELECT id, amount_fen, charge_id, settled_at IS NULL AS owed FROM debts
           WHERE session_id = $1 AND account_id = $2""",
        session_id,
        account_id,
    )
    return row


async def waive(conn: asyncpg.Connection, account_id: int, session_id: int) -> bool:
    """An operator agreed the stay was not the driver's car: its debt is waived (settled by
    nobody). The caller reverses the fee's accrual. False when none was open."""
    await _lock_account(conn, account_id)
    waived = await conn.fetchval(
        """UPDATE debts SET settled_at = now(), waived = true
           WHERE session_id = $1 AND account_id = $2 AND settled_at IS NULL RETURNING id""",
        session_id,
        account_id,
    )
    return waived is not None


async def send_reminders(
    conn: asyncpg.Connection,
    *,
    every: timedelta,
    now: datetime,
    limit: int = 500,
    language: notifications.Language = "zh",
) -> int:
    """Queues one reminder per account whose oldest unreminded debt is due; returns how many.
    Runs in the caller's transaction; the notification outbox sends them after commit."""
    rows = await conn.fetch(
        f"""WITH due AS (
               SELECT DISTINCT account_id FROM debts u
               WHERE settled_at IS NULL AND {UNDISPUTED.format(d="u")}
                 AND COALESCE(last_reminded_at, created_at) <= $1::timestamptz - $2::interval
               ORDER BY account_id LIMIT $3)
           SELECT d.account_id, sum(d.amount_fen)::bigint AS total, count(*) AS n,
                  max(d.reminders_sent) AS sent
           FROM debts d JOIN due USING (account_id)
           WHERE d.settled_at IS NULL AND {UNDISPUTED.format(d="d")}
           GROUP BY d.account_id""",
        now,
        every,
        limit,
    )
    for row in rows:
        await notifications.enqueue(
            conn,
            account_id=row["account_id"],
            kind="debt_reminder",
            source_key=f"debt-reminder:{row['account_id']}:{row['sent'] + 1}:{now.date()}",
            body=notifications.render(
                "debt_reminder", language, amount=format_fen(row["total"]), count=row["n"]
            ),
        )
        await conn.execute(
            f"""UPDATE debts d SET reminders_sent = reminders_sent + 1, last_reminded_at = $2
                WHERE account_id = $1 AND settled_at IS NULL AND {UNDISPUTED.format(d="d")}""",
            row["account_id"],
            now,
        )
    return len(rows)


async def ageing(conn: asyncpg.Connection, now: datetime) -> list[dict[str, int | str]]:
    """Open debts by age bucket: how many, how much, how many accounts."""
    rows = await conn.fetch(
        """SELECT amount_fen, account_id,
                  floor(extract(epoch FROM $1::timestamptz - created_at) / 86400)::int AS age_days
           FROM debts WHERE settled_at IS NULL""",
        now,
    )
    return age_buckets(rows)


def age_buckets(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, int | str]]:
    """Debts (rows with amount_fen, account_id, age_days) counted into AGE_BUCKETS."""
    report: list[dict[str, int | str]] = []
    bounds = [low for _, low in AGE_BUCKETS[1:]] + [10**9]
    for (label, low), high in zip(AGE_BUCKETS, bounds, strict=True):
        inside = [r for r in rows if low <= r["age_days"] < high]
        report.append(
            {
                "age_days": label,
                "debts": len(inside),
                "accounts": len({r["account_id"] for r in inside}),
                "amount_fen": sum(r["amount_fen"] for r in inside),
            }
        )
    return report
