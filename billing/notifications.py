"""Driver notifications: written in the transaction that caused them, sent by the outbox worker
through a `Notifier` adapter (SMS / app push in production, `DevNotifier` here).

Texts come from per-language templates (`TEMPLATES`), Chinese by default; a charge's message
links to its receipt page (`receipt_link`: a random token per message, stored as its hash)."""

import hashlib
import secrets
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol
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
    # The message's fields, where an adapter fills a template of its own with them (an SMS
    # service's approved charge template); None: the text alone.
    params: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Message:
    body: str
    params: dict[str, str]


class Notifier(Protocol):
    async def send(self, notification: Notification) -> None: ...


class DevNotifier:
    """Keeps the most recent notifications in memory so the demo and the API can show them."""

    def __init__(self, keep: int = 200) -> None:
        self.sent: deque[Notification] = deque(maxlen=keep)

    async def send(self, notification: Notification) -> None:
        self.sent.append(notification)


Language = Literal["zh", "en"]
LANGUAGES: tuple[Language, ...] = ("zh", "en")

# One template per message kind and language; `{receipt}` is the receipt sentence (empty when
# there is no link). Plates in them are the driver's own.
TEMPLATES: dict[str, dict[Language, str]] = {
    "exit_charged": {
        "zh": "{plate} 于{time}驶离{car_park}，停车{duration}，费用{amount}已扣款{receipt}",
        "en": "{plate} left {car_park} at {time}, {duration}, {amount} charged{receipt}",
    },
    "charge_failed": {
        "zh": "{plate} 在{car_park}的停车费{amount}未能扣款，"
        "请在App中缴纳，以继续无感离场{receipt}",
        "en": "{plate}: the parking fee at {car_park} could not be collected; "
        "pay it in the app to keep leaving without stopping{receipt}",
    },
    "charge_collected_late": {
        "zh": "{plate} 在{car_park}的停车费{amount}已扣款{twice}{receipt}",
        "en": "{plate}: the parking fee at {car_park} ({amount}) was collected after all"
        "{twice}{receipt}",
    },
    "debt_reminder": {
        "zh": "您有{count}笔停车费共{amount}尚未缴纳，请在App中缴纳，以继续无感离场",
        "en": "You owe {amount} in parking fees ({count} unpaid stays); pay in the app to "
        "leave without stopping again",
    },
    "payment_received": {
        "zh": "已收到您支付的{amount}，谢谢",
        "en": "{amount} received, thank you",
    },
    "refund": {
        "zh": "已退款{amount}：{reason}",
        "en": "{amount} refunded: {reason}",
    },
    "dispute_opened": {
        "zh": "已收到您对{car_park}停车费{amount}的申诉（不是我的车），"
        "运营方核对出入口照片后告知结果",
        "en": "We received your dispute of the {amount} fee at {car_park} (not my car); "
        "the car park will check both photos and tell you",
    },
    "dispute_driver_right": {
        "zh": "申诉成立：{car_park}的停车费{amount}{outcome}",
        "en": "Your dispute was upheld: the {amount} fee at {car_park} {outcome}",
    },
    "dispute_charge_stands": {
        "zh": "申诉未成立：运营方核对照片后确认{car_park}的停车费{amount}由您支付{receipt}",
        "en": "Your dispute was not upheld: having checked the photos, the car park confirms "
        "the {amount} fee at {car_park}{receipt}",
    },
}
_RECEIPT: dict[Language, str] = {"zh": "，凭证：{url}", "en": ". Receipt: {url}"}
_TWICE: dict[Language, str] = {
    "zh": "，您为此另付的{amount}将退还",
    "en": "; the {amount} you paid for it is being refunded",
}
_DISPUTE_OUTCOME: dict[str, dict[Language, str]] = {
    "cancelled": {"zh": "不再收取", "en": "will not be charged"},
    "refunded": {"zh": "将全额退还", "en": "is being refunded in full"},
}


@dataclass(frozen=True, slots=True)
class MessageStyle:
    """How drivers' messages are written: the language, the local time zone, and where receipt
    links point (`<base>/r/<token>`; None: no links)."""

    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("Asia/Shanghai"))
    language: Language = "zh"
    receipt_base_url: str | None = None


def render(kind: str, language: Language, **fields: object) -> str:
    fields.setdefault("receipt", "")
    fields.setdefault("twice", "")
    return TEMPLATES[kind][language].format(**fields)


def receipt_sentence(language: Language, url: str | None) -> str:
    return _RECEIPT[language].format(url=url) if url else ""


def twice_sentence(language: Language, amount_fen: int) -> str:
    return _TWICE[language].format(amount=format_fen(amount_fen)) if amount_fen else ""


def dispute_outcome(language: Language, outcome: Literal["cancelled", "refunded"]) -> str:
    return _DISPUTE_OUTCOME[outcome][language]


def format_duration(seconds: int, language: Language = "en") -> str:
    hours, rest = divmod(max(0, seconds), 3600)
    if language == "zh":
        return f"{hours}小时{rest // 60}分" if hours else f"{rest // 60}分钟"
    return f"{hours}h{rest // 60:02d}m"


def exit_charged(
    plate: str,
    car_park_name: str,
    entered_at: datetime,
    exited_at: datetime,
    amount_fen: int,
    tz: ZoneInfo,
    *,
    language: Language = "zh",
    receipt_url: str | None = None,
) -> Message:
    """The charge message and its fields (an SMS template's variables: the amount in yuan
    without its sign, the receipt link or nothing)."""
    fields = {
        "plate": plate,
        "car_park": car_park_name,
        "time": exited_at.astimezone(tz).strftime("%H:%M"),
        "duration": format_duration(int((exited_at - entered_at).total_seconds()), language),
    }
    body = render(
        "exit_charged",
        language,
        **fields,
        amount=format_fen(amount_fen),
        receipt=receipt_sentence(language, receipt_url),
    )
    yuan, fen = divmod(amount_fen, 100)
    return Message(body, {**fields, "amount": f"{yuan}.{fen:02d}", "receipt": receipt_url or ""})


def exit_charged_text(
    plate: str,
    car_park_name: str,
    entered_at: datetime,
    exited_at: datetime,
    amount_fen: int,
    tz: ZoneInfo,
    *,
    language: Language = "zh",
    receipt_url: str | None = None,
) -> str:
    return exit_charged(
        plate,
        car_park_name,
        entered_at,
        exited_at,
        amount_fen,
        tz,
        language=language,
        receipt_url=receipt_url,
    ).body


def receipt_token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def receipt_link(conn: asyncpg.Connection, charge_id: int, style: MessageStyle) -> str | None:
    """A new receipt link for the charge's message (None when links are off): a random token,
    unguessable, stored only as its hash and tied to this one charge."""
    if style.receipt_base_url is None:
        return None
    token = secrets.token_urlsafe(24)
    await conn.execute(
        "INSERT INTO receipts (token_hash, charge_id) VALUES ($1, $2)",
        receipt_token_hash(token),
        charge_id,
    )
    return f"{style.receipt_base_url.rstrip('/')}/r/{token}"


async def enqueue(
    conn: asyncpg.Connection,
    *,
    account_id: int,
    kind: str,
    source_key: str,
    body: str,
    params: dict[str, str] | None = None,
) -> int | None:
    """Queues a notification once per source_key; None when it was already queued, or the
    account is deleted (its messages were erased with it: a later one, a pass reminder or a
    refund's, would name its plate and places again)."""
    notification_id: int | None = await conn.fetchval(
        """WITH notification AS (
               INSERT INTO notifications (account_id, kind, source_key, body, params)
               SELECT $1, $2, $3, $4, $5
               -- Locked: an account being deleted is waited for, then seen deleted.
               WHERE EXISTS (SELECT 1 FROM accounts WHERE id = $1 AND deleted_at IS NULL
                             FOR KEY SHARE)
               ON CONFLICT (source_key) DO NOTHING RETURNING id)
           INSERT INTO outbox (kind, ref_id) SELECT 'notification', id FROM notification
           RETURNING ref_id""",
        account_id,
        kind,
        source_key,
        body,
        params,
    )
    return notification_id


async def load(conn: asyncpg.Connection, notification_id: int) -> Notification | None:
    row = await conn.fetchrow(
        """SELECT id, account_id, kind, body, params FROM notifications
           WHERE id = $1 AND status = 'pending'""",
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
