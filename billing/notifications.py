"""Driver notifications: written in the transaction that caused them, sent by the outbox worker
through a `Notifier` adapter (SMS / app push in production, `DevNotifier` here)."""

from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from zoneinfo import ZoneInfo

import asyncpg

from billing.queue import delete_in_batches
from billing.tariff import format_fen


@dataclass(frozen=True, slots=True)
class Notification:
    id: int
    account_id: int
    kind: str
    body: str


class Notifier(Protocol):
    async def send(self, notification: Notification) -> None: ...


class DevNotifier:
    """Keeps the most recent notifications in memory so the demo and the API can show them."""

    def __init__(self, keep: int = 200) -> None:
        self.sent: deque[Notification] = deque(maxlen=keep)

    async def send(self, notification: Notification) -> None:
        self.sent.append(notification)


def format_duration(seconds: int) -> str:
    hours, rest = divmod(max(0, seconds), 3600)
    return f"{hours}h{rest // 60:02d}m"


def exit_charged_text(
    plate: str,
    car_park_name: str,
    entered_at: datetime,
    exited_at: datetime,
    amount_fen: int,
    tz: ZoneInfo,
) -> str:
    left = exited_at.astimezone(tz).strftime("%H:%M")
    stay = format_duration(int((exited_at - entered_at).total_seconds()))
    return f"{plate} left {car_park_name} at {left}, {stay}, {format_fen(amount_fen)} charged"


async def enqueue(
    conn: asyncpg.Connection, *, account_id: int, kind: str, source_key: str, body: str
) -> int | None:
    """Queues a notification once per source_key; None when it was already queued."""
    notification_id: int | None = await conn.fetchval(
        """WITH notification AS (
               INSERT INTO notifications (account_id, kind, source_key, body)
               VALUES ($1, $2, $3, $4) ON CONFLICT (source_key) DO NOTHING RETURNING id)
           INSERT INTO outbox (kind, ref_id) SELECT 'notification', id FROM notification
           RETURNING ref_id""",
        account_id,
        kind,
        source_key,
        body,
    )
    return notification_id


async def load(conn: asyncpg.Connection, notification_id: int) -> Notification | None:
    row = await conn.fetchrow(
        "SELECT id, account_id, kind, body FROM notifications WHERE id = $1 AND status = 'pending'",
        notification_id,
    )
    return Notification(**dict(row)) if row else None


async def mark_sent(conn: asyncpg.Connection, notification_id: int) -> None:
    await conn.execute(
        "UPDATE notifications SET status = 'sent', sent_at = now() WHERE id = $1",
        notification_id,
    )


async def prune_sent(conn: asyncpg.Connection, before: datetime) -> int:
    """Deletes notifications sent before `before` (pending and failed ones stay). Their
    `source_key`s name events that do not come again (a charge, a payment, a dated reminder)."""
    return await delete_in_batches(
        conn,
        """WITH gone AS (
               DELETE FROM notifications WHERE id IN (
                   SELECT id FROM notifications
                   WHERE status = 'sent' AND sent_at < $1 LIMIT $2)
               RETURNING 1)
           SELECT count(*) FROM gone""",
        before,
    )
