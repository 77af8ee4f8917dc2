"""A local stand-in for Alibaba Cloud SMS (dysmsapi `SendSms`), a real HTTP server that checks
every request's RPC v1 signature the way the service does, written from its documentation
independently of parking.sms.aliyun (the Java recipe: form-encode, then `+` → %20, `*` → %2A,
%7E → ~), refuses a reused nonce or a stale timestamp, and keeps what it accepted."""

import base64
import contextlib
import hashlib
import hmac
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote_plus

import orjson
from aiohttp import web


def _encode(value: str) -> str:
    return quote_plus(value, safe="").replace("+", "%20").replace("*", "%2A").replace("%7E", "~")


def expected_signature(secret: str, method: str, params: dict[str, str]) -> str:
    canonical = "&".join(
        _encode(key) + "=" + _encode(params[key]) for key in sorted(params) if key != "Signature"
    )
    text = method + "&" + _encode("/") + "&" + _encode(canonical)
    return base64.b64encode(
        hmac.new((secret + "&").encode(), text.encode(), hashlib.sha1).digest()
    ).decode()


@dataclass
class FakeAliyunSms:
    access_key_id: str
    access_key_secret: str
    url: str = ""
    accepted: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    # Set to an error code to refuse every (well-signed) message with it.
    fail_with: str | None = None
    _nonces: set[str] = field(default_factory=set)

    def _answer(self, code: str, status: int = 400) -> web.Response:
        self.refused.append(code)
        body = {"Code": code, "Message": code, "RequestId": uuid.uuid4().hex}
        return web.json_response(body, status=status)

    async def handle(self, request: web.Request) -> web.Response:
        params = {key: value for key, value in (await request.post()).items()}
        if not all(isinstance(value, str) for value in params.values()):
            return self._answer("InvalidParameter")
        fields: dict[str, str] = {k: str(v) for k, v in params.items()}
        if fields.get("AccessKeyId") != self.access_key_id:
            return self._answer("InvalidAccessKeyId.NotFound", 404)
        if (
            fields.get("SignatureMethod") != "HMAC-SHA1"
            or fields.get("SignatureVersion") != "1.0"
            or fields.get("Action") != "SendSms"
            or fields.get("Version") != "2017-05-25"
        ):
            return self._answer("InvalidParameter")
        wanted = expected_signature(self.access_key_secret, request.method, fields)
        if not hmac.compare_digest(wanted, fields.get("Signature", "")):
            return self._answer("SignatureDoesNotMatch")
        try:
            stamp = datetime.strptime(fields["Timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except (KeyError, ValueError):
            return self._answer("InvalidTimeStamp.Format")
        if abs(datetime.now(UTC) - stamp) > timedelta(minutes=15):
            return self._answer("InvalidTimeStamp.Expired")
        nonce = fields.get("SignatureNonce", "")
        if not nonce or nonce in self._nonces:
            return self._answer("SignatureNonceUsed")
        self._nonces.add(nonce)
        if self.fail_with is not None:
            return self._answer(self.fail_with, 200)
        self.accepted.append(
            {
                "phone": fields["PhoneNumbers"],
                "sign_name": fields["SignName"],
                "template": fields["TemplateCode"],
                "params": orjson.loads(fields["TemplateParam"]),
            }
        )
        return web.json_response(
            {"Code": "OK", "Message": "OK", "BizId": uuid.uuid4().hex, "RequestId": "r"}
        )


@contextlib.asynccontextmanager
async def serving(access_key_id: str, access_key_secret: str) -> AsyncIterator[FakeAliyunSms]:
    fake = FakeAliyunSms(access_key_id, access_key_secret)
    app = web.Application()
    app.router.add_post("/", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.url = f"http://127.0.0.1:{port}/"
    try:
        yield fake
    finally:
        await runner.cleanup()
