"""How drivers' messages are written in this deployment: billing writes them, from settings
it does not read itself."""

from zoneinfo import ZoneInfo

from billing.notifications import MessageStyle
from parking.settings import Settings


def message_style(settings: Settings) -> MessageStyle:
    return MessageStyle(
        ZoneInfo(settings.timezone), settings.message_language, settings.public_base_url
    )
