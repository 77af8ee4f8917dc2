"""The `parking` command line."""

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import orjson
import uvicorn
import uvloop

from parking import billing_cli
from parking.admin import cli as admin_cli
from parking.app import create_app, server_config
from parking.db import create_pool
from parking.gates import provision as gates_provision
from parking.infra import endpoints
from parking.logging import configure_from
from parking.migrate import MIGRATIONS_DIR, migrate, schema_snapshot
from parking.partitions import service as partitions
from parking.production import ConfigurationError, ProductionRefused, refuse_stand_ins
from parking.retention import service as retention
from parking.runtime import payment_provider, running
from parking.settings import Settings, get_settings

T = TypeVar("T")
SNAPSHOT_PATH = MIGRATIONS_DIR / "schema_snapshot.txt"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Runs a command's coroutine on uvloop (asyncpg's and the broker client's socket work is
    the lane's hot path). SIGTERM — how a service manager, `timeout` or CI stops a command —
    unwinds it like Ctrl-C, so that embedded servers and workers are stopped, not orphaned.

    It is passed on as SIGINT, for the runner's own Ctrl-C handling: that cancels the main task
    and lets it unwind through its awaits. A KeyboardInterrupt raised wherever the interpreter
    happens to be (SIGTERM's old handler) could land inside a task's step, and the runner then
    waited for ever on a task it had stranded, with PostgreSQL and Redis still running."""
    # A shell starts background jobs with SIGINT ignored, and the runner then leaves it so.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        return uvloop.run(main)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


async def _migrate(settings: Settings, snapshot: Path | None) -> None:
    async with endpoints(settings, database_only=True) as eps:
        pool = await create_pool(eps.database_url, min_size=1, max_size=1)
        try:
            async with pool.acquire() as conn:
                applied = await migrate(conn)
                print(f"migrations applied: {applied or 'none (up to date)'}")
                if snapshot is not None:
                    text = await schema_snapshot(conn)
                    await asyncio.to_thread(snapshot.write_text, text, encoding="utf-8")
                    print(f"schema snapshot written to {snapshot}")
        finally:
            await pool.close()


async def _serve(settings: Settings, *, lanes: bool, outbox_worker: bool) -> None:
    await refuse_stand_ins(settings)
    async with (
        endpoints(settings) as eps,
        payment_provider(settings) as provider,
        running(settings, eps, provider, lanes=lanes, outbox_worker=outbox_worker) as runtime,
    ):
        server = uvicorn.Server(
            server_config(
                create_app(runtime), settings.api_host, settings.api_port, log_level="info"
            )
        )
        await server.serve()


async def _without_api(settings: Settings, *, lanes: bool, name: str) -> None:
    """`parking lanes` (the lane service alone) or `parking worker` (the outbox worker alone)."""
    await refuse_stand_ins(settings)
    async with (
        endpoints(settings) as eps,
        payment_provider(settings) as provider,
        running(settings, eps, provider, lanes=lanes, outbox_worker=not lanes),
    ):
        print(f"{name} running", file=sys.stderr, flush=True)
        await _until_terminated()


async def _until_terminated() -> None:
    """Returns on SIGTERM or SIGINT, so that leaving `running` stops the workers cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def _once(
    settings: Settings, job: Callable[[asyncpg.Pool, Settings], Awaitable[Any]]
) -> None:
    """Runs one maintenance job now, on a pool of one connection, and prints its result."""
    async with endpoints(settings, database_only=True) as eps:
        pool = await create_pool(eps.database_url, min_size=1, max_size=1)
        try:
            result = await job(pool, settings)
        finally:
            await pool.close()
    print(orjson.dumps(result).decode())


async def _retention(pool: asyncpg.Pool, settings: Settings) -> dict[str, int]:
    erased = await retention.expire_images(pool, settings.image_retention_days, datetime.now(UTC))
    return {"images_erased": erased}


async def _prune(pool: asyncpg.Pool, settings: Settings) -> dict[str, int]:
    return await retention.prune(
        pool, retention.Retention.from_settings(settings), datetime.now(UTC)
    )


async def _partitions(pool: asyncpg.Pool, settings: Settings) -> partitions.Maintained:
    """`{"created": [...], "rows_in_default": {...}}` once printed."""
    return await partitions.ensure_partitions(
        pool, settings.partition_months_ahead, datetime.now(UTC).date()
    )


def _plates(argv: list[str]) -> int:
    """`parking plates eval PATH ...`, `parking plates calibrate PATH ...` and
    `parking plates bench PATH ...`."""
    from plate_recognition.evaluate import main as plates_main

    if argv[:1] == ["eval"]:
        return plates_main(argv[1:])
    if argv[:1] == ["calibrate"]:
        return plates_main([*argv[1:], "--calibrate"])
    if argv[:1] == ["bench"]:
        return plates_main([*argv[1:], "--bench"])
    print(
        "usage: parking plates {eval,calibrate,bench} PATH [--engine E] [--json] ...",
        file=sys.stderr,
    )
    return 2


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and option; `main` runs what it parses (tests parse without running)."""
    parser = argparse.ArgumentParser(prog="parking", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_migrate = sub.add_parser("migrate", help="apply database migrations")
    p_migrate.add_argument(
        "--snapshot",
        nargs="?",
        const=SNAPSHOT_PATH,
        type=Path,
        help=f"also write the resulting schema description (default {SNAPSHOT_PATH.name})",
    )

    p_serve = sub.add_parser("serve", help="run the API, the lane service and the workers")
    p_serve.add_argument(
        "--no-lanes",
        action="store_true",
        help="no lane service here: gate captures are left to `parking lanes` processes",
    )
    p_serve.add_argument(
        "--no-worker",
        action="store_true",
        help="leave charges and notifications to separate `parking worker` processes",
    )
    sub.add_parser("lanes", help="run only the lane service (gate captures, exit decisions)")
    sub.add_parser("worker", help="run only the charge and notification (outbox) worker")

    sub.add_parser(
        "retention", help="erase capture images older than PARKING_IMAGE_RETENTION_DAYS now"
    )

    sub.add_parser(
        "prune",
        help="delete done jobs, dead letters, sent notifications and expired refresh tokens "
        "past their retention now",
    )

    sub.add_parser(
        "partitions",
        help="create the monthly partitions of this month and PARKING_PARTITION_MONTHS_AHEAD more",
    )

    gates_provision.add_arguments(
        sub.add_parser("gates", help="broker accounts and ACLs for gates and lane workers")
    )

    admin_cli.add_arguments(
        sub.add_parser(
            "admin",
            help="companies, car parks, staff, gates and API keys (audit-logged)",
            description=admin_cli.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )

    p_billing = sub.add_parser("billing", help="reconciliation and money reports")
    billing_cli.add_arguments(p_billing)

    sub.add_parser(
        "plates", help="plate recognition tools (eval, calibrate, bench)", add_help=False
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["plates"]:
        return _plates(argv[1:])
    args = parser.parse_args(argv)
    settings = get_settings()
    configure_from(settings)
    try:
        return _command(settings, args)
    except (ProductionRefused, ConfigurationError) as exc:
        # A configuration that cannot run (production on a stand-in): every reason, status 2.
        print(f"parking {args.command}: {exc}", file=sys.stderr)
        return 2


def _command(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "serve":
        run(_serve(settings, lanes=not args.no_lanes, outbox_worker=not args.no_worker))
    elif args.command == "lanes":
        run(_without_api(settings, lanes=True, name="lane service"))
    elif args.command == "worker":
        run(_without_api(settings, lanes=False, name="outbox worker"))
    elif args.command == "migrate":
        run(_migrate(settings, args.snapshot))
    elif args.command == "retention":
        run(_once(settings, _retention))
    elif args.command == "prune":
        run(_once(settings, _prune))
    elif args.command == "partitions":
        run(_once(settings, _partitions))
    elif args.command == "gates":
        return gates_provision.run(args)
    elif args.command == "admin":
        return run(admin_cli.run(settings, args))
    elif args.command == "billing":
        return run(billing_cli.run(settings, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
