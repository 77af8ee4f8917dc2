"""WeChat Pay Score parking (微信支付分停车服务, API v3) behind `PaymentProvider`.

The wire protocol is the `wechatpayv3` library's: every request signed
`WECHATPAY2-SHA256-RSA2048` with the merchant's private key, every 2xx answer and every
notification verified with the platform public key (or the platform certificates), notification
resources decrypted with AES-256-GCM under the APIv3 key. This module maps the parking
operations onto our interface:

| ours | WeChat Pay v3 |
|---|---|
| service_state | GET /v3/vehicle/parking/services/find (查询车牌服务开通信息) |
| register_entry | POST /v3/vehicle/parking/parkings (创建停车入场) |
| create_charge | POST /v3/vehicle/transactions/parking (扣费受理), out_trade_no = our key |
| query | GET /v3/vehicle/transactions/out-trade-no/{no} (查询订单); a payment's: /v3/pay/... |
| create_payment / close_payment | Native pay: POST /v3/pay/transactions/native, .../close |
| refund | POST /v3/refund/domestic/refunds |
| statement | GET /v3/bill/tradebill, then the file at its download_url |
| parse_notification | TRANSACTION.* (订单支付结果通知), REFUND.*, VEHICLE.ENTRANCE_STATE_CHANGE |

A deduction WeChat paid in the driver's stead (垫资: trade_state SUCCESS with bank_type BPA)
is a success with `advanced=True`. A plate's state: NORMAL is "normal"; PAUSE "paused";
OVERDUE "overdue"; OUT_SERVICE and EVALUATION_FAILED "not_opened". `agreement_no` is the
driver's openid under our appid (the service is opened per WeChat user and plate).
"""

import csv
import hashlib
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

import httpx
from wechatpayv3.async_ import AsyncWeChatPay
from wechatpayv3.async_.type import RequestType, WeChatPayType
from wechatpayv3.async_.utils import load_certificate

from billing.providers import (
    InvalidNotification,
    MalformedNotification,
    Notification,
    OrderKind,
    OrderResult,
    OrderStatus,
    ParkingDeduction,
    ParkingEntry,
    PlateService,
    ProviderMalformed,
    ProviderRejected,
    ProviderUnavailable,
    RejectionSide,
    ServiceState,
    ServiceStateChange,
    StatementLine,
)
from billing.rails import WECHAT_API, WECHAT_HOSTS

# Our plate colours and WeChat's (LIMEGREEN, the yellow-green of large new-energy vehicles, is
# not a colour our readers give).
_COLORS = {"blue": "BLUE", "green": "GREEN", "yellow": "YELLOW", "white": "WHITE", "black": "BLACK"}
_OUR_COLORS = {theirs: ours for ours, theirs in _COLORS.items()}

# PlateService.service_state and Parking.block_reason / blocked_state_description.
_STATES: dict[str, ServiceState] = {
    "NORMAL": "normal",
    "PAUSE": "paused",
    "OVERDUE": "overdue",
    "OUT_SERVICE": "not_opened",
    "EVALUATION_FAILED": "not_opened",
}

# Error codes (the body's `code`) that say the outcome is unknown or the request may be sent
# again unchanged: answered like an outage (retried with the same out_trade_no, then asked).
_RETRY_CODES = frozenset({"SYSTEM_ERROR", "SYSTEMERROR", "FREQUENCY_LIMITED", "BANK_ERROR"})
# Refusals on the driver's side (their balance or account): the fee may become their debt.
# Everything else WeChat refuses (PARAM_ERROR, INVALID_REQUEST, SIGN_ERROR, NO_AUTH,
# MCH_NOT_EXISTS, APPID_MCHID_NOT_MATCH, OUT_TRADE_NO_USED, ...) is the car park's own request.
_DRIVER_CODES = frozenset({"NOTENOUGH", "USER_ACCOUNT_ABNORMAL"})
# A query for an order WeChat never received.
_NOT_FOUND_CODES = frozenset(
    {"ORDER_NOT_EXIST", "ORDERNOTEXIST", "RESOURCE_NOT_EXISTS", "NOT_FOUND"}
)
# The sign-in's answers to try again (system busy, the app's minute quota), and those about
# the driver's code (40029 invalid or expired, 40163 used already, 40226 a user WeChat blocks);
# any other errcode is about the car park's app (40125 its AppSecret, 40013 its appid).
_LOGIN_BUSY_CODES = frozenset({-1, 45011})
_LOGIN_DRIVER_CODES = frozenset({40029, 40163, 40226})

# Parking deductions (trade_state) and Native payments (trade_state) as our order statuses.
_CHARGE_STATES: dict[str, OrderStatus] = {
    "SUCCESS": "succeeded",
    "REFUND": "succeeded",  # paid, then (part) refunded: the refund is its own order
    "ACCEPTED": "processing",
    "PAY_FAIL": "declined",
}
_PAYMENT_STATES: dict[str, OrderStatus] = {
    "SUCCESS": "succeeded",
    "REFUND": "succeeded",
    "NOTPAY": "pending_payment",
    "USERPAYING": "pending_payment",
    "CLOSED": "closed",
    "REVOKED": "closed",
    "PAYERROR": "closed",
}
_REFUND_STATES: dict[str, OrderStatus] = {
    "SUCCESS": "succeeded",
    "PROCESSING": "processing",
    "CLOSED": "declined",
    "ABNORMAL": "declined",
}
# WeChat takes out_trade_no of at most 32 characters: digits, letters and _-*.
_TRADE_NO = re.compile(r"^[A-Za-z0-9_*-]{1,32}$")
_YUAN = re.compile(r"^(-?)([0-9]+)(?:\.([0-9]{1,2}))?$")


@dataclass(frozen=True, slots=True)
class WeChatCredentials:
    """The merchant's WeChat Pay keys (see docs/billing.md, "Payment rails")."""

    mchid: str
    appid: str
    # The merchant API certificate's serial number and its private key (PEM).
    cert_serial_no: str
    private_key_pem: str
    apiv3_key: str
    # The platform's public key and its id (PUB_KEY_ID_...), or a folder of platform
    # certificates (PEM; fetched from /v3/certificates when it is empty).
    platform_public_key_pem: str | None = None
    platform_public_key_id: str | None = None
    platform_cert_dir: str | None = None
    # The mini program's AppSecret, for the driver's sign-in code (wx.login), and where that
    # code is exchanged (None: at the API's own URL, as an emulator serves both).
    app_secret: str = ""
    login_url: str | None = None


def _wechat_time(moment: datetime, tz: ZoneInfo) -> str:
    """RFC 3339 in Beijing time, to the second, as WeChat writes it: 2015-05-20T13:29:35+08:00."""
    return moment.astimezone(tz).replace(microsecond=0).isoformat()


def _parse_time(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError(f"not a time: {value!r}")
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"a time without a zone: {value!r}")
    return moment


def _fen_from_yuan(text: str) -> int:
    """An amount of a WeChat bill (yuan with at most two decimals) in fen, exactly."""
    match = _YUAN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not an amount of yuan: {text!r}")
    sign, whole, cents = match.groups()
    fen = int(whole) * 100 + int((cents or "0").ljust(2, "0"))
    return -fen if sign else fen


def _amount(body: Mapping[str, Any], key: str = "total") -> int:
    amount = body.get("amount")
    value = amount.get(key) if isinstance(amount, Mapping) else None
    if type(value) is not int or value < 0:
        raise ValueError(f"amount.{key} must be an integer number of fen, not {value!r}")
    return value


def _text(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string, not {value!r}")
    return value


def _transaction(body: Any, *, kind: str) -> OrderResult:
    """A parking deduction's or a Native payment's Transaction as our order."""
    if not isinstance(body, Mapping):
        raise ValueError(f"expected a JSON object, got {type(body).__name__}")
    state = body.get("trade_state")
    table = _CHARGE_STATES if kind == "charge" else _PAYMENT_STATES
    if state not in table:
        raise ValueError(f"unknown trade_state {state!r}")
    status = table[state]
    reason = body.get("trade_state_description")
    if status == "declined":
        reason = f"{state}: {reason}" if reason else state
    return OrderResult(
        "charge" if kind == "charge" else "payment",
        _text(body, "out_trade_no"),
        status,
        _amount(body),
        body.get("transaction_id") or "",
        reason if isinstance(reason, str) and status != "succeeded" else None,
        _parse_time(body.get("success_time")),
        advanced=status == "succeeded" and body.get("bank_type") == "BPA",
    )


def _refund(body: Any) -> OrderResult:
    if not isinstance(body, Mapping):
        raise ValueError(f"expected a JSON object, got {type(body).__name__}")
    state = body.get("status") or body.get("refund_status")
    if state not in _REFUND_STATES:
        raise ValueError(f"unknown refund status {state!r}")
    status = _REFUND_STATES[state]
    return OrderResult(
        "refund",
        _text(body, "out_refund_no"),
        status,
        _amount(body, "refund"),
        _text(body, "refund_id"),
        state if status == "declined" else None,
        _parse_time(body.get("success_time")),
    )


def _state_change(body: Any) -> ServiceStateChange:
    if not isinstance(body, Mapping):
        raise ValueError(f"expected a JSON object, got {type(body).__name__}")
    color = _OUR_COLORS.get(body.get("plate_color", ""))
    if color is None:
        raise ValueError(f"unknown plate_color {body.get('plate_color')!r}")
    parking_state = body.get("parking_state", "NORMAL")
    if parking_state == "NORMAL":
        state: ServiceState = "normal"
    else:
        blocked = body.get("blocked_state_description")
        if parking_state != "BLOCKED" or blocked not in _STATES or blocked == "NORMAL":
            raise ValueError(f"unknown state {parking_state!r}/{blocked!r}")
        state = _STATES[blocked]
    return ServiceStateChange(
        _text(body, "plate_number"),
        color,
        state,
        _parse_time(body.get("state_update_time")),
        body.get("parking_id") or None,
        body.get("out_parking_no") or None,
    )


class WeChatParkingProvider:
    """The WeChat Pay Score parking rails (see the module's table)."""

    name = "wechat"

    def __init__(
        self,
        credentials: WeChatCredentials,
        *,
        notify_url: str,
        base_url: str = WECHAT_API,
        timeout_s: float = 3.0,
        timezone: str = "Asia/Shanghai",
        notification_max_age_s: int = 300,
    ) -> None:
        self._credentials = credentials
        self._timeout_s = timeout_s
        self._notify_url = notify_url
        self._base_url = base_url.rstrip("/")
        # Anything but WeChat's own API is an emulator (parking_dev.wechat): a stand-in.
        self.is_stand_in = self._base_url not in WECHAT_HOSTS
        self._tz = ZoneInfo(timezone)
        self._max_age_s = notification_max_age_s
        self._client = AsyncWeChatPay(
            wechatpay_type=WeChatPayType.NATIVE,
            mchid=credentials.mchid,
            private_key=credentials.private_key_pem,
            cert_serial_no=credentials.cert_serial_no,
            appid=credentials.appid,
            apiv3_key=credentials.apiv3_key,
            notify_url=notify_url,
            cert_dir=credentials.platform_cert_dir,
            timeout=(timeout_s, timeout_s),
            public_key=credentials.platform_public_key_pem,
            public_key_id=credentials.platform_public_key_id,
        )
        # The library's gateway is WeChat's; an emulator (or the backup domain) replaces it.
        self._client._core._gate_way = self._base_url
        if credentials.platform_cert_dir and credentials.platform_public_key_pem is None:
            # Certificate mode: the library loads the certificates when its client opens (the
            # first request); a notification may come first, so they are read now too.
            for pem in sorted(Path(credentials.platform_cert_dir).glob("*.pem")):
                certificate = load_certificate(pem.read_text())
                if certificate is not None:
                    self._client._core._certificates.append(certificate)
        self._open = False

    async def _request(
        self, path: str, method: RequestType = RequestType.GET, data: Any = None
    ) -> tuple[int, Any]:
        """(status, decoded JSON body or None) of a signed request whose 2xx answer's signature
        was verified. Outages, throttling and unverifiable answers raise ProviderUnavailable
        (ProviderMalformed for the latter), refusals ProviderRejected."""
        core = self._client._core
        if not self._open:
            # Opens the HTTP client (and loads platform certificates in certificate mode).
            try:
                await core.__aenter__()
            except httpx.HTTPError as exc:
                raise ProviderUnavailable(f"{type(exc).__name__}: {exc}") from exc
            self._open = True
        try:
            status, content = await core.request(path, method=method, data=data)
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            # The library raises a bare Exception when a 2xx answer's signature is wrong: what
            # WeChat did is unknown (and the answer is suspect): retried, kept for a person.
            if "signature" in str(exc):
                raise ProviderMalformed("the answer's signature did not verify") from exc
            raise
        raw = content.encode() if isinstance(content, str) else (content or b"")
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                if 200 <= status < 300:
                    raise ProviderMalformed(f"not JSON: {exc}", raw) from exc
        if status >= 500 or status == 429:
            raise ProviderUnavailable(f"WeChat Pay answered {status}")
        code = body.get("code") if isinstance(body, dict) else None
        if status >= 400:
            if code in _RETRY_CODES:
                raise ProviderUnavailable(f"WeChat Pay answered {status} {code}")
            if method == RequestType.GET and (status == 404 or code in _NOT_FOUND_CODES):
                return 404, body  # a query for something WeChat does not have
            side: RejectionSide = "driver" if code in _DRIVER_CODES else "car_park"
            message = body.get("message") if isinstance(body, dict) else None
            raise ProviderRejected(
                f"WeChat Pay answered {status} {code}: {message or raw[:300]!r}",
                side=side,
                code=code or f"http_{status}",
                status_code=status,
            )
        return status, body

    @staticmethod
    def _trade_no(out_trade_no: str) -> str:
        if not _TRADE_NO.fullmatch(out_trade_no):
            raise ProviderRejected(
                f"out_trade_no {out_trade_no!r} is not one WeChat Pay takes",
                code="invalid_out_trade_no",
            )
        return out_trade_no

    # The driver's WeChat identity.

    async def openid_of(self, login_code: str) -> str:
        """The openid of the WeChat user whose mini program sign-in (wx.login) gave
        `login_code`: WeChat's answer, never the app's word (jscode2session; a code is good
        once, for five minutes). A code WeChat refuses is the driver's side."""
        query = urlencode(
            {
                "appid": self._credentials.appid,
                "secret": self._credentials.app_secret,
                "js_code": login_code,
                "grant_type": "authorization_code",
            }
        )
        url = f"{(self._credentials.login_url or self._base_url).rstrip('/')}/sns/jscode2session"
        try:
            async with httpx.AsyncClient(timeout=self._timeout_s) as client:
                response = await client.get(f"{url}?{query}")
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise ProviderUnavailable(f"WeChat sign-in answered {response.status_code}")
        try:
            body = response.json()
        except ValueError as exc:
            raise ProviderMalformed(f"not JSON: {exc}", response.content) from exc
        code = body.get("errcode", 0) if isinstance(body, dict) else None
        if code in _LOGIN_BUSY_CODES:
            raise ProviderUnavailable(f"WeChat sign-in answered errcode {code}")
        if code != 0:
            raise ProviderRejected(
                f"WeChat refused the sign-in code: {body.get('errmsg') if code else body!r}",
                side="driver" if code in _LOGIN_DRIVER_CODES else "car_park",
                code=f"login_{code}",
                status_code=response.status_code,
            )
        openid = body.get("openid")
        if not isinstance(openid, str) or not openid:
            raise ProviderMalformed("the sign-in answer names no openid", response.content)
        return openid

    # Plate service and entries.

    async def service_state(self, *, agreement_no: str, plate: str, color: str) -> PlateService:
        query = urlencode(
            {
                "appid": self._credentials.appid,
                "plate_number": plate,
                "plate_color": _COLORS[color],
                "openid": agreement_no,
            },
            quote_via=quote,
        )
        status, body = await self._request(f"/v3/vehicle/parking/services/find?{query}")
        if status == 404:
            return PlateService(plate, color, "not_opened", "not found")
        state = body.get("service_state") if isinstance(body, dict) else None
        if state not in _STATES:
            raise ProviderMalformed(f"unknown service_state {state!r}")
        if body.get("openid", agreement_no) != agreement_no:
            raise ProviderMalformed("the answer is about another WeChat user")
        return PlateService(plate, color, _STATES[state], None if state == "NORMAL" else state)

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
        data = {
            "out_parking_no": out_parking_no,
            "plate_number": plate,
            "plate_color": _COLORS[color],
            "notify_url": self._notify_url,
            "start_time": _wechat_time(entered_at, self._tz),
            "parking_name": car_park_name[:128],
            "free_duration": max(0, free_duration_s),
        }
        _, body = await self._request("/v3/vehicle/parking/parkings", RequestType.POST, data)
        try:
            parking_id = _text(body, "id")
            if body.get("state") == "NORMAL":
                state: ServiceState = "normal"
            else:
                state = _STATES[body["block_reason"]]
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            raise ProviderMalformed(f"not a parking entry: {exc}", repr(body).encode()) from exc
        return ParkingEntry(out_parking_no, parking_id, state)

    # Deductions and payments.

    async def create_charge(
        self,
        *,
        out_trade_no: str,
        agreement_no: str,
        amount_fen: int,
        description: str,
        parking: ParkingDeduction | None = None,
    ) -> OrderResult:
        if parking is None:
            raise ProviderRejected("a WeChat parking deduction needs its stay", code="stay_missing")
        parking_id = parking.parking_id
        if parking_id is None:
            # Never registered (WeChat was away at the entry): registered now, same number.
            entry = await self.register_entry(
                out_parking_no=parking.out_parking_no or out_trade_no,
                plate=parking.plate,
                color=parking.color,
                entered_at=parking.entered_at,
                car_park_name=parking.car_park_name,
                free_duration_s=parking.free_duration_s,
            )
            parking_id = entry.parking_id
        data = {
            "appid": self._credentials.appid,
            "description": description[:128],
            "out_trade_no": self._trade_no(out_trade_no),
            "trade_scene": "PARKING",
            "notify_url": self._notify_url,
            "amount": {"total": amount_fen, "currency": "CNY"},
            "parking_info": {
                "parking_id": parking_id,
                "plate_number": parking.plate,
                "plate_color": _COLORS[parking.color],
                "start_time": _wechat_time(parking.entered_at, self._tz),
                "end_time": _wechat_time(parking.exited_at, self._tz),
                "parking_name": parking.car_park_name[:128],
                "charging_duration": max(
                    0, int((parking.exited_at - parking.entered_at).total_seconds())
                ),
                "device_id": parking.device_id,
            },
        }
        _, body = await self._request("/v3/vehicle/transactions/parking", RequestType.POST, data)
        return self._parsed(body, kind="charge")

    def _parsed(self, body: Any, *, kind: str) -> OrderResult:
        try:
            return _refund(body) if kind == "refund" else _transaction(body, kind=kind)
        except (ValueError, TypeError) as exc:
            raise ProviderMalformed(str(exc), repr(body)[:2000].encode()) from exc

    async def create_payment(
        self, *, out_trade_no: str, amount_fen: int, description: str
    ) -> tuple[OrderResult, str]:
        data = {
            "appid": self._credentials.appid,
            "mchid": self._credentials.mchid,
            "description": description[:127],
            "out_trade_no": self._trade_no(out_trade_no),
            "notify_url": self._notify_url,
            "amount": {"total": amount_fen, "currency": "CNY"},
        }
        _, body = await self._request("/v3/pay/transactions/native", RequestType.POST, data)
        code_url = body.get("code_url") if isinstance(body, dict) else None
        if not isinstance(code_url, str) or not code_url:
            raise ProviderMalformed(f"code_url missing: {body!r}"[:500])
        return OrderResult("payment", out_trade_no, "pending_payment", amount_fen, ""), code_url

    async def query(self, *, out_trade_no: str) -> OrderResult | None:
        # Our payments' numbers begin with "p" (billing.payments), charges' with "s".
        if out_trade_no.startswith("p"):
            path = f"/v3/pay/transactions/out-trade-no/{quote(out_trade_no)}"
            status, body = await self._request(f"{path}?mchid={self._credentials.mchid}")
            return None if status == 404 else self._parsed(body, kind="payment")
        path = f"/v3/vehicle/transactions/out-trade-no/{quote(out_trade_no)}"
        status, body = await self._request(path)
        return None if status == 404 else self._parsed(body, kind="charge")

    async def close_payment(self, *, out_trade_no: str) -> OrderResult:
        path = f"/v3/pay/transactions/out-trade-no/{quote(out_trade_no)}/close"
        try:
            await self._request(path, RequestType.POST, {"mchid": self._credentials.mchid})
        except ProviderRejected as exc:
            if exc.code != "ORDER_PAID":
                raise
        order = await self.query(out_trade_no=out_trade_no)
        if order is None:
            raise ProviderRejected(f"payment {out_trade_no} vanished")
        return order

    async def refund(
        self, *, out_refund_no: str, out_trade_no: str, amount_fen: int, reason: str
    ) -> OrderResult:
        # WeChat wants the order's total beside the refund.
        order = await self.query(out_trade_no=out_trade_no)
        if order is None:
            raise ProviderRejected(f"no order {out_trade_no} to refund", code="ORDER_NOT_EXIST")
        data = {
            "out_trade_no": out_trade_no,
            "out_refund_no": out_refund_no,
            "reason": reason[:80],
            "notify_url": self._notify_url,
            "amount": {"refund": amount_fen, "total": order.amount_fen, "currency": "CNY"},
        }
        _, body = await self._request("/v3/refund/domestic/refunds", RequestType.POST, data)
        return self._parsed(body, kind="refund")

    async def statement(self, day: date) -> list[StatementLine]:
        """The day's trade bill (ALL, uncompressed), its hash checked: successful deductions
        and payments as charges/payments, refunds as refunds."""
        try:
            status, body = await self._request(
                f"/v3/bill/tradebill?bill_date={day.isoformat()}&bill_type=ALL"
            )
        except ProviderRejected as exc:
            if exc.code == "NO_STATEMENT_EXIST":
                return []  # no trade that day
            raise
        if status == 404:
            return []
        url = body.get("download_url") if isinstance(body, dict) else None
        if not isinstance(url, str) or not url.startswith(self._base_url):
            raise ProviderMalformed(f"download_url {url!r} is not WeChat Pay's")
        core = self._client._core
        try:
            code, content = await core.request(url[len(self._base_url) :], skip_verify=True)
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if code != 200:
            raise ProviderUnavailable(f"bill download answered {code}")
        raw = content.encode() if isinstance(content, str) else content
        if body.get("hash_type") == "SHA1" and hashlib.sha1(raw).hexdigest() != body.get(
            "hash_value"
        ):
            raise ProviderMalformed("the bill's SHA1 does not match", raw[:2000])
        try:
            return self._bill_lines(raw.decode("utf-8-sig"))
        except (ValueError, KeyError, csv.Error) as exc:
            raise ProviderMalformed(f"bill {day}: {exc}", raw[:2000]) from exc

    def _bill_lines(self, text: str) -> list[StatementLine]:
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        header = rows[0]
        lines: list[StatementLine] = []
        for row in rows[1:]:
            if len(row) != len(header):
                break  # the summary block after the trades
            field = dict(zip(header, (value.lstrip("`") for value in row), strict=True))
            at = datetime.strptime(field["交易时间"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=self._tz)
            out_trade_no = field["商户订单号"]
            kind: OrderKind = "payment" if out_trade_no.startswith("p") else "charge"
            if field["交易状态"] == "SUCCESS":
                lines.append(
                    StatementLine(
                        out_trade_no,
                        field["微信订单号"],
                        kind,
                        _fen_from_yuan(field["订单金额"]),
                        at.astimezone(UTC),
                    )
                )
            elif field["交易状态"] == "REFUND" and field["退款状态"] == "SUCCESS":
                lines.append(
                    StatementLine(
                        field["商户退款单号"],
                        field["微信退款单号"],
                        "refund",
                        _fen_from_yuan(field["申请退款金额"]),
                        at.astimezone(UTC),
                    )
                )
        return lines

    # Notifications.

    def parse_notification(
        self, body: bytes, headers: Mapping[str, str], *, now: int
    ) -> Notification:
        lowered = {key.lower(): value for key, value in headers.items()}
        try:
            timestamp = int(lowered.get("wechatpay-timestamp", ""))
        except ValueError:
            raise InvalidNotification("missing or bad Wechatpay-Timestamp") from None
        if abs(now - timestamp) > self._max_age_s:
            raise InvalidNotification("stale or future notification (Wechatpay-Timestamp)")
        wanted = {
            "Wechatpay-Signature": lowered.get("wechatpay-signature", ""),
            "Wechatpay-Timestamp": lowered.get("wechatpay-timestamp", ""),
            "Wechatpay-Nonce": lowered.get("wechatpay-nonce", ""),
            "Wechatpay-Serial": lowered.get("wechatpay-serial", ""),
            "Wechatpay-Signature-Type": lowered.get(
                "wechatpay-signature-type", "WECHATPAY2-SHA256-RSA2048"
            ),
        }
        try:
            text = body.decode("utf-8")
            # Verifies the signature with the platform key, then decrypts the resource with
            # the APIv3 key (AES-256-GCM); None when either fails.
            event = self._client.callback(wanted, text)
        except Exception as exc:  # the library's own errors are bare Exceptions
            raise InvalidNotification(f"unverifiable notification: {exc}") from exc
        if not isinstance(event, dict):
            raise InvalidNotification("bad signature, or a resource the APIv3 key cannot open")
        event_type = event.get("event_type")
        resource = event.get("resource")
        try:
            if not isinstance(event_type, str):
                raise ValueError(f"event_type {event_type!r}")
            self._check_ours(resource)
            if event_type == "VEHICLE.ENTRANCE_STATE_CHANGE":
                return _state_change(resource)
            if event_type.startswith("REFUND."):
                return _refund(resource)
            if event_type.startswith("TRANSACTION."):
                kind = (
                    "charge"
                    if isinstance(resource, dict) and resource.get("trade_scene") == "PARKING"
                    else "payment"
                )
                return _transaction(resource, kind=kind)
            raise ValueError(f"unknown event_type {event_type!r}")
        except (ValueError, TypeError) as exc:
            raise MalformedNotification(f"malformed notification: {exc}") from exc

    def _check_ours(self, resource: Any) -> None:
        """A notification about another merchant's or app's order (a shared notify URL, a
        misrouted delivery) is not about ours, even under an `out_trade_no` we also use."""
        if not isinstance(resource, Mapping):
            return
        ours = {
            "mchid": self._credentials.mchid,
            "sp_mchid": self._credentials.mchid,
            "appid": self._credentials.appid,
            "sp_appid": self._credentials.appid,
        }
        for key, value in ours.items():
            if key in resource and resource[key] != value:
                raise ValueError(f"{key} {resource[key]!r} is not ours")

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            await self._client._core.__aexit__(None, None, None)
