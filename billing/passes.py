"""Monthly passes bought in the app: booked when paid, recognised over their period.

A paid purchase (`activate`, called by `payments.mark_paid` for a 'pass' payment) gets its
assigned right for [starts_at, ends_at) — from now, or from the end of the same vehicle's pass of
the same offer when it is a renewal — and the ledger books the money as deferred revenue:
clearing:provider ↔ deferred:pass_purchase:N. `recognise` moves the earned part into the car
park's revenue: amount × elapsed / period, in integer fen rounded down, the whole amount from
the end of the period on; each call books only what is newly earned, so running it again books
nothing. `send_expiry_reminders` tells the driver once before a pass ends (unless renewed).
"""

from datetime import datetime, timedelta

import asyncpg

from billing import ledger, notifications

_US = timedelta(microseconds=1)


async def assign_right(
    conn: asyncpg.Connection,
    *,
    spec_id: int,
    operator_id: int,
    vehicles: list[tuple[str, str]],
    valid_from: datetime,
    valid_until: datetime,
    max_inside: int | None,
    label: str | None,
    source: str,
    created_by: str,
) -> int:
    """An assigned right of a specification for vehicles (plate, colour), in one statement: the
    one writer of assigned rights (an operator's, an import's, a purchase's)."""
    right_id: int = await conn.fetchval(
        """WITH ar AS (
               INSERT INTO assigned_rights (spec_id, operator_id, valid_from, valid_until,
                                            max_inside, label, source, created_by)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id
           ), plates AS (
               INSERT INTO assigned_right_plates (right_id, plate, color)
               SELECT ar.id, v.plate, v.color FROM ar,
                      unnest($9::text[], $10::text[]) AS v (plate, color)
           )
           SELECT id FROM ar""",
        spec_id,
        operator_id,
        valid_from,
        valid_until,
        max_inside,
        label,
        source,
        created_by,
        [v[0] for v in vehicles],
        [v[1] for v in vehicles],
    )
    return right_id


async def activate(conn: asyncpg.Connection, payment_id: int, provider: str, now: datetime) -> None:
    """Books a paid pass purchase once (the payment is booked once: `payments.mark_paid`).
    Purchases of one offer are booked one at a time (its row locked first, in a statement of
    its own so that the next one reads the pass this one made): two for one vehicle paid at
    once run one after the other, never side by side for the same days."""
    await conn.execute(
        """SELECT 1 FROM pass_offers o JOIN pass_purchases p ON p.offer_id = o.id
           WHERE p.payment_id = $1 FOR UPDATE OF o""",
        payment_id,
    )
    purchase = await conn.fetchrow(
        """SELECT p.id, p.offer_id, p.account_id, p.plate, p.color, p.amount_fen, o.spec_id,
                  o.operator_id, o.period_days, o.name,
                  (SELECT max(q.ends_at) FROM pass_purchases q
                   WHERE q.offer_id = p.offer_id AND q.plate = p.plate AND q.color = p.color
                     AND q.account_id = p.account_id AND q.ends_at > $2) AS current_end
           FROM pass_purchases p JOIN pass_offers o ON o.id = p.offer_id
           WHERE p.payment_id = $1 AND p.right_id IS NULL FOR UPDATE OF p""",
        payment_id,
        now,
    )
    if purchase is None:
        return
    starts = max(now, purchase["current_end"] or now)
    ends = starts + timedelta(days=purchase["period_days"])
    right_id = await assign_right(
        conn,
        spec_id=purchase["spec_id"],
        operator_id=purchase["operator_id"],
        vehicles=[(purchase["plate"], purchase["color"])],
        valid_from=starts,
        valid_until=ends,
        max_inside=None,
        label=purchase["name"],
        source="purchase",
        created_by=f"account:{purchase['account_id']}",
    )
    await conn.execute(
        "UPDATE pass_purchases SET starts_at = $2, ends_at = $3, right_id = $4 WHERE id = $1",
        purchase["id"],
        starts,
        ends,
        right_id,
    )
    amount = purchase["amount_fen"]
    await ledger.post(
        conn,
        "pass_sold",
        [(ledger.clearing(provider), amount), (ledger.deferred_pass(purchase["id"]), -amount)],
        payment_id=payment_id,
    )
    await notifications.enqueue(
        conn,
        account_id=purchase["account_id"],
        kind="pass_active",
        source_key=f"pass:{purchase['id']}:active",
        body=f"{purchase['plate']} {purchase['name']} 已生效，有效期至 {ends:%Y-%m-%d %H:%M} UTC",
    )


def earned(amount_fen: int, starts: datetime, ends: datetime, now: datetime) -> int:
    """What of a pass's price is earned by `now`: pro rata of the period, rounded down."""
    if now <= starts:
        return 0
    if now >= ends:
        return amount_fen
    return amount_fen * ((now - starts) // _US) // ((ends - starts) // _US)


async def recognise(conn: asyncpg.Connection, now: datetime, limit: int = 1000) -> int:
    """Books the newly earned part of paid passes as their car park's revenue; returns how many
    passes had something to book."""
    rows = await conn.fetch(
        """SELECT id, car_park_id, amount_fen, recognised_fen, starts_at, ends_at
           FROM pass_purchases
           WHERE right_id IS NOT NULL AND recognised_fen < amount_fen AND starts_at < $1
           ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED""",
        now,
        limit,
    )
    booked = 0
    for row in rows:
        due = earned(row["amount_fen"], row["starts_at"], row["ends_at"], now)
        delta = due - row["recognised_fen"]
        if delta <= 0:
            continue
        await ledger.post(
            conn,
            "pass_revenue",
            [
                (ledger.deferred_pass(row["id"]), delta),
                (ledger.revenue(row["car_park_id"]), -delta),
            ],
        )
        await conn.execute(
            "UPDATE pass_purchases SET recognised_fen = $2 WHERE id = $1", row["id"], due
        )
        booked += 1
    return booked


async def send_expiry_reminders(conn: asyncpg.Connection, now: datetime, before: timedelta) -> int:
    """Tells each driver once that a pass ends within `before`, unless it has been renewed
    (a later purchase of the same offer for the same vehicle)."""
    rows = await conn.fetch(
        """UPDATE pass_purchases p SET reminded_at = $1
           FROM pass_offers o
           WHERE o.id = p.offer_id AND p.right_id IS NOT NULL AND p.reminded_at IS NULL
             AND p.ends_at > $1 AND p.ends_at <= $1::timestamptz + $2::interval
             AND NOT EXISTS (
                 SELECT 1 FROM pass_purchases q
                 WHERE q.offer_id = p.offer_id AND q.plate = p.plate AND q.color = p.color
                   AND q.ends_at > p.ends_at)
           RETURNING p.id, p.account_id, p.plate, p.ends_at, o.name""",
        now,
        before,
    )
    for row in rows:
        await notifications.enqueue(
            conn,
            account_id=row["account_id"],
            kind="pass_expiring",
            source_key=f"pass:{row['id']}:expiring",
            body=(
                f"{row['plate']} {row['name']} 将于 {row['ends_at']:%Y-%m-%d %H:%M} UTC 到期，"
                "请在App续费"
            ),
        )
    return len(rows)
