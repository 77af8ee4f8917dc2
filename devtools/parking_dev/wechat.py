"""An emulator of WeChat Pay API v3's Pay Score parking rails: a real HTTP service on 127.0.0.1.

It speaks the wire protocol the adapter (billing.wechat) speaks to WeChat: it verifies every
request's `WECHATPAY2-SHA256-RSA2048` signature with the merchant's public key (401 SIGN_ERROR
otherwise), signs every answer and notification with its own platform key (announced by its
public key id), and encrypts notification resources with AES-256-GCM under the APIv3 key.
It keeps plate service states, parking entries, deductions, Native payments and refunds,
advances the money (垫资, bank_type BPA) when a driver's balance is short unless told not to,
sends TRANSACTION.SUCCESS / REFUND.SUCCESS / VEHICLE.ENTRANCE_STATE_CHANGE notifications, and
injects the sandbox's faults (parking_dev.sandbox.FaultConfig): errors before or after the
effect, hangs, lost, duplicate, late and forged notifications; plus a wrongly signed answer
(`bad_response_signature_rate`).

Keys are drawn per run: `Emulator.credentials()` is what the merchant configures.
"""

import asyncio
import base64
import contextlib
import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
import random
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import uvicorn
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from billing.wechat import WeChatCredentials
from parking_dev.sandbox.faults import FaultConfig

_AUTH = re.compile(r'(\w+)="([^"]*)"')
_TZ = ZoneInfo("Asia/Shanghai")
_SCHEME = "WECHATPAY2-SHA256-RSA2048"
_STATES = {"NORMAL", "PAUSE", "OVERDUE", "OUT_SERVICE", "EVALUATION_FAILED"}
# How far a request's timestamp may be from the emulator's clock (WeChat: 5 minutes).
_CLOCK_SKEW_S = 300
# A sign-in code is good for five minutes (wx.login).
_LOGIN_CODE_TTL_S = 300

Route = Callable[..., Awaitable[Response]]


def _now() -> str:
    return datetime.now(_TZ).replace(microsecond=0).isoformat()


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_private(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _pem_public(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _sign(key: rsa.RSAPrivateKey, message: str) -> str:
    signature = key.sign(message.encode(), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(signature).decode()


@dataclass
class Notice:
    """One notification the emulator sent (or dropped): for tests and the demo's summary."""

    event_type: str
    url: str
    key: str  # out_trade_no, out_refund_no or out_parking_no
    applied: list[str]
    outcome: str = "pending"  # delivered | failed | dropped
    attempts: int = 0


@dataclass
class EmulatorConfig:
    faults: FaultConfig = field(default_factory=FaultConfig)
    # A short balance is advanced (SUCCESS, bank_type BPA) unless this is off (PAY_FAIL).
    advance: bool = True
    # The state of a plate nobody set: the demo's drivers have all opened the service.
    default_state: str = "NORMAL"
    bad_response_signature_rate: float = 0.0
    # A refund answered PROCESSING and finished this long after (WeChat's refunds are
    # asynchronous); 0: SUCCESS within the request.
    refund_processing_s: float = 0.0
    # How a refund ends: SUCCESS, or ABNORMAL (the payer's card could not take it back).
    refund_outcome: str = "SUCCESS"


class Emulator:
    """The emulator's keys, books and background deliveries."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.rng = random.Random(self.config.faults.seed)
        self.mchid = "1900000109"
        self.appid = "wxd678efh567hg6787"
        self.merchant_key = _new_key()
        self.merchant_serial = secrets.token_hex(20).upper()
        self.platform_key = _new_key()
        self.platform_key_id = f"PUB_KEY_ID_{secrets.token_hex(12).upper()}"
        # What its answers and notifications name in Wechatpay-Serial: the public key's id, or
        # (use_certificate) the serial number of a platform certificate.
        self.platform_serial = self.platform_key_id
        self.apiv3_key = secrets.token_hex(16)  # 32 characters
        # The mini program's AppSecret, and the sign-in codes (wx.login) not yet exchanged:
        # code -> (openid, issued at monotonic seconds).
        self.app_secret = secrets.token_hex(16)
        self.login_codes: dict[str, tuple[str, float]] = {}
        self.used_login_codes: set[str] = set()
        self.plates: dict[tuple[str, str], str] = {}
        # The WeChat user (openid) who opened a plate's service, where a test or the demo said
        # so: the plate-service query under another openid answers OUT_SERVICE. A plate with
        # none answers its state to any openid.
        self.openers: dict[tuple[str, str], str] = {}
        self.parkings: dict[str, dict[str, Any]] = {}
        self.transactions: dict[str, dict[str, Any]] = {}
        self.payments: dict[str, dict[str, Any]] = {}
        self.refunds: dict[str, dict[str, Any]] = {}
        self.bills: dict[str, bytes] = {}
        self.notices: list[Notice] = []
        self.rejected_requests = 0
        # The plate of every plate-service query received (answered or failed).
        self.service_queries: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: httpx.AsyncClient | None = None
        self._stopping = asyncio.Event()

    def credentials(self) -> WeChatCredentials:
        return WeChatCredentials(
            mchid=self.mchid,
            appid=self.appid,
            cert_serial_no=self.merchant_serial,
            private_key_pem=_pem_private(self.merchant_key),
            apiv3_key=self.apiv3_key,
            platform_public_key_pem=_pem_public(self.platform_key),
            platform_public_key_id=self.platform_key_id,
            app_secret=self.app_secret,
        )

    def use_certificate(self, folder: Path) -> WeChatCredentials:
        """Platform-certificate mode (WeChat's older one): a certificate of the platform key in
        `folder`, named by its serial in Wechatpay-Serial; the merchant's credentials for it."""
        serial = x509.random_serial_number()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tenpay.com Root CA")])
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.platform_key.public_key())
            .serial_number(serial)
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=365))
            .sign(self.platform_key, hashes.SHA256())
        )
        self.platform_serial = f"{serial:X}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{self.platform_serial}.pem").write_bytes(
            certificate.public_bytes(serialization.Encoding.PEM)
        )
        return dataclasses.replace(
            self.credentials(),
            platform_public_key_pem=None,
            platform_public_key_id=None,
            platform_cert_dir=str(folder),
        )

    def chance(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    # Lifecycle.

    def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=5.0)

    async def stop(self) -> None:
        self._stopping.set()
        while self._tasks:
            pending = set(self._tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._tasks -= pending
        if self._http is not None:
            await self._http.aclose()

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hang(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.faults.timeout_s):
                await self._stopping.wait()

    # The wire protocol.

    def verify_request(self, request: Request, body: bytes) -> str | None:
        """Why the request's signature is not the merchant's, or None when it is."""
        auth = request.headers.get("authorization", "")
        if not auth.startswith(_SCHEME + " "):
            return "no WECHATPAY2-SHA256-RSA2048 Authorization"
        fields = dict(_AUTH.findall(auth[len(_SCHEME) + 1 :]))
        if fields.get("mchid") != self.mchid or fields.get("serial_no") != self.merchant_serial:
            return "unknown merchant or certificate serial"
        try:
            timestamp = int(fields.get("timestamp", ""))
        except ValueError:
            return "bad timestamp"
        if abs(time.time() - timestamp) > _CLOCK_SKEW_S:
            return "timestamp too far from now"
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        query = request.scope.get("query_string", b"")
        target = raw_path.decode() + (f"?{query.decode()}" if query else "")
        message = (
            f"{request.method}\n{target}\n{timestamp}\n{fields.get('nonce_str', '')}\n"
            f"{body.decode('utf-8', 'replace')}\n"
        )
        try:
            self.merchant_key.public_key().verify(
                base64.b64decode(fields.get("signature", "")),
                message.encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (InvalidSignature, ValueError):
            return "signature does not verify"
        return None

    def _signed_headers(self, body: bytes, *, forged: bool = False) -> dict[str, str]:
        timestamp = str(int(time.time()))
        nonce = secrets.token_hex(16)
        key = _new_key() if forged else self.platform_key
        return {
            "Wechatpay-Timestamp": timestamp,
            "Wechatpay-Nonce": nonce,
            "Wechatpay-Serial": self.platform_serial,
            "Wechatpay-Signature-Type": _SCHEME,
            "Wechatpay-Signature": _sign(key, f"{timestamp}\n{nonce}\n{body.decode()}\n"),
            "Request-ID": str(uuid.uuid4()),
        }

    def answer(self, status: int, content: Any = None) -> Response:
        body = b"" if content is None else json.dumps(content, ensure_ascii=False).encode()
        bad = self.chance(self.config.bad_response_signature_rate)
        return Response(
            body,
            status_code=status,
            media_type="application/json" if content is not None else None,
            headers=self._signed_headers(body, forged=bad),
        )

    def error(self, status: int, code: str, message: str) -> Response:
        return self.answer(status, {"code": code, "message": message})

    async def before(self) -> Response | None:
        faults = self.config.faults
        if self.chance(faults.error_rate):
            return self.error(500, "SYSTEM_ERROR", "injected error before taking effect")
        if self.chance(faults.timeout_rate):
            await self._hang()
            return self.error(500, "SYSTEM_ERROR", "injected hang")
        return None

    async def after(self, response: Response) -> Response:
        faults = self.config.faults
        if self.chance(faults.lost_response_rate):
            return self.error(500, "SYSTEM_ERROR", "injected error after taking effect")
        if self.chance(faults.slow_after_apply_rate):
            await self._hang()
        return response

    # Notifications.

    def notify(self, url: str | None, event_type: str, key: str, resource: dict[str, Any]) -> None:
        if not url:
            return
        faults = self.config.faults
        applied = [
            name
            for name, rate in (
                ("lost", faults.lost_notification_rate),
                ("duplicate", faults.duplicate_notification_rate),
                ("late", faults.late_notification_rate),
                ("forged", faults.forged_notification_rate),
            )
            if self.chance(rate)
        ]
        plaintext = json.dumps(resource, ensure_ascii=False)

        if "forged" in applied:
            forged = dict(resource)
            if "amount" in forged:
                forged["amount"] = {**forged["amount"], "total": 1}
            notice = Notice(event_type, url, key, ["forged"])
            self.notices.append(notice)
            self._spawn(
                self._deliver(
                    notice, self.event(event_type, json.dumps(forged), forged=True), True, ()
                )
            )
        if "lost" in applied:
            self.notices.append(Notice(event_type, url, key, applied, outcome="dropped"))
            return
        delay = faults.late_notification_s if "late" in applied else 0.0
        body = self.event(event_type, plaintext)
        for _ in range(2 if "duplicate" in applied else 1):
            notice = Notice(event_type, url, key, applied)
            self.notices.append(notice)
            self._spawn(self._deliver(notice, body, False, faults.notify_retry_s, delay))

    def event(self, event_type: str, content: str, *, forged: bool = False) -> bytes:
        """A notification's body: `content` encrypted under the APIv3 key (a forger's own key
        when `forged`: they cannot have ours)."""
        original = {"VEHICLE.ENTRANCE_STATE_CHANGE": ""}.get(event_type, "transaction")
        nonce = secrets.token_hex(6)  # 12 characters, as WeChat's
        key_text = secrets.token_hex(16) if forged else self.apiv3_key
        ciphertext = AESGCM(key_text.encode()).encrypt(
            nonce.encode(), content.encode(), original.encode()
        )
        return json.dumps(
            {
                "id": str(uuid.uuid4()),
                "create_time": _now(),
                "resource_type": "encrypt-resource",
                "event_type": event_type,
                "summary": "支付成功" if event_type.startswith("TRANSACTION") else event_type,
                "resource": {
                    "original_type": original,
                    "algorithm": "AEAD_AES_256_GCM",
                    "ciphertext": base64.b64encode(ciphertext).decode(),
                    "associated_data": original,
                    "nonce": nonce,
                },
            },
            ensure_ascii=False,
        ).encode()

    async def _deliver(
        self,
        notice: Notice,
        body: bytes,
        forged: bool,
        retry_s: tuple[float, ...],
        delay_s: float = 0.0,
    ) -> None:
        assert self._http is not None
        await asyncio.sleep(delay_s)
        for wait_s in (0.0, *retry_s):
            await asyncio.sleep(wait_s)
            notice.attempts += 1
            headers = {"Content-Type": "application/json", **self._signed_headers(body)}
            if forged:
                headers.update(self._signed_headers(body, forged=True))
            try:
                response = await self._http.post(notice.url, content=body, headers=headers)
            except httpx.HTTPError:
                continue
            if response.is_success:
                notice.outcome = "delivered"
                return
        notice.outcome = "failed"

    # Plates and the decisions of deductions.

    def login_code(self, openid: str) -> str:
        """The WeChat user `openid` signs in to the mini program (wx.login): a code the server
        exchanges once, within five minutes, for that openid."""
        code = secrets.token_urlsafe(24)
        self.login_codes[code] = (openid, time.monotonic())
        return code

    def exchange_login_code(self, appid: str, secret: str, code: str) -> dict[str, Any]:
        """jscode2session's answer: the openid, or WeChat's errcode (40125 a wrong AppSecret,
        40029 an unknown or expired code, 40163 one exchanged already)."""
        if appid != self.appid or secret != self.app_secret:
            return {"errcode": 40125, "errmsg": "invalid appsecret"}
        issued = self.login_codes.get(code)
        if issued is None:
            used = code in self.used_login_codes
            return (
                {"errcode": 40163, "errmsg": "code been used"}
                if used
                else {"errcode": 40029, "errmsg": "invalid code"}
            )
        del self.login_codes[code]
        self.used_login_codes.add(code)
        if time.monotonic() - issued[1] > _LOGIN_CODE_TTL_S:
            return {"errcode": 40029, "errmsg": "invalid code"}
        return {"openid": issued[0], "session_key": base64.b64encode(os.urandom(16)).decode()}

    def finish_refund(self, refund: dict[str, Any], notify_url: str | None) -> None:
        """The refund ends (`refund_outcome`: SUCCESS, or ABNORMAL) and REFUND.<it> is sent."""
        outcome = self.config.refund_outcome
        refund["status"] = outcome
        if outcome == "SUCCESS":
            refund["success_time"] = _now()
        resource = {
            "mchid": self.mchid,
            **{k: refund[k] for k in ("out_trade_no", "transaction_id", "out_refund_no")},
            "refund_id": refund["refund_id"],
            "refund_status": outcome,
            "amount": refund["amount"],
        }
        if outcome == "SUCCESS":
            resource["success_time"] = refund["success_time"]
        self.notify(notify_url, f"REFUND.{outcome}", refund["out_trade_no"], resource)

    def finish_refund_later(self, refund: dict[str, Any], notify_url: str | None) -> None:
        async def later() -> None:
            await asyncio.sleep(self.config.refund_processing_s)
            self.finish_refund(refund, notify_url)

        self._spawn(later())

    def plate_state(self, plate: str, color: str) -> str:
        return self.plates.get((plate, color), self.config.default_state)

    def set_plate_state(
        self, plate: str, color: str, state: str, *, openid: str | None = None
    ) -> None:
        """A driver paused, resumed, fell overdue or closed the service (`openid`: the WeChat
        user who opened it): every open entry of the plate is told
        (VEHICLE.ENTRANCE_STATE_CHANGE)."""
        if state not in _STATES:
            raise ValueError(f"unknown state {state!r}")
        self.plates[(plate, color)] = state
        if openid is not None:
            self.openers[(plate, color)] = openid
        for parking in self.parkings.values():
            if (parking["plate_number"], parking["plate_color"]) != (plate, color):
                continue
            if parking.get("closed"):
                continue
            resource = {
                "sp_mchid": self.mchid,
                "parking_id": parking["id"],
                "out_parking_no": parking["out_parking_no"],
                "plate_number": plate,
                "plate_color": color,
                "start_time": parking["start_time"],
                "parking_name": parking["parking_name"],
                "free_duration": parking["free_duration"],
                "parking_state": "NORMAL" if state == "NORMAL" else "BLOCKED",
                "state_update_time": _now(),
            }
            if state != "NORMAL":
                resource["blocked_state_description"] = state
            self.notify(
                parking["notify_url"],
                "VEHICLE.ENTRANCE_STATE_CHANGE",
                parking["out_parking_no"],
                resource,
            )

    def decide(self, out_trade_no: str) -> None:
        order = self.transactions[out_trade_no]
        if order["trade_state"] != "ACCEPTED":
            return
        faults = self.config.faults
        openid = order["payer"]["openid"]
        short = openid in faults.declined_agreements or self.chance(faults.decline_rate)
        if order.get("_blocked"):
            order["trade_state"] = "PAY_FAIL"
            order["trade_state_description"] = "车牌服务不可用"
        elif short and not self.config.advance:
            order["trade_state"] = "PAY_FAIL"
            order["trade_state_description"] = "用户余额不足"
        else:
            order["trade_state"] = "SUCCESS"
            order["success_time"] = _now()
            order["bank_type"] = "BPA" if short else "OTHERS"
            if short:
                order["user_repaid"] = "N"
            order["trade_state_description"] = "支付成功"
        event = "TRANSACTION.SUCCESS" if order["trade_state"] == "SUCCESS" else "TRANSACTION.FAIL"
        self.notify(order["_notify_url"], event, out_trade_no, self.public(order))

    async def decide_later(self, out_trade_no: str) -> None:
        await asyncio.sleep(self.config.faults.processing_delay_s)
        self.decide(out_trade_no)

    @staticmethod
    def public(record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if not k.startswith("_")}

    def bill(self, day: str) -> bytes | None:
        """The day's trade bill as WeChat writes it: backtick-prefixed CSV fields; None when
        nothing was traded that day (WeChat answers NO_STATEMENT_EXIST)."""
        header = [
            "交易时间", "公众账号ID", "商户号", "特约商户号", "设备号", "微信订单号",
            "商户订单号", "用户标识", "交易类型", "交易状态", "付款银行", "货币种类",
            "应结订单总金额", "代金券金额", "微信退款单号", "商户退款单号", "退款金额",
            "充值券退款金额", "退款类型", "退款状态", "商品名称", "商户数据包", "手续费",
            "费率", "订单金额", "申请退款金额", "费率备注",
        ]  # fmt: skip

        def yuan(fen: int) -> str:
            return f"{fen // 100}.{fen % 100:02d}"

        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(header)
        rows = 0
        for order in [*self.transactions.values(), *self.payments.values()]:
            if order["trade_state"] not in ("SUCCESS", "REFUND"):
                continue
            at = datetime.fromisoformat(order["success_time"])
            if at.date().isoformat() != day:
                continue
            total = yuan(order["amount"]["total"])
            cells = [at.strftime("%Y-%m-%d %H:%M:%S"), self.appid, self.mchid, "", "",
                     order["transaction_id"], order["out_trade_no"], "", "PARKING",
                     "SUCCESS", order.get("bank_type", "OTHERS"), "CNY", total, "0.00", "0",
                     "0", "0.00", "0.00", "", "", order["description"], "", "0.00", "0.60%",
                     total, "0.00", ""]  # fmt: skip
            writer.writerow([f"`{cell}" for cell in cells])
            rows += 1
        for refund in self.refunds.values():
            if refund["status"] != "SUCCESS":
                continue
            at = datetime.fromisoformat(refund["success_time"])
            if at.date().isoformat() != day:
                continue
            amount = yuan(refund["amount"]["refund"])
            cells = [at.strftime("%Y-%m-%d %H:%M:%S"), self.appid, self.mchid, "", "",
                     refund["transaction_id"], refund["out_trade_no"], "", "PARKING",
                     "REFUND", "OTHERS", "CNY", "0.00", "0.00", refund["refund_id"],
                     refund["out_refund_no"], amount, "0.00", "ORIGINAL", "SUCCESS", "", "",
                     "0.00", "0.60%", yuan(refund["amount"]["total"]), amount, ""]  # fmt: skip
            writer.writerow([f"`{cell}" for cell in cells])
            rows += 1
        if rows == 0:
            return None
        writer.writerow(["总交易单数", "应结订单总金额", "退款总金额"])
        writer.writerow([f"`{rows}", "`0.00", "`0.00"])
        return out.getvalue().encode()


def create_app(config: EmulatorConfig | None = None) -> FastAPI:
    emulator = Emulator(config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        emulator.start()
        try:
            yield
        finally:
            await emulator.stop()

    app = FastAPI(title="WeChat Pay v3 parking emulator", lifespan=lifespan)
    app.state.emulator = emulator

    def signed(*, takes_effect: bool = False) -> Callable[[Route], Route]:
        """A v3 route as WeChat serves it: the request's signature checked (401 SIGN_ERROR),
        the faults injected before any effect, the JSON body in `request.state.body`; on a
        route that takes effect, a successful answer passes the faults injected after it."""

        def decorate(route: Route) -> Route:
            @functools.wraps(route)
            async def checked(*args: Any, **kwargs: Any) -> Response:
                request: Request = kwargs["request"]
                body = await request.body()
                problem = emulator.verify_request(request, body)
                if problem is not None:
                    emulator.rejected_requests += 1
                    return emulator.error(401, "SIGN_ERROR", problem)
                if (failure := await emulator.before()) is not None:
                    return failure
                try:
                    request.state.body = json.loads(body) if body else None
                except ValueError:
                    return emulator.error(400, "PARAM_ERROR", "body is not JSON")
                response = await route(*args, **kwargs)
                if takes_effect and response.status_code < 300:
                    return await emulator.after(response)
                return response

            return checked

        return decorate

    def note_service_query(request: Request) -> None:
        # Counted as asked even when the answer fails (tests count the worker's attempts).
        emulator.service_queries.append(request.query_params.get("plate_number", ""))

    @app.get("/v3/vehicle/parking/services/find", dependencies=[Depends(note_service_query)])
    @signed()
    async def services_find(request: Request) -> Response:
        q = request.query_params
        if not (q.get("appid") and q.get("plate_number") and q.get("openid")):
            return emulator.error(400, "PARAM_ERROR", "appid, plate_number and openid needed")
        color = q.get("plate_color", "")
        state = emulator.plate_state(q["plate_number"], color)
        opener = emulator.openers.get((q["plate_number"], color))
        if opener is not None and opener != q["openid"]:
            state = "OUT_SERVICE"  # not this WeChat user's plate service
        return emulator.answer(
            200,
            {
                "plate_number": q["plate_number"],
                "plate_color": color,
                "service_open_time": _now(),
                "openid": q["openid"],
                # The query knows NORMAL, PAUSE and OUT_SERVICE; the reasons of a block
                # (OVERDUE, EVALUATION_FAILED) show at the entry.
                "service_state": {"OVERDUE": "PAUSE", "EVALUATION_FAILED": "OUT_SERVICE"}.get(
                    state, state
                ),
            },
        )

    @app.post("/v3/vehicle/parking/parkings")
    @signed(takes_effect=True)
    async def create_parking(request: Request) -> Response:
        data = request.state.body
        required = ("out_parking_no", "plate_number", "plate_color", "notify_url", "start_time")
        if not isinstance(data, dict) or any(not data.get(k) for k in required):
            return emulator.error(400, "PARAM_ERROR", f"{', '.join(required)} are required")
        if not isinstance(data.get("free_duration"), int) or not data.get("parking_name"):
            return emulator.error(400, "PARAM_ERROR", "parking_name and free_duration needed")
        parking = emulator.parkings.get(data["out_parking_no"])
        if parking is None:
            parking = {
                "id": f"PK{uuid.uuid4().hex[:28].upper()}",
                **{k: data[k] for k in (*required, "parking_name", "free_duration")},
            }
            emulator.parkings[data["out_parking_no"]] = parking
        state = emulator.plate_state(parking["plate_number"], parking["plate_color"])
        answer = {k: v for k, v in parking.items() if k not in ("notify_url", "closed")}
        answer["state"] = "NORMAL" if state == "NORMAL" else "BLOCKED"
        if state != "NORMAL":
            answer["block_reason"] = state
        return emulator.answer(200, answer)

    @app.post("/v3/vehicle/transactions/parking")
    @signed(takes_effect=True)
    async def create_transaction(request: Request) -> Response:
        data = request.state.body
        info = data.get("parking_info") if isinstance(data, dict) else None
        if (
            not isinstance(info, dict)
            or not isinstance(data.get("out_trade_no"), str)
            or len(data["out_trade_no"]) > 32
            or data.get("appid") != emulator.appid
            or not isinstance(data.get("amount", {}).get("total"), int)
        ):
            return emulator.error(400, "PARAM_ERROR", "appid, out_trade_no, amount, parking_info")
        parking = next(
            (p for p in emulator.parkings.values() if p["id"] == info.get("parking_id")), None
        )
        if parking is None:
            return emulator.error(400, "INVALID_REQUEST", "parking_id 不存在")
        existing = emulator.transactions.get(data["out_trade_no"])
        if existing is not None:
            if existing["amount"]["total"] != data["amount"]["total"]:
                return emulator.error(403, "OUT_TRADE_NO_USED", "商户订单号重复")
            return emulator.answer(200, emulator.public(existing))
        state = emulator.plate_state(parking["plate_number"], parking["plate_color"])
        order = {
            "appid": emulator.appid,
            "sp_mchid": emulator.mchid,
            "description": data.get("description", ""),
            "create_time": _now(),
            "out_trade_no": data["out_trade_no"],
            "transaction_id": f"42000{secrets.randbelow(10**23):023d}",
            "trade_state": "ACCEPTED",
            "trade_state_description": "已受理",
            "trade_scene": "PARKING",
            "parking_info": info,
            # The emulator knows drivers by plate: the openid is the plate's.
            "payer": {"openid": f"o-{parking['plate_number']}"},
            "amount": {"total": data["amount"]["total"], "currency": "CNY"},
            "_notify_url": data.get("notify_url"),
        }
        emulator.transactions[data["out_trade_no"]] = order
        parking["closed"] = True
        # Blocked at the exit (paused, overdue, not opened): the deduction fails.
        order["_blocked"] = state != "NORMAL"
        if emulator.config.faults.processing_delay_s <= 0:
            emulator.decide(data["out_trade_no"])
        else:
            emulator._spawn(emulator.decide_later(data["out_trade_no"]))
        return emulator.answer(200, emulator.public(order))

    @app.get("/v3/vehicle/transactions/out-trade-no/{out_trade_no}")
    @signed()
    async def query_transaction(out_trade_no: str, request: Request) -> Response:
        order = emulator.transactions.get(out_trade_no)
        if order is None:
            return emulator.error(404, "ORDER_NOT_EXIST", "订单不存在")
        return emulator.answer(200, emulator.public(order))

    @app.post("/v3/pay/transactions/native")
    @signed(takes_effect=True)
    async def native(request: Request) -> Response:
        data = request.state.body
        if not isinstance(data, dict) or not isinstance(data.get("out_trade_no"), str):
            return emulator.error(400, "PARAM_ERROR", "out_trade_no")
        no = data["out_trade_no"]
        if no not in emulator.payments:
            emulator.payments[no] = {
                "appid": emulator.appid,
                "mchid": emulator.mchid,
                "out_trade_no": no,
                "transaction_id": f"42001{secrets.randbelow(10**23):023d}",
                "trade_type": "NATIVE",
                "trade_state": "NOTPAY",
                "description": data.get("description", ""),
                "amount": {"total": data["amount"]["total"], "currency": "CNY"},
                "_notify_url": data.get("notify_url"),
            }
        code_url = f"weixin://wxpay/bizpayurl?pr={no}"
        return emulator.answer(200, {"code_url": code_url})

    @app.get("/v3/pay/transactions/out-trade-no/{out_trade_no}")
    @signed()
    async def query_payment(out_trade_no: str, request: Request) -> Response:
        payment = emulator.payments.get(out_trade_no)
        if payment is None:
            return emulator.error(404, "ORDER_NOT_EXIST", "订单不存在")
        return emulator.answer(200, emulator.public(payment))

    @app.post("/v3/pay/transactions/out-trade-no/{out_trade_no}/close")
    @signed()
    async def close_payment(out_trade_no: str, request: Request) -> Response:
        payment = emulator.payments.get(out_trade_no)
        if payment is None:
            return emulator.error(404, "ORDER_NOT_EXIST", "订单不存在")
        if payment["trade_state"] == "SUCCESS":
            return emulator.error(400, "ORDER_PAID", "订单已支付")
        payment["trade_state"] = "CLOSED"
        return emulator.answer(204)

    @app.post("/v3/refund/domestic/refunds")
    @signed(takes_effect=True)
    async def refund(request: Request) -> Response:
        data = request.state.body
        no = data.get("out_trade_no") if isinstance(data, dict) else None
        order = emulator.transactions.get(no or "") or emulator.payments.get(no or "")
        if order is None or order["trade_state"] not in ("SUCCESS", "REFUND"):
            return emulator.error(404, "RESOURCE_NOT_EXISTS", "订单不存在")
        amount = data.get("amount", {})
        if amount.get("total") != order["amount"]["total"]:
            return emulator.error(400, "PARAM_ERROR", "订单金额与退款总金额不一致")
        existing = emulator.refunds.get(data.get("out_refund_no", ""))
        if existing is None:
            refunded = sum(
                r["amount"]["refund"] for r in emulator.refunds.values() if r["out_trade_no"] == no
            )
            if refunded + amount.get("refund", 0) > order["amount"]["total"]:
                return emulator.error(403, "NOT_ENOUGH", "退款金额超过订单可退金额")
            existing = {
                "refund_id": f"50300{secrets.randbelow(10**23):023d}",
                "out_refund_no": data["out_refund_no"],
                "transaction_id": order["transaction_id"],
                "out_trade_no": no,
                "channel": "ORIGINAL",
                "create_time": _now(),
                "status": "PROCESSING",
                "amount": {
                    "total": order["amount"]["total"],
                    "refund": amount["refund"],
                    "payer_total": order["amount"]["total"],
                    "payer_refund": amount["refund"],
                    "currency": "CNY",
                },
            }
            emulator.refunds[data["out_refund_no"]] = existing
            order["trade_state"] = "REFUND"
            if emulator.config.refund_processing_s > 0:
                emulator.finish_refund_later(existing, data.get("notify_url"))
            else:
                emulator.finish_refund(existing, data.get("notify_url"))
        return emulator.answer(200, existing)

    @app.get("/v3/bill/tradebill")
    @signed()
    async def trade_bill(request: Request) -> Response:
        day = request.query_params.get("bill_date", "")
        content = emulator.bill(day)
        if content is None:
            return emulator.error(400, "NO_STATEMENT_EXIST", "账单文件不存在")
        token = secrets.token_urlsafe(12)
        emulator.bills[token] = content
        base = str(request.base_url).rstrip("/")
        return emulator.answer(
            200,
            {
                "hash_type": "SHA1",
                "hash_value": hashlib.sha1(content).hexdigest(),
                "download_url": f"{base}/v3/billdownload/file?token={token}",
            },
        )

    @app.get("/v3/billdownload/file")
    @signed()
    async def bill_file(request: Request, token: str) -> Response:
        content = emulator.bills.get(token)
        if content is None:
            return emulator.error(404, "RESOURCE_NOT_EXISTS", "账单不存在")
        return Response(content, media_type="text/csv")

    @app.post("/_emulator/pay/{out_trade_no}")
    async def pay(out_trade_no: str) -> Response:
        """Unsigned administration: the driver scanned the Native QR code and paid."""
        payment = emulator.payments.get(out_trade_no)
        if payment is None:
            return Response(status_code=404)
        if payment["trade_state"] == "NOTPAY":
            payment.update(
                trade_state="SUCCESS",
                trade_state_description="支付成功",
                success_time=_now(),
                bank_type="OTHERS",
                payer={"openid": f"o-payer-{secrets.token_hex(4)}"},
            )
            emulator.notify(
                payment["_notify_url"],
                "TRANSACTION.SUCCESS",
                out_trade_no,
                emulator.public(payment),
            )
        return emulator.answer(200, emulator.public(payment))

    @app.get("/sns/jscode2session")
    async def jscode2session(
        appid: str = "", secret: str = "", js_code: str = "", grant_type: str = ""
    ) -> Response:
        """The mini program sign-in's code exchanged for the openid (WeChat answers 200 with an
        errcode when it refuses)."""
        if grant_type != "authorization_code":
            answer: dict[str, Any] = {"errcode": 40002, "errmsg": "invalid grant_type"}
        else:
            answer = emulator.exchange_login_code(appid, secret, js_code)
        return Response(json.dumps(answer), media_type="application/json")

    @app.post("/_emulator/login")
    async def login(request: Request) -> Response:
        """Unsigned administration (tests, the demo): the WeChat user `openid` signs in to the
        mini program; the code its wx.login would give."""
        data = await request.json()
        openid = data.get("openid") if isinstance(data, dict) else None
        if not isinstance(openid, str) or not openid:
            return Response("openid required", status_code=400)
        return Response(
            json.dumps({"code": emulator.login_code(openid)}), media_type="application/json"
        )

    @app.put("/_emulator/plates")
    async def set_plate(request: Request) -> Response:
        """Unsigned administration (tests, the demo): a plate's service state (and, with
        `openid`, the WeChat user who opened it)."""
        data = await request.json()
        try:
            emulator.set_plate_state(
                data["plate_number"], data["plate_color"], data["state"], openid=data.get("openid")
            )
        except (KeyError, ValueError, TypeError) as exc:
            return Response(str(exc), status_code=400)
        return Response(status_code=204)

    return app


@contextlib.asynccontextmanager
async def running(config: EmulatorConfig | None = None) -> AsyncIterator[tuple[str, Emulator]]:
    """Serves the emulator on 127.0.0.1 (a free port) in the current event loop."""
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the WeChat Pay emulator stopped while starting")
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    emulator: Emulator = app.state.emulator
    try:
        yield f"http://127.0.0.1:{port}", emulator
    finally:
        emulator._stopping.set()
        server.should_exit = True
        await task


def write_keys(emulator: Emulator, url: str, folder: Path) -> Path:
    """The merchant's side of the emulator's keys in `folder` (private key and platform public
    key files, and `wechat.env` with the PARKING_* settings that point the service at it)."""
    folder.mkdir(parents=True, exist_ok=True)
    creds = emulator.credentials()
    private_key = folder / "apiclient_key.pem"
    private_key.write_text(creds.private_key_pem)
    private_key.chmod(0o600)
    public_key = folder / "platform_public_key.pem"
    public_key.write_text(creds.platform_public_key_pem or "")
    env = folder / "wechat.env"
    env.write_text(
        "\n".join(
            [
                "PARKING_PAYMENT_PROVIDER=wechat",
                f"PARKING_WECHAT_API_URL={url}",
                f"PARKING_WECHAT_MCHID={creds.mchid}",
                f"PARKING_WECHAT_APPID={creds.appid}",
                f"PARKING_WECHAT_CERT_SERIAL_NO={creds.cert_serial_no}",
                f"PARKING_WECHAT_PRIVATE_KEY_PATH={private_key.resolve()}",
                f"PARKING_WECHAT_APIV3_KEY={creds.apiv3_key}",
                f"PARKING_WECHAT_PLATFORM_PUBLIC_KEY_PATH={public_key.resolve()}",
                f"PARKING_WECHAT_PLATFORM_PUBLIC_KEY_ID={creds.platform_public_key_id}",
                f"PARKING_WECHAT_APP_SECRET={creds.app_secret}",
                f"PARKING_WECHAT_LOGIN_URL={url}",
                "",
            ]
        )
    )
    env.chmod(0o600)
    return env


def serve(port: int, config: EmulatorConfig, keys: Path) -> None:
    """Runs the emulator in the foreground on 127.0.0.1:`port` with fresh keys in `keys`."""
    app = create_app(config)
    env = write_keys(app.state.emulator, f"http://127.0.0.1:{port}", keys)
    print(f"WeChat Pay emulator on http://127.0.0.1:{port}; settings in {env}", flush=True)
    uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info", access_log=False)
    ).run()
