"""Payment-provider adapters. Everything outside this module sees only `PaymentProvider`.

A provider deducts under a driver's pay-later agreement (`create_charge`, answered
asynchronously), takes payments the driver makes by scanning a QR code (`create_payment`),
refunds, answers order queries, sends signed notifications and publishes a daily statement.
An Alipay or WeChat Pay adapter is another class with the same methods.
"""

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal, Protocol

import aiohttp
import orjson

from billing import money, signing

OrderKind = Literal["charge", "payment", "refund"]
OrderStatus = Literal["processing", "succeeded", "declined", "pending_payment", "closed"]
FINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "declined", "closed"})
# The longest order description the providers take (characters); a longer one is refused.
DESCRIPTION_MAX_CHARS = 200


@dataclass(frozen=True, slots=True)
class OrderResult:
    """What the provider says about one order (a charge, a payment) or one refund."""

    kind: OrderKind
    # Our number for it: a charge's idempotency key, a payment's or a refund's number.
    out_trade_no: str
    status: OrderStatus
    amount_fen: int
    provider_ref: str
    reason: str | None = None
    finished_at: datetime | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


@dataclass(frozen=True, slots=True)
class StatementLine:
    out_trade_no: str
    provider_ref: str
    kind: OrderKind
    amount_fen: int
    finished_at: datetime


class ProviderUnavailable(Exception):
    """Timeout, connection error or 5xx: the outcome is unknown, retry with the same key."""


class ProviderMalformed(ProviderUnavailable):
    """An answer that is not what the API promises (not JSON, a list instead of an object, a
    float amount, a missing field). What the provider did is still unknown: it is retried (and
    asked about) like an outage, and the answer is kept as a dead letter for a person."""

    def __init__(self, reason: str, payload: bytes = b"") -> None:
        super().__init__(f"malformed provider answer: {reason}")
        self.reason = reason
        self.payload = payload


# Whose side a refused request is on.
#   driver:   the driver's agreement or funds (declined, insufficient funds, service paused by
#             the driver, agreement no longer usable): the fee may become the driver's debt.
#   car_park: the merchant's own request (validation, an over-long field, credentials, an
#             order or agreement number the provider does not know, a conflicting key): never
#             the driver's debt; an operator takes it up and the charge stays collectable.
RejectionSide = Literal["driver", "car_park"]

# The error codes a provider answers for the driver's side; every other refusal is the car
# park's (a refusal the provider does not explain must not become anybody's debt).
DRIVER_SIDE_CODES: frozenset[str] = frozenset(
    {
        "declined",
        "insufficient_funds",
        "agreement_paused",
        "agreement_terminated",
        "agreement_unusable",
        "service_paused",
    }
)


class ProviderRejected(Exception):
    """The provider refused the request itself (4xx): retrying it unchanged will not help.

    `side` says whose reason it was (see RejectionSide), `code` is the provider's error code
    (or `http_<status>` when it gave none) and `status_code` the HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        side: RejectionSide = "car_park",
        code: str = "rejected",
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.side: RejectionSide = side
        self.code = code
        self.status_code = status_code


class InvalidNotification(Exception):
    """A notification whose signature, freshness or shape is wrong: forged or corrupted."""


class MalformedNotification(InvalidNotification):
    """A correctly signed notification whose content is not a valid order or refund event."""


class PaymentProvider(Protocol):
    name: str

    async def create_charge(
        self, *, out_trade_no: str, agreement_no: str, amount_fen: int, description: str
    ) -> OrderResult: ...

    async def create_payment(
        self, *, out_trade_no: str, amount_fen: int, description: str
    ) -> tuple[OrderResult, str]:
        """The order and the URL the driver pays at."""
        ...

    async def query(self, *, out_trade_no: str) -> OrderResult | None:
        """What the provider did with an order, or None when it never received it."""
        ...

    async def close_payment(self, *, out_trade_no: str) -> OrderResult:
        """Closes an unpaid payment; a paid one is returned as it is."""
        ...

    async def refund(
        self, *, out_refund_no: str, out_trade_no: str, amount_fen: int, reason: str
    ) -> OrderResult: ...

    async def statement(self, day: date) -> list[StatementLine]: ...

    def parse_notification(
        self, body: bytes, headers: Mapping[str, str], *, now: int
    ) -> OrderResult: ...

    async def aclose(self) -> None: ...


_KINDS: frozenset[str] = frozenset({"charge", "payment", "refund"})
_STATUSES: frozenset[str] = frozenset(
    {"processing", "succeeded", "declined", "pending_payment", "closed"}
)


class _Malformed(ValueError):
    pass


def _text(body: Mapping[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise _Malformed(f"{key} must be a non-empty string, not {value!r}")
    return value


def _datetime(body: Mapping[str, Any], key: str) -> datetime | None:
    value = _text(body, key, optional=True)
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise _Malformed(f"{key} is not an ISO 8601 time: {value!r}") from exc
    if moment.tzinfo is None:
        raise _Malformed(f"{key} has no time zone: {value!r}")
    return moment


def _order(body: Any) -> OrderResult:
    """An order or refund as the provider describes it; _Malformed when it is not one."""
    if not isinstance(body, Mapping):
        raise _Malformed(f"expected a JSON object, got {type(body).__name__}")
    try:
        amount_fen = money.fen_from_json(body.get("amount_fen"))
    except money.InvalidAmount as exc:
        raise _Malformed(f"amount_fen: {exc}") from exc
    status = _text(body, "status")
    if status not in _STATUSES:
        raise _Malformed(f"unknown status {status!r}")
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise _Malformed(f"reason must be a string, not {reason!r}")
    if body.get("type") == "refund" or "refund_id" in body:
        return OrderResult(
            "refund",
            _text(body, "out_refund_no") or "",
            status,  # type: ignore[arg-type]
            amount_fen,
            _text(body, "refund_id") or "",
            reason,
            _datetime(body, "finished_at"),
        )
    kind = body.get("kind") or body.get("type")
    if kind not in _KINDS or kind == "refund":
        raise _Malformed(f"unknown order kind {kind!r}")
    return OrderResult(
        kind,
        _text(body, "out_trade_no") or "",
        status,  # type: ignore[arg-type]
        amount_fen,
        _text(body, "order_id") or "",
        reason,
        _datetime(body, "finished_at"),
    )


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return orjson.loads(self.content)


class SandboxProvider:
    """Client of the sandbox provider (parking_dev.sandbox), a real HTTP service.

    aiohttp rather than httpx: the charge worker makes one request per charge, and httpx took
    0.8 ms of CPU per request against aiohttp's 0.1 ms (`parking-dev bench`, see README)."""

    name = "sandbox"

    def __init__(
        self, base_url: str, *, secret: str, notify_url: str | None, timeout_s: float = 3.0
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        # Made on first use: a session belongs to the event loop it is created in.
        self._http: aiohttp.ClientSession | None = None
        self._secret = secret
        self._notify_url = notify_url

    async def _send(
        self, method: str, path: str, *, key: str | None = None, body: dict[str, Any] | None = None
    ) -> ProviderAnswer:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=self._timeout)
        headers = {"Idempotency-Key": key} if key else {}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        try:
            async with self._http.request(
                method, self._base_url + path, data=data, headers=headers
            ) as response:
                answer = ProviderAnswer(response.status, await response.read())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(f"{type(exc).__name__}: {exc}") from exc
        # Overloaded, throttled or timed out: the outcome is unknown, not refused.
        if answer.status_code >= 500 or answer.status_code in (408, 429):
            raise ProviderUnavailable(f"provider answered {answer.status_code}")
        return answer

    @staticmethod
    def _rejection(response: ProviderAnswer) -> ProviderRejected:
        """A 4xx answer, classified by the provider's error code (see RejectionSide)."""
        code = f"http_{response.status_code}"
        try:
            error = response.json()
        except orjson.JSONDecodeError:
            error = None
        if isinstance(error, dict) and isinstance(error.get("error"), str):
            code = error["error"]
        side: RejectionSide = "driver" if code in DRIVER_SIDE_CODES else "car_park"
        return ProviderRejected(
            f"provider answered {response.status_code}: {response.text[:500]}",
            side=side,
            code=code,
            status_code=response.status_code,
        )

    @classmethod
    def _checked(cls, response: ProviderAnswer) -> Any:
        if response.status_code >= 400:
            raise cls._rejection(response)
        try:
            return response.json()
        except orjson.JSONDecodeError as exc:
            raise ProviderMalformed(f"not JSON: {exc}", response.content) from exc

    @classmethod
    def _order_of(cls, response: ProviderAnswer) -> OrderResult:
        body = cls._checked(response)
        try:
            return _order(body)
        except _Malformed as exc:
            raise ProviderMalformed(str(exc), response.content) from exc

    def _with_notify_url(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._notify_url:
            body["notify_url"] = self._notify_url
        return body

    async def create_charge(
        self, *, out_trade_no: str, agreement_no: str, amount_fen: int, description: str
    ) -> OrderResult:
        body = {"agreement_no": agreement_no, "amount_fen": amount_fen, "description": description}
        response = await self._send(
            "POST", "/v1/charges", key=out_trade_no, body=self._with_notify_url(body)
        )
        return self._order_of(response)

    async def create_payment(
        self, *, out_trade_no: str, amount_fen: int, description: str
    ) -> tuple[OrderResult, str]:
        body = {"amount_fen": amount_fen, "description": description}
        response = await self._send(
            "POST", "/v1/payments", key=out_trade_no, body=self._with_notify_url(body)
        )
        order = self._order_of(response)
        pay_url = self._checked(response).get("pay_url")
        if not isinstance(pay_url, str) or not pay_url.startswith(("http://", "https://")):
            raise ProviderMalformed(f"pay_url must be a URL, not {pay_url!r}", response.content)
        return order, pay_url

    async def query(self, *, out_trade_no: str) -> OrderResult | None:
        response = await self._send("GET", f"/v1/orders/{out_trade_no}")
        if response.status_code == 404:
            return None
        return self._order_of(response)

    async def close_payment(self, *, out_trade_no: str) -> OrderResult:
        response = await self._send("POST", f"/v1/payments/{out_trade_no}/close")
        if response.status_code == 409:
            # Already paid: the order as it is.
            order = await self.query(out_trade_no=out_trade_no)
            if order is None:
                raise ProviderRejected(f"payment {out_trade_no} vanished")
            return order
        return self._order_of(response)

    async def refund(
        self, *, out_refund_no: str, out_trade_no: str, amount_fen: int, reason: str
    ) -> OrderResult:
        body = {"out_trade_no": out_trade_no, "amount_fen": amount_fen, "reason": reason}
        response = await self._send("POST", "/v1/refunds", key=out_refund_no, body=body)
        return self._order_of(response)

    async def statement(self, day: date) -> list[StatementLine]:
        response = await self._send("GET", f"/v1/statements/{day.isoformat()}")
        if response.status_code >= 400:
            raise self._rejection(response)
        lines = []
        try:
            for row in csv.DictReader(io.StringIO(response.text)):
                kind = row.get("type")
                if kind not in _KINDS:
                    raise _Malformed(f"unknown type {kind!r}")
                finished_at = _datetime(row, "finished_at")
                if finished_at is None:
                    raise _Malformed("finished_at is missing")
                lines.append(
                    StatementLine(
                        _text(row, "out_trade_no") or "",
                        _text(row, "order_id") or "",
                        kind,  # type: ignore[arg-type]
                        money.fen_from_text(row.get("amount_fen") or ""),
                        finished_at,
                    )
                )
        except (_Malformed, money.InvalidAmount, csv.Error) as exc:
            raise ProviderMalformed(f"statement {day}: {exc}", response.content) from exc
        return lines

    def parse_notification(
        self, body: bytes, headers: Mapping[str, str], *, now: int
    ) -> OrderResult:
        if not signing.verify(self._secret, body, headers.get(signing.SIGNATURE_HEADER), now=now):
            raise InvalidNotification("bad or missing signature")
        try:
            return _order(orjson.loads(body))
        except (orjson.JSONDecodeError, _Malformed) as exc:
            raise MalformedNotification(f"malformed notification: {exc}") from exc

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
