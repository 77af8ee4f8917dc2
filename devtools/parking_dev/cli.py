"""The `parking-dev` command line: the simulated city, the benchmarks and the sandbox provider.

These are development tools: a production install (`pip install parking`) carries none of them.
"""

import argparse
import contextlib
import os
import sys
from pathlib import Path

import orjson

from parking.cli import run
from parking.logging import configure_from
from parking.settings import Settings, get_settings
from parking_dev import sandbox

# The benches' embedded servers, apart from the demo's under .data/: a bench's charges in the
# demo's database would be the next demo's reconciliation differences.
BENCH_DATA_DIR = Path(".data/bench")


def use_bench_data_dir(settings: Settings) -> None:
    """A bench keeps its embedded servers' data in BENCH_DATA_DIR unless PARKING_DATA_DIR
    chooses a folder (servers given by PARKING_*_URL are used as they are)."""
    if "data_dir" not in settings.model_fields_set:
        settings.data_dir = BENCH_DATA_DIR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parking-dev", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_demo = sub.add_parser("demo", help="run a simulated city end to end")
    p_demo.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    p_demo.add_argument("--rate", type=float, default=20.0, help="captures per second")
    p_demo.add_argument("--json", action="store_true", help="print a JSON summary last")
    p_demo.add_argument("--no-api", action="store_true", help="do not serve the HTTP API")
    p_demo.add_argument(
        "--provider",
        choices=("sandbox", "wechat"),
        help="payment rails: the sandbox, or WeChat Pay (its emulator unless the PARKING_WECHAT_* "
        "keys are set); default PARKING_PAYMENT_PROVIDER",
    )
    # Faults of the in-process sandbox provider (or WeChat Pay emulator).
    sandbox.add_arguments(p_demo)

    p_bench = sub.add_parser("bench", help="exit decisions under load (JSON figures)")
    p_bench.add_argument(
        "--rate", type=float, help="captures per second (default 200; 100 with --city-day)"
    )
    p_bench.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    p_bench.add_argument("--car-parks", type=int, help="default 40; 3,476 with --city-day")
    p_bench.add_argument(
        "--ocr",
        type=Path,
        metavar="PLATES_DIR",
        help="captures carry plate photos from this labels.csv folder instead of camera reads",
    )
    p_bench.add_argument(
        "--feeds",
        action="store_true",
        help="every company subscribed (APDS webhook and city platform) to a local receiver; "
        "reports the delivery lag",
    )
    p_bench.add_argument("--json", action="store_true", help="print only the JSON line")
    p_bench.add_argument(
        "--rights-share",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="give this share of the parked cars a right (whitelist, night pass, free minutes, "
        "discount, flat fee in turn), e.g. 0.2",
    )
    abuse = p_bench.add_argument_group(
        "abuse",
        "exits at --rate (default 100) for --duration alone, then again while many fake "
        "clients hammer the public and sign-in routes; the lane's p99 both ways",
    )
    abuse.add_argument("--abuse", action="store_true")
    abuse.add_argument("--abuse-clients", type=int, default=500, help="fake client addresses")
    abuse.add_argument(
        "--abuse-connections", type=int, default=16, help="concurrent abusive connections"
    )
    p_bench.add_argument(
        "--priorities",
        "--abuse-priorities",
        dest="priorities",
        choices=["deployed", "equal"],
        default="deployed",
        help="--abuse and --signs: deployed (default): the lane on a core of its own, the API and "
        "the clients yielding the CPU to it, as deploy/kubernetes places and ranks them; equal: "
        "everything at the lane's priority on every core",
    )
    signs = p_bench.add_argument_group(
        "guidance signs",
        "exits at --rate (default 100) for --duration alone, then again while N signs poll "
        "/api/v1/public/signs; the signs' latency and the lane's p99 both ways",
    )
    signs.add_argument("--signs", type=int, metavar="N", help="simulated sign controllers")
    signs.add_argument(
        "--sign-interval", type=float, default=10.0, help="seconds between a sign's polls"
    )
    signs.add_argument(
        "--sign-connections", type=int, default=200, help="the signs' concurrent connections"
    )
    signs.add_argument(
        "--subscribers",
        type=int,
        default=10,
        help="each company's push subscribers while the signs poll (its city platform and "
        "APDS webhooks, every topic; 0: none)",
    )
    signs.add_argument(
        "--subscriber-topics",
        choices=["mixed", "every"],
        default="mixed",
        help="mixed (default): the city platform and a third of the APDS subscribers take every "
        "topic, the rest occupancy alone; every: all of them every topic",
    )
    p_bench.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="--abuse and --signs: alternate the phases (alone, loaded) this many times",
    )
    city_day = p_bench.add_argument_group(
        "city day",
        "a day of the whole city in a database of its own (see parking_dev/citybench.py), the "
        "lane replayed on top of it, the operator views and the public API timed under it",
    )
    city_day.add_argument("--city-day", action="store_true")
    city_day.add_argument("--stays", type=int, help="stays in the day's history (default 1M)")
    city_day.add_argument("--replay-seconds", type=float, help="seconds of replay (default 60)")
    city_day.add_argument("--query-calls", type=int, help="calls of each view (default 20)")
    city_day.add_argument(
        "--load-workers", type=int, help="processes loading the history (default 2)"
    )
    city_day.add_argument(
        "--database",
        help="create the database under this name and keep it (default: a new one, dropped)",
    )
    city_day.add_argument("--seed", type=int, help="random seed (city day, misreads)")
    misreads = p_bench.add_argument_group(
        "misreads",
        "a city's exits with realistic misreads decided by the lane's own pure rules, no "
        "database (see parking_dev/misreads.py): wrong-account charges, exits needing a person",
    )
    misreads.add_argument("--misreads", action="store_true")
    misreads.add_argument("--exits", type=int, default=1_000_000, help="exits (default 1M)")
    misreads.add_argument(
        "--harsh",
        action="store_true",
        help="a harsher world: worse cameras, more consistent misreads and look-alikes "
        "(MisreadModel.harsh)",
    )
    city_day.add_argument(
        "--explain-out",
        type=Path,
        help="where the EXPLAIN of each view goes (default .artifacts/city-day-explain.txt)",
    )

    p_sandbox = sub.add_parser(
        "sandbox-provider",
        help="run the sandbox payment provider (signs with PARKING_PAYMENT_PROVIDER_SECRET)",
    )
    p_sandbox.add_argument("--port", type=int, default=8100)
    p_sandbox.add_argument(
        "--db", default=":memory:", help="SQLite file for its orders (default: in memory)"
    )
    sandbox.add_arguments(p_sandbox)

    p_wechat = sub.add_parser(
        "wechat-emulator",
        help="run the WeChat Pay v3 parking emulator; its keys and the PARKING_WECHAT_* settings "
        "for `parking serve` are written to --keys",
    )
    p_wechat.add_argument("--port", type=int, default=8110)
    p_wechat.add_argument("--keys", type=Path, default=Path(".data/wechat-emulator"))
    p_wechat.add_argument(
        "--no-advance", action="store_true", help="fail a short balance instead of advancing it"
    )
    sandbox.add_arguments(p_wechat)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    settings = get_settings()
    if args.command in ("demo", "bench") and "PARKING_LOG_LEVEL" not in os.environ:
        # The demo prints its own progress; per-capture logs would drown it.
        settings.log_level = "WARNING"
    configure_from(settings)
    if args.command == "bench":
        use_bench_data_dir(settings)
    if args.command == "demo":
        from parking_dev.demo import run_demo

        if args.provider:
            settings.payment_provider = args.provider
        summary = run(
            run_demo(
                settings,
                args.duration,
                args.rate,
                serve_api=not args.no_api,
                faults=sandbox.faults_from_args(args),
            )
        )
        option = 0 if args.json else orjson.OPT_INDENT_2
        print(orjson.dumps(summary, option=option).decode())
    elif args.command == "bench" and args.misreads:
        from parking_dev.misreads import MisreadModel, run_misreads

        seed = 15 if args.seed is None else args.seed
        model = MisreadModel.harsh() if args.harsh else MisreadModel()
        result = run_misreads(settings, exits=args.exits, seed=seed, model=model)
        print(orjson.dumps(result, option=0 if args.json else orjson.OPT_INDENT_2).decode())
    elif args.command == "bench" and args.city_day:
        from parking_dev.bench import sandbox_process
        from parking_dev.citybench import CityDayConfig, run_city_day

        given = {
            "car_parks": args.car_parks,
            "stays": args.stays,
            "rate": args.rate,
            "replay_seconds": args.replay_seconds,
            "query_calls": args.query_calls,
            "load_workers": args.load_workers,
            "database": args.database,
            "seed": args.seed,
            "explain_path": args.explain_out,
        }
        config = CityDayConfig(**{k: v for k, v in given.items() if v is not None})
        with sandbox_process() as provider:
            result = run(run_city_day(settings, provider, config))
        print(orjson.dumps(result, option=0 if args.json else orjson.OPT_INDENT_2).decode())
    elif args.command == "bench" and args.signs:
        from parking_dev.bench import sandbox_process
        from parking_dev.signbench import run_signs_bench

        with sandbox_process() as provider:
            result = run(
                run_signs_bench(
                    settings,
                    provider,
                    rate=args.rate or 100.0,
                    duration_s=args.duration,
                    signs=args.signs,
                    interval_s=args.sign_interval,
                    connections=args.sign_connections,
                    car_parks=args.car_parks or 40,
                    subscribers=args.subscribers,
                    subscriber_mix=args.subscriber_topics,
                    rounds=args.rounds,
                    priorities=args.priorities,
                )
            )
        print(orjson.dumps(result, option=0 if args.json else orjson.OPT_INDENT_2).decode())
    elif args.command == "bench" and args.abuse:
        from parking_dev.abuse import run_abuse_bench
        from parking_dev.bench import sandbox_process

        with sandbox_process() as provider:
            result = run(
                run_abuse_bench(
                    settings,
                    provider,
                    rate=args.rate or 100.0,
                    duration_s=args.duration,
                    car_parks=args.car_parks or 40,
                    clients=args.abuse_clients,
                    concurrency=args.abuse_connections,
                    priorities=args.priorities,
                    rounds=args.rounds,
                )
            )
        print(orjson.dumps(result, option=0 if args.json else orjson.OPT_INDENT_2).decode())
    elif args.command == "bench":
        from parking_dev.bench import feed_receiver, run_bench, sandbox_process

        with (
            sandbox_process() as provider,
            feed_receiver() if args.feeds else contextlib.nullcontext() as feeds_url,
        ):
            result = run(
                run_bench(
                    settings,
                    provider,
                    rate=args.rate or 200.0,
                    duration_s=args.duration,
                    ocr_folder=args.ocr,
                    car_parks=args.car_parks or 40,
                    rights_share=args.rights_share,
                    feeds_url=feeds_url,
                )
            )
        print(orjson.dumps(result, option=0 if args.json else orjson.OPT_INDENT_2).decode())
    elif args.command == "wechat-emulator":
        from parking_dev import wechat

        with contextlib.suppress(KeyboardInterrupt):
            wechat.serve(
                args.port,
                wechat.EmulatorConfig(
                    faults=sandbox.faults_from_args(args), advance=not args.no_advance
                ),
                args.keys,
            )
    elif args.command == "sandbox-provider":
        if settings.payment_provider_secret is None:
            parser.error(
                "set PARKING_PAYMENT_PROVIDER_SECRET: the key notifications are signed with"
            )
        with contextlib.suppress(KeyboardInterrupt):
            sandbox.serve(
                args.port,
                sandbox.faults_from_args(args),
                settings.payment_provider_secret.get_secret_value(),
                args.db,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
