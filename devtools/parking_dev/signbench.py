"""`parking-dev bench --signs N`: do N guidance signs polling `/api/v1/public/signs`, with every
company's push subscribers, slow the lane, and how fast are signs and subscribers served?

As `--abuse` (`parking_dev.abuse`): the lane service and the API in processes of their own, the
lane on a core of its own, exits at `rate` alone and then again while another process plays
the signs, in alternating rounds. Each sign shows one to three car parks
(`?car_parks=A,B`), carries the city's key (as deployed: not rate-limited), polls every
`interval_s` from a random start with `If-None-Match` (a 304 while nothing changed). With
`subscribers` (the issue's 10) every company also has its city platform and APDS webhook
subscriptions on every topic while the signs poll, answered by a receiver in a process of its
own (`bench.feed_receiver`): their deliveries' lag is reported, and their cost is in the lane's
figures. The signs and the receiver run at the lowest priority (they stand for machines
elsewhere): the signs' latency, measured in their own process, includes that process's own wait
for the CPU on a busy machine, so it is an upper bound.
"""

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import uvloop

from parking.auth import repository as auth_repo
from parking.auth.principal import CITY_KEY_PREFIX
from parking.auth.tokens import digest, new_secret
from parking.runtime import ProviderEndpoint, Runtime
from parking.settings import Settings
from parking_dev.abuse import PRIORITIES, lane_alone_and_loaded, server_errors
from parking_dev.bench import (
    FEED_SUBSCRIBERS,
    SUBSCRIBERS_NICENESS,
    FeedLags,
    feed_figures,
    feed_lags,
    feed_receiver,
    stand_elsewhere,
    subscribe_everyone,
    unsubscribe_everyone,
    worker_cpu,
)
from parking_dev.demo import DemoCity, percentiles

# The lane's p99 with the signs may be at most this much above its p99 alone (the issue's).
TARGET_P99_INCREASE = 0.10


def _signs(
    base_url: str,
    car_parks: list[str],
    city_key: str,
    signs: int,
    signs_niceness: int,
    interval_s: float,
    connections: int,
    duration_s: float,
) -> tuple[dict[str, Any], float]:
    """Runs in its own process: `signs` signs polling every `interval_s` for `duration_s`.
    Returns the answers' statuses and every poll's latency (ms), and the signs' CPU seconds."""
    stand_elsewhere(signs_niceness)

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
                    latencies.append(round(1000 * (time.monotonic() - sent), 3))
                    statuses[status] = statuses.get(status, 0) + 1
                    due += interval_s

            await asyncio.gather(*(one_sign() for _ in range(signs)))
        return {
            "seconds": time.monotonic() - started,
            "answered": statuses,
            "polls_late_by_an_interval": late_polls,
            "latencies_ms": latencies,
        }

    return uvloop.run(go()), time.process_time()


async def _city_key(conn: asyncpg.Connection) -> tuple[str]:
    key = new_secret(CITY_KEY_PREFIX)
    await auth_repo.create_api_key(conn, "city", digest(key), "bench signs")
    return (key,)


def _signs_figures(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    for answers in rounds:
        statuses.update(answers["answered"])
    requests = sum(len(answers["latencies_ms"]) for answers in rounds)
    return {
        "requests": requests,
        "requests_per_s": round(requests / sum(answers["seconds"] for answers in rounds), 1),
        "answered": dict(sorted(statuses.items())),
        "server_errors": server_errors({"signs": statuses}),
        "polls_late_by_an_interval": sum(a["polls_late_by_an_interval"] for a in rounds),
    } | percentiles([v for answers in rounds for v in answers["latencies_ms"]])


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
    subscribers: int = FEED_SUBSCRIBERS,
    subscriber_mix: str = "mixed",
    rounds: int = 3,
    priorities: str = "deployed",
) -> dict[str, Any]:
    api_niceness, signs_niceness = PRIORITIES[priorities]
    # The receiver listens on loopback.
    settings = settings.model_copy(update={"feed_allow_loopback": True})
    feeds: list[FeedLags] = []
    subscriptions: list[int] = []

    with feed_receiver() if subscribers else contextlib.nullcontext() as url:

        @contextlib.asynccontextmanager
        async def subscribed(runtime: Runtime, city: DemoCity) -> AsyncIterator[None]:
            """Every company's subscribers for the round; their deliveries measured once sent."""
            if url is None:
                yield
                return
            async with runtime.pool.acquire() as conn:
                since = await conn.fetchval("SELECT clock_timestamp()")
            worker_cpu_s = worker_cpu()
            subscriptions.append(
                await subscribe_everyone(runtime, city, url, subscribers, subscriber_mix)
            )
            try:
                yield
                feeds.append(await feed_lags(runtime, city, since, worker_cpu_s))
            finally:
                await unsubscribe_everyone(runtime, url)

        run = await lane_alone_and_loaded(
            settings,
            provider,
            rate=rate,
            duration_s=duration_s,
            car_parks=car_parks,
            load=_signs,
            load_args=(signs, signs_niceness, interval_s, connections),
            describe=f"{signs} signs polling every {interval_s}s and {subscribers} subscribers "
            "per company",
            prepare=_city_key,
            around_load=subscribed,
            api_niceness=api_niceness,
            place_lane=priorities == "deployed",
            rounds=rounds,
        )
    change = run.p99_change_pct()
    return {
        "mode": "signs",
        "rate": rate,
        "duration_s": duration_s,
        "rounds": rounds,
        "car_parks": run.car_parks,
        "alone": run.alone,
        "with_signs": run.loaded,
        "exit_p99_change_pct": change,
        "target_p99_change_pct": round(100 * TARGET_P99_INCREASE),
        "target_met": change is not None and change <= 100 * TARGET_P99_INCREASE,
        "priorities": {
            "mode": priorities,
            "niceness": {
                "lane": os.nice(0),
                "api": run.api_niceness,
                "signs": signs_niceness,
                "subscribers": SUBSCRIBERS_NICENESS,
            },
            "cores": run.cores,
        },
        "signs": {"signs": signs, "interval_s": interval_s, "connections": connections}
        | _signs_figures(run.loads),
        "feeds": {"subscriptions_per_round": subscriptions, "topics": subscriber_mix}
        | feed_figures(feeds)
        if subscribers
        else None,
    }
