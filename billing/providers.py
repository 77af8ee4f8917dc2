"""Payment-provider adapters. Everything outside this module sees only `PaymentProvider`.

The interface is shaped on the real pay-later rails (WeChat Pay Score parking, API v3): a
plate's service state with the provider (`service_state`: normal, paused, overdue, not opened;
only "normal" may leave on pay-later), the registration of each stay at its entry
(`register_entry`, which answers the provider's parking id and the plate's state then), a
deduction for that entry (`create_charge`, answered asynchronously; `out_trade_no` is our
idempotency key), payments the driver makes by scanning a QR code (`create_payment`), refunds,
order queries, signed notifications (an order's outcome, or a plate's service state changing:
`parse_notification`) and a daily statement. A deduction the provider *advanced* (WeChat's
垫资: the driver's balance was short and the provider paid the car park) is a success with
`advanced=True`: the car park is paid, and it never becomes the driver's debt with us.

Adapters: `SandboxProvider` (parking_dev.sandbox, a stand-in with injectable faults) and
`billing.wechat.WeChatParkingProvider` (the WeChat Pay v3 wire protocol).
"""

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal, Protocol
from urllib.parse import urlencode

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
    # A succeeded charge the provider paid in the driver's stead (WeChat's 垫资, bank_type
    # BPA): the car park is paid; what the driver owes is the provider's to collect.
    advanced: bool = False

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


# A plate's pay-later service with the provider. Only "normal" lets a car leave on pay-later:
#   paused:     the driver paused the service (WeChat PAUSE)
#   overdue:    signed, but in arrears with the provider (WeChat OVERDUE)
#   not_opened: the plate has no service with this provider (WeChat OUT_SERVICE, or an
#               evaluation the driver's credit failed: EVALUATION_FAILED)
ServiceState = Literal["normal", "paused", "overdue", "not_opened"]
SERVICE_STATES: frozenset[str] = frozenset({"normal", "paused", "overdue", "not_opened"})


@dataclass(frozen=True, slots=True)
class PlateService:
    """A plate's service state as the provider answered it (`service_state`)."""

    plate: str
    color: str
    state: ServiceState
    reason: str | None = None

    @property
    def usable(self) -> bool:
        return self.state == "normal"


@dataclass(frozen=True, slots=True)
class ParkingEntry:
    """A stay registered with the provider at its entry (`register_entry`)."""

    out_parking_no: str
    # The provider's id of the entry: a deduction for the stay names it.
    parking_id: str
    # The plate's service state at the entry.
    state: ServiceState


@dataclass(frozen=True, slots=True)
class ParkingDeduction:
    """The stay a deduction is for, as the parking rails want it described."""

    plate: str
    color: str
    entered_at: datetime
    exited_at: datetime
    car_park_name: str
    # The provider's parking id from `register_entry`; None when the stay was never
    # registered (the adapter registers it first when its rails need one).
    parking_id: str | None = None
    out_parking_no: str | None = None
    device_id: str = "gate"
    free_duration_s: int = 0


@dataclass(frozen=True, slots=True)
class ServiceStateChange:
    """A signed notification that a plate's service state changed during a stay."""

    plate: str
    color: str
    state: ServiceState
    changed_at: datetime | None = None
    parking_id: str | None = None
    out_parking_no: str | None = None


# What a provider notification says: an order's (or refund's) outcome, or a state change.
Notification = OrderResult | ServiceStateChange


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
    # A stand-in for the real rails (the sandbox, or an adapter pointed at an emulator):
    # never in production.
    is_stand_in: bool

    async def service_state(self, *, agreement_no: str, plate: str, color: str) -> PlateService:
        """The plate's pay-later service with the provider (`agreement_no` names the driver
        with it: WeChat's openid)."""
        ...

    async def register_entry(
        self,
        *,
        out_parking_no: str,
        plate: str,
        color: str,
        entered_at: datetime,
        car_park_name: str,
        free_duration_s: int,
        agreement_no: str | None = None,
    ) -> ParkingEntry:
        """Registers a stay at its entry (idempotent by `out_parking_no`)."""
        ...

    async def create_charge(
        self,
        *,
        out_trade_no: str,
        agreement_no: str,
        amount_fen: int,
        description: str,
        parking: ParkingDeduction | None = None,
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
    ) -> Notification: ...

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
    advanced = body.get("advanced", False)
    if not isinstance(advanced, bool):
        raise _Malformed(f"advanced must be a boolean, not {advanced!r}")
    return OrderResult(
        kind,
        _text(body, "out_trade_no") or "",
        status,  # type: ignore[arg-type]
        amount_fen,
        _text(body, "order_id") or "",
        reason,
        _datetime(body, "finished_at"),
        advanced=advanced and status == "succeeded",
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
    0.8 ms of CPU per request against aiohttp's 0.1 ms (`parking-dev bench`, see
    docs/benchmarks.md)."""

    name = "sandbox"
    is_stand_in = True

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

    async def service_state(self, *, agreement_no: str, plate: str, color: str) -> PlateService:
        query = urlencode({"agreement_no": agreement_no, "plate": plate, "color": color})
        response = await self._send("GET", f"/v1/plate-services?{query}")
        body = self._checked(response)
        state = body.get("state") if isinstance(body, dict) else None
        if state not in SERVICE_STATES:
            raise ProviderMalformed(f"unknown service state {state!r}", response.content)
        return PlateService(plate, color, state, body.get("reason"))

    async def register_entry(
        self,
        *,
        out_parking_no: str,
        plate: str,
        color: str,
        entered_at: datetime,
        car_park_name: str,
        free_duration_s: int,
        agreement_no: str | None = None,
    ) -> ParkingEntry:
        body = {
            "plate": plate,
            "color": color,
            "entered_at": entered_at.isoformat(),
            "car_park_name": car_park_name,
            "free_duration_s": free_duration_s,
            "agreement_no": agreement_no,
        }
        response = await self._send("POST", "/v1/parkings", key=out_parking_no, body=body)
        answer = self._checked(response)
        parking_id = answer.get("parking_id") if isinstance(answer, dict) else None
        state = answer.get("state") if isinstance(answer, dict) else None
        if not isinstance(parking_id, str) or not parking_id or state not in SERVICE_STATES:
            raise ProviderMalformed("not a parking entry", response.content)
        return ParkingEntry(out_parking_no, parking_id, state)

    async def create_charge(
        self,
        *,
        out_trade_no: str,
        agreement_no: str,
        amount_fen: int,
        description: str,
        parking: ParkingDeduction | None = None,
    ) -> OrderResult:
        # The sandbox deducts under the agreement alone; the stay is not part of its API.
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
        # The provider takes a reason of at most 200 characters (as a description).
        body = {
            "out_trade_no": out_trade_no,
            "amount_fen": amount_fen,
            "reason": reason[:DESCRIPTION_MAX_CHARS],
        }
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
