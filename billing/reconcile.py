"""Reconciliation: our books for one day against the provider's statement file for that day.

Both sides are keyed by our order number (out_trade_no / out_refund_no) and dated by the
provider's own clock (its `finished_at`, which we store with every booking), so a day means the
same money on both sides. Every difference lands in exactly one bucket:
  missing_at_provider  we booked money the statement does not show
  missing_in_ledger    the statement shows money we did not book (or booked as failed)
  amount_mismatch      both show it with different amounts (or the statement lists it twice)
Exceptions are recorded once per (provider, day, order); re-running finds the same set and adds
nothing. Nothing is corrected here: an exception waits for a person.

Booth takings (cash and cards an attendant took) never pass the provider: the day's booth
payments per car park and method are set beside what the ledger booked to their clearing
accounts, for the till count; a difference shows as `ledger_fen` unequal to `amount_fen`.
"""

from collections import Counter
from dataclasses import dataclass, field
from datetime import date

import asyncpg

from billing.providers import StatementLine

BUCKETS = ("missing_at_provider", "missing_in_ledger", "amount_mismatch")


@dataclass(frozen=True, slots=True)
class Difference:
    out_trade_no: str
    bucket: str
    ledger_amount_fen: int | None
    provider_amount_fen: int | None
    detail: str


@dataclass(frozen=True, slots=True)
class BoothTakings:
    car_park_id: int
    method: str
    payments: int
    amount_fen: int
    ledger_fen: int


@dataclass
class Reconciliation:
    provider: str
    statement_date: date
    provider_lines: int
    ledger_lines: int
    matched: int
    differences: list[Difference]
    new_exceptions: int = 0
    by_bucket: Counter[str] = field(default_factory=Counter)
    booth: list[BoothTakings] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {
            "provider": self.provider,
            "date": self.statement_date.isoformat(),
            "provider_lines": self.provider_lines,
            "ledger_lines": self.ledger_lines,
            "matched": self.matched,
            "exceptions": len(self.differences),
            "new_exceptions": self.new_exceptions,
            "by_bucket": {bucket: self.by_bucket.get(bucket, 0) for bucket in BUCKETS},
            "booth": {
                "payments": sum(b.payments for b in self.booth),
                "amount_fen": sum(b.amount_fen for b in self.booth),
                "ledger_fen": sum(b.ledger_fen for b in self.booth),
                "unbalanced": sum(1 for b in self.booth if b.amount_fen != b.ledger_fen),
            },
        }


# Money we booked with the provider, by the provider's day: charges, payments, refunds.
_BOOKED = """
    SELECT c.idempotency_key AS no, c.amount_fen FROM charges c
    JOIN pay_later_agreements a ON a.id = c.agreement_id
    WHERE a.provider = $1
      AND (c.status = 'succeeded' OR (c.status = 'cancelled' AND c.settled_at IS NOT NULL))
      AND (c.provider_finished_at AT TIME ZONE $3)::date = $2
    UNION ALL
    SELECT p.out_trade_no, p.amount_fen FROM payments p
    WHERE p.provider = $1 AND p.status = 'succeeded'
      AND (p.provider_finished_at AT TIME ZONE $3)::date = $2
    UNION ALL
    SELECT r.out_refund_no, r.amount_fen FROM refunds r
    WHERE r.provider = $1 AND r.status = 'succeeded'
      AND (r.provider_finished_at AT TIME ZONE $3)::date = $2"""

# The day's booth payments per car park and method, beside their clearing lines in the ledger.
_BOOTH = """
    WITH taken AS (
        SELECT car_park_id, method, count(*) AS payments, sum(amount_fen) AS amount_fen
        FROM booth_payments
        WHERE created_at >= ($1::date::timestamp AT TIME ZONE $2)
          AND created_at < (($1::date + 1)::timestamp AT TIME ZONE $2)
        GROUP BY 1, 2),
    booked AS (
        SELECT split_part(ledger_account, ':', 4)::bigint AS car_park_id,
               split_part(ledger_account, ':', 2) AS method, sum(amount_fen) AS ledger_fen
        FROM ledger_entries
        WHERE kind = 'booth_payment' AND ledger_account LIKE 'clearing:%:car_park:%'
          AND created_at >= ($1::date::timestamp AT TIME ZONE $2)
          AND created_at < (($1::date + 1)::timestamp AT TIME ZONE $2)
        GROUP BY 1, 2)
    SELECT car_park_id, method, COALESCE(t.payments, 0)::int AS payments,
           COALESCE(t.amount_fen, 0)::bigint AS amount_fen,
           COALESCE(b.ledger_fen, 0)::bigint AS ledger_fen
    FROM taken t FULL JOIN booked b USING (car_park_id, method)
    ORDER BY car_park_id, method"""

# What we know of an order number anywhere in our books, to explain a difference.
_KNOWN = """
    SELECT idempotency_key AS no, 'charge ' || status AS state FROM charges
    WHERE idempotency_key = ANY($1)
    UNION ALL
    SELECT out_trade_no, 'payment ' || status FROM payments WHERE out_trade_no = ANY($1)
    UNION ALL
    SELECT out_refund_no, 'refund ' || status FROM refunds WHERE out_refund_no = ANY($1)"""


async def reconcile(
    conn: asyncpg.Connection,
    provider: str,
    day: date,
    statement: list[StatementLine],
    timezone: str,
) -> Reconciliation:
    """Compares and records, in the caller's transaction."""
    ours = {r["no"]: r["amount_fen"] for r in await conn.fetch(_BOOKED, provider, day, timezone)}
    # Summed per number: a number the statement lists twice is money taken twice, never one
    # line standing for both.
    theirs: Counter[str] = Counter()
    listed: Counter[str] = Counter()
    for line in statement:
        theirs[line.out_trade_no] += line.amount_fen
        listed[line.out_trade_no] += 1
    unexplained = sorted(set(theirs) - set(ours))
    known = {r["no"]: r["state"] for r in await conn.fetch(_KNOWN, unexplained)}
    differences = [
        Difference(
            no,
            "missing_in_ledger",
            None,
            theirs[no],
            f"our books: {known[no]}" if no in known else "no such order in our books",
        )
        for no in unexplained
    ]
    differences += [
        Difference(no, "missing_at_provider", ours[no], None, "not in the provider's statement")
        for no in sorted(set(ours) - set(theirs))
    ]
    both = sorted(set(ours) & set(theirs))
    differences += [
        Difference(
            no,
            "amount_mismatch",
            ours[no],
            theirs[no],
            "amounts differ" if listed[no] == 1 else f"listed {listed[no]} times",
        )
        for no in both
        if ours[no] != theirs[no] or listed[no] > 1
    ]
    result = Reconciliation(
        provider,
        day,
        len(statement),
        len(ours),
        len(both) - sum(1 for d in differences if d.bucket == "amount_mismatch"),
        differences,
        by_bucket=Counter(d.bucket for d in differences),
        booth=[BoothTakings(**dict(r)) for r in await conn.fetch(_BOOTH, day, timezone)],
    )
    run_id = await conn.fetchval(
        """INSERT INTO reconciliation_runs
               (provider, statement_date, provider_lines, ledger_lines, matched, exceptions)
           VALUES ($1, $2, $3, $4, $5, $6) RETURNING id""",
        provider,
        day,
        result.provider_lines,
        result.ledger_lines,
        result.matched,
        len(differences),
    )
    for d in differences:
        inserted = await conn.fetchval(
            """INSERT INTO reconciliation_exceptions
                   (provider, statement_date, out_trade_no, bucket, ledger_amount_fen,
                    provider_amount_fen, detail, first_run_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               ON CONFLICT (provider, statement_date, out_trade_no) DO NOTHING RETURNING id""",
            provider,
            day,
            d.out_trade_no,
            d.bucket,
            d.ledger_amount_fen,
            d.provider_amount_fen,
            d.detail,
            run_id,
        )
        result.new_exceptions += inserted is not None
    return result
