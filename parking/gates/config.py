"""Each gate's config, signed and retained on its `.../config` topic.

The config carries the car park's offline whitelist: the cars parked there now that the lane
would let out on pay-later (the plate bound to an account with an active pay-later agreement and
no block for arrears, each with its per-session limit), and pass holders, each free until the
end of its pass's hours or validity (`free_until`, on the server's clock) and after it only on
pay-later. A gate that cannot reach the server lets these out and no one else. The list is valid
for `valid_for` (24 h by default) and signed with the server's Ed25519 key over
`GateConfig.signed_bytes()`; the gates hold the public key (`parking gates keygen` prints it)
and ignore a config whose signature, car park or expiry does not check out.

Cars enter all the time, so the configs are republished every `interval_s` by
`publish_periodically`, and a car park's at once when something takes a car parked there off
its list (a binding ended, pay-later cancelled or blocked, a blacklisting, a pass revoked:
migrations 0054, 0057); `parking gates publish-config` does it once.
"""

import argparse
import asyncio
import base64
import binascii
import contextlib
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gate_controller.mqtt import MqttClient
from gate_controller.protocol import (
    DISPLAY_DEFAULTS,
    GateAddress,
    GateConfig,
    Topics,
    WhitelistEntry,
    encode,
)
from parking.db import create_pool
from parking.gates import repository
from parking.gates.repository import WhitelistedCar
from parking.infra import endpoints
from parking.logging import get_logger
from parking.settings import Settings, get_settings

log = get_logger(__name__)

DEFAULT_VALIDITY = timedelta(hours=24)
# Where a car park's id is announced on commit when a vehicle parked there may have lost its
# place on the list (migrations 0054 and 0057).
WHITELIST_CHANNEL = "gate_whitelists"
_LISTENER_RETRY_S = 1.0
# Retained publishes in flight at once (the client's own window is 1000).
_PUBLISH_BATCH = 500


# Keys


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def load_private_key(text: str) -> Ed25519PrivateKey:
    """A PEM (PKCS#8, unencrypted) Ed25519 private key, or its 32-byte seed in base64."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_private_key(text.encode(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the config key must be an Ed25519 private key")
        return key
    try:
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"the config key is neither PEM nor 32 bytes of base64: {exc}") from None


def private_key_pem(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def public_key_text(key: Ed25519PrivateKey) -> str:
    """The public key as the gates are configured with it: its 32 raw bytes in base64."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


# Configs


def signed(config: GateConfig, key: Ed25519PrivateKey) -> GateConfig:
    signature = base64.b64encode(key.sign(config.signed_bytes())).decode()
    return config.model_copy(update={"signature": signature})


def build_config(
    lot: str,
    cars: Sequence[WhitelistedCar],
    key: Ed25519PrivateKey,
    *,
    issued_at: datetime,
    valid_for: timedelta = DEFAULT_VALIDITY,
) -> GateConfig:
    expires_at = issued_at + valid_for
    config = GateConfig(
        lot=lot,
        issued_at=issued_at,
        whitelist=[
            entry for car in cars if (entry := _entry(car, issued_at, expires_at)) is not None
        ],
        whitelist_expires_at=expires_at,
        display=dict(DISPLAY_DEFAULTS),
    )
    return signed(config, key)


def _entry(car: WhitelistedCar, issued_at: datetime, expires_at: datetime) -> WhitelistEntry | None:
    """The car's entry in a list in force from `issued_at` to `expires_at`; None when the lane
    would let it out at no time of it. Under a free passage the lane lets a stay out free only
    while the right has been in force since its entry (rights are never combined: one right
    must cover it all); any stretch outside the pass's hours or validity is priced, and the
    stay leaves on pay-later or is held. So a pass holder is free until the end of the longest
    such stretch of its passes (`free_until`), and after it only on pay-later."""
    free_until = max(
        (
            until
            for right in car.passes
            if car.entered_at is not None
            and (until := right.in_force_until(car.entered_at, expires_at)) is not None
        ),
        default=None,
    )
    if free_until is not None and free_until >= expires_at:
        # Free for as long as the list lasts, whatever it could pay.
        return WhitelistEntry(plate=car.plate, color=car.color)
    if free_until is not None and free_until <= issued_at:
        free_until = None
    if free_until is None and car.per_session_limit_fen is None:
        return None
    return WhitelistEntry(
        plate=car.plate,
        color=car.color,
        per_session_limit_fen=car.per_session_limit_fen,
        free_until=free_until,
    )


async def publish_configs(
    pool: asyncpg.Pool,
    mqtt: MqttClient,
    settings: Settings,
    private_key: Ed25519PrivateKey,
    *,
    valid_for: timedelta = DEFAULT_VALIDITY,
    now: datetime | None = None,
    car_park_ids: list[int] | None = None,
) -> int:
    """Publishes the signed config of every gate (of the car parks `car_park_ids`, when given),
    retained; returns how many gates got one. A car park with no whitelisted car still gets its
    (empty) list: the gates must not keep an old one."""
    issued_at = now or datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        gates = await repository.gate_addresses(conn, car_park_ids)
        whitelists = await repository.offline_whitelists(conn, car_park_ids)
    payloads: dict[str, bytes] = {}
    for lot in {address.lot for address in gates}:
        config = build_config(
            lot, whitelists.get(lot, []), private_key, issued_at=issued_at, valid_for=valid_for
        )
        payloads[lot] = encode(config)
        # The lane service publishes these on its own event loop: building the whole city's
        # lists in one go (~5 us of CPU a car: 60 ms for 12,000 parked cars, seconds for a
        # city) would hold every decision waiting behind it. One car park at a time.
        await asyncio.sleep(0)
    topics = Topics(settings.mqtt_topic_prefix)
    for start in range(0, len(gates), _PUBLISH_BATCH):
        batch: list[GateAddress] = gates[start : start + _PUBLISH_BATCH]
        await asyncio.gather(
            *(
                mqtt.publish(topics.topic(gate, "config"), payloads[gate.lot], retain=True)
                for gate in batch
            )
        )
    log.info(
        "gates.configs_published",
        gates=len(gates),
        car_parks=len(payloads),
        whitelisted=sum(len(cars) for cars in whitelists.values()),
        announced=car_park_ids is not None,
    )
    return len(gates)


async def publish_periodically(
    pool: asyncpg.Pool,
    mqtt: MqttClient,
    settings: Settings,
    private_key: Ed25519PrivateKey,
    *,
    interval_s: float = 60.0,
) -> None:
    """Republishes the configs every `interval_s`, so that cars that entered since are on the
    lists and the lists never expire while the server runs. Between rounds, a car park whose
    list lost a vehicle (migrations 0054 and 0057 announce it on commit) is republished at
    once, so that its gates that are online drop the plate now rather than at the next round.
    A gate offline then keeps its list until its link returns (the retained config reaches it
    then) or the list expires."""
    loop = asyncio.get_running_loop()
    announced: set[int] = set()
    wake = asyncio.Event()
    next_round = loop.time()

    def on_announcement(car_park_id: int | None) -> None:
        nonlocal next_round
        if car_park_id is None:  # announcements may have been missed: a whole round now
            next_round = loop.time()
        else:
            announced.add(car_park_id)
        wake.set()

    listening = asyncio.create_task(_listen_for_lost_vehicles(pool, on_announcement))
    try:
        while True:
            wake.clear()
            round_due = loop.time() >= next_round
            car_park_ids = sorted(announced)
            announced.clear()
            try:
                if round_due:
                    next_round = loop.time() + interval_s
                    await publish_configs(pool, mqtt, settings, private_key)
                elif car_park_ids:
                    await publish_configs(
                        pool, mqtt, settings, private_key, car_park_ids=car_park_ids
                    )
            except Exception:  # must not end: the gates' lists would expire
                log.exception("gates.configs_publish_failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_round - loop.time())):
                    await wake.wait()
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening


async def _listen_for_lost_vehicles(
    pool: asyncpg.Pool, on_announcement: Callable[[int | None], None]
) -> None:
    """Passes on each car park announced on `WHITELIST_CHANNEL`; after the listening connection
    was lost (nothing is announced to nobody), None once it listens again."""

    def announced(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        on_announcement(int(payload))

    lost_before = False
    while True:
        try:
            async with pool.acquire() as listener:
                closed = asyncio.Event()

                def lost(_conn: object, closed: asyncio.Event = closed) -> None:
                    closed.set()

                listener.add_termination_listener(lost)
                await listener.add_listener(WHITELIST_CHANNEL, announced)
                if lost_before:
                    on_announcement(None)
                try:
                    await closed.wait()
                finally:
                    listener.remove_termination_listener(lost)
                    if not listener.is_closed():
                        await listener.remove_listener(WHITELIST_CHANNEL, announced)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            log.warning("gates.whitelist_listener_lost")
        lost_before = True
        await asyncio.sleep(_LISTENER_RETRY_S)


# Command line: `parking gates keygen`, `parking gates publish-config`


def add_parsers(gates_commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Adds `keygen` and `publish-config` to the `parking gates` subcommands."""
    p_keygen = gates_commands.add_parser(
        "keygen",
        help="a new Ed25519 key for signing gate configs; prints the public key for the gates",
    )
    p_keygen.add_argument(
        "--out", type=Path, required=True, metavar="FILE", help="private key file (PEM, 0600)"
    )
    p_publish = gates_commands.add_parser(
        "publish-config",
        help="publish every gate's signed config (offline whitelist) once, retained",
    )
    p_publish.add_argument(
        "--key-file", type=Path, required=True, metavar="FILE", help="the private key (PEM)"
    )
    p_publish.add_argument(
        "--valid-hours", type=float, default=DEFAULT_VALIDITY.total_seconds() / 3600
    )


def run(args: argparse.Namespace) -> int:
    """0 when done, 2 on a key that cannot be written or read."""
    if args.gates_command == "keygen":
        return _keygen(args.out)
    try:
        key = load_private_key(args.key_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"parking gates publish-config: {exc}", file=sys.stderr)
        return 2
    valid_for = timedelta(hours=args.valid_hours)
    count = asyncio.run(_publish_once(get_settings(), key, valid_for))
    print(orjson.dumps({"gates": count}).decode())
    return 0


def _keygen(out: Path) -> int:
    key = generate_private_key()
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        print(
            f"parking gates keygen: {exc} (an existing key is never overwritten)", file=sys.stderr
        )
        return 2
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(private_key_pem(key))
    print(orjson.dumps({"private_key_file": str(out), "public_key": public_key_text(key)}).decode())
    return 0


async def _publish_once(settings: Settings, key: Ed25519PrivateKey, valid_for: timedelta) -> int:
    async with endpoints(settings) as eps:
        pool = await create_pool(eps.database_url, min_size=1, max_size=1)
        mqtt = MqttClient(eps.mqtt_url, f"gate-config-{uuid.uuid4().hex[:8]}")
        try:
            await mqtt.start()
            return await publish_configs(pool, mqtt, settings, key, valid_for=valid_for)
        finally:
            await mqtt.stop()
            await pool.close()
