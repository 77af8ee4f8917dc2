"""The SMS adapters behind the service's two interfaces: sign-in codes (`SmsSender`) and
drivers' notifications (billing's `Notifier`), both on Alibaba Cloud SMS templates."""

from dataclasses import dataclass

import asyncpg

from billing.notifications import Notification
from parking.errors import AppError
from parking.logging import get_logger
from parking.production import ConfigurationError, sms_missing
from parking.settings import Settings
from parking.sms import repository
from parking.sms.aliyun import AliyunSmsClient, AliyunSmsConfig, SmsError

log = get_logger(__name__)

# The notification kind sent with the charge template, one variable per field (billing.
# notifications.exit_charged); every other kind goes with the notice template as `${content}`.
CHARGE_KIND = "exit_charged"


@dataclass(frozen=True, slots=True)
class Templates:
    login_code: str
    charge: str
    notice: str


def client_from(settings: Settings) -> tuple[AliyunSmsClient, Templates] | None:
    """The configured SMS service, or None (the in-memory dev sender); ConfigurationError
    naming what is missing when it is set up half."""
    if settings.sms_provider != "aliyun":
        return None
    missing = sms_missing(settings)
    if missing:
        raise ConfigurationError("; ".join(map(str, missing)))
    assert settings.sms_access_key_id and settings.sms_access_key_secret
    assert settings.sms_sign_name and settings.sms_template_login_code
    assert settings.sms_template_charge and settings.sms_template_notice
    config = AliyunSmsConfig(
        endpoint=settings.sms_endpoint,
        access_key_id=settings.sms_access_key_id,
        access_key_secret=settings.sms_access_key_secret.get_secret_value(),
        sign_name=settings.sms_sign_name,
        timeout_s=settings.sms_timeout_s,
    )
    templates = Templates(
        settings.sms_template_login_code, settings.sms_template_charge, settings.sms_template_notice
    )
    return AliyunSmsClient(config), templates


class AliyunCodeSender:
    """Sign-in codes: the login template with `${code}`."""

    def __init__(self, client: AliyunSmsClient, template: str) -> None:
        self.client = client
        self.template = template

    async def send_code(self, phone: str, code: str) -> None:
        try:
            await self.client.send(phone, self.template, {"code": code})
        except SmsError as exc:
            log.warning("sms.code_not_sent", reason=exc.code)
            raise AppError(503, "sms_unavailable", "the sign-in code could not be sent") from exc


class SmsNotifier:
    """Drivers' notifications as text messages to the account's phone; an error leaves the
    notification's job to the outbox's retries."""

    def __init__(self, pool: asyncpg.Pool, client: AliyunSmsClient, templates: Templates) -> None:
        self.pool = pool
        self.client = client
        self.templates = templates

    async def send(self, notification: Notification) -> None:
        async with self.pool.acquire() as conn:
            phone = await repository.phone_of(conn, notification.account_id)
        if phone is None:
            log.info("sms.account_gone", notification_id=notification.id)
            return
        if notification.kind == CHARGE_KIND and notification.params:
            await self.client.send(phone, self.templates.charge, notification.params)
        else:
            await self.client.send(phone, self.templates.notice, {"content": notification.body})
