"""Bearer tokens and secrets.

Access tokens are short-lived JWTs signed HS256 with the service's key; decoding accepts only
that algorithm (an `alg: none` or RS/HS-confused token is refused), requires an expiry and
checks issuer and audience. Refresh tokens, sign-in codes and API keys are random strings of
which only a SHA-256 hash is stored. A sign-in code's challenge is sealed with the same key
(an HMAC of the code's id and phone), so it needs no storing and cannot be made up.
"""

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import jwt

ISSUER = "parking"
AUDIENCE = "parking-api"
_ALGORITHM = "HS256"

Role = Literal["driver", "admin", "attendant", "merchant", "platform"]
_ROLES = frozenset(get_args(Role))


class InvalidToken(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Claims:
    subject: str  # "account:12" or "operator_user:3"
    role: Role
    operator_id: int | None
    expires_at: int
    # The sign-in (refresh token family) the token was issued in; signing out ends it.
    session: str | None = None


# A device token names the e-mail a browser signed in with before; never an access token (its
# audience differs, and `decode` accepts only AUDIENCE).
DEVICE_AUDIENCE = "parking-known-device"
DEVICE_TTL_S = 90 * 24 * 3600
# A sign-in code's challenge: `ch_<code id>.<seal>`, the seal an HMAC of the code's id and
# phone under the service's key (truncated to 128 bits), so only the request that asked for
# the code learns it and nobody can make one up; nothing of it needs storing.
CHALLENGE_PREFIX = "ch_"
_CHALLENGE_PATTERN = re.compile(r"ch_([1-9][0-9]{0,18})\.([A-Za-z0-9_-]{22})")


class TokenSigner:
    def __init__(self, key: str, access_ttl_s: int) -> None:
        if len(key) < 32:
            raise ValueError("the token signing key must be at least 32 characters")
        self._key = key
        self.access_ttl_s = access_ttl_s

    def issue(
        self,
        subject: str,
        role: Role,
        operator_id: int | None = None,
        session: str | None = None,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "sub": subject,
            "role": role,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + self.access_ttl_s,
        }
        if operator_id is not None:
            payload["op"] = operator_id
        if session is not None:
            payload["sid"] = session
        return jwt.encode(payload, self._key, algorithm=_ALGORITHM)

    def device_token(self, email: str) -> str:
        """A token naming `email` for the browser that signed in with it (`known_device`)."""
        now = int(time.time())
        payload = {
            "sub": digest(email.lower()),
            "iss": ISSUER,
            "aud": DEVICE_AUDIENCE,
            "iat": now,
            "exp": now + DEVICE_TTL_S,
            "jti": secrets.token_urlsafe(12),
        }
        return jwt.encode(payload, self._key, algorithm=_ALGORITHM)

    def known_device(self, token: str | None, email: str) -> str | None:
        """The device token's own id when it is ours, unexpired and for `email`, else None."""
        if not token:
            return None
        try:
            payload = self._verified(token, DEVICE_AUDIENCE, ["exp", "sub", "jti"])
        except jwt.PyJWTError:
            return None
        if payload["sub"] != digest(email.lower()):
            return None
        return str(payload["jti"])

    def _challenge_seal(self, code_id: int, phone: str) -> str:
        mac = hmac.new(
            self._key.encode(), f"sign-in-code:{code_id}:{phone}".encode(), hashlib.sha256
        )
        return base64.urlsafe_b64encode(mac.digest()[:16]).decode().rstrip("=")

    def code_challenge(self, code_id: int, phone: str) -> str:
        return f"{CHALLENGE_PREFIX}{code_id}.{self._challenge_seal(code_id, phone)}"

    def challenged_code(self, challenge: str, phone: str) -> int | None:
        """The id of the code `challenge` was given for, when we gave it for `phone`, else
        None."""
        matched = _CHALLENGE_PATTERN.fullmatch(challenge)
        if matched is None:
            return None
        code_id = int(matched[1])
        if not hmac.compare_digest(matched[2], self._challenge_seal(code_id, phone)):
            return None
        return code_id

    def _verified(self, token: str, audience: str, required: list[str]) -> dict[str, Any]:
        """The token's claims when our key signed it for `audience` with `required` claims
        (HS256 only); raises jwt.PyJWTError otherwise."""
        return jwt.decode(
            token,
            self._key,
            algorithms=[_ALGORITHM],
            audience=audience,
            issuer=ISSUER,
            options={"require": required},
        )

    def decode(self, token: str) -> Claims:
        try:
            payload = self._verified(token, AUDIENCE, ["exp", "iat", "sub", "iss", "aud"])
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from exc
        role = payload.get("role")
        if role not in _ROLES:
            raise InvalidToken("unknown role")
        operator_id = payload.get("op")
        if role != "driver" and not isinstance(operator_id, int):
            raise InvalidToken("operator token without operator")
        session = payload.get("sid")
        if session is not None and not isinstance(session, str):
            raise InvalidToken("bad session")
        return Claims(
            str(payload["sub"]), cast(Role, role), operator_id, int(payload["exp"]), session
        )


def new_secret(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_code() -> str:
    """A six-digit sign-in code."""
    return f"{secrets.randbelow(1_000_000):06d}"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    derived = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"scrypt${salt.hex()}${derived.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, salt_hex, derived_hex = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    derived = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt_hex), n=2**14, r=8, p=1)
    return hmac.compare_digest(derived.hex(), derived_hex)
