"""Alibaba Cloud SMS (dysmsapi 2017-05-25 `SendSms`), signed with the RPC signature v1.

The request is a form POST of the common and the action's parameters plus `Signature`:
Base64(HMAC-SHA1(AccessKeySecret + "&", StringToSign)), where StringToSign is
`POST&%2F&` + percentEncode(the parameters, sorted by name, each `percentEncode(name)=
percentEncode(value)`, joined by `&`). percentEncode is RFC 3986: A-Z a-z 0-9 - _ . ~ as they
are, everything else (UTF-8) as %XY, a space as %20. The answer is JSON with `Code` "OK" on
success.
"""

import base64
import hashlib
import hmac
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

import aiohttp
import orjson

API_VERSION = "2017-05-25"
SIGNATURE_METHOD = "HMAC-SHA1"
SIGNATURE_VERSION = "1.0"


class SmsError(Exception):
    """The message was not accepted (the provider said no, or could not be reached)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def percent_encode(value: str) -> str:
    return quote(value, safe="~")


def string_to_sign(method: str, params: Mapping[str, str]) -> str:
    canonical = "&".join(
        f"{percent_encode(name)}={percent_encode(params[name])}" for name in sorted(params)
    )
    return f"{method}&{percent_encode('/')}&{percent_encode(canonical)}"


def signature(secret: str, method: str, params: Mapping[str, str]) -> str:
    """`Signature` of `params` (which must not contain it)."""
    digest = hmac.new(
        f"{secret}&".encode(), string_to_sign(method, params).encode(), hashlib.sha1
    ).digest()
    return base64.b64encode(digest).decode()


def domestic_number(phone: str) -> str:
    """Mainland numbers go without the country code."""
    return phone.removeprefix("+86")


@dataclass(frozen=True, slots=True)
class AliyunSmsConfig:
    endpoint: str
    access_key_id: str
    access_key_secret: str
    sign_name: str
    timeout_s: float = 5.0


class AliyunSmsClient:
    """One `SendSms` call per message; the session is opened on first use."""

    def __init__(self, config: AliyunSmsConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    def signed_params(
        self,
        phone: str,
        template_code: str,
        template_params: Mapping[str, str],
        *,
        now: datetime | None = None,
        nonce: str | None = None,
    ) -> dict[str, str]:
        params = {
            "AccessKeyId": self.config.access_key_id,
            "Action": "SendSms",
            "Format": "JSON",
            "PhoneNumbers": domestic_number(phone),
            "RegionId": "cn-hangzhou",
            "SignName": self.config.sign_name,
            "SignatureMethod": SIGNATURE_METHOD,
            "SignatureNonce": nonce or uuid.uuid4().hex,
            "SignatureVersion": SIGNATURE_VERSION,
            "TemplateCode": template_code,
            "TemplateParam": orjson.dumps(dict(template_params)).decode(),
            "Timestamp": (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "Version": API_VERSION,
        }
        params["Signature"] = signature(self.config.access_key_secret, "POST", params)
        return params

    async def send(self, phone: str, template_code: str, template_params: Mapping[str, str]) -> str:
        """Sends one templated message; returns the provider's BizId. Raises SmsError."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s)
            )
        body = self.signed_params(phone, template_code, template_params)
        try:
            async with self._session.post(self.config.endpoint, data=body) as response:
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SmsError("unreachable", repr(exc)) from exc
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise SmsError("malformed", f"HTTP {response.status}, not JSON") from None
        if not isinstance(answer, dict):
            raise SmsError("malformed", f"HTTP {response.status}, not an object")
        if answer.get("Code") != "OK":
            raise SmsError(str(answer.get("Code")), str(answer.get("Message")))
        return str(answer.get("BizId", ""))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
