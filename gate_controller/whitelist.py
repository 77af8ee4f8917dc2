"""The gate's offline whitelist: the server's signed config, checked before it is trusted.

The server (parking.gates.config) signs each car park's config with its Ed25519 key; the gate
is installed with the matching public key. A config counts only when its signature verifies,
it is for this gate's car park, it has not expired and it is not older than the one already
held (a replayed old list cannot bring back a plate that has since been removed). Anything
else is ignored, and an expired list is as good as an empty one. Times are the server's, as the
gate knows it (`GateAgent.server_now`): the list's expiry and a pass holder's hours are on the
server's clock, not the gate's.
"""

import base64
import binascii
from datetime import datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gate_controller.protocol import Ack, Command, GateAddress, GateConfig, WhitelistEntry


def command_refusal(
    command: Command, key: Ed25519PublicKey, address: GateAddress, now: datetime
) -> str | None:
    """Why a gate at `address` must not act on `command`, or None when the server signed it
    (`key`: the server's public key) for this very gate and it has not expired by `now`, the
    server's time as the gate knows it (`GateAgent.server_now`: its expiry is on the server's
    clock, not the gate's). The reasons: unsigned, bad_signature, other_gate, expired."""
    refusal = signed_refusal(command, key, address)
    return refusal if refusal is not None else expiry_refusal(command, now)


def expiry_refusal(command: Command, now: datetime) -> str | None:
    """ "expired" when `command` is no longer in force at `now` (the server's time)."""
    return "expired" if command.expires_at <= now else None


def signed_refusal(
    message: Command | Ack, key: Ed25519PublicKey, address: GateAddress
) -> str | None:
    """Why a gate at `address` must not take `message` as the server's, or None when the
    server signed it (`key`) for this very gate: unsigned, bad_signature, other_gate."""
    if message.signature is None:
        return "unsigned"
    try:
        signature = base64.b64decode(message.signature, validate=True)
        key.verify(signature, message.signed_bytes())
    except (InvalidSignature, binascii.Error, ValueError):
        return "bad_signature"
    if (message.lot, message.gate) != (address.lot, address.gate):
        return "other_gate"
    return None


def load_public_key(text: str) -> Ed25519PublicKey:
    """The server's config key: a PEM public key, or its 32 raw bytes in base64."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the config key must be an Ed25519 public key")
        return key
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"the config key is neither PEM nor 32 bytes of base64: {exc}") from None


def normal_plate(plate: str) -> str:
    return plate.strip().upper()


class OfflineWhitelist:
    def __init__(self, public_key: Ed25519PublicKey, lot: str) -> None:
        self.public_key = public_key
        self.lot = lot
        self.config: GateConfig | None = None
        # By plate text, every entry of it: one per vehicle (colour) bound.
        self._plates: dict[str, list[WhitelistEntry]] = {}

    def refusal(self, config: GateConfig, now: datetime) -> str | None:
        """Why `config` must not be used, or None when it is valid."""
        if config.signature is None:
            return "unsigned"
        try:
            self.public_key.verify(base64.b64decode(config.signature), config.signed_bytes())
        except (InvalidSignature, binascii.Error, ValueError):
            return "bad_signature"
        if config.lot != self.lot:
            return "other_car_park"
        if config.issued_at is None:
            return "no_issue_time"
        if config.whitelist_expires_at is None or config.whitelist_expires_at <= now:
            return "expired"
        if (
            self.config is not None
            and self.config.issued_at is not None
            and config.issued_at < self.config.issued_at
        ):
            return "older_than_held"
        return None

    def offer(self, config: GateConfig, now: datetime) -> str | None:
        """Takes `config` when it is valid; returns why it was refused otherwise."""
        reason = self.refusal(config, now)
        if reason is None:
            self.config = config
            plates: dict[str, list[WhitelistEntry]] = {}
            for entry in config.whitelist:
                plates.setdefault(normal_plate(entry.plate), []).append(entry)
            self._plates = plates
        return reason

    def expires_at(self, now: datetime) -> datetime | None:
        """Until when the held whitelist is valid; None when there is none or it expired."""
        expires = self.config.whitelist_expires_at if self.config else None
        return expires if expires is not None and expires > now else None

    def allows(self, plate: str, color: str | None, now: datetime) -> bool:
        """Whether the vehicle may leave at `now`, the server's time as the gate knows it
        (`GateAgent.server_now`), while the server is unreachable. A plate's identity is
        (plate, colour): when the camera reports a colour, an entry of that colour (or one that
        names none) must be on the list; a yellow plate is another vehicle than the blue one of
        the same characters. A read without a colour is matched on the characters alone. A pass
        holder past its entry's `free_until` leaves only on pay-later, as the lane would let it
        (the stay has a fee since)."""
        if self.expires_at(now) is None:
            return False
        entries = self._plates.get(normal_plate(plate), [])
        return any(
            (color is None or entry.color in (None, color)) and _may_leave(entry, now)
            for entry in entries
        )

    def display(self, key: str, default: str) -> str:
        return self.config.display.get(key, default) if self.config else default


def _may_leave(entry: WhitelistEntry, now: datetime) -> bool:
    return (
        entry.per_session_limit_fen is not None
        or entry.free_until is None
        or now < entry.free_until
    )
