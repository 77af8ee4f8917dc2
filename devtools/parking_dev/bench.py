"""`parking-dev bench`: exit decisions under load, measured the way DESIGN.md states the targets.

Latency is capture received by the lane service -> command acknowledged by the broker
(`decision`), and publish by the gate -> command received by the gate (`gate_round_trip`).
The simulated gates run in their own process so that they do not share the lane's event loop.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
from pydantic import SecretStr

from gate_controller.simulator import GateSimulator, SimGate, SimReport, Vehicle
from parking.gates.config import generate_private_key, private_key_pem
from parking.infra import Endpoints, endpoints
from parking.logging import configure_from, configure_logging
from parking.runtime import ProviderEndpoint, Runtime, running
from parking.settings import Settings
from parking_dev import sandbox
from parking_dev.demo import DemoCity, percentiles, seed_city

# Niceness of the outbox worker and the simulated provider during a bench run.
DEFERRED_WORK_NICENESS = 10
# The decisions right after the lane started, reported apart: a cold start shows there.
FIRST_DECISIONS = 200


def _simulate(
    mqtt_url: str,
    prefix: str,
    gates: list[SimGate],
    inside: dict[str, list[tuple[Vehicle, Any]]],
    outside: list[Vehicle],
    rate: float,
    duration_s: float,
    exit_share: float,
) -> SimReport:
    """Runs in a separate process: the gates' side of the benchmark."""
    configure_logging("WARNING")

    async def go() -> SimReport:
        async with GateSimulator(
            mqtt_url,
            gates,
            inside,
            outside,
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
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.1)
        yield ProviderEndpoint(f"http://127.0.0.1:{port}", secret)
    finally:
        process.terminate()
        process.join(5)


def _plate_photos(folder: Path, rng: random.Random) -> list[Vehicle]:
    """Vehicles whose plates are the cropped photos of a labels.csv folder."""
    seen: set[str] = set()
    vehicles = []
    with (folder / "labels.csv").open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["kind"] != "crop" or row["plate"] in seen:
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


@contextlib.asynccontextmanager
async def lane_service(settings: Settings, provider: ProviderEndpoint) -> AsyncIterator[Runtime]:
    """The system under measurement: the lane service in this process, the outbox worker in its
    own (charging is deferred work and must not slow the gates). Its commands are signed as in
    production: with a key of its own when none is configured."""
    if settings.gate_config_key is None:
        settings.gate_config_key = SecretStr(private_key_pem(generate_private_key()))
    async with (
        endpoints(settings) as eps,
        running(settings, eps, provider, outbox_worker=False) as runtime,
    ):
        worker = multiprocessing.get_context("spawn").Process(
            target=_outbox_worker,
            args=(settings.model_dump(exclude={"mqtt_client_id"}), eps, provider),
            daemon=True,
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
    progress = asyncio.create_task(_progress(runtime, started))
    window = _DecisionWindow()
    watcher = asyncio.create_task(window.watch(runtime))
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as gates:
        report: SimReport = await loop.run_in_executor(
            gates,
            _simulate,
            runtime.endpoints.mqtt_url,
            runtime.settings.mqtt_topic_prefix,
            city.gates,
            city.inside,
            city.outside,
            rate,
            duration_s,
            exit_share,
        )
    elapsed = time.monotonic() - started
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
        "charged": charged["succeeded"],
        # Exits decided on a plate other than the car's own (the simulator knows the truth).
        "exits_wrong_plate": wrong["decided"],
        "exits_wrong_plate_charged": wrong["charged"],
        "charges_pending": charged["pending"],
        "lane_concurrency": runtime.settings.lane_concurrency,
    }


async def run_bench(
    settings: Settings,
    provider: ProviderEndpoint,
    *,
    rate: float,
    duration_s: float,
    ocr_folder: Path | None = None,
    car_parks: int = 40,
) -> dict[str, Any]:
    rng = random.Random()
    exits_needed = int(rate * duration_s * 1.2) + 100
    if ocr_folder is None and "camera_default_calibrated" not in settings.model_fields_set:
        # The simulated cameras' scores are the ones we give them: calibrated by construction,
        # so their charges go to the provider as a calibrated camera model's do (with photos,
        # charges on the server's reads are verified by the worker, as in production).
        settings = settings.model_copy(update={"camera_default_calibrated": True})
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
        # The city was seeded after the lane started; a lane in service starts on its gates.
        await runtime.lanes.warm_up()
        print(
            f"bench: {len(city.car_park_ids)} car parks, "
            f"{sum(len(v) for v in city.inside.values())} cars inside; "
            f"{rate}/s for {duration_s}s",
            file=sys.stderr,
        )
        figures = await drive(
            runtime, city, rate=rate, duration_s=duration_s, exit_share=exit_share
        )
    return {
        "mode": "ocr" if ocr_folder is not None else "camera_read",
        **figures,
        "ocr_workers": settings.ocr_workers if ocr_folder is not None else 0,
    }
