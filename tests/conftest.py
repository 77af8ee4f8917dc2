"""Test fixtures on real servers: the machine's PostgreSQL, Redis and MQTT broker.

Each test session creates its own database (dropped at the end), uses its own Redis database
number, and puts its gate topics under a unique prefix, so runs never see each other's data.
Override the servers with PARKING_TEST_DATABASE_URL / _REDIS_URL / _MQTT_URL; `./scripts/test`
sets them to throwaway servers of its own where nothing listens (scripts/test_servers.py).
"""

import asyncio
import contextlib
import itertools
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from redis.asyncio import Redis

from billing import agreements
from billing.tariff import Tariff
from parking.admin import repository as admin
from parking.app import create_app, server_config
from parking.auth import repository as auth_repo
from parking.auth.tokens import Role, hash_password
from parking.infra import Endpoints
from parking.logging import configure_logging
from parking.migrate import migrate
from parking.runtime import ProviderEndpoint, Runtime, running
from parking.settings import Settings
from parking_dev import sandbox
from plate_recognition.calibration import certain_threshold
from tests.gates import GateProbe


def pytest_configure(config: pytest.Config) -> None:
    """The services' log configuration for the whole run, as every process of ours has it
    (masked, on stderr): unconfigured, structlog prints to stdout, where a background worker's
    line lands in the middle of a command's JSON output a test reads."""
    configure_logging("INFO")


ADMIN_DSN = os.environ.get(
    "PARKING_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PARKING_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
MQTT_URL = os.environ.get("PARKING_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")


def _dsn_for(database: str) -> str:
    base, _, _ = ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture(scope="session")
async def migrated_template() -> AsyncIterator[str]:
    """A database migrated once, never connected to again: each test module's database is a
    copy of it (`database_url`)."""
    name = f"parking_template_{uuid.uuid4().hex[:10]}"
    admin_conn = await asyncpg.connect(ADMIN_DSN)
    await admin_conn.execute(f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(_dsn_for(name))
    try:
        await migrate(conn)
    finally:
        await conn.close()
    try:
        yield name
    finally:
        await admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin_conn.close()


@pytest.fixture(scope="module")
async def database_url(migrated_template: str) -> AsyncIterator[str]:
    """A database of the test module's own. The fixture photos' plates are the same in every
    module, and a stay one module left (closed a moment ago, say) would be the same car's
    earlier stay to the next module's backdated entry of that plate: a run in another order
    decided differently (test_charge_verification after test_lane_reading did)."""
    name = f"parking_test_{uuid.uuid4().hex[:10]}"
    admin_conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin_conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{migrated_template}"')
        yield _dsn_for(name)
    finally:
        await admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin_conn.close()


# The session-wide sandbox's faults; a test may decline its own drivers' agreements.
SANDBOX_FAULTS = sandbox.FaultConfig(processing_delay_s=0.01, notify_retry_s=(0.1,))
SANDBOX_SECRET = uuid.uuid4().hex


@pytest.fixture(scope="session")
async def provider() -> AsyncIterator[ProviderEndpoint]:
    async with sandbox.running(SANDBOX_FAULTS, secret=SANDBOX_SECRET) as (url, _):
        yield ProviderEndpoint(url, SANDBOX_SECRET)


@pytest.fixture
def settings() -> Settings:
    return Settings(
        database_url=None,
        redis_url=None,
        mqtt_url=None,
        mqtt_topic_prefix=f"test-{uuid.uuid4().hex[:8]}",
        redis_key_prefix=f"test-{uuid.uuid4().hex[:8]}:",
        mqtt_client_id=f"lanes-{uuid.uuid4().hex[:8]}",
        lane_concurrency=4,
        worker_poll_interval_s=0.1,
        charge_retry_base_s=0.05,
        charge_query_after_s=0.1,
        dev_adapters=True,
        # The feed tests' receivers listen on loopback.
        feed_allow_loopback=True,
        # The tests' cameras report the scores a test gives them: taken as calibrated, so a
        # certain read is proven and a charge on it needs no second reader. The tests of the
        # second reader (test_charge_verification.py) turn this off, as production has it.
        camera_default_calibrated=True,
        # No API server in most tests: the provider's notifications go nowhere and the worker
        # learns outcomes by order query; tests of notifications serve the API themselves.
        public_base_url="http://127.0.0.1:9",
    )


@pytest.fixture
async def runtime(
    settings: Settings, database_url: str, provider: ProviderEndpoint
) -> AsyncIterator[Runtime]:
    eps = Endpoints(database_url, REDIS_URL, MQTT_URL)
    async with running(settings, eps, provider) as rt:
        yield rt


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def gate(settings: Settings) -> AsyncIterator[GateProbe]:
    async with GateProbe(MQTT_URL, settings.mqtt_topic_prefix) as probe:
        yield probe


@dataclass
class Lot:
    id: int
    code: str
    name: str
    operator_id: int


@pytest.fixture
async def lot(runtime: Runtime) -> Lot:
    return await create_lot(runtime)


async def create_lot(runtime: Runtime) -> Lot:
    """A car park with one entry and one exit gate; no free minutes, ¥6 per started hour,
    ¥50 a day."""
    code = f"lot-{uuid.uuid4().hex[:8]}"
    name = "测试停车场"
    async with runtime.pool.acquire() as conn, conn.transaction():
        operator_id = await admin.create_operator(conn, f"测试运营-{code}")
        car_park_id = await admin.create_car_park(
            conn, operator_id=operator_id, code=code, name=name, capacity=50
        )
        await admin.create_gate(conn, car_park_id, "in1", "in")
        await admin.create_gate(conn, car_park_id, "out1", "out")
        await admin.create_tariff(
            conn,
            car_park_id,
            effective_from=datetime.now(UTC) - timedelta(days=365),
            tariff=Tariff.hourly(free_minutes=0, hourly_fen=600, daily_cap_fen=5000),
        )
    return Lot(car_park_id, code, name, operator_id)


async def located_car_park(
    runtime: Runtime,
    latitude: float,
    longitude: float,
    *,
    name: str | None = None,
    capacity: int = 20,
) -> str:
    """A car park of a company of its own at the point, with no gates and no tariff."""
    code = f"geo-{uuid.uuid4().hex[:8]}"
    async with runtime.pool.acquire() as conn, conn.transaction():
        operator_id = await admin.create_operator(conn, f"运营-{code}")
        await admin.create_car_park(
            conn,
            operator_id=operator_id,
            code=code,
            name=name or f"停车场 {code}",
            capacity=capacity,
            latitude=latitude,
            longitude=longitude,
        )
    return code


@dataclass
class Driver:
    account_id: int
    plate: str
    agreement_id: int | None


async def make_driver(
    runtime: Runtime,
    plate: str,
    *,
    pay_later: bool = True,
    limit_fen: int = 20_000,
    provider: str = "sandbox",
    agreement_no: str | None = None,
) -> Driver:
    async with runtime.pool.acquire() as conn, conn.transaction():
        account_id = await admin.create_account(conn, f"+86-{uuid.uuid4().hex[:12]}")
        await admin.bind_plate(conn, account_id, plate, "blue")
        agreement_id = None
        if pay_later:
            agreement_id = await agreements.sign(
                conn,
                account_id,
                provider=provider,
                agreement_no=agreement_no or f"AGR-{uuid.uuid4().hex[:12]}",
                per_session_limit_fen=limit_fen,
            )
    return Driver(account_id, plate, agreement_id)


async def backdate_entry(runtime: Runtime, lot: Lot, plate: str, by: timedelta) -> None:
    """Moves an open stay's entry into the past, as if the car had been parked that long; the
    plate's binding and agreement, made before it came in, move back with it (a stay is charged
    pay-later only to a binding and agreement that existed when it began)."""
    async with runtime.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """UPDATE sessions SET entered_at = entered_at - $3::interval
               WHERE car_park_id = $1 AND plate = $2 AND status = 'open'""",
            lot.id,
            plate,
            by,
        )
        await conn.execute(
            """WITH b AS (
                   UPDATE plate_bindings SET bound_at = bound_at - $2::interval
                   WHERE plate = $1 AND unbound_at IS NULL RETURNING account_id)
               UPDATE pay_later_agreements SET signed_at = signed_at - $2::interval
               WHERE account_id IN (SELECT account_id FROM b) AND cancelled_at IS NULL""",
            plate,
            by,
        )


async def stay_status(runtime: Runtime, lot: Lot, plate: str) -> str | None:
    """The status of the plate's (only) stay in the car park."""
    async with runtime.pool.acquire() as conn:
        status: str | None = await conn.fetchval(
            "SELECT status FROM sessions WHERE car_park_id = $1 AND plate = $2", lot.id, plate
        )
    return status


async def enter(
    runtime: Runtime,
    gate: GateProbe,
    lot: Lot,
    plate: str,
    *,
    parked_for: timedelta = timedelta(minutes=90),
    confidence: float = 0.98,
    color: str = "blue",
) -> None:
    """The car enters through the lot's entry gate, read by the camera at `confidence` in
    `color`, and has been parked for `parked_for`."""
    capture = gate.capture("in", plate, confidence=confidence, color=color)
    command = await gate.decide(lot.code, "in1", capture)
    assert command["action"] == "open", command
    await backdate_entry(runtime, lot, plate, parked_for)


async def set_car_park(runtime: Runtime, lot: Lot, **columns: object) -> None:
    """Sets the car park's columns (its policies) and makes the lane read its gates again."""
    async with runtime.pool.acquire() as conn:
        for column, value in columns.items():
            await conn.execute(f"UPDATE car_parks SET {column} = $2 WHERE id = $1", lot.id, value)
    runtime.lanes._gates.clear()


async def eventually(probe: Any, timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
    """Polls an async predicate until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await probe()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last value {value!r})")
        await asyncio.sleep(interval_s)


async def waiting_on_a_lock(runtime: Runtime, query_start: str = "", at_least: int = 1) -> bool:
    """Whether `at_least` backends of the test database running a statement that begins
    `query_start` wait on a lock: how a test knows other paths reached the lock it holds."""
    async with runtime.pool.acquire() as conn:
        waiting: bool = await conn.fetchval(
            """SELECT count(*) >= $2 FROM pg_stat_activity
               WHERE datname = current_database() AND wait_event_type = 'Lock'
                 AND ltrim(query) LIKE $1""",
            query_start + "%",
            at_least,
        )
    return waiting


@contextlib.asynccontextmanager
async def holding(
    runtime: Runtime, statement: str, *args: object
) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """A transaction of its own holding the locks `statement` takes, so that a test can line up
    other paths behind them; yields the commit that lets them go on (rolled back at the end if
    the test did not call it)."""
    async with runtime.pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        released = False

        async def release() -> None:
            nonlocal released
            released = True
            await transaction.commit()

        try:
            await conn.execute(statement, *args)
            yield release
        finally:
            if not released:
                await transaction.rollback()


async def server_errors(tasks: dict[str, "asyncio.Task[Any]"]) -> list[str]:
    """What each of two paths racing for the same rows ended in, where it was not an answer:
    an exception (a deadlock, say) or a 5xx response."""
    errors = []
    for name, task in tasks.items():
        try:
            result = await task
        except Exception as exc:
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
        else:
            if isinstance(result, httpx.Response) and result.status_code >= 500:
                errors.append(f"{name}: {result.status_code} {result.text[:200]}")
    return errors


async def entry_registered(runtime: Runtime, lot: Lot, plate: str) -> str:
    """Waits until the provider answered the registration of the plate's stay at its entry
    (WeChat's rails register each pay-later stay; the sandbox's register none) and returns
    the provider's parking id."""

    async def parking_id() -> str | None:
        async with runtime.pool.acquire() as conn:
            found: str | None = await conn.fetchval(
                """SELECT provider_parking_id FROM sessions
                   WHERE car_park_id = $1 AND plate = $2""",
                lot.id,
                plate,
            )
        return found

    registered: str = await eventually(parking_id)
    return registered


# unique_plate()'s plates: 浙, an issuing letter of Zhejiang's (A-L; never I or O, see
# plate_recognition/grammar.py) that neither a plate written out in the tests (浙K…) nor the
# cities the demo and the benches seed into the same database (gate_controller.simulator's
# random_plate: A-H) use, five digits. Sharing B, D, G and H with the seeded cities, a test
# once bound a plate a seeded driver already held.
_PLATE_LETTERS = "JL"
_PLATE_SPACE = len(_PLATE_LETTERS) * 100_000
# n ↦ (n * stride + offset) mod space is a bijection (the stride, 7,919, is prime to 2 and 5, the
# space's only factors): the n-th plate of a run differs from every other, by construction.
# The stride spreads consecutive plates over the space; the offset varies them between runs.
_PLATE_STRIDE = 7_919
_PLATE_OFFSET = secrets.randbelow(_PLATE_SPACE)
_plates_drawn = itertools.count()


def unique_plate() -> str:
    """A grammatical blue plate nobody else in this test run (this process) has."""
    n = next(_plates_drawn)
    if n >= _PLATE_SPACE:
        raise RuntimeError(f"unique_plate(): all {_PLATE_SPACE} plates were drawn")
    value = (n * _PLATE_STRIDE + _PLATE_OFFSET) % _PLATE_SPACE
    letter, serial = divmod(value, 100_000)
    return f"浙{_PLATE_LETTERS[letter]}{serial:05d}"


@contextlib.asynccontextmanager
async def provider_and_runtime(
    settings: Settings, database_url: str, faults: sandbox.FaultConfig, *, secret: str = ""
) -> AsyncIterator[tuple[Runtime, str]]:
    """A sandbox provider of its own (with these faults) and a runtime charging through it;
    yields the runtime and the provider's URL."""
    secret = secret or uuid.uuid4().hex
    async with sandbox.running(faults, secret=secret) as (url, _):
        eps = Endpoints(database_url, REDIS_URL, MQTT_URL)
        async with running(settings, eps, ProviderEndpoint(url, secret)) as runtime:
            yield runtime, url


async def provider_order(provider_url: str, out_trade_no: str) -> dict[str, Any] | None:
    """The provider's view of an order, asked until it answers (injected 5xx included)."""
    async with httpx.AsyncClient(base_url=provider_url) as http:
        for _ in range(50):
            response = await http.get(f"/v1/orders/{out_trade_no}")
            if response.status_code < 500:
                break
    if response.status_code == 404:
        return None
    response.raise_for_status()
    order: dict[str, Any] = response.json()
    return order


async def charges_of(runtime: Runtime, lot: Lot) -> list[asyncpg.Record]:
    async with runtime.pool.acquire() as conn:
        return await conn.fetch(
            "SELECT c.* FROM charges c JOIN sessions s ON s.id = c.session_id "
            "WHERE s.car_park_id = $1 ORDER BY c.id",
            lot.id,
        )


async def exit_after(
    runtime: Runtime, gate: GateProbe, lot: Lot, plate: str, stay: timedelta
) -> dict[str, Any]:
    await enter(runtime, gate, lot, plate, parked_for=stay)
    return await gate.decide(lot.code, "out1", gate.capture("out", plate))


@contextlib.asynccontextmanager
async def api_server(
    runtime: Runtime, port: int, *, app: FastAPI | None = None
) -> AsyncIterator[str]:
    """Serves the API (`app`, or a new one) on 127.0.0.1:`port`, where the provider's
    notifications are sent when `settings.public_base_url` points there."""
    server = uvicorn.Server(
        server_config(app or create_app(runtime), "127.0.0.1", port, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
def app(runtime: Runtime) -> FastAPI:
    return create_app(runtime)


@pytest.fixture
async def api(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The API in-process (ASGI), with no credentials unless a test passes some."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def driver_token(app: FastAPI, account_id: int) -> str:
    token: str = app.state.signer.issue(f"account:{account_id}", "driver")
    return token


@dataclass
class Staff:
    user_id: int
    operator_id: int
    role: Role
    email: str
    password: str


async def make_staff(runtime: Runtime, operator_id: int, role: Role = "admin") -> Staff:
    email = f"{role}-{uuid.uuid4().hex[:8]}@operator.test"
    password = uuid.uuid4().hex
    async with runtime.pool.acquire() as conn:
        user_id = await auth_repo.create_operator_user(
            conn, operator_id, email, "Staff", role, hash_password(password)
        )
    return Staff(user_id, operator_id, role, email, password)


def staff_token(app: FastAPI, staff: Staff) -> str:
    token: str = app.state.signer.issue(
        f"operator_user:{staff.user_id}",
        staff.role,
        staff.operator_id,
    )
    return token


async def decide_dispute(
    api: httpx.AsyncClient, admin: dict[str, str], dispute_id: int, outcome: str
) -> None:
    """An admin decides a driver's "not my car" after looking at both frames."""
    decided = await api.post(
        f"/api/v1/operator/disputes/{dispute_id}/decision",
        json={"outcome": outcome, "note": "looked at both frames"},
        headers=admin,
    )
    assert decided.status_code == 200, decided.text


async def reject_awaiting(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, lot: Lot, charge_id: int
) -> tuple[dict[str, str], int]:
    """An attendant rejects the charge awaiting confirmation: the attendant's headers, and the
    exception its exit waits in for the right plate."""
    attendant = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))
    rejected = await api.post(
        f"/api/v1/operator/confirmations/{charge_id}/reject",
        json={"reason": "出口车辆不是入场车辆"},
        headers=attendant,
    )
    assert rejected.status_code == 200, rejected.text
    exception_id: int = rejected.json()["exception_id"]
    return attendant, exception_id


async def stay_debt(runtime: Runtime, account_id: int, stay_id: int) -> tuple[bool, bool, bool]:
    """(the account blocked for arrears, the stay's debt settled, and waived)."""
    async with runtime.pool.acquire() as conn:
        blocked = await conn.fetchval(
            "SELECT blocked_for_arrears FROM accounts WHERE id = $1", account_id
        )
        debt = await conn.fetchrow(
            "SELECT settled_at, waived FROM debts WHERE session_id = $1", stay_id
        )
    return bool(blocked), debt["settled_at"] is not None, bool(debt["waived"])


async def driver_in_debt(runtime: Runtime, gate: GateProbe, lot: Lot) -> Driver:
    """A pay-later driver whose first charge (a 30-minute stay, ¥6.00) the provider declined:
    one open debt, pay-later blocked."""
    driver = await make_driver(runtime, unique_plate())
    async with runtime.pool.acquire() as conn:
        agreement_no = await conn.fetchval(
            "SELECT agreement_no FROM pay_later_agreements WHERE id = $1", driver.agreement_id
        )
    SANDBOX_FAULTS.declined_agreements.add(agreement_no)
    try:
        await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))

        async def in_debt() -> bool:
            async with runtime.pool.acquire() as conn:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM debts WHERE account_id = $1 AND settled_at IS NULL",
                        driver.account_id,
                    )
                )

        await eventually(in_debt)
    finally:
        SANDBOX_FAULTS.declined_agreements.discard(agreement_no)
    return driver


def with_ppocr_reader(settings: Settings) -> Settings:
    """``settings`` with the lanes reading by PP-OCR alone, at its own certain threshold. The
    fixture photos (``fixtures/plate_*.jpg``) are among those PlateNet learnt from, which the
    default reader reads surely; tests whose premise is a right read below the certain
    threshold take PP-OCR's read of them (a calibrated 0.998 for 皖AD2Y34)."""
    settings.ocr_engine = "rapidocr"
    settings.plate_certain_score = certain_threshold("rapidocr")
    return settings


async def unbind(runtime: Runtime, *plates: str) -> None:
    """Ends every active binding of ``plates``: tests that bind the fixture photos' plates
    leave them free for the next."""
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE plate_bindings SET unbound_at = now()"
            " WHERE plate = ANY($1) AND unbound_at IS NULL",
            list(plates),
        )
