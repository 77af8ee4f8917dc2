"""Text messages to drivers' phones (sign-in codes). Production plugs an SMS gateway in behind
`SmsSender`; `DevSms` keeps the recent messages in memory so the demo and tests can show them."""

from collections import deque
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Sms:
    phone: str
    text: str


class SmsSender(Protocol):
    async def send(self, phone: str, text: str) -> None: ...


class DevSms:
    def __init__(self, keep: int = 200) -> None:
        self.sent: deque[Sms] = deque(maxlen=keep)

    async def send(self, phone: str, text: str) -> None:
        self.sent.append(Sms(phone, text))

    def last_code(self, phone: str) -> str | None:
        """The code in the newest message to `phone` (tests, the demo)."""
        for sms in reversed(self.sent):
            if sms.phone == phone:
                return sms.text.split()[-1]
        return None
