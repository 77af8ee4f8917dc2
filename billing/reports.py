"""Money views for operators and finance: revenue per car park and day (from the ledger),
refunds with their reasons, debts by age; any of them as CSV."""

import csv
import io
from collections.abc import Sequence
from datetime import date
from typing import Any

import asyncpg


async def revenue(
    conn: asyncpg.Connection,
    *,
    start: date,
    end: date,
    timezone: str,
    car_park_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Per car park and local day: pay-later fees, fees paid at the gate, refunds, net."""
    rows = await conn.fetch(
        """SELECT (e.created_at AT TIME ZONE $3)::date AS day, cp.code AS car_park,
                  cp.name AS car_park_name,
                  (-sum(e.amount_fen) FILTER (WHERE e.kind = 'fee_accrued'))::bigint
                      AS pay_later_fen,
                  (-sum(e.amount_fen) FILTER (WHERE e.kind = 'payment_received'))::bigint
                      AS gate_fen,
                  (sum(e.amount_fen) FILTER (WHERE e.kind = 'refund'))::bigint AS refunded_fen,
                  (-sum(e.amount_fen))::bigint AS net_fen
           FROM ledger_entries e
           JOIN car_parks cp ON e.ledger_account = 'revenue:car_park:' || cp.id
           WHERE e.created_at >= ($1::date::timestamp AT TIME ZONE $3)
             AND e.created_at < (($2::date + 1)::timestamp AT TIME ZONE $3)
             AND ($4::bigint[] IS NULL OR cp.id = ANY($4))
           GROUP BY 1, 2, 3 ORDER BY 1, 2""",
        start,
        end,
        timezone,
        list(car_park_ids) if car_park_ids is not None else None,
    )
    return [
        {
            "day": r["day"].isoformat(),
            "car_park": r["car_park"],
            "car_park_name": r["car_park_name"],
            "pay_later_fen": r["pay_later_fen"] or 0,
            "paid_at_gate_fen": r["gate_fen"] or 0,
            "refunded_fen": r["refunded_fen"] or 0,
            "net_fen": r["net_fen"] or 0,
        }
        for r in rows
    ]


async def refunds(
    conn: asyncpg.Connection, *, start: date, end: date, timezone: str
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT r.id, r.created_at, cp.code AS car_park, r.amount_fen, r.kind, r.reason,
                  r.requested_by, r.status, r.out_refund_no
           FROM refunds r JOIN car_parks cp ON cp.id = r.car_park_id
           WHERE r.created_at >= ($1::date::timestamp AT TIME ZONE $3)
             AND r.created_at < (($2::date + 1)::timestamp AT TIME ZONE $3)
           ORDER BY r.created_at""",
        start,
        end,
        timezone,
    )
    return [{**dict(r), "created_at": r["created_at"].isoformat()} for r in rows]


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
