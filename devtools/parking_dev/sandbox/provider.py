"""The provider's state: fault config, books, notifications and background tasks."""

import asyncio
import contextlib
import json
import logging
import random
import secrets
import time
import uuid
from collections import deque
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from typing import Any, Literal

import httpx
from fastapi.responses import JSONResponse

from billing.signing import SIGNATURE_HEADER, sign
from parking_dev.sandbox.errors import error
from parking_dev.sandbox.faults import FaultConfig
from parking_dev.sandbox.store import Order, OrderBook, Refund

log = logging.getLogger(__name__)

# Merchants must answer a notification quickly; a slower answer counts as a failed delivery.
NOTIFY_TIMEOUT_S = 5.0
# The notification log is a test aid; a long production-like run must not grow it forever.
NOTIFICATION_LOG_SIZE = 10_000


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
        # Stays registered at their entry: out_parking_no -> parking id (routes/parking.py).
        self.parkings: dict[str, str] = {}
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
            async with asyncio.timeout(self.faults.timeout_s):
                await self._stopping.wait()
        return not self._stopping.is_set()

    async def fail_before_effect(self) -> JSONResponse | None:
        """An injected failure of a request that would take effect (a charge, a refund, an
        entry), before it does."""
        return await self._injected_failure()

    async def fail_query(self) -> JSONResponse | None:
        """The same failures for a read that takes no effect (a plate's service state): kept
        apart so what counts effects (the worker-crash tests' spies) does not count reads."""
        return await self._injected_failure()

    async def _injected_failure(self) -> JSONResponse | None:
        if self.chance(self.faults.unauthorized_rate):
            return error(401, "unauthorized", "the merchant's credentials were refused")
        if self.chance(self.faults.error_rate):
            return error(503, "service_unavailable", "injected error before taking effect")
        if self.chance(self.faults.timeout_rate) and not await self._hang():
            return error(503, "service_unavailable", "shutting down")
        return None

    async def fail_after_effect(self, response: JSONResponse) -> JSONResponse:
        if self.chance(self.faults.lost_response_rate):
            return error(503, "service_unavailable", "injected error after taking effect")
        if self.chance(self.faults.slow_after_apply_rate) and not await self._hang():
            return error(503, "service_unavailable", "shutting down")
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
