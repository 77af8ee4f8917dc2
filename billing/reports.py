"""Money views for operators and finance: revenue per car park and day (from the ledger),
refunds with their reasons, debts by age; any of them as CSV."""

import csv
import io
from collections.abc import Sequence
from datetime import date
from typing import Any

import asyncpg

from billing import ledger


async def revenue(
    conn: asyncpg.Connection,
    *,
    start: date,
    end: date,
    timezone: str,
    car_park_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Per car park and local day: pay-later fees accrued, fees paid at the gate (QR code) and
    at the booth (cash or card), passes earned, refunds, pay-later fees cancelled (a dispute
    the driver won before the charge was sent: counted the day it was cancelled), net. Every
    column is a sum of the day's revenue lines: net = pay_later + paid_at_gate + paid_at_booth
    + passes - refunded - cancelled.

    Only the car parks' revenue lines are read, from the covering index ledger_entries_revenue
    (an index-only scan of the months the days fall in), and summed per ledger account before
    the car parks are joined: a city's day is millions of ledger lines, its report 3,476 rows.
    An operator's accounts are matched through a hashed subplan: `= ANY($4)` compares every
    line with every account (10 s for 1,000 car parks on a 1M-stay day)."""
    accounts = [ledger.revenue(i) for i in car_park_ids] if car_park_ids is not None else None
    rows = await conn.fetch(
        """WITH days AS (
               SELECT (created_at AT TIME ZONE $3)::date AS day, ledger_account,
                      sum(amount_fen) FILTER (WHERE kind = 'fee_accrued') AS accrued_fen,
                      sum(amount_fen) FILTER (WHERE kind = 'payment_received') AS gate_fen,
                      sum(amount_fen) FILTER (WHERE kind = 'booth_payment') AS booth_fen,
                      sum(amount_fen) FILTER (WHERE kind = 'pass_revenue') AS pass_fen,
                      sum(amount_fen) FILTER (WHERE kind = 'refund') AS refunded_fen,
                      sum(amount_fen) FILTER (WHERE kind = 'fee_cancelled') AS cancelled_fen,
                      sum(amount_fen) AS total_fen
               FROM ledger_entries
               WHERE ledger_account LIKE 'revenue:%'
                 AND created_at >= ($1::date::timestamp AT TIME ZONE $3)
                 AND created_at < (($2::date + 1)::timestamp AT TIME ZONE $3)
                 AND ($4::text[] IS NULL OR ledger_account IN (SELECT unnest($4::text[])))
               GROUP BY 1, 2)
           SELECT d.day, cp.code AS car_park, cp.name AS car_park_name,
                  (-d.accrued_fen)::bigint AS pay_later_fen, (-d.gate_fen)::bigint AS gate_fen,
                  (-d.booth_fen)::bigint AS booth_fen, (-d.pass_fen)::bigint AS pass_fen,
                  d.refunded_fen::bigint AS refunded_fen,
                  d.cancelled_fen::bigint AS cancelled_fen, (-d.total_fen)::bigint AS net_fen
           FROM days d JOIN car_parks cp ON d.ledger_account = 'revenue:car_park:' || cp.id
           ORDER BY 1, 2""",
        start,
        end,
        timezone,
        accounts,
    )
    return [
        {
            "day": r["day"].isoformat(),
            "car_park": r["car_park"],
            "car_park_name": r["car_park_name"],
            "pay_later_fen": r["pay_later_fen"] or 0,
            "paid_at_gate_fen": r["gate_fen"] or 0,
            "paid_at_booth_fen": r["booth_fen"] or 0,
            # Passes bought in the app, as they are earned (billing/passes.py).
            "passes_fen": r["pass_fen"] or 0,
            "refunded_fen": r["refunded_fen"] or 0,
            "cancelled_fen": r["cancelled_fen"] or 0,
            "net_fen": r["net_fen"] or 0,
        }
        for r in rows
    ]


# One company's refunds of a period: read through refunds_car_park_created (migration 0022),
# never a scan of every company's refunds.
REFUNDS_SQL = """
    SELECT r.id, r.created_at, cp.code AS car_park, r.amount_fen, r.kind, r.reason,
           r.requested_by, r.status, r.out_refund_no
    FROM refunds r JOIN car_parks cp ON cp.id = r.car_park_id
    WHERE r.created_at >= ($1::date::timestamp AT TIME ZONE $3)
      AND r.created_at < (($2::date + 1)::timestamp AT TIME ZONE $3)
      AND ($4::bigint[] IS NULL OR r.car_park_id = ANY($4::bigint[]))
    ORDER BY r.created_at"""


async def refunds(
    conn: asyncpg.Connection,
    *,
    start: date,
    end: date,
    timezone: str,
    car_park_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Refunds created in the local days [start, end]; of `car_park_ids` only, when given."""
    ids = list(car_park_ids) if car_park_ids is not None else None
    rows = await conn.fetch(REFUNDS_SQL, start, end, timezone, ids)
    return [{**dict(r), "created_at": r["created_at"].isoformat()} for r in rows]


# A text cell a spreadsheet would run as a formula (or that hides one behind a tab or a line
# break) is written with a leading apostrophe: operators open these files in Excel, and a
# refund reason or a car park's name is typed by people. Numbers are left as they are.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    # CRLF (RFC 4180): then a CR inside a cell is quoted too, and cannot split a row.
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows({key: _cell(value) for key, value in row.items()} for row in rows)
    return out.getvalue()
