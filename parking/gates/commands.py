"""Barrier commands, signed in this one place for every publisher: the lane's decisions, the
gate opened after a payment, an operator's manual open.

Each command is bound to its gate (car park and gate code), its capture and its expiry, and
signed with the server's Ed25519 key, the one that signs the gates' configs
(`PARKING_GATE_CONFIG_KEY`, `parking gates keygen`); the gate agent acts on nothing else. So a
client that can publish on a command topic (a shared broker login, a broker without ACLs, a
replayed message for another gate) cannot lift a barrier. Acks are signed the same way (a gate
drops a capture only on one): without the key both go out unsigned and every agent refuses
them: a gate then works as if offline (fail closed), resending its captures at its backoff.
"""

import base64
from functools import lru_cache
from typing import TypeVar, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gate_controller.mqtt import MqttClient
from gate_controller.protocol import Ack, Command, GateAddress, Topics, encode
from parking.gates.config import load_private_key
from parking.logging import get_logger
from parking.settings import Settings

log = get_logger(__name__)


Signed = TypeVar("Signed", bound=Command | Ack)


def sign_command(message: Signed, address: GateAddress, key: Ed25519PrivateKey) -> Signed:
    """The command (or ack) bound to the gate at `address` and signed for it."""
    bound = message.model_copy(update={"lot": address.lot, "gate": address.gate, "signature": None})
    signature = base64.b64encode(key.sign(bound.signed_bytes())).decode()
    # A copy of the same model: pydantic's Self is lost on a type variable over a union.
    return cast(Signed, bound.model_copy(update={"signature": signature}))


@lru_cache(maxsize=4)
def _key(text: str) -> Ed25519PrivateKey:
    return load_private_key(text)


def command_key(settings: Settings) -> Ed25519PrivateKey | None:
    if settings.gate_config_key is None:
        return None
    return _key(settings.gate_config_key.get_secret_value())


_warned_unsigned = False


def _warn_unsigned_once() -> None:
    """Once per process: a warning per command would cost every decision a log write (it took
    the lane's p99 at 200 exits/s from 86 to 280 ms) and bury the log."""
    global _warned_unsigned
    if not _warned_unsigned:
        _warned_unsigned = True
        log.warning(
            "gates.commands_unsigned",
            hint="set PARKING_GATE_CONFIG_KEY: every gate agent refuses unsigned commands and acks",
        )


def _signed_payload(settings: Settings, address: GateAddress, message: Command | Ack) -> bytes:
    key = command_key(settings)
    if key is None:
        _warn_unsigned_once()
        return encode(message.model_copy(update={"lot": address.lot, "gate": address.gate}))
    return encode(sign_command(message, address, key))


async def publish_command(
    mqtt: MqttClient, settings: Settings, address: GateAddress, command: Command | bytes
) -> None:
    """Signs `command` for the gate at `address` and publishes it there (QoS 1, waiting for the
    broker). `command` may be the stored JSON of one (the lane answers a resend with it)."""
    if isinstance(command, bytes):
        command = Command.model_validate_json(command)
    payload = _signed_payload(settings, address, command)
    await mqtt.publish(Topics(settings.mqtt_topic_prefix).topic(address, "command"), payload)


async def publish_ack(mqtt: MqttClient, settings: Settings, address: GateAddress, ack: Ack) -> None:
    """Signs the ack of a capture for its gate and publishes it, without waiting for the broker
    (the gate resends a capture it has no ack of). The gate drops its copy of the capture only
    on an ack the server signed for it: one anybody else published would lose an offline exit."""
    payload = _signed_payload(settings, address, ack)
    await mqtt.publish(
        Topics(settings.mqtt_topic_prefix).topic(address, "ack"), payload, wait=False
    )
