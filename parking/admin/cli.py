"""`parking admin …`: companies, car parks, staff, gates and API keys, without SQL.

Every command writes in one transaction with its audit-log line (`--actor`, default
`cli:<login>`), and prints what it made: `key: value` lines, or one JSON object with `--json`.
Secrets (a drawn password, a gate's broker password and camera key, an API key) are printed
once and stored only as hashes. Exit status 0 when done, 2 when the input was refused
(nothing written).
"""

import argparse
import getpass
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from billing.tariff import Tariff
from parking.admin import service
from parking.auth import apikeys
from parking.db import create_pool
from parking.gates import config as gate_configs
from parking.infra import endpoints
from parking.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--actor", help="who runs it, for the audit log (default cli:<login name>)")
    sub = parser.add_subparsers(dest="admin_object", required=True)

    company = sub.add_parser("company", help="companies (car park operators)")
    company_sub = company.add_subparsers(dest="admin_command", required=True)
    company_create = company_sub.add_parser("create", help="a new company")
    company_create.add_argument("--name", required=True)

    car_park = sub.add_parser("car-park", help="car parks")
    car_park_sub = car_park.add_subparsers(dest="admin_command", required=True)
    cp_create = car_park_sub.add_parser("create", help="a car park with its first tariff")
    cp_create.add_argument("--company", required=True, help="company id or name")
    cp_create.add_argument("--code", required=True, help="1-64 of A-Z a-z 0-9 _ - (gate topics)")
    cp_create.add_argument("--name", required=True)
    cp_create.add_argument("--address")
    cp_create.add_argument("--lat", type=float)
    cp_create.add_argument("--lon", type=float)
    cp_create.add_argument("--capacity", type=int, required=True)
    tariff = cp_create.add_mutually_exclusive_group(required=True)
    tariff.add_argument(
        "--tariff-file", type=Path, metavar="FILE", help="a tariff table (JSON, billing.tariff)"
    )
    tariff.add_argument(
        "--hourly-fen", type=int, metavar="FEN", help="a simple tariff: this much per started hour"
    )
    cp_create.add_argument("--free-minutes", type=int, default=15, help="with --hourly-fen")
    cp_create.add_argument("--daily-cap-fen", type=int, help="with --hourly-fen")
    cp_create.add_argument(
        "--uncertain-exit-policy", choices=["hold", "open_confirm"], default="open_confirm"
    )
    cp_policy = car_park_sub.add_parser(
        "set-policy", help="how the car park treats uncertain exits"
    )
    cp_policy.add_argument("--car-park", required=True, metavar="CODE")
    cp_policy.add_argument(
        "--uncertain-exit-policy", choices=["hold", "open_confirm"], required=True
    )

    staff = sub.add_parser("staff", help="operator staff")
    staff_sub = staff.add_subparsers(dest="admin_command", required=True)
    staff_create = staff_sub.add_parser(
        "create", help="a staff member (the company's first admin); prints a drawn password"
    )
    staff_create.add_argument("--company", required=True, help="company id or name")
    staff_create.add_argument("--email", required=True)
    staff_create.add_argument("--name", required=True)
    staff_create.add_argument(
        "--role",
        choices=["admin", "attendant", "platform"],
        default="admin",
        help="platform: the city platform's staff (decide plate ownership claims; give the "
        "platform's own company, which runs no car parks)",
    )
    staff_create.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin instead of drawing one",
    )

    gate = sub.add_parser("gate", help="gates")
    gate_sub = gate.add_subparsers(dest="admin_command", required=True)
    gate_create = gate_sub.add_parser(
        "create", help="a gate; prints its broker login and camera key once"
    )
    gate_create.add_argument("--car-park", required=True, metavar="CODE")
    gate_create.add_argument("--code", required=True)
    gate_create.add_argument("--direction", choices=["in", "out", "both"], required=True)
    gate_create.add_argument(
        "--broker-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="the broker's files, rewritten for every gate as `parking gates provision "
        "--from-db --out DIR` does (the passwords already in DIR/credentials.json are kept)",
    )

    key = sub.add_parser("api-key", help="city and gate API keys")
    key_sub = key.add_subparsers(dest="admin_command", required=True)
    key_create = key_sub.add_parser("create", help="a new key, printed once")
    key_create.add_argument("--kind", choices=["city", "gate"], required=True)
    key_create.add_argument("--label", required=True)
    key_create.add_argument("--gate", metavar="CAR_PARK/GATE", help="the gate of a gate key")
    key_sub.add_parser("list", help="every key (ids, labels, revoked or not; never the keys)")
    key_revoke = key_sub.add_parser("revoke", help="revoke a key")
    key_revoke.add_argument("id", type=int)


def _tariff(args: argparse.Namespace) -> Tariff:
    if args.tariff_file is not None:
        return service.parse_tariff(args.tariff_file.read_text(encoding="utf-8"))
    if args.hourly_fen < 0 or args.free_minutes < 0:
        raise service.AdminError("--hourly-fen and --free-minutes: 0 or more")
    return Tariff.hourly(args.free_minutes, args.hourly_fen, args.daily_cap_fen)


def _password(args: argparse.Namespace) -> str | None:
    if not args.password_stdin:
        return None
    return sys.stdin.readline().rstrip("\r\n")


def _server_public_key(settings: Settings) -> str | None:
    """The public half of PARKING_GATE_CONFIG_KEY, which the gate's agent is configured with."""
    if settings.gate_config_key is None:
        return None
    try:
        key = gate_configs.load_private_key(settings.gate_config_key.get_secret_value())
    except ValueError as exc:
        raise service.AdminError(f"PARKING_GATE_CONFIG_KEY: {exc}") from None
    return gate_configs.public_key_text(key)


Command = Callable[[asyncpg.Connection, str], Awaitable[Any]]


def command(args: argparse.Namespace, settings: Settings) -> Command:
    """The command `args` asks for, as a function of a connection and the actor. Input that
    needs no database (a tariff file, the password on stdin) is read here."""
    what = (args.admin_object, args.admin_command)
    if what == ("company", "create"):
        return lambda conn, actor: service.create_company(conn, actor, args.name)
    if what == ("car-park", "create"):
        spec = service.CarParkSpec(
            company=args.company,
            code=args.code,
            name=args.name,
            capacity=args.capacity,
            tariff=_tariff(args),
            address=args.address,
            latitude=args.lat,
            longitude=args.lon,
            uncertain_exit_policy=args.uncertain_exit_policy,
        )
        return lambda conn, actor: service.create_car_park(conn, actor, spec, datetime.now(UTC))
    if what == ("car-park", "set-policy"):
        return lambda conn, actor: service.set_policy(
            conn, actor, args.car_park, args.uncertain_exit_policy
        )
    if what == ("staff", "create"):
        password = _password(args)
        return lambda conn, actor: service.create_staff(
            conn,
            actor,
            company=args.company,
            email=args.email,
            name=args.name,
            role=args.role,
            password=password,
        )
    if what == ("gate", "create"):
        return lambda conn, actor: service.create_gate(
            conn,
            actor,
            car_park=args.car_park,
            code=args.code,
            direction=args.direction,
            topic_prefix=settings.mqtt_topic_prefix,
            broker_dir=args.broker_dir,
            server_public_key=_server_public_key(settings),
        )
    if what == ("api-key", "create"):
        return lambda conn, actor: service.create_api_key(
            conn, actor, kind=args.kind, label=args.label, gate=args.gate
        )
    if what == ("api-key", "list"):
        return lambda conn, _: service.list_api_keys(conn)
    if what == ("api-key", "revoke"):
        return lambda conn, actor: service.revoke_api_key(conn, actor, args.id)
    raise AssertionError(what)


def _print(result: Any, as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(result).decode())
        return
    rows = result if isinstance(result, list) else [result]
    for index, row in enumerate(rows):
        if index:
            print()
        for key, value in row.items():
            if isinstance(value, dict):
                for inner, text in value.items():
                    print(f"{key}.{inner}: {text}")
            else:
                print(f"{key}: {value}")


async def run(settings: Settings, args: argparse.Namespace) -> int:
    """`parking admin …`: 0 when done, 2 when the input was refused (nothing written)."""
    actor = args.actor or f"cli:{getpass.getuser()}"
    try:
        try:
            job = command(args, settings)
        except OSError as exc:  # the tariff file
            raise service.AdminError(str(exc)) from exc
        async with endpoints(settings, database_only=True) as eps:
            pool = await create_pool(eps.database_url, min_size=1, max_size=1)
            try:
                async with pool.acquire() as conn, conn.transaction():
                    result = await job(conn, actor)
            finally:
                await pool.close()
            if (args.admin_object, args.admin_command) == ("api-key", "revoke"):
                await _announce_revoked(settings, eps.redis_url, args.id)
    except service.AdminError as exc:
        print(f"parking admin: {exc}", file=sys.stderr)
        return 2
    _print(result, args.json)
    return 0


async def _announce_revoked(settings: Settings, redis_url: str, key_id: int) -> None:
    """Tells the running processes that the key is revoked (committed already): they stop
    taking it at once rather than within PARKING_API_KEY_CACHE_SECONDS."""
    later = f"processes still taking it stop within {settings.api_key_cache_seconds:g} s"
    if not redis_url:
        print(f"parking admin: PARKING_REDIS_URL is not set: {later}", file=sys.stderr)
        return
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        await apikeys.announce_revoked(redis, settings.redis_key_prefix, key_id)
    except (RedisError, OSError) as exc:
        print(f"parking admin: Redis did not take the news ({exc}): {later}", file=sys.stderr)
    finally:
        await redis.aclose()
