"""`parking gates provision`: broker accounts and topic permissions for the gates (Mosquitto 2).

Writes into one folder: `password_file` (one user per gate, `gate-<lot>-<gate>`, and one per
server process: `lanes-N` for each lane process, `worker-N` for each charge worker, `api-N` for
each API process), `acl_file` (each gate may use only its own topics, a lane process every gate's
topics in the server's direction, workers and API processes only the command topics),
`mosquitto.conf` (log-in required, both files, the client id taken from the username so that
no login can knock another client off, a 1 MiB packet limit, TLS lines to uncomment) and
`credentials.json` (mode 0600: the plaintext passwords, for the people
who install the gates). Passwords already in `credentials.json` are kept unless `--rotate`, so
adding a gate does not log every other gate out. See docs/broker-security.md.
"""

import argparse
import asyncio
import base64
import grp
import hashlib
import ipaddress
import os
import re
import secrets
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import orjson

from gate_controller.protocol import GateAddress, TopicKind, Topics
from parking.gates import config, repository
from parking.infra import endpoints
from parking.settings import Settings, get_settings

# The role of the lane service's processes; each instance logs in as `lanes-<n>`.
LANES_USER = "lanes"
# Server roles and what each may do: the lane service reads what gates send and answers; the
# charge worker (a gate opened after a payment) and the API (an operator's open, a resolved
# exception) only send commands.
ROLES: tuple[str, ...] = ("lanes", "worker", "api")
DEFAULT_INSTANCES = {"lanes": 1, "worker": 1, "api": 1}
# The largest MQTT packet the broker takes; a larger one disconnects its sender. A capture is
# at most PARKING_MAX_CAPTURE_BYTES (512 KiB); a 100 MiB one took a lane process from 187 to 447
# MB before the lane could refuse it.
MAX_PACKET_BYTES = 1024 * 1024
PASSWORD_FILE = "password_file"
ACL_FILE = "acl_file"
CONF_FILE = "mosquitto.conf"
CREDENTIALS_FILE = "credentials.json"

# What the gates table's CHECK allows. A '+' or '#' would make a gate's own topic a wildcard
# over other gates, a '/' would make it another gate's topic.
CODE = re.compile(r"[A-Za-z0-9_-]{1,64}")
PREFIX = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")

GATE_PUBLISHES: tuple[TopicKind, ...] = ("capture", "event", "status")
SERVER_PUBLISHES: tuple[TopicKind, ...] = ("command", "ack", "config")

# Mosquitto's own default. The passwords are random 192-bit tokens, which no iteration count
# makes harder to guess, while every (re)connect of every gate pays for each iteration.
PBKDF2_ITERATIONS = 101


class ProvisionError(ValueError):
    """Input that cannot be provisioned safely; the command exits with status 2."""


@dataclass(frozen=True, slots=True)
class Account:
    username: str
    password: str
    gate: GateAddress | None  # None: a server process of `role`
    role: str = LANES_USER


@dataclass(frozen=True, slots=True)
class Provisioned:
    accounts: list[Account]
    new_passwords: int
    files: dict[str, Path]


def checked(address: GateAddress) -> GateAddress:
    if not (CODE.fullmatch(address.lot) and CODE.fullmatch(address.gate)):
        raise _bad_gate(f"{address.lot}/{address.gate}")
    return address


def parse_gate(text: str) -> GateAddress:
    """`lot/gate` -> GateAddress; anything that is not exactly two valid codes is refused."""
    parts = text.strip().split("/")
    if len(parts) != 2:
        raise _bad_gate(text)
    return checked(GateAddress(parts[0], parts[1]))


def _bad_gate(text: str) -> ProvisionError:
    return ProvisionError(
        f"gate {text!r}: expected LOT/GATE, each 1-64 characters of A-Z a-z 0-9 _ - "
        "(no '+', '#' or '/')"
    )


def read_gates_file(path: Path) -> list[GateAddress]:
    """One `lot/gate` a line. Only whole lines are comments: a '#' inside a line belongs to a
    name, and such a name is refused rather than silently cut short."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [
        parse_gate(line) for line in lines if line.strip() and not line.lstrip().startswith("#")
    ]


async def gates_from_database(database_url: str) -> list[GateAddress]:
    conn = await asyncpg.connect(database_url)
    try:
        return [checked(address) for address in await repository.gate_addresses(conn)]
    finally:
        await conn.close()


def gate_username(address: GateAddress) -> str:
    return f"gate-{address.lot}-{address.gate}"


def instance_username(role: str, number: int) -> str:
    return f"{role}-{number}"


def new_password() -> str:
    # URL-safe, so that it fits unescaped in PARKING_MQTT_URL (mqtt://lanes:<password>@host).
    return secrets.token_urlsafe(24)


def plan_accounts(
    gates: Iterable[GateAddress],
    known_passwords: Mapping[str, str],
    instances: Mapping[str, int] = DEFAULT_INSTANCES,
) -> list[Account]:
    """One account per server process (`instances`: at least how many of each role) and one
    per gate, keeping the passwords already known. Server logins already provisioned are kept
    too (`lanes-3` stays when run again with fewer): a pod of a StatefulSet scaled to 3 would
    otherwise lose its login when a gate is added. `--rotate` (no known passwords) starts over."""
    for role, count in instances.items():
        if role not in ROLES or not 1 <= count <= 999:
            raise ProvisionError(f"{role}={count}: expected 1-999 of each of {', '.join(ROLES)}")
    counts = {
        role: max(instances.get(role, DEFAULT_INSTANCES[role]), _known_count(role, known_passwords))
        for role in ROLES
    }
    by_username: dict[str, GateAddress] = {}
    for address in map(checked, gates):
        username = gate_username(address)
        earlier = by_username.setdefault(username, address)
        if earlier != address:
            # '-' is allowed in codes, so lot "a-b" gate "c" and lot "a" gate "b-c" meet here.
            raise ProvisionError(
                f"gates {earlier.lot}/{earlier.gate} and {address.lot}/{address.gate} would "
                f"both log in as {username!r}; rename one of them"
            )
    if not by_username:
        raise ProvisionError("no gates to provision (give --gate, --gates-file or --from-db)")
    servers = [
        Account(
            instance_username(role, number),
            known_passwords.get(instance_username(role, number)) or new_password(),
            None,
            role,
        )
        for role in ROLES
        for number in range(1, counts[role] + 1)
    ]
    gate_accounts = [
        Account(username, known_passwords.get(username) or new_password(), gate, "gate")
        for username, gate in sorted(by_username.items(), key=lambda item: item[0])
    ]
    return servers + gate_accounts


def _known_count(role: str, known_passwords: Mapping[str, str]) -> int:
    """The highest `<role>-<n>` among the known logins (0 when none)."""
    pattern = re.compile(rf"{re.escape(role)}-([1-9][0-9]{{0,2}})")
    numbers = [int(m.group(1)) for m in map(pattern.fullmatch, known_passwords) if m]
    return max(numbers, default=0)


def mosquitto_hash(password: str) -> str:
    """Mosquitto 2's `$7$` entry, as `mosquitto_passwd` writes it: PBKDF2-HMAC-SHA512 over a
    12-byte random salt, `$7$<iterations>$<base64 salt>$<base64 digest>`."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    encoded_salt = base64.b64encode(salt).decode()
    return f"$7${PBKDF2_ITERATIONS}${encoded_salt}${base64.b64encode(digest).decode()}"


def password_file_text(accounts: Sequence[Account]) -> str:
    return "".join(
        f"{account.username}:{mosquitto_hash(account.password)}\n" for account in accounts
    )


def acl_text(accounts: Sequence[Account], topics: Topics) -> str:
    lines = [
        "# Written by `parking gates provision`; regenerate rather than edit.",
        "# Each user may use only the topics under its name. Mosquitto drops any other publish",
        "# (an MQTT 3.1.1 client is not told) and delivers nothing else to a subscription.",
    ]
    for account in accounts:
        lines += ["", f"user {account.username}"]
        if account.gate is None and account.role == LANES_USER:
            lines += [f"topic read {topics.all_gates(kind)}" for kind in GATE_PUBLISHES]
            lines += [f"topic write {topics.all_gates(kind)}" for kind in SERVER_PUBLISHES]
        elif account.gate is None:
            lines += [f"topic write {topics.all_gates('command')}"]
        else:
            lines += [f"topic write {topics.topic(account.gate, kind)}" for kind in GATE_PUBLISHES]
            lines += [f"topic read {topics.topic(account.gate, kind)}" for kind in SERVER_PUBLISHES]
    return "\n".join(lines) + "\n"


def mosquitto_conf_text(config_dir: Path, port: int, bind_address: str | None) -> str:
    listener = f"listener {port} {bind_address}" if bind_address else f"listener {port}"
    return f"""\
# Mosquitto 2 for the parking gates, written by `parking gates provision`
# (docs/broker-security.md). Use it as the broker's whole configuration, or include it from the
# main one after removing every other listener, allow_anonymous, password_file and acl_file
# there: with per_listener_settings false the settings below hold for every listener.
per_listener_settings false

# Every client logs in: one user per gate, one per server process (lanes-N, worker-N, api-N).
allow_anonymous false
password_file {config_dir / PASSWORD_FILE}
# Larger packets disconnect their sender before any subscriber has to hold them.
max_packet_size {MAX_PACKET_BYTES}
# Each gate publishes only its own capture/event/status and reads only its own
# command/ack/config; the lane service reads and writes those of every gate.
acl_file {config_dir / ACL_FILE}

# Plain MQTT: passwords and captures cross the network in clear. Keep it to the broker's own
# host or a closed network, and give gates anywhere else the TLS listener below.
{listener}
# The client id is the username, whatever the client asks for: a gate's id is predictable, and
# any login could otherwise disconnect that gate by connecting under its id. (So each server
# process needs a login of its own: two under one login would keep replacing each other.)
# A listener's setting: repeat it under every listener.
use_username_as_clientid true

# TLS: uncomment, give the server certificate and its key (readable by the broker's user), and
# connect with mqtts://host:8883 (gates and PARKING_MQTT_URL). Clients check the certificate
# against their system CA store, so a private CA must be installed there on every gate and
# server (update-ca-certificates). Mosquitto 2 accepts TLS 1.2 and 1.3 only by default.
#listener 8883
#certfile /etc/mosquitto/certs/server.crt
#keyfile /etc/mosquitto/certs/server.key
#use_username_as_clientid true
# Optionally also require a client certificate signed by your gates' CA (the passwords still
# apply unless use_identity_as_username is set):
#cafile /etc/mosquitto/certs/gates-ca.crt
#require_certificate true
"""


def credentials_document(accounts: Sequence[Account], topics: Topics) -> dict[str, object]:
    return {"topic_root": topics.root, "users": [_credential(account) for account in accounts]}


def _credential(account: Account) -> dict[str, str]:
    if account.gate is None:
        return {"username": account.username, "password": account.password, "role": account.role}
    return {
        "username": account.username,
        "password": account.password,
        "role": "gate",
        "lot": account.gate.lot,
        "gate": account.gate.gate,
    }


def known_passwords(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        document = orjson.loads(path.read_bytes())
        return {str(user["username"]): str(user["password"]) for user in document["users"]}
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ProvisionError(
            f"{path} is not a credentials file written by this command ({exc!r}); "
            "move it away or pass --rotate"
        ) from exc


def _write(path: Path, text: str, mode: int, gid: int | None = None) -> None:
    """Replaces `path` atomically; the content is never readable beyond `mode`, not even briefly."""
    staging = path.with_name(f".{path.name}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(fd, mode)  # an old staging file keeps its mode through O_CREAT
        if gid is not None:
            os.fchown(fd, -1, gid)
        handle.write(text)
    os.replace(staging, path)


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ProvisionError(f"no group named {name!r}") from None


def provision(
    gates: Iterable[GateAddress],
    out_dir: Path,
    *,
    prefix: str = "",
    port: int = 1883,
    bind_address: str | None = None,
    config_dir: Path | None = None,
    broker_group: str | None = None,
    rotate: bool = False,
    instances: Mapping[str, int] = DEFAULT_INSTANCES,
) -> Provisioned:
    """Writes the broker's files for `gates` into `out_dir`. `config_dir` is where the broker
    will read them (default: `out_dir`). With `broker_group` the password file, the ACL and a
    folder created here are given to that group: a broker started as root reads them after
    switching to its own user."""
    if prefix and not PREFIX.fullmatch(prefix.rstrip("/")):
        raise ProvisionError(f"topic prefix {prefix!r}: expected segments of A-Z a-z 0-9 _ . -")
    if not 0 < port < 65536:
        raise ProvisionError(f"port {port}: expected 1-65535")
    if bind_address is not None:
        try:
            bind_address = str(ipaddress.ip_address(bind_address))
        except ValueError:
            raise ProvisionError(f"bind address {bind_address!r}: expected an IP address") from None
    out_dir = out_dir.resolve()
    config_dir = config_dir if config_dir is not None else out_dir
    if not config_dir.is_absolute() or any(char.isspace() for char in str(config_dir)):
        # mosquitto.conf values end at the first blank.
        raise ProvisionError(
            f"config folder {str(config_dir)!r}: expected an absolute path without blanks"
        )
    gid = _group_id(broker_group) if broker_group is not None else None
    credentials_path = out_dir / CREDENTIALS_FILE
    previous = {} if rotate else known_passwords(credentials_path)
    accounts = plan_accounts(gates, previous, instances)
    topics = Topics(prefix)

    if not out_dir.exists():
        # A folder that already exists is left as it is: it may be /etc/mosquitto itself.
        out_dir.mkdir(mode=0o750, parents=True)
        if gid is not None:
            os.chown(out_dir, -1, gid)
    files = {
        "credentials": credentials_path,
        "password_file": out_dir / PASSWORD_FILE,
        "acl_file": out_dir / ACL_FILE,
        "conf": out_dir / CONF_FILE,
    }
    # Credentials first: if a later write fails, a rerun finds and keeps these passwords.
    document = credentials_document(accounts, topics)
    _write(files["credentials"], orjson.dumps(document, option=orjson.OPT_INDENT_2).decode(), 0o600)
    broker_mode = 0o600 if gid is None else 0o640
    _write(files["password_file"], password_file_text(accounts), broker_mode, gid)
    _write(files["acl_file"], acl_text(accounts, topics), broker_mode, gid)
    _write(files["conf"], mosquitto_conf_text(config_dir, port, bind_address), 0o644)
    new = sum(1 for account in accounts if account.username not in previous)
    return Provisioned(accounts, new, files)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `provision`, `keygen` and `publish-config` under `parser` (`parking gates`)."""
    sub = parser.add_subparsers(dest="gates_command", required=True)
    config.add_parsers(sub)  # keygen, publish-config
    p_provision = sub.add_parser(
        "provision",
        help="broker users, ACL and mosquitto.conf for the gates and the lane service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_provision.add_argument(
        "--gate", action="append", default=[], metavar="LOT/GATE", help="a gate (repeatable)"
    )
    p_provision.add_argument(
        "--gates-file", type=Path, metavar="FILE", help="one LOT/GATE a line; '#' starts a comment"
    )
    p_provision.add_argument(
        "--from-db", action="store_true", help="every gate in the database (PARKING_DATABASE_URL)"
    )
    p_provision.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder to write the files into"
    )
    p_provision.add_argument(
        "--prefix", help="topic prefix before parking/v1 (default: PARKING_MQTT_TOPIC_PREFIX)"
    )
    p_provision.add_argument("--port", type=int, default=1883, help="the listener's port")
    p_provision.add_argument("--bind-address", help="listen on this IP address only (default: all)")
    p_provision.add_argument(
        "--config-dir",
        type=Path,
        metavar="DIR",
        help="where the broker will read the files, if not from --out (e.g. /etc/mosquitto/gates)",
    )
    p_provision.add_argument(
        "--broker-group",
        metavar="GROUP",
        help="give the password file and ACL to this group (mosquitto, when run on the broker)",
    )
    for role, what in (
        ("lanes", "lane processes"),
        ("workers", "charge worker processes"),
        ("apis", "API processes"),
    ):
        p_provision.add_argument(
            f"--{role}",
            type=int,
            default=1,
            metavar="N",
            help=f"{what}, each with a login of its own (default 1)",
        )
    p_provision.add_argument(
        "--rotate",
        action="store_true",
        help="new passwords for everyone (default: keep those in DIR/credentials.json)",
    )


async def _database_gates(settings: Settings) -> list[GateAddress]:
    async with endpoints(settings, database_only=True) as eps:
        return await gates_from_database(eps.database_url)


def run(args: argparse.Namespace) -> int:
    """`parking gates provision`: 0 when written, 2 on input that was refused, 1 when a file
    could not be read or written."""
    if args.gates_command != "provision":
        return config.run(args)
    settings = get_settings()
    try:
        gates = [parse_gate(text) for text in args.gate]
        if args.gates_file is not None:
            gates += read_gates_file(args.gates_file)
        if args.from_db:
            gates += asyncio.run(_database_gates(settings))
        result = provision(
            gates,
            args.out,
            prefix=settings.mqtt_topic_prefix if args.prefix is None else args.prefix,
            port=args.port,
            bind_address=args.bind_address,
            config_dir=args.config_dir,
            broker_group=args.broker_group,
            rotate=args.rotate,
            instances={"lanes": args.lanes, "worker": args.workers, "api": args.apis},
        )
    except ProvisionError as exc:
        print(f"parking gates provision: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"parking gates provision: {exc}", file=sys.stderr)
        return 1
    summary = {
        "gates": sum(1 for account in result.accounts if account.gate is not None),
        "new_passwords": result.new_passwords,
        "files": {name: str(path) for name, path in result.files.items()},
    }
    print(orjson.dumps(summary).decode())
    return 0
