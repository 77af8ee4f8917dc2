"""Infrastructure faults under gate traffic: the MQTT broker restarted, PostgreSQL stopped in
`immediate` mode (a crash: no checkpoint, connections cut) and started again, and a gate cut off
from the broker for a while.

Every test starts the server it breaks itself, on a free loopback port: its own Mosquitto, its
own PostgreSQL cluster. The machine's servers are never stopped or signalled. The lane service
and the outbox worker run in the test process (`parking.runtime.running`), the sandbox provider
too. Each test proves that every capture a gate sent took effect exactly once (one row, one
exit per stay, one charge and one provider order per pay-later stay, the ledger balanced), and
prints one JSON line with its counts and the recovery time (also appended to
`.artifacts/fault-results.jsonl`).
"""

import asyncio
import contextlib
import os
import random
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import structlog
from pydantic import SecretStr

from billing import ledger
from gate_controller.agent import AgentConfig, GateAgent
from gate_controller.barrier import SimulatedDisplay, SimulatedRelay
from gate_controller.camera import CameraEvent, QueueCameraSource
from gate_controller.mqtt import IncomingMessage, MqttClient
from gate_controller.protocol import DISPLAY_DEFAULTS, Topics
from parking.gates.config import (
    generate_private_key,
    private_key_pem,
    public_key_text,
    publish_configs,
)
from parking.infra import Endpoints
from parking.logging import configure_logging
from parking.runtime import ProviderEndpoint, Runtime, running
from parking.settings import Settings
from parking_dev import sandbox
from parking_dev.demo import DemoCity, ensure_command_key, seed_city
from tests.conftest import (
    MQTT_URL,
    REDIS_URL,
    Lot,
    create_lot,
    enter,
    eventually,
    make_driver,
    unique_plate,
)
from tests.faults import (
    PROVIDER_FAULTS,
    RecordingSimulator,
    check_effects,
    delete_keys,
    free_port,
    own_database,
    p99,
    record_result,
    wait_for_charges,
)
from tests.gates import GateProbe

pytestmark = pytest.mark.slow

PG_BIN = Path("/usr/lib/postgresql/15/bin")
# Gate traffic: a modest rate for a while, the fault in the middle of it.
RATE = 10.0
TRAFFIC_S = 20.0
FAULT_AT_S = 8.0
# The simulated gates resend an unanswered capture after this (a real gate: a few seconds).
RESEND_AFTER_S = 1.0
# The simulator's client waits this long for a PUBACK: a capture published while the broker
# is down waits in the client's queue until it returns, as it does in a gate's outbox.
SIM_ACK_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 30.0
CHARGES_TIMEOUT_S = 30.0


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Commands signed as in production, before the system starts: the simulated gates verify
    them."""
    ensure_command_key(settings)
    return settings


@pytest.fixture(autouse=True)
def service_logging() -> Iterator[None]:
    """Logs as `parking serve` does: plain tracebacks without local variables. structlog's
    default renders each traceback with its locals through rich, on the event loop: when an
    outage fails captures by the dozen that alone stalls the lane for seconds."""
    saved = structlog.get_config()
    configure_logging("WARNING")
    yield
    structlog.configure(**saved)


# Servers of the test's own


async def _wait_accepting(port: int, alive: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 15.0
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
        except (OSError, TimeoutError):
            if not alive() or time.monotonic() > deadline:
                raise AssertionError(f"{what} is not accepting connections on {port}") from None
            await asyncio.sleep(0.02)
            continue
        writer.close()
        await writer.wait_closed()
        return


class Mosquitto:
    """A broker of the test's own on a free loopback port; a restart keeps the port. No
    persistence: a restart loses every session, subscription and retained message."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.config = folder / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n",
            encoding="utf-8",
        )
        self.log_path = folder / "mosquitto.log"
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> datetime:
        """Starts it; returns when it accepts connections (that instant)."""
        if shutil.which("mosquitto") is None:
            pytest.skip("mosquitto is not installed")
        with self.log_path.open("ab") as log_file:
            self._process = await asyncio.create_subprocess_exec(
                "mosquitto",
                "-c",
                str(self.config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
            )
        process = self._process
        await _wait_accepting(self.port, lambda: process.returncode is None, "mosquitto")
        return datetime.now(UTC)

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10.0)
        except TimeoutError:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def own_mosquitto(folder: Path) -> AsyncIterator[Mosquitto]:
    broker = Mosquitto(folder)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


class OwnPostgres:
    """A PostgreSQL 15 cluster of the test's own (trust auth) on a free loopback port, in a
    folder owned by the `postgres` user when the tests run as root (PostgreSQL refuses to run
    as root)."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            pytest.skip(f"PostgreSQL 15 binaries not found in {PG_BIN}")
        self.as_postgres: list[str] = []
        self.folder = Path(tempfile.mkdtemp(prefix="parking-fault-pg-"))
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                shutil.rmtree(self.folder)
                pytest.skip("running as root without runuser: cannot run PostgreSQL as postgres")
            try:
                shutil.chown(self.folder, user="postgres", group="postgres")
            except (LookupError, OSError) as exc:
                shutil.rmtree(self.folder)
                pytest.skip(f"running as root and the folder cannot be given to postgres: {exc}")
            self.as_postgres = [runuser, "-u", "postgres", "--"]
        self.data = self.folder / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def _pg(self, *args: str) -> None:
        output = self.folder / "pg_ctl.out"
        with output.open("ab") as out:
            process = await asyncio.create_subprocess_exec(
                *self.as_postgres,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
            code = await process.wait()
        if code != 0:
            log = self.folder / "postgres.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(
                f"{args[0]} failed ({code}):\n{output.read_text(errors='replace')[-3000:]}\n{tail}"
            )

    async def init(self) -> None:
        await self._pg(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"
        )

    async def start(self) -> datetime:
        """Starts it (after a crash: recovery first); returns when it accepts connections."""
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        await self._pg(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "postgres.log"),
            "-o",
            options,
            "-w",
            "start",
        )
        return datetime.now(UTC)

    async def stop_immediately(self) -> None:
        """`pg_ctl -m immediate stop`: every backend quits at once, nothing is flushed or
        checkpointed; the next start recovers from the WAL."""
        await self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")

    async def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                await self.stop_immediately()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.asynccontextmanager
async def own_postgres() -> AsyncIterator[OwnPostgres]:
    server = OwnPostgres()
    try:
        await server.init()
        await server.start()
        yield server
    finally:
        await server.destroy()


@contextlib.asynccontextmanager
async def own_provider() -> AsyncIterator[tuple[ProviderEndpoint, sandbox.Sandbox]]:
    """A sandbox provider in this process whose books hold this test's orders only."""
    secret = uuid.uuid4().hex
    async with sandbox.running(PROVIDER_FAULTS, secret=secret) as (url, app):
        yield ProviderEndpoint(url, secret), app.state.sandbox


@contextlib.asynccontextmanager
async def system(
    settings: Settings, database_url: str, mqtt_url: str, provider: ProviderEndpoint, **kw: bool
) -> AsyncIterator[Runtime]:
    """The lane service and the outbox worker in this process; their Redis keys (the
    machine's Redis, under the test's own prefix) are deleted afterwards."""
    async with running(
        settings, Endpoints(database_url, REDIS_URL, mqtt_url), provider, **kw
    ) as runtime:
        try:
            yield runtime
        finally:
            await delete_keys(runtime.redis, settings.redis_key_prefix)


# Gate traffic


class TimedSimulator(RecordingSimulator):
    """Also notes when the first command for each capture arrived."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commanded_at: dict[uuid.UUID, datetime] = {}
        # See SIM_ACK_TIMEOUT_S: a publish during an outage waits instead of failing.
        self._mqtt.ack_timeout_s = SIM_ACK_TIMEOUT_S

    def _on_command(self, message: IncomingMessage) -> None:
        capture_id = orjson.loads(message.payload).get("capture_id")
        if capture_id is not None:
            self.commanded_at.setdefault(uuid.UUID(capture_id), datetime.now(UTC))
        super()._on_command(message)

    def sent_between(self, start: datetime, end: datetime) -> int:
        return sum(start <= c.sent_at <= end for c in self.sent_captures.values())

    def first_command_after(self, at: datetime) -> datetime | None:
        return min((t for t in self.commanded_at.values() if t > at), default=None)

    def round_trips_ms(self, when: Callable[[datetime, datetime], bool]) -> list[float]:
        """Capture first sent -> its first command, for the captures whose (first sent, first
        command) satisfy `when`."""
        return [
            (commanded - capture.sent_at).total_seconds() * 1000
            for capture_id, capture in self.sent_captures.items()
            if (commanded := self.commanded_at.get(capture_id)) is not None
            and when(capture.sent_at, commanded)
        ]


async def drive(sim: TimedSimulator, rate: float, duration_s: float) -> None:
    """The simulator's traffic, each car's captures in a task of its own: the gates keep
    capturing at `rate` while the broker or the database is away, and resend what is overdue."""
    interval = 1.0 / rate
    started = time.perf_counter()
    cars: list[asyncio.Task[None]] = []
    n = 0
    next_resend = started
    while (elapsed := time.perf_counter() - started) < duration_s:
        cars.append(asyncio.create_task(sim.step()))
        n += 1
        if time.perf_counter() >= next_resend:
            next_resend = time.perf_counter() + 0.5
            await sim._resend_overdue()
        await asyncio.sleep(max(0.0, n * interval - elapsed))
    await asyncio.gather(*cars)


@dataclass
class Fault:
    """When the server went away and when it accepted connections again."""

    down_at: datetime | None = None
    back_at: datetime | None = None

    def window(self) -> tuple[datetime, datetime]:
        assert self.down_at is not None and self.back_at is not None, "the fault never happened"
        return self.down_at, self.back_at


async def traffic_with_fault(
    sim: TimedSimulator,
    stop: Callable[[], Awaitable[None]],
    start: Callable[[], Awaitable[datetime]],
    down_s: float,
) -> Fault:
    """Gate traffic for TRAFFIC_S; FAULT_AT_S into it the server stops for `down_s`."""
    fault = Fault()

    async def break_and_mend() -> None:
        await asyncio.sleep(FAULT_AT_S)
        fault.down_at = datetime.now(UTC)
        await stop()
        await asyncio.sleep(down_s)
        fault.back_at = await start()

    await asyncio.gather(drive(sim, RATE, TRAFFIC_S), break_and_mend())
    await sim.drain(DRAIN_TIMEOUT_S)
    return fault


def latency_figures(sim: TimedSimulator, fault: Fault) -> dict[str, Any]:
    """Recovery (server back -> first command), the backlog (server back -> every capture sent
    before then answered), and the gate round trip p99 before the fault (sent and answered
    before it) and after the backlog cleared."""
    down_at, back_at = fault.window()
    first = sim.first_command_after(back_at)
    answered = [
        commanded
        for capture_id, capture in sim.sent_captures.items()
        if capture.sent_at < back_at and (commanded := sim.commanded_at.get(capture_id))
    ]
    backlog_cleared = max([back_at, *answered])
    before = sim.round_trips_ms(lambda _, commanded: commanded < down_at)
    after = sim.round_trips_ms(lambda sent, _: sent > backlog_cleared)
    return {
        "recovery_ms": None if first is None else round((first - back_at).total_seconds() * 1000),
        "backlog_cleared_ms": round((backlog_cleared - back_at).total_seconds() * 1000),
        "round_trip_p99_ms_before": p99(before),
        "round_trip_p99_ms_after": p99(after),
        "captures_answered_before": len(before),
        "captures_sent_after": len(after),
    }


async def city_and_gates(
    runtime: Runtime, settings: Settings, mqtt_url: str
) -> tuple[DemoCity, TimedSimulator]:
    """Two car parks, 320 drivers (70 % pay-later), half of them parked, and their gates."""
    city = await seed_city(runtime.pool, random.Random(5), drivers=320, car_parks=2)
    sim = TimedSimulator(
        mqtt_url,
        city.gates,
        city.inside,
        city.outside,
        server_key=ensure_command_key(settings),
        topic_prefix=settings.mqtt_topic_prefix,
        resend_after_s=RESEND_AFTER_S,
        seed=13,
    )
    return city, sim


# 1. The broker restarts under load


async def test_broker_restart_under_load_loses_no_capture_and_doubles_no_effect(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with (
        own_mosquitto(tmp_path) as broker,
        own_database() as database_url,
        own_provider() as (provider, books),
        system(settings, database_url, broker.url, provider) as runtime,
    ):
        city, sim = await city_and_gates(runtime, settings, broker.url)
        async with sim:
            fault = await traffic_with_fault(sim, broker.stop, broker.start, down_s=2.0)
        assert runtime.mqtt.connected, "the lane service's client reconnected"
        pending = await wait_for_charges(runtime.pool, CHARGES_TIMEOUT_S)
        effects = await check_effects(runtime.pool, sim, city, books)
        record_result(
            "mosquitto_restart",
            {
                "captures_sent": effects.sent,
                "captures_decided": effects.decided,
                "resent": sim.report.resent,
                "unacked": sim.report.unanswered,
                "effects": sum(runtime.lanes.stats.outcomes.values()),
                "charges": effects.charges,
                "charges_pending": pending,
                "lost": len(effects.lost),
                "duplicates": effects.double_effects,
                "lane_failures": runtime.lanes.stats.failures,
                **latency_figures(sim, fault),
            },
            capsys,
        )
    assert sim.sent_between(*fault.window()) > 0, "the gates kept capturing without a broker"
    assert sim.report.unanswered == 0, "every capture was answered once the broker returned"
    assert pending == 0
    effects.assert_exactly_once()
    assert effects.charges > 0, "the traffic charged some pay-later exits"


# 2. PostgreSQL crashes and comes back


async def _listening_backends(pool: asyncpg.Pool) -> int:
    """Backends whose last statement was a LISTEN (the outbox worker's wake-up channel)."""
    count: int = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%' AND pid <> "
        "pg_backend_pid()"
    )
    return count


async def test_postgres_immediate_restart_mid_stream_every_capture_takes_effect_once(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Jobs in hand when the database went away are released by the worker once it is back,
    # but a claim that committed while its connection died is known to nobody: only its lease
    # (PARKING_WORKER_LEASE_S, 60 s by default) frees it. A short lease keeps the test short.
    settings = settings.model_copy(update={"worker_lease_s": 5.0})
    async with (
        own_postgres() as postgres,
        own_provider() as (provider, books),
        system(settings, postgres.url, MQTT_URL, provider) as runtime,
    ):
        city, sim = await city_and_gates(runtime, settings, MQTT_URL)
        listening_before = await _listening_backends(runtime.pool)
        async with sim:
            fault = await traffic_with_fault(
                sim, postgres.stop_immediately, postgres.start, down_s=3.0
            )
        # The pools reconnect by themselves: both answer without anyone resetting them.
        assert await runtime.pool.fetchval("SELECT 1") == 1
        assert await runtime.outbox.pool.fetchval("SELECT 1") == 1
        pending = await wait_for_charges(runtime.pool, CHARGES_TIMEOUT_S)
        effects = await check_effects(runtime.pool, sim, city, books)
        listening_after = await _listening_backends(runtime.pool)
        record_result(
            "postgres_immediate_restart",
            {
                "captures_sent": effects.sent,
                "captures_decided": effects.decided,
                "resent": sim.report.resent,
                "unacked": sim.report.unanswered,
                # Captures that failed while the database was away: not acked, resent.
                "lane_failures": runtime.lanes.stats.failures,
                "effects": sum(runtime.lanes.stats.outcomes.values()),
                "charges": effects.charges,
                "charges_pending": pending,
                "lost": len(effects.lost),
                "duplicates": effects.double_effects,
                "outbox_listeners_before": listening_before,
                "outbox_listeners_after": listening_after,
                **latency_figures(sim, fault),
            },
            capsys,
        )
    assert sim.sent_between(*fault.window()) > 0
    assert runtime.lanes.stats.failures > 0, "captures did fail while the database was down"
    assert sim.report.resent > 0, "and the gates sent them again"
    assert sim.report.unanswered == 0, "every capture was answered once the database returned"
    assert pending == 0
    effects.assert_exactly_once()
    assert effects.charges > 0, "the traffic charged some pay-later exits"


async def test_the_outbox_worker_listens_again_after_a_database_restart(
    settings: Settings,
) -> None:
    async with (
        own_postgres() as postgres,
        own_provider() as (provider, _),
        system(settings, postgres.url, MQTT_URL, provider, lanes=False) as runtime,
    ):

        async def listening() -> bool:
            # The charges' worker and the feeds' deliveries' worker, each on its connection.
            return await _listening_backends(runtime.pool) == 2

        await eventually(listening)
        await postgres.stop_immediately()
        await postgres.start()
        await eventually(listening, timeout_s=5.0)


# 3. A gate cut off from the broker


SERVER_KEY = generate_private_key()
HOLD_TEXT = DISPLAY_DEFAULTS["offline_hold"]
CUT_OFF_S = 3.0
FEE_FEN = 1200  # 90 minutes at ¥6 per started hour (create_lot's tariff)


async def until(
    predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05
) -> Any:
    async def probe() -> Any:
        return predicate()

    return await eventually(probe, timeout_s, interval_s)


def exit_read(plate: str) -> CameraEvent:
    return CameraEvent("out", datetime.now(UTC), plate, "blue", 0.98)


def outbox_on_disk(path: Path) -> list[tuple[str, str, str]]:
    """The agent's unacked captures as its SQLite file holds them: (id, decided by, action)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT capture_id, decided_by, action FROM captures WHERE acked_at IS NULL "
            "ORDER BY seq"
        ).fetchall()
    return [(str(a), str(b), str(c)) for a, b, c in rows]


@dataclass
class ExitLane:
    """An exit gate's edge agent on the test's own broker, with the lane service and the
    outbox worker behind it, and cars parked for 90 minutes: `payers` on pay-later (on the
    signed whitelist the agent holds) and `unbound` ones."""

    broker: Mosquitto
    runtime: Runtime
    books: sandbox.Sandbox
    lot: Lot
    payers: list[str]
    unbound: list[str]
    agent: GateAgent
    relay: SimulatedRelay
    display: SimulatedDisplay
    outbox_path: Path

    def decided(self) -> int:
        return sum(self.runtime.lanes.stats.outcomes.values())

    async def cut_off(self) -> datetime:
        """Stops the broker; returns once the gate and the lane service lost it."""
        cut_at = datetime.now(UTC)
        await self.broker.stop()
        await until(lambda: not self.agent.mqtt.connected and not self.runtime.mqtt.connected)
        return cut_at

    async def stored(self, capture_ids: list[uuid.UUID]) -> dict[uuid.UUID, asyncpg.Record]:
        async with self.runtime.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT c.capture_id, c.offline, c.offline_action, c.outcome, c.captured_at,
                          s.status, s.settlement, s.exited_at
                   FROM captures c LEFT JOIN sessions s ON s.exit_capture_id = c.capture_id
                   WHERE c.capture_id = ANY($1::uuid[])""",
                capture_ids,
            )
        return {r["capture_id"]: r for r in rows}


@contextlib.asynccontextmanager
async def exit_lane(
    settings: Settings, tmp_path: Path, *, payers: int, unbound: int
) -> AsyncIterator[ExitLane]:
    prefix = settings.mqtt_topic_prefix
    # The service signs its commands and acks with the key the gate trusts.
    settings = settings.model_copy(
        update={"gate_config_key": SecretStr(private_key_pem(SERVER_KEY))}
    )
    async with (
        own_mosquitto(tmp_path) as broker,
        own_database() as database_url,
        own_provider() as (provider, books),
        system(settings, database_url, broker.url, provider) as runtime,
        GateProbe(broker.url, prefix) as entry_gate,
    ):
        lot = await create_lot(runtime)
        paying = [(await make_driver(runtime, unique_plate())).plate for _ in range(payers)]
        others = [unique_plate() for _ in range(unbound)]
        for plate in paying + others:
            await enter(runtime, entry_gate, lot, plate, parked_for=timedelta(minutes=90))
        await publish_configs(runtime.pool, runtime.mqtt, settings, SERVER_KEY)
        config = AgentConfig(
            lot=lot.code,
            gate="out1",
            direction="out",
            server_public_key=public_key_text(SERVER_KEY),
            outbox_path=tmp_path / "outbox.sqlite3",
            mqtt_url=broker.url,
            topic_prefix=prefix,
            client_id=f"gate-test-{uuid.uuid4().hex[:8]}",
            offline_after_s=0.3,
            heartbeat_s=0.5,
            resend_after_s=0.3,
            resend_max_s=1.0,
        )
        relay, display = SimulatedRelay(), SimulatedDisplay()
        async with GateAgent(config, QueueCameraSource(), relay, display) as agent:
            held = await until(lambda: agent.whitelist.config)
            assert sorted(entry.plate for entry in held.whitelist) == sorted(paying)
            yield ExitLane(
                broker,
                runtime,
                books,
                lot,
                paying,
                others,
                agent,
                relay,
                display,
                config.outbox_path,
            )


async def test_a_gate_cut_off_decides_alone_and_each_offline_capture_takes_effect_once(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with exit_lane(settings, tmp_path, payers=2, unbound=1) as lane:
        agent, runtime = lane.agent, lane.runtime
        plates = [lane.payers[0], lane.unbound[0], lane.payers[1]]
        decided_before = lane.decided()
        cut_at = await lane.cut_off()
        # The cars come once the gate knows it is cut off (no link for longer than
        # offline_after_s), so it decides at once; a car captured just as the link drops has
        # its own test below.
        await asyncio.sleep(agent.config.offline_after_s * 2)
        captures = [await agent.capture(exit_read(plate)) for plate in plates]
        await until(lambda: len(lane.display.shown) == 3)
        # Alone: the two whitelisted payers go out, the unbound car waits for the booth.
        assert [o.reason for o in lane.relay.openings] == ["offline_exit", "offline_exit"]
        assert lane.display.shown[1] == [HOLD_TEXT]
        await asyncio.sleep(CUT_OFF_S)  # and stays cut off for a while
        ids = [str(c.capture_id) for c in captures]
        assert outbox_on_disk(lane.outbox_path) == [
            (ids[0], "offline", "open"),
            (ids[1], "offline", "hold"),
            (ids[2], "offline", "open"),
        ]

        back_at = await lane.broker.start()
        await until(lambda: agent.store.length() == 0, timeout_s=30.0)
        drained_ms = (datetime.now(UTC) - back_at).total_seconds() * 1000
        assert outbox_on_disk(lane.outbox_path) == []
        # Late answers to what the gate already did lift nothing again.
        await asyncio.sleep(0.5)
        openings = [o.reason for o in lane.relay.openings]
        decided = lane.decided() - decided_before

        pending = await wait_for_charges(runtime.pool, CHARGES_TIMEOUT_S)
        stored = await lane.stored([c.capture_id for c in captures])
        async with runtime.pool.acquire() as conn:
            open_stays = await conn.fetch(
                "SELECT plate FROM sessions WHERE car_park_id = $1 AND status = 'open'",
                lane.lot.id,
            )
            charges = await conn.fetch(
                "SELECT c.id, c.status, c.amount_fen, c.idempotency_key, s.exit_capture_id "
                "FROM charges c JOIN sessions s ON s.id = c.session_id WHERE s.car_park_id = $1",
                lane.lot.id,
            )
            settled = await conn.fetch(
                "SELECT charge_id, count(DISTINCT transaction_id) AS n FROM ledger_entries "
                "WHERE kind = 'charge_settled' AND charge_id = ANY($1) GROUP BY charge_id",
                [c["id"] for c in charges],
            )
            balanced = await ledger.is_balanced(conn)
        orders = lane.books.book.orders()
        record_result(
            "gate_cut_off",
            {
                "captures_sent": len(captures),
                "captures_decided": len(stored),
                "offline_opened": openings.count("offline_exit"),
                "offline_held": len(captures) - openings.count("offline_exit"),
                "effects": decided,
                "charges": len(charges),
                "provider_orders": len(orders),
                "lost": len(captures) - len(stored),
                "duplicates": max(0, decided - len(captures))
                + max(0, len(orders) - len(charges))
                + sum(r["n"] - 1 for r in settled),
                "cut_off_ms": round((back_at - cut_at).total_seconds() * 1000),
                "recovery_ms": round(drained_ms),
            },
            capsys,
        )

    # Each offline capture arrived once, flagged with what the gate did, and was decided once.
    assert decided == 3, "each capture decided once; resends were answered as duplicates"
    assert [
        (
            stored[c.capture_id]["offline"],
            stored[c.capture_id]["offline_action"],
            stored[c.capture_id]["outcome"],
        )
        for c in captures
    ] == [
        (True, "open", "exited_pay_later"),
        (True, "hold", "exited_offline_booth"),
        (True, "open", "exited_pay_later"),
    ]
    assert openings == ["offline_exit", "offline_exit"], "the barrier lifted once per payer"
    # The stays match what the gate did: the payers left when it let them out; the unbound car
    # the gate sent to the booth awaits the booth's payment (an operator sees it), never a
    # pay-later charge.
    for capture in (captures[0], captures[2]):
        row = stored[capture.capture_id]
        assert (row["status"], row["settlement"]) == ("closed", "pay_later")
        assert abs((row["exited_at"] - capture.captured_at).total_seconds()) < 1
    booth = stored[captures[1].capture_id]
    assert (booth["status"], booth["settlement"]) == ("closed", "offline_booth")
    assert open_stays == []
    # Each payer charged exactly once: one charge, one provider order, one settlement.
    assert pending == 0
    assert sorted(c["exit_capture_id"] for c in charges) == sorted(
        [captures[0].capture_id, captures[2].capture_id]
    )
    assert [(c["status"], c["amount_fen"]) for c in charges] == [("succeeded", FEE_FEN)] * 2
    assert sorted(o.out_trade_no for o in orders) == sorted(c["idempotency_key"] for c in charges)
    assert all(o.status == "succeeded" for o in orders)
    assert sorted(r["n"] for r in settled) == [1, 1]
    assert balanced


async def test_a_capture_taken_as_the_link_drops_is_uploaded_flagged_offline(
    settings: Settings, tmp_path: Path
) -> None:
    async with exit_lane(settings, tmp_path, payers=1, unbound=0) as lane:
        agent = lane.agent
        cut = time.monotonic()
        stopping = asyncio.create_task(lane.broker.stop())
        # The car is read the moment the gate's client sees the link gone.
        await until(lambda: not agent.mqtt.connected, interval_s=0.001)
        capture = await agent.capture(exit_read(lane.payers[0]))
        await stopping
        await until(lambda: lane.relay.openings)
        assert [o.reason for o in lane.relay.openings] == ["offline_exit"]

        # Back before the agent's next connection attempt (1.5 s after the cut), so that a
        # watcher is subscribed to its captures when it reconnects.
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - cut)))
        await lane.broker.start()
        sent: list[dict[str, Any]] = []
        watcher = MqttClient(lane.broker.url, f"watcher-{uuid.uuid4().hex[:8]}")
        await watcher.start()
        try:
            topic = Topics(settings.mqtt_topic_prefix).topic(agent.address, "capture")
            await watcher.subscribe(
                topic, lambda message: sent.append(orjson.loads(message.payload))
            )
            await until(lambda: agent.store.length() == 0, timeout_s=30.0)
        finally:
            await watcher.stop()
        stored = (await lane.stored([capture.capture_id]))[capture.capture_id]
    ours = [c for c in sent if c["capture_id"] == str(capture.capture_id)]
    assert ours and all(c["offline"] for c in ours), "only the flagged capture is sent"
    assert (stored["offline"], stored["offline_action"]) == (True, "open")
    # The stay ends when the gate let the car out, not when the link came back.
    assert abs((stored["exited_at"] - capture.captured_at).total_seconds()) < 0.5
