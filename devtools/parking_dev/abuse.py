"""`parking-dev bench --abuse`: does abuse of the public and sign-in routes slow the lane?

The lane service and the API run in one process, as `parking serve` runs them by default (the
worst case: in the deployment they are separate pods). Simulated gates drive exits at `rate`
twice: once alone, once while another process plays many clients at once (each request from
one of `clients` fake addresses, named in X-Forwarded-For, which the API trusts from its
local peer, as behind an ingress) on every public list, nearby search, fee quotes, sign-in
codes, password guesses, oversized bodies and junk provider notifications. The report gives
the exit decisions' latency without and with the abuse, and what the abusers were answered.
"""

import asyncio
import dataclasses
import multiprocessing
import random
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import httpx
import uvicorn
import uvloop

from parking.app import create_app, server_config
from parking.lanes.worker import LaneStats
from parking.runtime import ProviderEndpoint
from parking.settings import Settings
from parking_dev import sandbox
from parking_dev.bench import drive, lane_service
from parking_dev.demo import DemoCity, seed_city

# The lane's p99 under abuse may be at most this much above its p99 alone.
TARGET_P99_INCREASE = 0.20


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
    base_url: str, car_parks: list[str], clients: int, concurrency: int, duration_s: float
) -> dict[str, dict[str, int]]:
    """Runs in its own process: `concurrency` connections sending as fast as they are answered,
    each request from one of `clients` addresses. Returns counts by route and status."""

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

    return uvloop.run(go())


def _split(city: DemoCity) -> tuple[DemoCity, DemoCity]:
    """The parked cars in two halves: one for each run, so that every exit has its car."""
    first = {lot: cars[::2] for lot, cars in city.inside.items()}
    second = {lot: cars[1::2] for lot, cars in city.inside.items()}
    return dataclasses.replace(city, inside=first), dataclasses.replace(city, inside=second)


def _phase(figures: dict[str, Any]) -> dict[str, Any]:
    keep = ("decisions", "exits", "errors", "p50_ms", "p95_ms", "p99_ms", "max_ms")
    return {key: figures[key] for key in keep} | {"throughput_per_s": figures["throughput_per_s"]}


async def run_abuse_bench(
    settings: Settings,
    provider: ProviderEndpoint,
    *,
    rate: float,
    duration_s: float,
    car_parks: int = 40,
    clients: int = 500,
    concurrency: int = 16,
) -> dict[str, Any]:
    rng = random.Random()
    # The API believes X-Forwarded-For from the local abusers, as it would from an ingress.
    settings.trusted_proxies = ["127.0.0.1/32"]
    exits_needed = 2 * (int(rate * duration_s * 1.2) + 100)
    async with lane_service(settings, provider) as runtime:
        city = await seed_city(
            runtime.pool, rng, drivers=exits_needed, car_parks=car_parks, parked_share=1.0
        )
        await runtime.lanes.warm_up()
        alone_city, abused_city = _split(city)
        async with runtime.pool.acquire() as conn:
            codes = [
                r["code"]
                for r in await conn.fetch(
                    "SELECT code FROM car_parks WHERE id = ANY($1)", city.car_park_ids
                )
            ]
        port = sandbox.free_port()
        server = uvicorn.Server(
            server_config(create_app(runtime), "127.0.0.1", port, log_level="warning")
        )
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                if serving.done():
                    serving.result()
                await asyncio.sleep(0.02)
            print(f"bench: {rate}/s for {duration_s}s alone", file=sys.stderr)
            runtime.lanes.stats = LaneStats()
            alone = await drive(
                runtime, alone_city, rate=rate, duration_s=duration_s, exit_share=1.0
            )
            print(
                f"bench: {rate}/s for {duration_s}s with {concurrency} connections of abuse "
                f"from {clients} addresses",
                file=sys.stderr,
            )
            runtime.lanes.stats = LaneStats()
            loop = asyncio.get_running_loop()
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                started = time.monotonic()
                abuse = loop.run_in_executor(
                    pool,
                    _abuse,
                    f"http://127.0.0.1:{port}",
                    codes,
                    clients,
                    concurrency,
                    # The abusers' own start-up (a spawn) is covered by a little more time.
                    duration_s + 3,
                )
                abused = await drive(
                    runtime, abused_city, rate=rate, duration_s=duration_s, exit_share=1.0
                )
                answered = await abuse
                abuse_s = time.monotonic() - started
        finally:
            server.should_exit = True
            await serving
    requests = sum(sum(counts.values()) for counts in answered.values())
    base, loaded = alone["p99_ms"], abused["p99_ms"]
    change = round(100 * (loaded - base) / base, 1) if base else None
    return {
        "mode": "abuse",
        "rate": rate,
        "duration_s": duration_s,
        "car_parks": len(city.car_park_ids),
        "alone": _phase(alone),
        "abused": _phase(abused),
        "p99_change_pct": change,
        "target_p99_change_pct": round(100 * TARGET_P99_INCREASE),
        "target_met": change is not None and change <= 100 * TARGET_P99_INCREASE,
        "abuse": {
            "clients": clients,
            "connections": concurrency,
            "requests": requests,
            "requests_per_s": round(requests / abuse_s, 1),
            "server_errors": sum(
                n
                for counts in answered.values()
                for status, n in counts.items()
                if status != "closed" and (not status.isdigit() or int(status) >= 500)
            ),
            "answered": answered,
        },
    }
