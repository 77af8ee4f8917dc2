"""`parking-dev bench`: exit decisions under load, measured the way DESIGN.md states the targets.

Latency is capture received by the lane service -> command acknowledged by the broker
(`decision`), and publish by the gate -> command received by the gate (`gate_round_trip`).
The simulated gates run in their own process so that they do not share the lane's event loop.
With `--feeds` every company of the city has a city platform and 9 APDS webhook subscriptions
(every topic), all answered by a receiver in a process of its own: the stays' trigger queues
their deliveries in the lane's transactions, and `feeds` reports the delivery lag (queued ->
recorded as sent).
"""

import asyncio
import base64
import contextlib
import csv
import itertools
import multiprocessing
import os
import random
import secrets
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import uvloop

from billing import fees
from gate_controller.simulator import GateSimulator, SimGate, SimReport, Vehicle
from gate_controller.whitelist import load_public_key
from parking.gates.commands import command_key
from parking.gates.config import public_key_text
from parking.infra import Endpoints, endpoints
from parking.lanes import repository as lanes_repo
from parking.lanes.rules import exit_rule
from parking.logging import configure_from, configure_logging
from parking.runtime import ProviderEndpoint, Runtime, running
from parking.settings import Settings
from parking_dev import sandbox
from parking_dev.demo import (
    DemoCity,
    ensure_command_key,
    percentiles,
    seed_city,
    with_simulated_cameras,
)
from plate_recognition.holdout import held_out

# Niceness of the outbox worker and the simulated provider during a bench run.
DEFERRED_WORK_NICENESS = 10
# The cores left to the bench's processes other than the lane's (`lane_placed_alone`), in the
# environment so that the processes it spawns afterwards find them.
OTHER_CORES_ENV = "PARKING_DEV_OTHER_CORES"
# Every core, for processes that stand for machines elsewhere (`stand_elsewhere`).
ALL_CORES_ENV = "PARKING_DEV_ALL_CORES"
# Names of the bench's processes that stand for machines elsewhere (`stand_elsewhere`).
ELSEWHERE = "bench-elsewhere"
# The decisions right after the lane started, reported apart: a cold start shows there.
FIRST_DECISIONS = 200


@contextlib.contextmanager
def lane_placed_alone() -> Iterator[dict[str, list[int]] | None]:
    """Places the bench's processes as deploy/kubernetes/lanes.yaml places pods on a node: the
    lane pod (Guaranteed QoS, whole cores, the kubelet's static CPU manager policy) gets a core
    of its own, on which no other pod runs. Here this process (the lane) takes the last core it
    may use; the bench's other processes, those running now (the outbox worker, the provider)
    and those spawned meanwhile (which call `keep_off_lane_core`: the API, the simulated
    gates), the rest. PostgreSQL, Redis and the broker keep every core: a deployment shares
    them too. What stands for machines elsewhere (clients, subscribers) takes only the cycles
    nobody else wants, on any core (`stand_elsewhere`). Yields the cores, None (nothing
    placed) on a machine with one core; this process gets all its cores back at the end."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        yield None
        return
    lane, others = cores[-1:], cores[:-1]
    os.environ[OTHER_CORES_ENV] = ",".join(map(str, others))
    os.environ[ALL_CORES_ENV] = ",".join(map(str, cores))
    for child in multiprocessing.active_children():
        if child.pid is None:
            continue
        if child.name.startswith(ELSEWHERE):
            os.sched_setscheduler(child.pid, os.SCHED_IDLE, os.sched_param(0))
        else:
            os.sched_setaffinity(child.pid, others)
    os.sched_setaffinity(0, lane)
    try:
        yield {"lane": lane, "others": others}
    finally:
        os.sched_setaffinity(0, cores)
        del os.environ[OTHER_CORES_ENV], os.environ[ALL_CORES_ENV]


def _cores(variable: str) -> set[int] | None:
    cores = os.environ.get(variable)
    return {int(core) for core in cores.split(",")} if cores else None


def keep_off_lane_core() -> None:
    """In a process the bench spawned: off the lane's core, if `lane_placed_alone` took one."""
    others = _cores(OTHER_CORES_ENV)
    if others:
        os.sched_setaffinity(0, others)


def stand_elsewhere(niceness: int) -> None:
    """In a process that stands for other machines (clients, subscribers): at `niceness`; while
    the lane has a core of its own (`lane_placed_alone`), at the idle scheduling class on every
    core instead: other machines take none of our cycles, so here they take only those that
    nothing else wants (the kernel preempts them at once for any other process)."""
    os.nice(niceness)
    every = _cores(ALL_CORES_ENV)
    if every:
        os.sched_setaffinity(0, every)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _simulate(
    mqtt_url: str,
    server_key: str,
    prefix: str,
    gates: list[SimGate],
    inside: dict[str, list[tuple[Vehicle, Any]]],
    outside: list[Vehicle],
    rate: float,
    duration_s: float,
    exit_share: float,
) -> SimReport:
    """Runs in a separate process: the gates' side of the benchmark."""
    keep_off_lane_core()
    configure_logging("WARNING")

    async def go() -> SimReport:
        async with GateSimulator(
            mqtt_url,
            gates,
            inside,
            outside,
            server_key=load_public_key(server_key),
            topic_prefix=prefix,
            duplicate_rate=0.0,
            double_read_rate=0.0,
            exit_share=exit_share,
            resend_after_s=10.0,
        ) as sim:
            return await sim.run(rate, duration_s)

    return uvloop.run(go())


def _outbox_worker(settings: dict[str, Any], eps: Endpoints, provider: ProviderEndpoint) -> None:
    """Runs in its own process: charging is deferred work and must not slow the gates."""

    # Charging is deferred work: on this one machine it yields the cores to the gates' path.
    os.nice(DEFERRED_WORK_NICENESS)
    worker_settings = Settings(**settings)
    configure_from(worker_settings)

    async def go() -> None:
        async with running(worker_settings, eps, provider, lanes=False):
            await asyncio.Event().wait()

    uvloop.run(go())


def _serve_provider(port: int, faults: sandbox.FaultConfig, secret: str) -> None:
    os.nice(DEFERRED_WORK_NICENESS)  # another company's service, sharing our two cores here
    sandbox.serve(port, faults, secret, ":memory:")


def wait_for_port(port: int, timeout_s: float = 30) -> None:
    """Until something accepts connections on the local port (a child process serving)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)


@contextlib.contextmanager
def sandbox_process(faults: sandbox.FaultConfig | None = None) -> Iterator[ProviderEndpoint]:
    """The provider in its own process: another service, not part of the lane. By default it
    decides each deduction within the request (the synchronous success real agreement
    deductions mostly get) and sends no notifications: the bench serves no API to receive
    them, and failing deliveries would only burn the cores the lane is measured on."""
    port = sandbox.free_port()
    secret = secrets.token_hex(16)
    process = multiprocessing.get_context("spawn").Process(
        target=_serve_provider,
        args=(
            port,
            faults or sandbox.FaultConfig(processing_delay_s=0.0, lost_notification_rate=1.0),
            secret,
        ),
        daemon=True,
    )
    process.start()
    try:
        wait_for_port(port)
        yield ProviderEndpoint(f"http://127.0.0.1:{port}", secret)
    finally:
        process.terminate()
        process.join(5)


def _plate_photos(folder: Path, rng: random.Random) -> list[Vehicle]:
    """Vehicles whose plates are the cropped photos of a labels.csv folder, those the shipped
    reader never learnt from alone (a photo it trained on reads surely, and faster)."""
    seen: set[str] = set()
    vehicles = []
    with (folder / "labels.csv").open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["kind"] != "crop" or not held_out(row["file"]) or row["plate"] in seen:
                continue
            seen.add(row["plate"])
            image = base64.b64encode((folder / row["file"]).read_bytes()).decode()
            color = "green" if row["color"] == "green" else "blue"
            vehicles.append(Vehicle(row["plate"], color, rng.random() < 0.7, image))  # type: ignore[arg-type]
    return vehicles


async def _wait_for_charges(
    runtime: Runtime, report: SimReport, timeout_s: float
) -> dict[str, int]:
    """The charges of this run's exits (a database may hold many days of others)."""
    exits = [e.capture_id for e in report.exit_log]
    deadline = time.monotonic() + timeout_s
    while True:
        async with runtime.pool.acquire() as conn:
            row = await conn.fetchrow(
                """SELECT count(*) FILTER (WHERE c.status = 'succeeded') AS succeeded,
                          count(*) FILTER (WHERE c.status = 'pending') AS pending
                   FROM captures x JOIN charges c ON c.session_id = x.session_id
                   WHERE x.capture_id = ANY($1) AND x.direction = 'out'""",
                exits,
            )
        if row["pending"] == 0 or time.monotonic() > deadline:
            return dict(row)
        await asyncio.sleep(0.5)


async def _wrong_plates(runtime: Runtime, report: SimReport) -> dict[str, int]:
    truth = {e.capture_id: e.vehicle.plate for e in report.exit_log}
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT capture_id, plate, outcome FROM captures WHERE capture_id = ANY($1)",
            list(truth),
        )
    wrong = [r for r in rows if r["plate"] is not None and r["plate"] != truth[r["capture_id"]]]
    return {
        "decided": len(wrong),
        "charged": sum(1 for r in wrong if r["outcome"] == "exited_pay_later"),
    }


async def _progress(runtime: Runtime, started: float) -> None:
    while True:
        await asyncio.sleep(2.0)
        stats = runtime.lanes.stats
        recent = list(stats.latencies_ms)[-1000:]
        p99 = percentiles(recent)["p99_ms"]
        print(
            f"bench: {time.monotonic() - started:5.1f}s  decided {stats.captures:6d}  "
            f"queued {runtime.lanes.pending():4d}  recent p99 {p99:7.1f} ms",
            file=sys.stderr,
            flush=True,
        )


async def analyze(runtime: Runtime) -> None:
    """Statistics of the freshly seeded tables, as autovacuum gathers them soon after a bulk
    load: without them the planner guesses (the gates' offline whitelist took 2.3 s instead of
    40 ms), and autovacuum's own ANALYZE lands in the middle of the measured run."""
    async with runtime.pool.acquire() as conn:
        await conn.execute("ANALYZE")


@contextlib.asynccontextmanager
async def lane_service(settings: Settings, provider: ProviderEndpoint) -> AsyncIterator[Runtime]:
    """The system under measurement: the lane service in this process, the outbox worker in its
    own (charging is deferred work and must not slow the gates). Its commands are signed as in
    production: with a key of its own when none is configured."""
    ensure_command_key(settings)
    async with (
        endpoints(settings) as eps,
        running(settings, eps, provider, outbox_worker=False) as runtime,
    ):
        worker = multiprocessing.get_context("spawn").Process(
            target=_outbox_worker,
            args=(settings.model_dump(exclude={"mqtt_client_id"}), eps, provider),
            daemon=True,
            name=OUTBOX_WORKER,
        )
        worker.start()
        try:
            yield runtime
        finally:
            worker.terminate()
            worker.join(5)


@dataclass
class _DecisionWindow:
    """When decisions were first and last counted: their rate without the simulated gates'
    start-up (a process spawn, and its city to unpickle)."""

    first: tuple[float, int] | None = None
    last: tuple[float, int] | None = None

    async def watch(self, runtime: Runtime) -> None:
        stats = runtime.lanes.stats
        counted = stats.captures
        while True:
            await asyncio.sleep(0.05)
            if stats.captures != counted:
                counted = stats.captures
                self.last = (time.monotonic(), counted)
                self.first = self.first or self.last

    def rate(self) -> float | None:
        if self.first is None or self.last is None or self.last[0] <= self.first[0]:
            return None
        return round((self.last[1] - self.first[1]) / (self.last[0] - self.first[0]), 1)


def waited_for_cpu_s(pid: int) -> float:
    """Seconds the process's threads have spent ready to run but waiting for a core (Linux
    schedstat; 0 where there is none): what the rest of a shared machine costs the process."""
    waited = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            waited += int((task / "schedstat").read_text().split()[1])
    return waited / 1e9


@dataclass
class _LaneCpu:
    """The lane process's CPU and its wait for a core over a run, and the machine's load: a
    run's latency read beside them tells the lane's own cost from a busy machine's."""

    cpu_s: float = field(default_factory=time.process_time)
    waited_s: float = field(default_factory=lambda: waited_for_cpu_s(os.getpid()))

    def figures(self, decisions: int) -> dict[str, Any]:
        cpu_s = time.process_time() - self.cpu_s
        return {
            "cpu_s": round(cpu_s, 1),
            "cpu_ms_per_decision": round(1000 * cpu_s / decisions, 2) if decisions else None,
            "waited_for_cpu_s": round(waited_for_cpu_s(os.getpid()) - self.waited_s, 1),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }


def _p99_first(latencies_ms: deque[float]) -> float | None:
    """p99 of the first decisions; None once the window has dropped them (a long run)."""
    if len(latencies_ms) == latencies_ms.maxlen:
        return None
    return percentiles(list(itertools.islice(latencies_ms, FIRST_DECISIONS)))["p99_ms"]


async def drive(
    runtime: Runtime, city: DemoCity, *, rate: float, duration_s: float, exit_share: float
) -> dict[str, Any]:
    """Simulated gates (their own process) send `rate` captures a second for `duration_s` to the
    running lane; returns its figures once this run's charges are done."""
    started = time.monotonic()
    lane_cpu = _LaneCpu()
    progress = asyncio.create_task(_progress(runtime, started))
    window = _DecisionWindow()
    watcher = asyncio.create_task(window.watch(runtime))
    loop = asyncio.get_running_loop()
    signing_key = command_key(runtime.settings)
    assert signing_key is not None, "lane_service() gives the lane a command key"
    server_key_text = public_key_text(signing_key)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as gates:
        report: SimReport = await loop.run_in_executor(
            gates,
            _simulate,
            runtime.endpoints.mqtt_url,
            server_key_text,
            runtime.settings.mqtt_topic_prefix,
            city.gates,
            city.inside,
            city.outside,
            rate,
            duration_s,
            exit_share,
        )
    elapsed = time.monotonic() - started
    lane_cpu_figures = lane_cpu.figures(runtime.lanes.stats.captures)
    progress.cancel()
    watcher.cancel()
    charged = await _wait_for_charges(runtime, report, timeout_s=30)
    wrong = await _wrong_plates(runtime, report)
    stats = runtime.lanes.stats
    return {
        "rate": rate,
        "duration_s": duration_s,
        "car_parks": len(city.car_park_ids),
        "captures_sent": report.sent,
        "decisions": stats.captures,
        "exits": report.exits,
        "throughput_per_s": round(stats.captures / elapsed, 1),
        # From the first decision to the last, the gates' start-up left out.
        "throughput_deciding_per_s": window.rate(),
        **percentiles(list(stats.latencies_ms)),
        f"p99_first_{FIRST_DECISIONS}_ms": _p99_first(stats.latencies_ms),
        "gate_round_trip": percentiles(report.round_trip_ms),
        "outcomes": dict(stats.outcomes),
        "errors": stats.failures + report.unanswered + stats.dead_letters,
        "commands_refused_by_gates": dict(report.command_refusals),
        "acks_refused_by_gates": dict(report.ack_refusals),
        "charged": charged["succeeded"],
        # Exits decided on a plate other than the car's own (the simulator knows the truth).
        "exits_wrong_plate": wrong["decided"],
        "exits_wrong_plate_charged": wrong["charged"],
        "charges_pending": charged["pending"],
        "lane_concurrency": runtime.settings.lane_concurrency,
        "lane_cpu": lane_cpu_figures,
    }


# The rights `--rights-share` hands out, in turn: a whitelist, a night pass (19:00-07:00),
# free minutes, a discount and a flat fee (all of the city's car parks, no cap on cars inside:
# the seeded stays took no pass's place at entry).
_BENCH_RIGHTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("bench whitelist", "free_passage", {}),
    ("bench night pass", "free_passage", {"window_start": "19:00", "window_end": "07:00"}),
    ("bench free minutes", "free_minutes", {"free_minutes": 60}),
    ("bench discount", "discount", {"discount_percent": 30}),
    ("bench flat fee", "flat_fee", {"flat_fee_fen": 500}),
)


async def seed_rights(runtime: Runtime, city: DemoCity, rng: random.Random, share: float) -> int:
    """Gives `share` of the cars parked in the city a right (one of _BENCH_RIGHTS), valid for a
    month around now; returns how many cars hold one."""
    vehicles = [vehicle for cars in city.inside.values() for vehicle, _ in cars]
    chosen = [v for v in vehicles if rng.random() < share]
    async with runtime.pool.acquire() as conn, conn.transaction():
        spec_ids = []
        for name, kind, terms in _BENCH_RIGHTS:
            spec_ids.append(
                await conn.fetchval(
                    """INSERT INTO right_specs (operator_id, name, kind, free_minutes,
                           discount_percent, flat_fee_fen, window_start, window_end, created_by)
                       VALUES ($1, $2, $3, $4, $5, $6, $7::text::time, $8::text::time, 'bench')
                       RETURNING id""",
                    city.operator_id,
                    f"{name} {city.run_id}",
                    kind,
                    terms.get("free_minutes"),
                    terms.get("discount_percent"),
                    terms.get("flat_fee_fen"),
                    terms.get("window_start"),
                    terms.get("window_end"),
                )
            )
        await conn.execute(
            """WITH cars AS (
                   SELECT plate, color, spec_id FROM unnest($1::text[], $2::text[], $3::bigint[])
                       AS c (plate, color, spec_id)
               ), ar AS (
                   INSERT INTO assigned_rights (spec_id, operator_id, valid_from, valid_until,
                                                label, created_by)
                   SELECT spec_id, $4, now() - interval '15 days', now() + interval '15 days',
                          plate || '/' || color, 'bench'
                   FROM cars RETURNING id, label)
               INSERT INTO assigned_right_plates (right_id, plate, color)
               SELECT id, split_part(label, '/', 1), split_part(label, '/', 2) FROM ar""",
            [v.plate for v in chosen],
            [v.color for v in chosen],
            [spec_ids[i % len(spec_ids)] for i in range(len(chosen))],
            city.operator_id,
        )
    return len(chosen)


async def exit_lookup_cost(runtime: Runtime, samples: int = 500) -> dict[str, Any]:
    """The exit's own lookup and pricing, timed apart from the queueing of a loaded machine:
    the stay's one query (`open_session_for_update`, which reads the rights and blacklist with
    the stay) and `exit_rule`, for open stays whose vehicle holds a right and for others,
    interleaved; and the same rows read with the query as it was before rights (stay and
    pay-later state only)."""
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT s.car_park_id, s.plate, s.plate_color,
                      EXISTS (SELECT 1 FROM assigned_right_plates rp
                              WHERE rp.plate = s.plate AND rp.color = s.plate_color) AS holder
               FROM sessions s WHERE s.status = 'open' AND s.fixed_fee_fen IS NULL"""
        )
        holders = [r for r in rows if r["holder"]][:samples]
        others = [r for r in rows if not r["holder"]][:samples]
        versions: dict[int, Any] = {}
        timings: dict[str, list[float]] = {"with_right": [], "without_right": [], "before": []}
        # The pre-rights query, for the same rows (parking/lanes/repository.py's parts).
        before = (
            f"SELECT {lanes_repo._STAY_COLUMNS}, {lanes_repo._PAY_LATER_COLUMNS}"
            f" FROM sessions s {lanes_repo.STAY_PAY_LATER_JOINS}"
            " WHERE s.car_park_id = $1 AND s.plate = $2 AND s.plate_color = $3"
            " AND s.status = 'open' FOR UPDATE OF s"
        )
        now = datetime.now(UTC)
        for holder, other in zip(holders, others, strict=False):
            for name, row in (("with_right", holder), ("without_right", other), ("before", other)):
                key = (row["car_park_id"], row["plate"], row["plate_color"])
                if key[0] not in versions:
                    versions[key[0]] = await fees.tariff_versions(conn, key[0])
                async with conn.transaction():
                    started = time.perf_counter()
                    if name == "before":
                        await conn.fetchrow(before, *key)
                    else:
                        stay = await lanes_repo.open_session_for_update(conn, *key)
                        assert stay is not None
                        exit_rule(
                            versions[key[0]],
                            entered_at=stay.entered_at,
                            at=now,
                            plate_color=stay.plate_color,
                            fixed_fee_fen=None,
                            pay_later_state=stay.pay_later,
                            reads_certain=True,
                            uncertain_policy="hold",
                            rights=stay.rights,
                            validation=stay.validation,
                        )
                    timings[name].append((time.perf_counter() - started) * 1000)
    return {name: {"n": len(t), **percentiles(t)} for name, t in timings.items()}


# The outbox worker's process (its CPU per feed delivery is reported).
OUTBOX_WORKER = "bench-outbox-worker"
# The feeds' receiver, like the abuse bench's clients (`parking_dev.abuse.CLIENTS_NICENESS`).
SUBSCRIBERS_NICENESS = 19
# Subscribers per company with --feeds (the 10: the city platform and 9 APDS ones).
FEED_SUBSCRIBERS = 10


def worker_cpu() -> float | None:
    """CPU seconds of the outbox worker's process so far (None: not found)."""
    for child in multiprocessing.active_children():
        if child.name == OUTBOX_WORKER and child.pid is not None:
            times = psutil.Process(child.pid).cpu_times()
            return float(times.user + times.system)
    return None


def _feed_receiver(port: int) -> None:
    """A subscriber that takes every delivery (its own process: not on the lane's loop), at
    the lowest priority: it stands for the subscribers' machines, elsewhere."""
    from aiohttp import web

    stand_elsewhere(SUBSCRIBERS_NICENESS)

    async def take(_: web.Request) -> web.Response:
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/{any}", take)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


@contextlib.contextmanager
def feed_receiver() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = multiprocessing.get_context("spawn").Process(
        target=_feed_receiver, args=(port,), daemon=True, name=f"{ELSEWHERE}-subscribers"
    )
    process.start()
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the feed receiver did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.join(5)


# What the bench's subscribers take (`subscribe_everyone`): "every" topic each, or a "mixed"
# city: the city platform every topic, a third of the APDS subscribers too (the operator's own
# systems: stays carry plates), the rest occupancy alone (navigation apps, other sign networks).
SUBSCRIBER_MIXES = ("mixed", "every")


async def subscribe_everyone(
    runtime: Runtime,
    city: DemoCity,
    url: str,
    subscribers: int = FEED_SUBSCRIBERS,
    mix: str = "every",
) -> int:
    """Each company: its city platform and `subscribers` - 1 APDS subscriptions, their topics
    by `mix` (`SUBSCRIBER_MIXES`)."""
    async with runtime.pool.acquire() as conn:
        created: int = await conn.fetchval(
            """WITH companies AS (SELECT DISTINCT operator_id FROM car_parks
                                  WHERE id = ANY ($1::bigint[])),
                    made AS (
                        INSERT INTO feed_subscriptions (operator_id, format, endpoint, secret,
                                                        topics)
                        SELECT operator_id, CASE WHEN n = 1 THEN 'city' ELSE 'apds' END,
                               $2 || '/' || n, 'bench-feed-secret',
                               CASE WHEN $4 = 'every' OR n <= 1 + ($3 - 1) / 3
                                    THEN ARRAY['occupancy', 'session_started', 'session_ended']
                                    ELSE ARRAY['occupancy'] END
                        FROM companies, generate_series(1, $3::int) AS n
                        ON CONFLICT DO NOTHING
                        RETURNING 1)
               SELECT count(*) FROM made""",
            list(city.car_park_ids),
            url,
            subscribers,
            mix,
        )
    return created


async def unsubscribe_everyone(runtime: Runtime, url: str) -> None:
    """Ends the subscriptions `subscribe_everyone` made to `url`."""
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE feed_subscriptions SET deleted_at = now() "
            "WHERE endpoint LIKE $1 || '/%' AND deleted_at IS NULL",
            url,
        )


@dataclass
class FeedLags:
    """The deliveries queued since a moment, once sent: each one's lag (queued -> recorded as
    sent, ms), stays' starts and ends apart from occupancy; what was left pending; the span from
    the first queued to the last sent; the outbox worker's CPU seconds meanwhile."""

    sessions: list[float]
    occupancy: list[float]
    pending: int
    span_s: float | None
    worker_cpu_s: float | None


async def feed_lags(
    runtime: Runtime,
    city: DemoCity,
    since: datetime | None,
    worker_cpu_s: float | None,
    timeout_s: float = 60,
) -> FeedLags:
    """Waits for the deliveries queued since `since` (None: ever) to be sent, and measures them;
    `worker_cpu_s`: the outbox worker's CPU seconds at `since` (`worker_cpu`)."""
    deadline = time.monotonic() + timeout_s
    where = "car_park_id = ANY ($1::bigint[]) AND ($2::timestamptz IS NULL OR created_at >= $2)"
    ids = list(city.car_park_ids)
    async with runtime.pool.acquire() as conn:
        while True:
            pending = await conn.fetchval(
                f"SELECT count(*) FROM feed_deliveries WHERE status = 'pending' AND {where}",
                ids,
                since,
            )
            if pending == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        rows = await conn.fetch(
            f"""SELECT topic = 'occupancy' AS occupancy,
                       extract(epoch FROM sent_at - created_at) * 1000 AS lag_ms
                FROM feed_deliveries WHERE status = 'sent' AND {where}""",
            ids,
            since,
        )
        span_s = await conn.fetchval(
            f"""SELECT extract(epoch FROM max(sent_at) - min(created_at))
                FROM feed_deliveries WHERE status = 'sent' AND {where}""",
            ids,
            since,
        )
    cpu_now = worker_cpu()
    return FeedLags(
        sessions=[float(r["lag_ms"]) for r in rows if not r["occupancy"]],
        occupancy=[float(r["lag_ms"]) for r in rows if r["occupancy"]],
        pending=pending,
        span_s=float(span_s) if span_s else None,
        worker_cpu_s=cpu_now - worker_cpu_s
        if cpu_now is not None and worker_cpu_s is not None
        else None,
    )


def feed_figures(runs: list[FeedLags]) -> dict[str, Any]:
    """The runs' deliveries together: lag percentiles, the rate sent and the worker's CPU per
    delivery (charging included)."""
    sent = sum(len(r.sessions) + len(r.occupancy) for r in runs)
    span_s = sum(r.span_s or 0.0 for r in runs)
    cpus = [r.worker_cpu_s for r in runs]
    cpu_s = None if None in cpus else sum(c or 0.0 for c in cpus)
    return {
        "sent": sent,
        "pending_after_run": sum(r.pending for r in runs),
        # From the first queued to the last sent (what one feed worker kept up with).
        "sent_per_s": round(sent / span_s, 1) if span_s else None,
        "worker_cpu_ms_per_delivery": round(1000 * cpu_s / sent, 3)
        if cpu_s is not None and sent
        else None,
        # A stay's start or end: queued by the lane's transaction, sent by the worker.
        "session_delivery_lag": percentiles([v for r in runs for v in r.sessions]),
        # Occupancy: due at most once per interval per car park and subscriber, by design.
        "occupancy_delivery_lag": percentiles([v for r in runs for v in r.occupancy]),
    }


async def run_bench(
    settings: Settings,
    provider: ProviderEndpoint,
    *,
    rate: float,
    duration_s: float,
    ocr_folder: Path | None = None,
    car_parks: int = 40,
    rights_share: float = 0.0,
    feeds_url: str | None = None,
) -> dict[str, Any]:
    rng = random.Random()
    exits_needed = int(rate * duration_s * 1.2) + 100
    if feeds_url is not None:
        # The receiver listens on loopback.
        settings = settings.model_copy(update={"feed_allow_loopback": True})
    if ocr_folder is None:
        settings = with_simulated_cameras(settings)
    async with lane_service(settings, provider) as runtime:
        if ocr_folder is not None:
            # Few distinct photos: cars leave and come back, both directions read by OCR.
            photos = _plate_photos(ocr_folder, rng)
            city: DemoCity = await seed_city(
                runtime.pool, rng, car_parks=car_parks, parked_share=0.8, vehicles=photos
            )
            exit_share = 0.5
            print("bench: warming the OCR process pool", file=sys.stderr)
            await runtime.lanes.reader.warm_up()
        else:
            city = await seed_city(
                runtime.pool, rng, drivers=exits_needed, car_parks=car_parks, parked_share=1.0
            )
            exit_share = 1.0
        with_rights = await seed_rights(runtime, city, rng, rights_share) if rights_share else 0
        await analyze(runtime)
        # The city was seeded after the lane started; a lane in service starts on its gates.
        await runtime.lanes.warm_up()
        print(
            f"bench: {len(city.car_park_ids)} car parks, "
            f"{sum(len(v) for v in city.inside.values())} cars inside; "
            f"{rate}/s for {duration_s}s",
            file=sys.stderr,
        )
        # Measured while the cars are all parked, before the load (which lets them out).
        lookup = await exit_lookup_cost(runtime) if rights_share else None
        subscriptions = (
            await subscribe_everyone(runtime, city, feeds_url) if feeds_url is not None else 0
        )
        worker_cpu_s = worker_cpu()
        figures = await drive(
            runtime, city, rate=rate, duration_s=duration_s, exit_share=exit_share
        )
        if feeds_url is not None:
            figures["feeds"] = {
                "subscriptions": subscriptions,
                **feed_figures([await feed_lags(runtime, city, None, worker_cpu_s)]),
            }
            # The database outlives the run: later benches must not feed a receiver that is
            # gone (its failing deliveries would load the lane they measure).
            await unsubscribe_everyone(runtime, feeds_url)
    return {
        "mode": "ocr" if ocr_folder is not None else "camera_read",
        **figures,
        "ocr_workers": settings.ocr_workers if ocr_folder is not None else 0,
        "rights_share": rights_share,
        "cars_with_rights": with_rights,
        "exit_lookup_ms": lookup,
    }
