"""Sandbox pay-later provider: a real HTTP service with the failure modes of a real one.

It is shaped like Alipay / WeChat Pay "pay after use": the merchant deducts a fee under a
driver's signed pay-later agreement (`POST /v1/charges`), or shows a QR code the driver pays in
a wallet app (`POST /v1/payments`). Every order lives in one namespace keyed by the merchant's
`out_trade_no`, sent as the `Idempotency-Key` header, so a retry never makes a second order.

Like the real thing, a deduction is accepted asynchronously (202 "processing") and finishes a
moment later; the outcome reaches the merchant as a webhook notification signed with the shared
secret (billing.signing), retried with backoff while the merchant does not answer 2xx. A
merchant that misses a notification asks with the order query (`GET /v1/orders/{no}`), and
checks its books against the daily statement file (`GET /v1/statements/{date}`).

Failures are injected by `FaultConfig` (seeded, changeable at runtime through
`POST /_sandbox/faults`): requests answer 503 before or after taking effect, hang before or
after taking effect, deductions are declined; notifications are lost, duplicated, late, or
accompanied by a forgery with a wrong signature. The `/_sandbox/` admin endpoints also make the
provider's books disagree with the merchant's (extra, missing or wrong-amount orders), which is
what reconciliation exists to catch.

Orders are kept in SQLite, so a file database survives a restart of the provider; charges still
processing when it stopped are finished after it starts again. Notifications not yet delivered
when it stops are lost, as with a real provider outage: the order query still answers.
"""

import argparse
import asyncio
import contextlib
import csv
import html
import io
import json
import logging
import random
import re
import secrets
import socket
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import uvicorn
from fastapi import Body, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import AwareDatetime, BaseModel, Field, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from billing.signing import SIGNATURE_HEADER, sign

log = logging.getLogger(__name__)

# Merchants must answer a notification quickly; a slower answer counts as a failed delivery.
NOTIFY_TIMEOUT_S = 5.0
# The notification log is a test aid; a long production-like run must not grow it forever.
NOTIFICATION_LOG_SIZE = 10_000

# Keys appear in URLs (`/v1/orders/{out_trade_no}`, the pay link), so they stay URL-safe.
KEY_PATTERN = r"^[A-Za-z0-9_.:-]+$"
IdempotencyKey = Annotated[str, Header(min_length=8, max_length=64, pattern=KEY_PATTERN)]
AmountFen = Annotated[int, Field(gt=0, strict=True)]
NotifyUrl = Annotated[str | None, Field(default=None, max_length=500, pattern=r"^https?://")]


@dataclass
class FaultConfig:
    """What goes wrong, and how often (probabilities in [0, 1], drawn from a seeded rng)."""

    error_rate: float = 0.0  # 503 before doing anything
    lost_response_rate: float = 0.0  # the request takes effect, then 503
    timeout_rate: float = 0.0  # hang timeout_s before taking effect
    slow_after_apply_rate: float = 0.0  # take effect, then hang timeout_s before answering
    timeout_s: float = 10.0
    # A deduction stays "processing" this long; 0 decides it within the request (the
    # synchronous success most agreement deductions get), answered 200 instead of 202.
    processing_delay_s: float = 0.05
    decline_rate: float = 0.0  # deductions declined for insufficient funds
    declined_agreements: set[str] = field(default_factory=set)  # always declined
    # Refusals of a charge request, each with the error code a real provider gives. The
    # driver's side: the driver paused the pay-later service (403 agreement_paused). The
    # merchant's side: an agreement number the provider does not know (404
    # agreement_not_found), the merchant's credentials refused (401 unauthorized); an
    # over-long description is a 400 invalid_request and a reused key a 409 by themselves.
    paused_agreements: set[str] = field(default_factory=set)
    unknown_agreements: set[str] = field(default_factory=set)
    unauthorized_rate: float = 0.0  # 401 before doing anything
    notify_url: str | None = None  # for orders created without their own notify_url
    notify_retry_s: tuple[float, ...] = (0.2, 1.0, 5.0)  # waits between delivery attempts
    lost_notification_rate: float = 0.0  # never sent: the merchant must query the order
    duplicate_notification_rate: float = 0.0  # the same event delivered twice
    late_notification_rate: float = 0.0  # delivered late_notification_s after the outcome
    late_notification_s: float = 2.0
    forged_notification_rate: float = 0.0  # plus a wrongly signed one with other status/amount
    statement_timezone: str = "Asia/Shanghai"  # the day boundaries of statement files
    seed: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_rate") and not 0.0 <= value <= 1.0:
                raise ValueError(f"{f.name} must be between 0 and 1, not {value}")
            if f.name.endswith("_s") and f.name != "notify_retry_s" and value < 0:
                raise ValueError(f"{f.name} must not be negative, not {value}")
        if any(wait < 0 for wait in self.notify_retry_s):
            raise ValueError("notify_retry_s must not contain negative waits")
        try:
            ZoneInfo(self.statement_timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown statement_timezone {self.statement_timezone!r}") from exc

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["declined_agreements"] = sorted(self.declined_agreements)
        data["paused_agreements"] = sorted(self.paused_agreements)
        data["unknown_agreements"] = sorted(self.unknown_agreements)
        data["notify_retry_s"] = list(self.notify_retry_s)
        return data


_FAULT_FIELDS = frozenset(f.name for f in fields(FaultConfig))


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a probability between 0 and 1, not {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"seconds must not be negative, not {text}")
    return value


def _seconds_list(text: str) -> tuple[float, ...]:
    return tuple(_seconds(part) for part in text.split(",") if part.strip())


def _timezone(text: str) -> str:
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"unknown time zone {text!r}") from exc
    return text


# (flag, FaultConfig field, parser, metavar, help) for every fault but the agreement sets.
_FLAGS: tuple[tuple[str, str, Callable[[str], Any], str, str], ...] = (
    ("--error-rate", "error_rate", _rate, "P", "share of requests answered 503 at once"),
    ("--unauthorized-rate", "unauthorized_rate", _rate, "P",
     "share of requests answered 401 (the merchant's credentials refused)"),
    ("--lost-response-rate", "lost_response_rate", _rate, "P",
     "share of requests that take effect, then answer 503"),
    ("--timeout-rate", "timeout_rate", _rate, "P",
     "share of requests that hang --timeout seconds before taking effect"),
    ("--slow-after-apply-rate", "slow_after_apply_rate", _rate, "P",
     "share of requests that take effect, then hang --timeout seconds"),
    ("--timeout", "timeout_s", _seconds, "SECONDS", "length of an injected hang"),
    ("--processing-delay", "processing_delay_s", _seconds, "SECONDS",
     "how long a deduction stays processing"),
    ("--decline-rate", "decline_rate", _rate, "P",
     "share of deductions declined for insufficient funds"),
    ("--notify-url", "notify_url", str, "URL",
     "where notifications go for orders created without a notify_url"),
    ("--notify-retry", "notify_retry_s", _seconds_list, "S1,S2,...",
     "waits between notification delivery attempts (empty: no retries)"),
    ("--lost-notification-rate", "lost_notification_rate", _rate, "P",
     "share of notifications never sent"),
    ("--duplicate-notification-rate", "duplicate_notification_rate", _rate, "P",
     "share of notifications delivered twice"),
    ("--late-notification-rate", "late_notification_rate", _rate, "P",
     "share of notifications delayed by --late-notification-delay"),
    ("--late-notification-delay", "late_notification_s", _seconds, "SECONDS",
     "how late a late notification is"),
    ("--forged-notification-rate", "forged_notification_rate", _rate, "P",
     "share of notifications accompanied by a wrongly signed forgery"),
    ("--statement-timezone", "statement_timezone", _timezone, "TZ",
     "time zone of statement days"),
    ("--seed", "seed", int, "N", "seed of the fault rng, for reproducible runs"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per FaultConfig field; `faults_from_args` reads them back."""
    defaults = FaultConfig()
    for flag, name, parse, metavar, help_text in _FLAGS:
        parser.add_argument(
            flag,
            dest=name,
            type=parse,
            default=getattr(defaults, name),
            metavar=metavar,
            help=f"{help_text} (default: %(default)s)",
        )
    parser.add_argument(
        "--declined-agreement",
        dest="declined_agreements",
        action="append",
        metavar="AGREEMENT_NO",
        help="always decline deductions under this agreement (repeatable)",
    )
    parser.add_argument(
        "--paused-agreement",
        dest="paused_agreements",
        action="append",
        metavar="AGREEMENT_NO",
        help="refuse deductions under this agreement: 403 agreement_paused (repeatable)",
    )
    parser.add_argument(
        "--unknown-agreement",
        dest="unknown_agreements",
        action="append",
        metavar="AGREEMENT_NO",
        help="refuse deductions under this agreement: 404 agreement_not_found (repeatable)",
    )


def faults_from_args(args: argparse.Namespace) -> FaultConfig:
    values = {name: getattr(args, name) for name in _FAULT_FIELDS}
    for name in ("declined_agreements", "paused_agreements", "unknown_agreements"):
        values[name] = set(getattr(args, name) or ())
    return FaultConfig(**values)


def _utc_iso(moment: datetime) -> str:
    """Fixed-width UTC timestamps, so that comparing the strings compares the instants."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def _now_iso() -> str:
    return _utc_iso(datetime.now(UTC))


OrderKind = Literal["charge", "payment"]
OrderStatus = Literal["processing", "succeeded", "declined", "pending_payment", "closed"]


@dataclass
class Order:
    order_id: str
    out_trade_no: str
    kind: OrderKind
    agreement_no: str | None
    amount_fen: int
    description: str
    status: OrderStatus
    reason: str | None
    created_at: str
    finished_at: str | None
    refunded_fen: int
    notify_url: str | None
    voided: bool  # left off the statement by /_sandbox/.../void; never shown to the merchant

    def body(self, base_url: str) -> dict[str, Any]:
        """The order as the API shows it."""
        shown = asdict(self)
        del shown["voided"]
        if self.kind == "payment":
            shown["pay_url"] = f"{base_url}/pay/{self.out_trade_no}"
        return shown


@dataclass
class Refund:
    refund_id: str
    out_refund_no: str
    out_trade_no: str
    amount_fen: int
    reason: str
    status: Literal["succeeded"]
    finished_at: str

    def body(self) -> dict[str, Any]:
        return asdict(self)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    out_trade_no TEXT PRIMARY KEY,
    order_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    agreement_no TEXT,
    amount_fen INTEGER NOT NULL,
    description TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    created_at TEXT NOT NULL,
    finished_at TEXT,
    refunded_fen INTEGER NOT NULL,
    notify_url TEXT,
    voided INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_by_finished_at ON orders (finished_at);
CREATE TABLE IF NOT EXISTS refunds (
    out_refund_no TEXT PRIMARY KEY,
    refund_id TEXT NOT NULL UNIQUE,
    out_trade_no TEXT NOT NULL REFERENCES orders (out_trade_no),
    amount_fen INTEGER NOT NULL,
    reason TEXT NOT NULL,
    status TEXT NOT NULL,
    finished_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS refunds_by_finished_at ON refunds (finished_at);
"""

_ORDER_COLUMNS = ", ".join(f.name for f in fields(Order))
_REFUND_COLUMNS = ", ".join(f.name for f in fields(Refund))


@dataclass(frozen=True)
class StatementLine:
    out_trade_no: str  # the out_refund_no for a refund
    order_id: str  # the refund_id for a refund
    type: Literal["charge", "payment", "refund"]
    amount_fen: int
    finished_at: str


class OrderBook:
    """The provider's books in SQLite.

    Every method runs to completion without awaiting, and the server has one event-loop thread,
    so each read-check-write is atomic with respect to concurrent requests.
    """

    def __init__(self, db_path: str) -> None:
        # Only the event-loop thread uses the connection, but that need not be the thread that
        # created the app (uvicorn may start its loop elsewhere).
        self._db = sqlite3.connect(db_path, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def order(self, out_trade_no: str) -> Order | None:
        row = self._db.execute(
            f"SELECT {_ORDER_COLUMNS} FROM orders WHERE out_trade_no = ?", (out_trade_no,)
        ).fetchone()
        return None if row is None else Order(**{**dict(row), "voided": bool(row["voided"])})

    def orders(self) -> list[Order]:
        rows = self._db.execute(f"SELECT {_ORDER_COLUMNS} FROM orders ORDER BY created_at")
        return [Order(**{**dict(row), "voided": bool(row["voided"])}) for row in rows]

    def add_order(self, order: Order) -> None:
        with self._db:
            self._db.execute(
                f"INSERT INTO orders ({_ORDER_COLUMNS}) VALUES "
                f"({', '.join(':' + f.name for f in fields(Order))})",
                asdict(order),
            )

    def _update(self, out_trade_no: str, assignments: str, *params: object) -> Order:
        with self._db:
            self._db.execute(
                f"UPDATE orders SET {assignments} WHERE out_trade_no = ?", (*params, out_trade_no)
            )
        order = self.order(out_trade_no)
        assert order is not None, out_trade_no
        return order

    def finish(self, out_trade_no: str, status: OrderStatus, reason: str | None) -> Order:
        return self._update(
            out_trade_no, "status = ?, reason = ?, finished_at = ?", status, reason, _now_iso()
        )

    def set_amount(self, out_trade_no: str, amount_fen: int) -> Order:
        return self._update(out_trade_no, "amount_fen = ?", amount_fen)

    def void(self, out_trade_no: str) -> Order:
        return self._update(out_trade_no, "voided = 1")

    def refund(self, out_refund_no: str) -> Refund | None:
        row = self._db.execute(
            f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE out_refund_no = ?", (out_refund_no,)
        ).fetchone()
        return None if row is None else Refund(**dict(row))

    def add_refund(self, refund: Refund) -> None:
        with self._db:
            self._db.execute(
                f"INSERT INTO refunds ({_REFUND_COLUMNS}) VALUES "
                f"({', '.join(':' + f.name for f in fields(Refund))})",
                asdict(refund),
            )
            self._db.execute(
                "UPDATE orders SET refunded_fen = refunded_fen + ? WHERE out_trade_no = ?",
                (refund.amount_fen, refund.out_trade_no),
            )

    def processing(self) -> list[str]:
        rows = self._db.execute("SELECT out_trade_no FROM orders WHERE status = 'processing'")
        return [row["out_trade_no"] for row in rows]

    def statement(self, start: datetime, end: datetime) -> list[StatementLine]:
        """Money that moved in [start, end): succeeded orders and refunds."""
        bounds = (_utc_iso(start), _utc_iso(end))
        orders = self._db.execute(
            """SELECT out_trade_no, order_id, kind, amount_fen, finished_at FROM orders
               WHERE status = 'succeeded' AND voided = 0
                 AND finished_at >= ? AND finished_at < ?""",
            bounds,
        )
        refunds = self._db.execute(
            """SELECT out_refund_no, refund_id, 'refund', amount_fen, finished_at FROM refunds
               WHERE finished_at >= ? AND finished_at < ?""",
            bounds,
        )
        lines = [StatementLine(*row) for row in [*orders, *refunds]]
        return sorted(lines, key=lambda line: (line.finished_at, line.out_trade_no))


@dataclass
class Delivery:
    """One notification sent (or, for a lost one, not sent) to a merchant."""

    event_id: str
    type: str
    out_trade_no: str
    url: str
    body: bytes
    faults: list[str]  # which notification faults shaped it: lost, late, duplicate, forged
    signature_valid: bool = True
    attempts: int = 0
    outcome: Literal["pending", "delivered", "failed", "dropped"] = "pending"
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        shown = asdict(self)
        shown["payload"] = json.loads(shown.pop("body"))
        return shown


def _forgery(payload: dict[str, Any]) -> dict[str, Any]:
    """What an attacker would claim: success for a failed order, another amount otherwise.

    It keeps the genuine event_id, so a merchant that records event ids before checking the
    signature would then drop the genuine notification as a duplicate.
    """
    if payload["status"] != "succeeded":
        return {**payload, "status": "succeeded", "reason": None}
    return {**payload, "amount_fen": payload["amount_fen"] * 2}


class Sandbox:
    """The provider's state: fault config, books, notifications and background tasks."""

    def __init__(self, faults: FaultConfig, secret: str, db_path: str) -> None:
        self.faults = faults
        self.rng = random.Random(faults.seed)
        self.book = OrderBook(db_path)
        self.notifications: deque[Delivery] = deque(maxlen=NOTIFICATION_LOG_SIZE)
        self._secret = secret
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: httpx.AsyncClient | None = None
        self._stopping = asyncio.Event()

    def chance(self, rate: float) -> bool:
        # A fault that is off draws nothing: a seeded run depends only on the faults that are on.
        return rate > 0 and self.rng.random() < rate

    def replace_faults(self, faults: FaultConfig) -> None:
        self.faults = faults
        if faults.seed is not None:
            self.rng.seed(faults.seed)

    def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=NOTIFY_TIMEOUT_S)
        for out_trade_no in self.book.processing():
            self._spawn(self._finish_charge_later(out_trade_no, self.faults.processing_delay_s))

    async def stop(self) -> None:
        # A cancelled task spawns nothing more (tasks spawn only after their sleeps); the loop is
        # there so that nothing can be left pending when the event loop closes regardless.
        while self._tasks:
            pending = set(self._tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._tasks -= pending
        if self._http is not None:
            await self._http.aclose()
        self.book.close()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("sandbox background task failed", exc_info=exc)

    # Request faults.

    def interrupt_hangs(self) -> None:
        """The server is stopping: requests hanging in an injected timeout give up now."""
        self._stopping.set()

    async def _hang(self) -> bool:
        """Waits timeout_s; False when cut short because the server is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self.faults.timeout_s)
        return not self._stopping.is_set()

    async def fail_before_effect(self) -> JSONResponse | None:
        if self.chance(self.faults.unauthorized_rate):
            return _error(401, "unauthorized", "the merchant's credentials were refused")
        if self.chance(self.faults.error_rate):
            return _error(503, "service_unavailable", "injected error before taking effect")
        if self.chance(self.faults.timeout_rate) and not await self._hang():
            return _error(503, "service_unavailable", "shutting down")
        return None

    async def fail_after_effect(self, response: JSONResponse) -> JSONResponse:
        if self.chance(self.faults.lost_response_rate):
            return _error(503, "service_unavailable", "injected error after taking effect")
        if self.chance(self.faults.slow_after_apply_rate) and not await self._hang():
            return _error(503, "service_unavailable", "shutting down")
        return response

    # Deductions.

    def finish_charge(self, order: Order) -> Order:
        """Decides a new deduction now (no processing delay) or later; returns the order as
        the create request answers it."""
        if self.faults.processing_delay_s <= 0:
            return self._decide_charge(order)
        self._spawn(self._finish_charge_later(order.out_trade_no, self.faults.processing_delay_s))
        return order

    async def _finish_charge_later(self, out_trade_no: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        order = self.book.order(out_trade_no)
        if order is not None and order.status == "processing":
            self._decide_charge(order)

    def _decide_charge(self, order: Order) -> Order:
        declined = order.agreement_no in self.faults.declined_agreements or self.chance(
            self.faults.decline_rate
        )
        if declined:
            order = self.book.finish(order.out_trade_no, "declined", "insufficient_funds")
        else:
            order = self.book.finish(order.out_trade_no, "succeeded", None)
        self.notify_order(order)
        return order

    # Notifications.

    def notify_order(self, order: Order) -> None:
        payload = {
            "event_id": str(uuid.uuid4()),
            "type": order.kind,
            "out_trade_no": order.out_trade_no,
            "order_id": order.order_id,
            "status": order.status,
            "amount_fen": order.amount_fen,
            "reason": order.reason,
            "finished_at": order.finished_at,
        }
        self._notify(payload, order.notify_url)

    def notify_refund(self, refund: Refund, order: Order) -> None:
        payload = {
            "event_id": str(uuid.uuid4()),
            "type": "refund",
            "out_refund_no": refund.out_refund_no,
            "refund_id": refund.refund_id,
            "out_trade_no": order.out_trade_no,
            "order_id": order.order_id,
            "status": refund.status,
            "amount_fen": refund.amount_fen,
            "reason": refund.reason,
            "finished_at": refund.finished_at,
        }
        self._notify(payload, order.notify_url)

    def _notify(self, payload: dict[str, Any], notify_url: str | None) -> None:
        url = notify_url or self.faults.notify_url
        if url is None:
            return
        faults = self.faults
        forged = self.chance(faults.forged_notification_rate)
        lost = self.chance(faults.lost_notification_rate)
        late = self.chance(faults.late_notification_rate)
        duplicated = self.chance(faults.duplicate_notification_rate)

        def delivery(content: dict[str, Any], applied: list[str]) -> Delivery:
            body = json.dumps(content, separators=(",", ":")).encode()
            event = Delivery(
                payload["event_id"], payload["type"], payload["out_trade_no"], url, body, applied
            )
            self.notifications.append(event)
            return event

        if forged:
            forgery = delivery(_forgery(payload), ["forged"])
            forgery.signature_valid = False
            # Signed with a key that is not the merchant's; a forger does not retry.
            self._spawn(self._deliver(forgery, secrets.token_hex(16), 0.0, ()))
        applied = [name for name, on in (("late", late), ("duplicate", duplicated)) if on]
        if lost:
            delivery(payload, ["lost", *applied]).outcome = "dropped"
            return
        delay_s = faults.late_notification_s if late else 0.0
        for _ in range(2 if duplicated else 1):
            genuine = delivery(payload, applied)
            self._spawn(self._deliver(genuine, self._secret, delay_s, faults.notify_retry_s))

    async def _deliver(
        self, event: Delivery, secret: str, delay_s: float, retry_s: tuple[float, ...]
    ) -> None:
        assert self._http is not None, "deliveries start only while the server runs"
        if delay_s:
            await asyncio.sleep(delay_s)
        for wait_s in (0.0, *retry_s):
            await asyncio.sleep(wait_s)
            event.attempts += 1
            # Signed again on each attempt, as real providers do, so retries stay fresh.
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(secret, event.body, int(time.time())),
            }
            try:
                response = await self._http.post(event.url, content=event.body, headers=headers)
            except httpx.HTTPError as exc:
                event.last_error = f"{type(exc).__name__}: {exc}"
                continue
            if response.is_success:
                event.outcome = "delivered"
                return
            event.last_error = f"HTTP {response.status_code}"
        event.outcome = "failed"


def _error(status_code: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status_code)


def _not_found(what: str) -> JSONResponse:
    return _error(404, "not_found", f"no {what}")


def _yuan(fen: int) -> str:
    return f"¥{fen // 100}.{fen % 100:02d}"


_DATE_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}")


class ChargeRequest(BaseModel):
    agreement_no: str = Field(min_length=1, max_length=64)
    amount_fen: AmountFen
    description: str = Field(default="", max_length=200)
    notify_url: NotifyUrl


class PaymentRequest(BaseModel):
    amount_fen: AmountFen
    description: str = Field(default="", max_length=200)
    notify_url: NotifyUrl


class RefundRequest(BaseModel):
    out_trade_no: str = Field(min_length=1, max_length=64)
    amount_fen: AmountFen
    reason: str = Field(default="", max_length=200)


class ExtraOrderRequest(BaseModel):
    """A succeeded order the merchant never asked for, as found in a real provider's books."""

    out_trade_no: str = Field(min_length=1, max_length=64, pattern=KEY_PATTERN)
    amount_fen: AmountFen
    kind: OrderKind = "charge"
    agreement_no: str | None = Field(default=None, max_length=64)
    description: str = Field(default="", max_length=200)
    finished_at: AwareDatetime | None = None  # default now; lets a test pick the statement day


class AmountChange(BaseModel):
    amount_fen: AmountFen


def create_app(
    faults: FaultConfig | None = None, *, secret: str, db_path: str = ":memory:"
) -> FastAPI:
    """The provider as an ASGI app; its state is `app.state.sandbox` (a `Sandbox`).

    The lifespan must run (uvicorn does by default): it starts the notification client and
    finishes charges left processing in a file database, and on shutdown stops all background
    work and closes the database.
    """
    if not secret:
        raise ValueError("a notification signing secret is required")
    sandbox = Sandbox(faults or FaultConfig(), secret, db_path)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        sandbox.start()
        try:
            yield
        finally:
            await sandbox.stop()

    app = FastAPI(title="Sandbox pay-later provider", lifespan=lifespan)
    app.state.sandbox = sandbox
    book = sandbox.book

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return _error(400, "invalid_request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @app.post("/v1/charges")
    async def create_charge(
        charge: ChargeRequest, idempotency_key: IdempotencyKey, request: Request
    ) -> JSONResponse:
        """A deduction under a pay-later agreement, finished asynchronously."""
        if (failure := await sandbox.fail_before_effect()) is not None:
            return failure
        order = book.order(idempotency_key)
        if order is None and charge.agreement_no in sandbox.faults.unknown_agreements:
            return _error(404, "agreement_not_found", f"no agreement {charge.agreement_no}")
        if order is None and charge.agreement_no in sandbox.faults.paused_agreements:
            return _error(403, "agreement_paused", "the user paused the pay-later service")
        if order is None:
            order = Order(
                order_id=f"sbx_{uuid.uuid4().hex}",
                out_trade_no=idempotency_key,
                kind="charge",
                agreement_no=charge.agreement_no,
                amount_fen=charge.amount_fen,
                description=charge.description,
                status="processing",
                reason=None,
                created_at=_now_iso(),
                finished_at=None,
                refunded_fen=0,
                notify_url=charge.notify_url,
                voided=False,
            )
            book.add_order(order)
            order = sandbox.finish_charge(order)
        elif (order.kind, order.agreement_no, order.amount_fen) != (
            "charge",
            charge.agreement_no,
            charge.amount_fen,
        ):
            return await sandbox.fail_after_effect(
                _error(409, "idempotency_key_reused", "this key was used for a different order")
            )
        status_code = 202 if order.status == "processing" else 200
        response = JSONResponse(order.body(base_url(request)), status_code=status_code)
        return await sandbox.fail_after_effect(response)

    @app.get("/v1/orders/{out_trade_no}")
    async def query_order(out_trade_no: str, request: Request) -> JSONResponse:
        """The order query merchants use when a notification is missing."""
        if sandbox.chance(sandbox.faults.error_rate):
            return _error(503, "service_unavailable", "injected error")
        order = book.order(out_trade_no)
        if order is None:
            return _not_found(f"order {out_trade_no}")
        return JSONResponse(order.body(base_url(request)))

    @app.post("/v1/payments")
    async def create_payment(
        payment: PaymentRequest, idempotency_key: IdempotencyKey, request: Request
    ) -> JSONResponse:
        """An order the driver pays by scanning a QR code (the pay_url) in a wallet app."""
        if (failure := await sandbox.fail_before_effect()) is not None:
            return failure
        order = book.order(idempotency_key)
        if order is None:
            order = Order(
                order_id=f"sbx_{uuid.uuid4().hex}",
                out_trade_no=idempotency_key,
                kind="payment",
                agreement_no=None,
                amount_fen=payment.amount_fen,
                description=payment.description,
                status="pending_payment",
                reason=None,
                created_at=_now_iso(),
                finished_at=None,
                refunded_fen=0,
                notify_url=payment.notify_url,
                voided=False,
            )
            book.add_order(order)
            response = JSONResponse(order.body(base_url(request)), status_code=201)
        elif (order.kind, order.amount_fen) != ("payment", payment.amount_fen):
            response = _error(
                409, "idempotency_key_reused", "this key was used for a different order"
            )
        else:
            response = JSONResponse(order.body(base_url(request)))
        return await sandbox.fail_after_effect(response)

    @app.post("/v1/payments/{out_trade_no}/pay")
    async def pay(out_trade_no: str, request: Request) -> JSONResponse:
        """The driver completes the payment in the wallet app."""
        order = book.order(out_trade_no)
        if order is None or order.kind != "payment":
            return _not_found(f"payment {out_trade_no}")
        if order.status == "closed":
            return _error(409, "order_closed", "the payment was closed before it was paid")
        if order.status == "pending_payment":
            order = book.finish(out_trade_no, "succeeded", None)
            sandbox.notify_order(order)
        return JSONResponse(order.body(base_url(request)))

    @app.post("/v1/payments/{out_trade_no}/close")
    async def close_payment(out_trade_no: str, request: Request) -> JSONResponse:
        """The merchant withdraws an unpaid payment, so it can no longer be paid."""
        order = book.order(out_trade_no)
        if order is None or order.kind != "payment":
            return _not_found(f"payment {out_trade_no}")
        if order.status == "succeeded":
            return _error(409, "order_paid", "the payment was already paid")
        if order.status == "pending_payment":
            order = book.finish(out_trade_no, "closed", None)
        return JSONResponse(order.body(base_url(request)))

    @app.get("/pay/{out_trade_no}", response_class=HTMLResponse)
    async def pay_page(out_trade_no: str) -> HTMLResponse:
        """What the QR code opens: the wallet app's confirmation page."""
        order = book.order(out_trade_no)
        if order is None or order.kind != "payment":
            return HTMLResponse("<p>No such payment.</p>", status_code=404)
        action = (
            f'<form method="post" action="/v1/payments/{html.escape(out_trade_no)}/pay">'
            "<button>Pay</button></form>"
            if order.status == "pending_payment"
            else f"<p>{html.escape(order.status)}</p>"
        )
        return HTMLResponse(
            f"<!doctype html><title>Sandbox wallet</title>"
            f"<h1>{html.escape(_yuan(order.amount_fen))}</h1>"
            f"<p>{html.escape(order.description)}</p>{action}"
        )

    def refund_once(refund: RefundRequest, out_refund_no: str) -> JSONResponse:
        existing = book.refund(out_refund_no)
        if existing is not None:
            if (existing.out_trade_no, existing.amount_fen) != (
                refund.out_trade_no,
                refund.amount_fen,
            ):
                return _error(
                    409, "idempotency_key_reused", "this key was used for a different refund"
                )
            return JSONResponse(existing.body())
        order = book.order(refund.out_trade_no)
        if order is None:
            return _not_found(f"order {refund.out_trade_no}")
        if order.status != "succeeded":
            return _error(409, "order_not_refundable", f"the order is {order.status}")
        remaining_fen = order.amount_fen - order.refunded_fen
        if refund.amount_fen > remaining_fen:
            return _error(
                409,
                "refund_exceeds_order",
                f"{refund.amount_fen} fen asked, {remaining_fen} fen left to refund",
            )
        made = Refund(
            refund_id=f"sbx_refund_{uuid.uuid4().hex}",
            out_refund_no=out_refund_no,
            out_trade_no=order.out_trade_no,
            amount_fen=refund.amount_fen,
            reason=refund.reason,
            status="succeeded",
            finished_at=_now_iso(),
        )
        book.add_refund(made)
        sandbox.notify_refund(made, order)
        return JSONResponse(made.body())

    @app.post("/v1/refunds")
    async def create_refund(refund: RefundRequest, idempotency_key: IdempotencyKey) -> JSONResponse:
        """Gives back part or all of a succeeded order; the key is the merchant's out_refund_no."""
        if (failure := await sandbox.fail_before_effect()) is not None:
            return failure
        response = refund_once(refund, idempotency_key)
        return await sandbox.fail_after_effect(response)

    @app.get("/v1/statements/{day}")
    async def statement(day: str) -> Response:
        """The statement file: money moved on `day` (statement time zone), as CSV."""
        try:
            if not _DATE_PATTERN.fullmatch(day):
                raise ValueError(day)
            start_date = date.fromisoformat(day)
        except ValueError:
            return _error(400, "invalid_date", f"expected a date as YYYY-MM-DD, not {day!r}")
        zone = ZoneInfo(sandbox.faults.statement_timezone)
        start = datetime.combine(start_date, datetime.min.time(), tzinfo=zone)
        end = datetime.combine(start_date + timedelta(days=1), datetime.min.time(), tzinfo=zone)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["out_trade_no", "order_id", "type", "amount_fen", "finished_at"])
        for line in book.statement(start, end):
            writer.writerow(
                [line.out_trade_no, line.order_id, line.type, line.amount_fen, line.finished_at]
            )
        return Response(
            out.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="statement-{day}.csv"'},
        )

    # Sandbox-only administration: set up reconciliation tests and inspect notifications.

    @app.post("/_sandbox/orders")
    async def add_extra_order(extra: ExtraOrderRequest, request: Request) -> JSONResponse:
        """Money the provider took that the merchant never asked for."""
        if book.order(extra.out_trade_no) is not None:
            return _error(409, "order_exists", f"order {extra.out_trade_no} exists")
        finished_at = _utc_iso(extra.finished_at) if extra.finished_at else _now_iso()
        order = Order(
            order_id=f"sbx_{uuid.uuid4().hex}",
            out_trade_no=extra.out_trade_no,
            kind=extra.kind,
            agreement_no=extra.agreement_no,
            amount_fen=extra.amount_fen,
            description=extra.description,
            status="succeeded",
            reason=None,
            created_at=finished_at,
            finished_at=finished_at,
            refunded_fen=0,
            notify_url=None,
            voided=False,
        )
        book.add_order(order)
        return JSONResponse(order.body(base_url(request)), status_code=201)

    @app.post("/_sandbox/orders/{out_trade_no}/amount")
    async def change_amount(
        out_trade_no: str, change: AmountChange, request: Request
    ) -> JSONResponse:
        """The provider recorded another amount than the merchant asked for."""
        if book.order(out_trade_no) is None:
            return _not_found(f"order {out_trade_no}")
        order = book.set_amount(out_trade_no, change.amount_fen)
        return JSONResponse(order.body(base_url(request)))

    @app.post("/_sandbox/orders/{out_trade_no}/succeed")
    async def succeed_late(out_trade_no: str, request: Request) -> JSONResponse:
        """Late news: a declined (or still processing) charge collected after all; the
        merchant hears of it by notification or order query like any outcome."""
        order = book.order(out_trade_no)
        if order is None or order.kind != "charge":
            return _not_found(f"charge {out_trade_no}")
        if order.status != "succeeded":
            order = book.finish(out_trade_no, "succeeded", None)
            sandbox.notify_order(order)
        return JSONResponse(order.body(base_url(request)))

    @app.post("/_sandbox/orders/{out_trade_no}/void")
    async def void_order(out_trade_no: str, request: Request) -> JSONResponse:
        """The order stays queryable but is missing from the statement files."""
        if book.order(out_trade_no) is None:
            return _not_found(f"order {out_trade_no}")
        order = book.void(out_trade_no)
        return JSONResponse(order.body(base_url(request)))

    @app.get("/_sandbox/notifications")
    async def list_notifications(out_trade_no: str | None = None) -> JSONResponse:
        """Every notification produced, oldest first, with how its delivery went."""
        return JSONResponse(
            [
                event.to_json()
                for event in sandbox.notifications
                if out_trade_no is None or event.out_trade_no == out_trade_no
            ]
        )

    @app.post("/_sandbox/faults")
    async def replace_faults(config: Annotated[dict[str, Any], Body()]) -> JSONResponse:
        """Replaces the whole fault config; fields left out take their defaults."""
        unknown = sorted(set(config) - _FAULT_FIELDS)
        if unknown:
            return _error(400, "invalid_request", f"unknown fault fields: {', '.join(unknown)}")
        try:
            faults = TypeAdapter(FaultConfig).validate_python(config)
        except ValidationError as exc:
            return _error(400, "invalid_request", str(exc))
        sandbox.replace_faults(faults)
        return JSONResponse(faults.to_json())

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Server(uvicorn.Server):
    """Cuts injected hangs short on shutdown, so that stopping never waits out a timeout_s
    (uvicorn finishes in-flight requests before it stops)."""

    def __init__(self, app: FastAPI, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._sandbox: Sandbox = app.state.sandbox

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._sandbox.interrupt_hangs()
        await super().shutdown(sockets)


@contextlib.asynccontextmanager
async def running(
    faults: FaultConfig | None = None,
    *,
    secret: str,
    port: int | None = None,
    db_path: str = ":memory:",
) -> AsyncIterator[tuple[str, FastAPI]]:
    """Serves the sandbox on 127.0.0.1 inside the current event loop; yields (url, app)."""
    app = create_app(faults, secret=secret, db_path=db_path)
    server = _Server(
        app,
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port or 0,  # 0: the OS picks a free port, read back once listening
            log_level="warning",
            lifespan="on",
        ),
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the sandbox provider stopped while starting")
        await asyncio.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{bound_port}", app
    finally:
        server.should_exit = True
        await task


def serve(port: int, faults: FaultConfig, secret: str, db_path: str) -> None:
    """Runs the sandbox in the foreground on 127.0.0.1:`port` until interrupted."""
    app = create_app(faults, secret=secret, db_path=db_path)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="info",
        access_log=False,  # a load run would print a line per charge
    )
    _Server(app, config).run()
