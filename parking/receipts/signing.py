"""Expiring frame URLs of the receipt page: HMAC-SHA256 over the receipt token, the frame and
the expiry, with PARKING_RECEIPT_KEY. Without a key there are no frame URLs, except on a
laptop (`PARKING_DEV_ADAPTERS`), which gets a fixed development key."""

import base64
import hashlib
import hmac
import time
from typing import Literal

from parking.settings import Settings

Which = Literal["entry", "exit"]
MIN_KEY_CHARS = 32
# Only ever used with dev adapters on (never in production, where they are off).
_DEV_KEY = b"parking-dev-receipt-key-not-for-production"


class FrameSigner:
    def __init__(self, key: bytes, ttl_s: int) -> None:
        self._key = key
        self.ttl_s = ttl_s

    @classmethod
    def from_settings(cls, settings: Settings) -> "FrameSigner | None":
        if settings.receipt_key is not None:
            key = settings.receipt_key.get_secret_value()
            if len(key) < MIN_KEY_CHARS:
                raise ValueError(f"PARKING_RECEIPT_KEY needs at least {MIN_KEY_CHARS} characters")
            return cls(key.encode(), settings.receipt_frame_url_ttl_s)
        if settings.dev_adapters:
            return cls(_DEV_KEY, settings.receipt_frame_url_ttl_s)
        return None

    def sign(self, token: str, which: str, exp: int) -> str:
        mac = hmac.new(self._key, f"{token}\n{which}\n{exp}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")

    def valid(self, token: str, which: str, exp: int, sig: str) -> bool:
        # As bytes: compare_digest refuses str with characters beyond ASCII.
        return hmac.compare_digest(self.sign(token, which, exp).encode(), sig.encode())

    def url(self, token: str, which: Which, now: float | None = None) -> str:
        """A path (same origin as the page): no absolute URL ends up in the page."""
        exp = int(now if now is not None else time.time()) + self.ttl_s
        return f"/r/{token}/frames/{which}?exp={exp}&sig={self.sign(token, which, exp)}"
