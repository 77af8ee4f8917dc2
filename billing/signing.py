"""HMAC-SHA256 signatures on payment-provider webhook notifications.

The provider signs `f"{t}.".encode() + body` with the merchant's shared secret and sends
`t=<unix seconds>,v1=<hex digest>` in the `X-Sandbox-Signature` header. The merchant
recomputes the digest over the exact bytes it received and rejects the notification unless it
matches and `t` is recent, so a captured notification cannot be replayed much later and a
forged one (or one whose body was altered in transit) is never acted on.
"""

import hashlib
import hmac

SIGNATURE_HEADER = "X-Sandbox-Signature"


def _digest(secret: str, body: bytes, timestamp: int) -> str:
    signed = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header value for `body` sent at `timestamp` (unix seconds)."""
    return f"t={timestamp},v1={_digest(secret, body, timestamp)}"


def verify(
    secret: str, body: bytes, header: str | None, *, now: int, tolerance_s: int = 300
) -> bool:
    """Whether `header` is a valid signature of `body` made within `tolerance_s` of `now`."""
    if not header:
        return False
    fields: dict[str, str] = {}
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name in fields:
            return False
        fields[name] = value
    timestamp_text, signature = fields.get("t"), fields.get("v1")
    if signature is None or timestamp_text is None:
        return False
    if not (timestamp_text.isascii() and timestamp_text.isdigit()):
        return False
    timestamp = int(timestamp_text)
    if abs(now - timestamp) > tolerance_s:
        return False
    # Bytes, because compare_digest refuses non-ASCII str and the header is attacker-controlled.
    return hmac.compare_digest(signature.encode(), _digest(secret, body, timestamp).encode())
