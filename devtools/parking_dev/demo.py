"""`parking-dev demo`: a small city on real servers, simulated traffic, live API, JSON summary."""

import asyncio
import contextlib
import random
import re
import secrets
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import SecretStr

from billing import agreements, ledger, reconcile
from billing.tariff import Tariff
from gate_controller.mqtt import MqttClient
from gate_controller.protocol import CameraRead, Capture, GateAddress, Topics, encode
from gate_controller.simulator import GateSimulator, SimGate, Vehicle, random_plate
from parking.admin import repository as admin
from parking.app import create_app, server_config
from parking.auth import repository as auth_repo
from parking.auth.tokens import hash_password
from parking.gates.commands import command_key
from parking.gates.config import generate_private_key, private_key_pem
from parking.infra import endpoints
from parking.logging import mask_plates_in_text
from parking.runtime import ProviderEndpoint, Runtime, payment_provider, running
from parking.settings import Settings
from parking_dev import sandbox

# Real streets of Lin'an, Hangzhou, where the reference deployment runs.
DEMO_CAR_PARKS = [
    ("chengzhong", "城中街停车场", 120, 30.2335, 119.7245),
    ("qianwang", "钱王街停车场", 200, 30.2318, 119.7190),
    ("jinbei", "锦北广场停车场", 80, 30.2420, 119.7301),
    ("station", "临安汽车站停车场", 300, 30.2262, 119.7078),
]
# A typical city tariff: 15 free minutes; days ¥5 the first hour then ¥2 a half hour; nights
# ¥1 per two hours, at most ¥5; at most ¥40 per 24 h; new-energy (green) plates half price.
TARIFF = Tariff.from_json(
    {
        "free_minutes": 15,
        "bands": [
            {
                "name": "day",
                "start": "08:00",
                "end": "20:00",
                "lines": [
                    {"from_minute": 0, "to_minute": 60, "kind": "flat", "amount_fen": 500},
                    {
                        "from_minute": 60,
                        "kind": "per_increment",
                        "increment_minutes": 30,
                        "amount_fen": 200,
                    },
                ],
            },
            {
                "name": "night",
                "start": "20:00",
                "end": "08:00",
                "lines": [
                    {
                        "from_minute": 0,
                        "kind": "per_increment",
                        "increment_minutes": 120,
                        "amount_fen": 100,
                    }
                ],
                "max_fen": 500,
            },
        ],
        "daily_cap_fen": 4000,
        "colour_discount_percent": {"green": 50},
    }
)
PAY_LATER_LIMIT_FEN = 20_000
# The line (on stderr) with the dashboard's operator login: "<prefix><email> <password>".
LOGIN_LINE_PREFIX = "demo: login: "


@dataclass
class DemoCity:
    run_id: str
    operator_id: int
    car_park_ids: list[int]
    gates: list[SimGate]
    inside: dict[str, list[tuple[Vehicle, datetime]]]
    outside: list[Vehicle]


def _vehicles(rng: random.Random, count: int) -> list[Vehicle]:
    plates: set[str] = set()
    vehicles: list[Vehicle] = []
    while len(vehicles) < count:
        green = rng.random() < 0.2
        plate = random_plate(rng, green=green)
        if plate not in plates:
            plates.add(plate)
            vehicles.append(Vehicle(plate, "green" if green else "blue", rng.random() < 0.7))
    return vehicles


async def seed_city(
    pool: asyncpg.Pool,
    rng: random.Random,
    *,
    drivers: int = 400,
    car_parks: int = len(DEMO_CAR_PARKS),
    parked_share: float = 0.5,
    vehicles: list[Vehicle] | None = None,
    provider: str = "sandbox",
) -> DemoCity:
    """Car parks with entry and exit gates, a tariff, drivers (70 % bound with pay-later), and
    cars already parked for 20 minutes to 3 days so that exits carry real fees."""
    run_id = secrets.token_hex(3)
    now = datetime.now(UTC)
    vehicles = list(vehicles) if vehicles is not None else _vehicles(rng, drivers)
    gates: list[SimGate] = []
    car_park_ids: list[int] = []
    lots: list[str] = []
    inside: dict[str, list[tuple[Vehicle, datetime]]] = {}
    async with pool.acquire() as conn, conn.transaction():
        # A long-lived database holds earlier runs' drivers: never claim a plate already bound.
        taken = set(await admin.bound_plates(conn, [v.plate for v in vehicles]))
        vehicles = [v for v in vehicles if v.plate not in taken]
        operator_id = await admin.create_operator(conn, "临安城市停车运营")
        for n in range(car_parks):
            code, name, capacity, lat, lon = DEMO_CAR_PARKS[n % len(DEMO_CAR_PARKS)]
            round_ = n // len(DEMO_CAR_PARKS)
            lot = f"{code}{round_ or ''}-{run_id}"
            car_park_id = await admin.create_car_park(
                conn,
                operator_id=operator_id,
                code=lot,
                name=f"{name}{round_ + 1}号" if round_ else name,
                capacity=capacity,
                latitude=lat,
                longitude=lon,
            )
            car_park_ids.append(car_park_id)
            lots.append(lot)
            await admin.create_tariff(
                conn, car_park_id, effective_from=now - timedelta(days=30), tariff=TARIFF
            )
            for gate, direction in (("in1", "in"), ("out1", "out"), ("out2", "out")):
                await admin.create_gate(conn, car_park_id, gate, direction)
                gates.append(SimGate(lot, gate, direction))  # type: ignore[arg-type]
            inside[lot] = []
        for i, vehicle in enumerate(vehicles):
            if vehicle.bound:
                account_id = await admin.create_account(conn, f"+86-demo-{run_id}-{i:05d}")
                # Signed up a month ago: before any of the seeded stays began (a binding pays
                # only for stays that began after it).
                await admin.bind_plate(
                    conn, account_id, vehicle.plate, vehicle.color, since=now - timedelta(days=30)
                )
                await agreements.sign(
                    conn,
                    account_id,
                    provider=provider,
                    # WeChat knows a driver by openid (the emulator's are "o-<plate>").
                    agreement_no=(
                        f"o-{vehicle.plate}" if provider == "wechat" else f"AGR-{run_id}-{i:05d}"
                    ),
                    per_session_limit_fen=PAY_LATER_LIMIT_FEN,
                    signed_at=now - timedelta(days=30),
                )
        rng.shuffle(vehicles)
        parked_count = int(len(vehicles) * parked_share)
        for n, vehicle in enumerate(vehicles[:parked_count]):
            lot_index = n % car_parks
            entered_at = now - timedelta(minutes=rng.randint(20, 3 * 24 * 60))
            # The simulated cameras' reads are certain (gate_controller.simulator), and their
            # scores ours: calibrated by construction.
            await admin.seed_open_session(
                conn,
                car_park_ids[lot_index],
                vehicle.plate,
                vehicle.color,
                entered_at,
                entry_certain=True,
                entry_proven=True,
            )
            inside[lots[lot_index]].append((vehicle, entered_at))
    return DemoCity(run_id, operator_id, car_park_ids, gates, inside, vehicles[parked_count:])


async def _publish_bad_messages(mqtt: MqttClient, topics: Topics, lot: str) -> int:
    """What a broken or hostile gate sends: each must become a dead letter, nothing else."""
    bad = [
        (topics.topic(GateAddress(lot, "in1"), "capture"), b"{not json"),
        (topics.topic(GateAddress(lot, "nosuchgate"), "capture"), _valid_capture()),
        (topics.topic(GateAddress(lot, "in1"), "capture"), b"x" * (1024 * 1024)),
    ]
    for topic, payload in bad:
        await mqtt.publish(topic, payload)
    return len(bad)


def _valid_capture() -> bytes:
    return encode(
        Capture(
            capture_id=uuid.uuid4(),
            seq=1,
            direction="in",
            captured_at=datetime.now(UTC),
            camera_read=CameraRead(plate="浙A00001", color="blue", confidence=0.99),
        )
    )


def ensure_command_key(settings: Settings) -> Ed25519PublicKey:
    """Commands are signed as in production, with a key of this run's own when none is
    configured; returns the public key the simulated gates verify them with."""
    if settings.gate_config_key is None:
        settings.gate_config_key = SecretStr(private_key_pem(generate_private_key()))
    key = command_key(settings)
    assert key is not None
    return key.public_key()


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max in ms, rounded; zeros for no values."""
    if len(values) < 2:
        value = round(values[0], 2) if values else 0.0
        return {"p50_ms": value, "p95_ms": value, "p99_ms": value, "max_ms": value}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "p50_ms": round(q[49], 2),
        "p95_ms": round(q[94], 2),
        "p99_ms": round(q[98], 2),
        "max_ms": round(max(values), 2),
    }


async def summarise(
    runtime: Runtime, city: DemoCity, sim: GateSimulator, started: datetime, expected_dead: int
) -> dict[str, Any]:
    ids = city.car_park_ids
    async with runtime.pool.acquire() as conn:
        captures = await conn.fetchval(
            "SELECT count(*) FROM captures WHERE car_park_id = ANY($1)", ids
        )
        # Each simulated exit is judged by the decision on its first read.
        decided = await conn.fetchrow(
            """SELECT count(*) FILTER (WHERE command->>'action' = 'open') AS opened,
                      count(*) FILTER (WHERE command->>'action' = 'hold') AS held
               FROM captures WHERE capture_id = ANY($1)""",
            [e.capture_id for e in sim.report.exit_log],
        )
        charges = await conn.fetchrow(
            """SELECT count(*) FILTER (WHERE c.status = 'succeeded') AS charged,
                      count(*) FILTER (WHERE c.status = 'pending') AS pending,
                      count(*) FILTER (WHERE c.status = 'failed') AS failed,
                      count(*) FILTER (WHERE c.advanced_by_provider) AS advanced,
                      COALESCE(sum(c.amount_fen) FILTER (WHERE c.status = 'succeeded'), 0)::bigint
                          AS charged_fen
               FROM charges c JOIN sessions s ON s.id = c.session_id
               WHERE s.car_park_id = ANY($1)""",
            ids,
        )
        dead_letters = await conn.fetchval(
            "SELECT count(*) FROM dead_letters WHERE received_at >= $1 AND topic LIKE $2",
            started,
            f"{runtime.lanes.topics.root}/%-{city.run_id}/%",
        )
        money = await conn.fetchrow(
            """SELECT (SELECT count(*) FROM debts d JOIN charges c ON c.id = d.charge_id
                       JOIN sessions s ON s.id = c.session_id WHERE s.car_park_id = ANY($1))
                          AS debts,
                      (SELECT COALESCE(max(n), 0) FROM (
                           SELECT count(*) AS n FROM charges c JOIN sessions s
                           ON s.id = c.session_id WHERE s.car_park_id = ANY($1)
                           GROUP BY c.session_id) per_session) AS charges_per_session_max,
                      (SELECT count(*) FROM dead_letters WHERE source = 'provider_notification'
                       AND received_at >= $2) AS notifications_rejected""",
            ids,
            started,
        )
        balanced = await ledger.is_balanced(conn)
    decision = percentiles(list(runtime.lanes.stats.latencies_ms))
    report = sim.report
    # The simulator's own oracle: bound cars whose stay is past the free minutes must be charged.
    bound_paid_exits = sum(
        1 for e in report.exit_log if e.vehicle.bound and e.stay_s > TARIFF.free_minutes * 60
    )
    return {
        "captures": captures,
        "entries": report.entries,
        "exits": report.exits,
        "opened": decided["opened"],
        "held": decided["held"],
        "bound_exits": report.bound_exits,
        "bound_exits_with_fee": bound_paid_exits,
        "unbound_exits": report.unbound_exits,
        "charged": charges["charged"],
        "charges_pending": charges["pending"],
        "charges_failed": charges["failed"],
        # Paid by the provider in the driver's stead (WeChat's 垫资): charged, never a debt.
        "charges_advanced": charges["advanced"],
        "charged_fen": charges["charged_fen"],
        "charges_per_session_max": money["charges_per_session_max"],
        "charge_retries": runtime.outbox.stats.retries,
        "jobs_dead": runtime.outbox.stats.dead,
        "debts": money["debts"],
        "notifications_rejected": money["notifications_rejected"],
        "duplicates_sent": report.duplicates_sent + report.resent,
        "duplicates_ignored": runtime.lanes.stats.duplicates,
        "double_reads": report.double_reads_sent,
        "unanswered": report.unanswered,
        # Commands the simulated gates refused (unsigned, forged, another gate's, expired).
        "commands_refused": dict(report.command_refusals),
        "acks_refused": dict(report.ack_refusals),
        "notifications_sent": runtime.outbox.stats.notified,
        "dead_letters": dead_letters,
        "dead_letters_expected": expected_dead,
        "decision_p50_ms": decision["p50_ms"],
        "decision_p99_ms": decision["p99_ms"],
        "gate_round_trip_p99_ms": percentiles(report.round_trip_ms)["p99_ms"],
        "ledger_balanced": balanced,
    }


async def _dashboard_user(runtime: Runtime, city: DemoCity) -> tuple[str, str]:
    """An admin of the demo's operator, with a fresh password, to watch the demo live."""
    email, password = f"admin-{city.run_id}@parking.demo", secrets.token_urlsafe(9)
    async with runtime.pool.acquire() as conn:
        await auth_repo.create_operator_user(
            conn, city.operator_id, email, "Demo admin", "admin", hash_password(password)
        )
    return email, password


async def _reconcile_today(runtime: Runtime) -> dict[str, Any]:
    """Today's books against the provider's statement, as `parking billing reconcile` does."""
    day = datetime.now(ZoneInfo(runtime.settings.timezone)).date()
    statement = await runtime.provider.statement(day)
    async with runtime.pool.acquire() as conn, conn.transaction():
        result = await reconcile.reconcile(
            conn, runtime.provider.name, day, statement, runtime.settings.timezone
        )
    return result.summary()


async def wait_for_outbox(
    pool: asyncpg.Pool,
    timeout_s: float,
    kinds: list[str] | None = None,
    since: datetime | None = None,
) -> bool:
    """Charges run after the cars left: give the worker time to finish them (a dead job is
    finished with as far as the worker goes: it waits for an operator). Only `kinds` (None:
    every kind), and only jobs queued from `since` on (None: all). False: still some after
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with pool.acquire() as conn:
            if not await conn.fetchval(
                """SELECT EXISTS (SELECT 1 FROM outbox WHERE done_at IS NULL AND dead_at IS NULL
                                  AND ($1::text[] IS NULL OR kind = ANY ($1::text[]))
                                  AND ($2::timestamptz IS NULL OR created_at >= $2))""",
                kinds,
                since,
            ):
                return True
        await asyncio.sleep(0.2)
    return False


# Held cars whose drivers scan the gate's QR code and pay on its page (parking/pages/).
QR_PAYERS = 3
_FORM_ACTION = re.compile(r'<form[^>]*action="([^"]+)"')


async def _pay_held_cars_by_qr(
    runtime: Runtime, city: DemoCity, provider: ProviderEndpoint, out: TextIO
) -> int:
    """Some held drivers do what a phone does with the QR code: open its page, press 支付
    (which starts the payment), press the wallet's pay button on the provider's payer page,
    and wait on the page until the barrier opens. Returns how many drove on."""
    async with runtime.pool.acquire() as conn:
        held = await conn.fetch(
            """SELECT c.command->>'payment_qr_url' AS qr FROM captures c
               JOIN sessions s ON s.id = c.session_id
               WHERE c.car_park_id = ANY($1) AND c.command->>'payment_qr_url' IS NOT NULL
                 AND c.outcome LIKE 'held_%' AND s.status = 'open'
               ORDER BY c.received_at DESC LIMIT $2""",
            city.car_park_ids,
            QR_PAYERS,
        )
    paid = 0
    async with httpx.AsyncClient(timeout=10.0) as phone:
        for row in held:
            try:
                paid += await _pay_by_qr(phone, row["qr"], provider)
            except httpx.HTTPError as exc:
                print(f"demo: a QR payment failed: {exc!r}", file=out)
    print(f"demo: {paid} held drivers paid on the QR code's page and drove on", file=out)
    return paid


async def _pay_by_qr(phone: httpx.AsyncClient, qr: str, provider: ProviderEndpoint) -> int:
    """1 when the driver paid and the barrier opened (the page's 请通行), else 0. On WeChat's
    rails the page shows a Native code (`weixin://…?pr=<order>`) the wallet scans: the
    emulator's own payer stands in for the scan."""
    page = await phone.get(qr)
    if page.status_code != 200 or "支付" not in page.text:
        return 0
    api = qr.replace("/pay/", "/api/v1/gate-payments/")  # what the page's 支付 button calls
    started = await phone.post(api)
    if started.status_code != 200 or not started.json().get("pay_url"):
        return 0
    pay_url = httpx.URL(started.json()["pay_url"])
    if pay_url.scheme == "weixin":
        order = pay_url.params.get("pr")
        await phone.post(f"{provider.url.rstrip('/')}/_emulator/pay/{order}")
        return await _wait_gate_open(phone, api)
    action = _FORM_ACTION.search((await phone.get(pay_url)).text)
    if action is None:
        return 0
    await phone.post(pay_url.join(action.group(1)))
    return await _wait_gate_open(phone, api)


async def _wait_gate_open(phone: httpx.AsyncClient, api: str) -> int:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the page polls the same way
        if (await phone.get(api)).json().get("gate_open"):
            return 1
        await asyncio.sleep(0.3)
    return 0


async def _progress(runtime: Runtime, sim: GateSimulator, city: DemoCity, out: TextIO) -> None:
    while True:
        await asyncio.sleep(2.0)
        stats = runtime.lanes.stats
        lat = list(stats.latencies_ms)[-2000:]
        # Charges are booked by the worker and by the provider's notifications to the API.
        async with runtime.pool.acquire() as conn:
            charged = await conn.fetchval(
                """SELECT count(*) FROM charges c JOIN sessions s ON s.id = c.session_id
                   WHERE s.car_park_id = ANY($1) AND c.status = 'succeeded'""",
                city.car_park_ids,
            )
        print(
            f"demo: captures sent {sim.report.sent:5d}  decided {stats.captures:5d}  "
            f"open {sim.report.commands['open']:5d}  hold {sim.report.commands['hold']:4d}  "
            f"charged {charged:4d}  p99 {percentiles(lat)['p99_ms']:6.1f} ms",
            file=out,
            flush=True,
        )


def with_simulated_cameras(settings: Settings) -> Settings:
    """The simulated cameras' scores are the ones we give them: calibrated by construction, so
    their charges go to the provider as a calibrated camera model's do (charges on the server's
    reads of photos are still verified by the worker, as in production). An explicit setting
    wins."""
    if "camera_default_calibrated" in settings.model_fields_set:
        return settings
    return settings.model_copy(update={"camera_default_calibrated": True})


async def run_demo(
    settings: Settings,
    duration_s: float,
    rate: float,
    serve_api: bool = True,
    faults: sandbox.FaultConfig | None = None,
) -> dict[str, Any]:
    out = sys.stderr
    started = datetime.now(UTC)
    settings = with_simulated_cameras(settings)
    if serve_api and "public_base_url" not in settings.model_fields_set:
        # QR codes and the sandbox provider's notifications must reach this run's API, on
        # whichever port it was given, not whatever else listens on the default one.
        settings = settings.model_copy(
            update={"public_base_url": f"http://{settings.api_host}:{settings.api_port}"}
        )
    rng = random.Random()
    server_key = ensure_command_key(settings)
    async with (
        endpoints(settings) as eps,
        payment_provider(settings, faults) as provider,
        running(settings, eps, provider) as runtime,
    ):
        city = await seed_city(runtime.pool, rng, provider=runtime.provider.name)
        print(
            f"demo: city seeded: {len(city.car_park_ids)} car parks, {len(city.gates)} gates, "
            f"{sum(len(v) for v in city.inside.values())} cars inside",
            file=out,
        )
        server = None
        server_task = None
        if serve_api:
            server = uvicorn.Server(
                server_config(
                    create_app(runtime), settings.api_host, settings.api_port, log_level="warning"
                )
            )
            server_task = asyncio.create_task(server.serve())
            email, password = await _dashboard_user(runtime, city)
            base = f"http://{settings.api_host}:{settings.api_port}"
            print(
                f"demo: API on {base} (/docs, /api/v1/public/car-parks); operator dashboard "
                f"{base}/dashboard",
                file=out,
            )
            # One line of its own, in this form, for people and scripts alike
            # (tests/test_embedded_smoke.py reads it).
            print(f"{LOGIN_LINE_PREFIX}{email} {password}", file=out, flush=True)
        async with GateSimulator(
            runtime.endpoints.mqtt_url,
            city.gates,
            city.inside,
            city.outside,
            server_key=server_key,
            topic_prefix=settings.mqtt_topic_prefix,
            seed=rng.randrange(1 << 30),
        ) as sim:
            expected_dead = await _publish_bad_messages(
                runtime.mqtt, runtime.lanes.topics, city.gates[0].lot
            )
            progress = asyncio.create_task(_progress(runtime, sim, city, out))
            try:
                await sim.run(rate, duration_s)
                paid_by_qr = 0
                if serve_api:
                    paid_by_qr = await _pay_held_cars_by_qr(runtime, city, provider, out)
                # Only the kinds the charges' worker runs: push deliveries to other people's
                # subscribers (a shared database) are not the demo's to wait for.
                await wait_for_outbox(runtime.pool, 60, runtime.outbox.queue.kinds)
            finally:
                progress.cancel()
            summary = await summarise(runtime, city, sim, started, expected_dead)
            summary["paid_by_qr"] = paid_by_qr
            summary["reconciliation"] = await _reconcile_today(runtime)
        for note in list(getattr(runtime.notifier, "sent", ()))[-3:]:
            print(f"demo: sms -> {mask_plates_in_text(note.body)}", file=out)
        if server is not None and server_task is not None:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await server_task
    return summary
