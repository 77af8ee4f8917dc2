"""Production fails closed: with PARKING_ENV=production, `parking serve`, `lanes` and `worker`
refuse to start while any stand-in for the outside world would be used, and name every
missing setting at once.

A development run (the default) keeps its stand-ins: embedded servers, the in-process sandbox
provider, the in-memory SMS sender and notifier, the dev vehicle registry, keys drawn at random
per process, unsigned gate commands.
"""

from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import orjson

from billing.rails import WECHAT_HOSTS, WECHAT_LOGIN_API
from parking.settings import Settings

PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True, slots=True)
class Missing:
    setting: str
    why: str

    def __str__(self) -> str:
        return f"{self.setting}: {self.why}"


class ConfigurationError(RuntimeError):
    """Settings this process cannot run with (any environment)."""


class ProductionRefused(RuntimeError):
    def __init__(self, missing: list[Missing]) -> None:
        self.missing = missing
        lines = "\n".join(f"  - {item}" for item in missing)
        super().__init__(
            f"PARKING_ENV=production refuses to start on stand-ins; {len(missing)} "
            f"setting(s) missing or wrong:\n{lines}"
        )


def stand_ins(settings: Settings) -> list[Missing]:
    """What a start with `settings` would stand in for the real thing (settings alone; the
    provider's answer is checked by `provider_stand_in`)."""
    missing: list[Missing] = []
    for name, what in (
        ("database_url", "PostgreSQL"),
        ("redis_url", "Redis"),
        ("mqtt_url", "MQTT broker"),
    ):
        if getattr(settings, name) is None:
            missing.append(
                Missing(f"PARKING_{name.upper()}", f"unset: an embedded {what} would be started")
            )
    missing += payment_stand_ins(settings)
    missing += sms_missing(settings)
    if settings.dev_adapters:
        missing.append(
            Missing(
                "PARKING_DEV_ADAPTERS",
                "true: the dev vehicle registry would prove any plate with licence DEV-<plate> "
                "(and receipts would use the fixed development key)",
            )
        )
    if settings.feed_allow_loopback:
        missing.append(
            Missing(
                "PARKING_FEED_ALLOW_LOOPBACK",
                "true: webhook and city platform endpoints on loopback would be accepted "
                "(a subscription could make the feeds POST to this machine's own services)",
            )
        )
    if settings.jwt_secret is None:
        missing.append(
            Missing(
                "PARKING_JWT_SECRET",
                "unset: tokens would be signed with a random key per process "
                "(every sign-in ends at a restart, and differs between API processes)",
            )
        )
    if settings.gate_config_key is None:
        missing.append(
            Missing(
                "PARKING_GATE_CONFIG_KEY",
                "unset: barrier commands would go unsigned (the gates refuse them) and no "
                "offline whitelist would be published (`parking gates keygen`)",
            )
        )
    if "public_base_url" not in settings.model_fields_set:
        missing.append(
            Missing(
                "PARKING_PUBLIC_BASE_URL",
                f"unset: payment QR codes, receipt links and the provider's notification URL "
                f"would point at {settings.public_base_url}",
            )
        )
    elif urlsplit(settings.public_base_url).scheme != "https":
        missing.append(
            Missing(
                "PARKING_PUBLIC_BASE_URL",
                f"{settings.public_base_url}: phones and the provider must reach it by https://",
            )
        )
    if settings.receipt_key is None:
        missing.append(
            Missing("PARKING_RECEIPT_KEY", "unset: receipt pages would show no gate photos")
        )
    if settings.log_pseudonym_key is None:
        missing.append(
            Missing(
                "PARKING_LOG_PSEUDONYM_KEY",
                "unset: plates and phones in logs would be hashed with a random key per process "
                "(logs would not correlate across processes or restarts)",
            )
        )
    return missing


def payment_stand_ins(settings: Settings) -> list[Missing]:
    """The payment rails' stand-ins, each setting named once: on WeChat's rails every missing
    merchant key (none set: the emulator would stand in) and an API URL that is not WeChat's;
    otherwise the in-process sandbox or an unverifiable provider. The one place that decides
    them (`provider_stand_in` asks a configured provider URL what it is)."""
    if settings.payment_provider == "wechat":
        why = (
            "required on WeChat Pay's rails"
            if settings.wechat_configured()
            else "unset: the in-process WeChat Pay emulator would take the money"
        )
        missing = [Missing(name, why) for name in settings.wechat_missing()]
        if settings.wechat_configured() and settings.wechat_api_url.rstrip("/") not in WECHAT_HOSTS:
            missing.append(
                Missing(
                    "PARKING_WECHAT_API_URL",
                    f"{settings.wechat_api_url} is not WeChat's API (an emulator stands in)",
                )
            )
        login_url = settings.wechat_login_url.rstrip("/")
        if settings.wechat_configured() and login_url != WECHAT_LOGIN_API:
            missing.append(
                Missing(
                    "PARKING_WECHAT_LOGIN_URL",
                    f"{login_url} is not WeChat's sign-in API (an emulator would name drivers)",
                )
            )
        return missing
    missing = []
    if not settings.payment_provider_url:
        missing.append(
            Missing(
                "PARKING_PAYMENT_PROVIDER_URL",
                "unset: the in-process sandbox payment provider would take the money "
                "(it approves every charge)",
            )
        )
    if settings.payment_provider_secret is None:
        missing.append(
            Missing(
                "PARKING_PAYMENT_PROVIDER_SECRET",
                "unset: the provider's notifications could not be verified",
            )
        )
    return missing


def sms_missing(settings: Settings) -> list[Missing]:
    if settings.sms_provider is None:
        return [
            Missing(
                "PARKING_SMS_PROVIDER",
                "unset: sign-in codes would go to the in-memory dev SMS sender and drivers' "
                "notifications to the in-memory notifier (nothing reaches a phone); set it to "
                "aliyun with its keys and templates",
            )
        ]
    required = (
        "sms_access_key_id",
        "sms_access_key_secret",
        "sms_sign_name",
        "sms_template_login_code",
        "sms_template_charge",
        "sms_template_notice",
    )
    return [
        Missing(f"PARKING_{name.upper()}", "required with PARKING_SMS_PROVIDER=aliyun")
        for name in required
        if not getattr(settings, name)
    ]


async def provider_stand_in(url: str) -> Missing | None:
    """The configured provider URL when it is the sandbox provider (it describes itself as one
    and takes fault injections); None for anything else, or when it does not answer now."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as session,
            session.get(url.rstrip("/") + "/openapi.json") as response,
        ):
            if response.status != 200:
                return None
            document = orjson.loads(await response.read())
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    info = document.get("info")
    title = str(info.get("title", "")) if isinstance(info, dict) else ""
    paths = document.get("paths")
    if "sandbox" in title.lower() or (isinstance(paths, dict) and "/faults" in paths):
        return Missing(
            "PARKING_PAYMENT_PROVIDER_URL",
            f"{url} is the sandbox payment provider (a stand-in that approves every charge)",
        )
    return None


async def refuse_stand_ins(settings: Settings) -> None:
    """Raises ProductionRefused naming everything missing, in production; nothing otherwise."""
    if settings.env != "production":
        return
    missing = stand_ins(settings)
    if settings.payment_provider != "wechat" and settings.payment_provider_url:
        sandbox = await provider_stand_in(settings.payment_provider_url)
        if sandbox is not None:
            missing.append(sandbox)
    if missing:
        raise ProductionRefused(missing)
