"""`parking-dev bench --signs N`: do N guidance signs polling `/api/v1/public/signs` slow the
lane, and how fast are they answered?

As `--abuse` (`parking_dev.abuse`): the lane service and the API in processes of their own,
exits at `rate` alone, then again while another process plays the signs. Each sign shows one
to three car parks (`?car_parks=A,B`), carries the city's key (as deployed: not rate-limited),
polls every `interval_s` from a random start with `If-None-Match` (a 304 while nothing
changed). The signs' latency is measured in their own process, which runs at the lowest
priority (they stand for machines elsewhere): on a busy machine it includes that process's
own wait for the CPU, so it is an upper bound.
"""

import asyncio
import os
import random
import time
from typing import Any

import aiohttp
import asyncpg
import uvloop

from parking.auth import repository as auth_repo
from parking.auth.principal import CITY_KEY_PREFIX
from parking.auth.tokens import digest, new_secret
from parking.runtime import ProviderEndpoint
from parking.settings import Settings
from parking_dev.abuse import API_NICENESS, CLIENTS_NICENESS, lane_alone_and_loaded, server_errors
from parking_dev.demo import percentiles

# The lane's p99 with the signs may be at most this much above its p99 alone (the issue's).
TARGET_P99_INCREASE = 0.10


def _signs(
    base_url: str,
    car_parks: list[str],
    city_key: str,
    signs: int,
    interval_s: float,
    connections: int,
    duration_s: float,
) -> tuple[dict[str, Any], float]:
    """Runs in its own process: `signs` signs polling every `interval_s` for `duration_s`.
    Returns the answers' statuses and latencies (ms), and the CPU seconds the signs took."""
    os.nice(CLIENTS_NICENESS)

    async def go() -> dict[str, Any]:
        rng = random.Random()
        statuses: dict[str, int] = {}
        latencies: list[float] = []
        late_polls = 0
        started = time.monotonic()
        deadline = started + duration_s
        connector = aiohttp.TCPConnector(limit=connections)
        headers = {"Authorization": f"Bearer {city_key}"}
        timeout = aiohttp.ClientTimeout(total=30)
        # aiohttp, not httpx: about a sixth of the CPU per poll (measured), so that one process can
        # play thousands of signs.
        async with aiohttp.ClientSession(
            base_url, connector=connector, headers=headers, timeout=timeout
        ) as http:

            async def one_sign() -> None:
                nonlocal late_polls
                shown = ",".join(rng.sample(car_parks, min(len(car_parks), rng.randint(1, 3))))
                etag: str | None = None
                due = started + rng.uniform(0, interval_s)
                while due < deadline:
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    sent = time.monotonic()
                    if sent - due > interval_s:
                        late_polls += 1
                    try:
                        async with http.get(
                            "/api/v1/public/signs",
                            params={"car_parks": shown},
                            headers={"If-None-Match": etag} if etag else None,
                        ) as answer:
                            await answer.read()
                            status = str(answer.status)
                            etag = answer.headers.get("etag", etag)
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        status = type(exc).__name__
                    latencies.append(1000 * (time.monotonic() - sent))
                    statuses[status] = statuses.get(status, 0) + 1
                    due += interval_s

            await asyncio.gather(*(one_sign() for _ in range(signs)))
        return {
            "requests": len(latencies),
            "requests_per_s": round(len(latencies) / (time.monotonic() - started), 1),
            "answered": dict(sorted(statuses.items())),
            "polls_late_by_an_interval": late_polls,
        } | percentiles(latencies)

    return uvloop.run(go()), time.process_time()


async def _city_key(conn: asyncpg.Connection) -> tuple[str]:
    key = new_secret(CITY_KEY_PREFIX)
    await auth_repo.create_api_key(conn, "city", digest(key), "bench signs")
    return (key,)


async def run_signs_bench(
    settings: Settings,
    provider: ProviderEndpoint,
    *,
    rate: float,
    duration_s: float,
    signs: int,
    interval_s: float = 10.0,
    connections: int = 200,
    car_parks: int = 40,
) -> dict[str, Any]:
    run = await lane_alone_and_loaded(
        settings,
        provider,
        rate=rate,
        duration_s=duration_s,
        car_parks=car_parks,
        load=_signs,
        load_args=(signs, interval_s, connections),
        describe=f"{signs} signs polling every {interval_s}s",
        prepare=_city_key,
    )
    answers: dict[str, Any] = run.load
    change = run.p99_change_pct()
    return {
        "mode": "signs",
        "rate": rate,
        "duration_s": duration_s,
        "car_parks": run.car_parks,
        "alone": run.alone,
        "with_signs": run.loaded,
        "exit_p99_change_pct": change,
        "target_p99_change_pct": round(100 * TARGET_P99_INCREASE),
        "target_met": change is not None and change <= 100 * TARGET_P99_INCREASE,
        "niceness": {"lane": os.nice(0), "api": API_NICENESS, "signs": CLIENTS_NICENESS},
        "signs": {
            "signs": signs,
            "interval_s": interval_s,
            "connections": connections,
            "server_errors": server_errors({"signs": answers["answered"]}),
        }
        | answers,
    }
