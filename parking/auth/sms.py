"""Sign-in codes texted to drivers' phones. Production sends them through an SMS service's
template (`parking.sms.service.AliyunCodeSender`); `DevSms` keeps the recent messages in memory
so the demo and tests can show them (a stand-in: PARKING_ENV=production refuses it)."""

from collections import deque
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Sms:
    phone: str
    text: str


class SmsSender(Protocol):
    async def send_code(self, phone: str, code: str) -> None: ...


def login_code_text(code: str) -> str:
    """The sign-in message as the dev sender shows it (a real service fills its template)."""
    return f"【便捷泊车】登录验证码 sign-in code: {code}"


class DevSms:
    def __init__(self, keep: int = 200) -> None:
        self.sent: deque[Sms] = deque(maxlen=keep)

    async def send_code(self, phone: str, code: str) -> None:
        self.sent.append(Sms(phone, login_code_text(code)))

    def last_code(self, phone: str) -> str | None:
        """The code in the newest message to `phone` (tests, the demo)."""
        for sms in reversed(self.sent):
            if sms.phone == phone:
                return sms.text.split()[-1]
        return None
