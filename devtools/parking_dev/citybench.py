"""`parking-dev bench --city-day`: the city of DESIGN.md (3,476 car parks, about a million stays a
day) in a database of its own, the live lane on top of that data, and the operator and public
views under it.

1. Seed. Car parks around Hangzhou's districts (Lin'an among them), capacities 50-2,000, 2-4
   gates, a tariff each, one operator per district and a city-wide group: through the admin
   repository, as operators create them. The cars a day implies (one per two stays; 70 %
   bound to an account, most of those with a pay-later agreement) by COPY.
2. History. A day of stays ending now: arrivals follow a city's daily profile, durations mix
   drop-offs, errands, visits, working days and nights. Each stay is decided by the lane's
   rules (the car park's tariff, pay-later within the limit, held and paid at the gate,
   unreadable plates resolved by an attendant, declined charges that become debts and block
   pay-later until paid) and written in the state the lane, the outbox worker and the payments
   leave behind: sessions, captures with their commands, charges, payments, debts, balanced
   ledger transactions, notifications and outbox jobs. Rows go in by COPY in time order, one
   transaction per chunk, so the ledger's balance trigger and every foreign key check every
   row. `load_workers` processes load in parallel, each with its own car parks and cars.
3. Replay. parking.bench's lane, outbox worker and simulated gates across all the car parks, on
   top of that data, at `rate` captures a second for `replay_seconds`.
4. Views. The operator views and the public free-space API over HTTP (in-process ASGI: the app,
   Redis and the database, no socket), N calls each. The SQL each route ran is traced and
   EXPLAIN (ANALYZE, BUFFERS)-ed into a file, with the generic plan a prepared statement may
   switch to; sequential scans of large tables are flagged.
"""

import asyncio
import bisect
import contextlib
import dataclasses
import heapq
import itertools
import math
import multiprocessing
import os
import random
import re
import secrets
import sys
import time
import uuid
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import orjson
import uvloop

from billing import charges, debts, fees, ledger, notifications
from billing.charges import new_idempotency_key
from billing.notifications import exit_charged_text
from billing.payments import new_out_trade_no, received_lines
from billing.tariff import Tariff, format_fen
from gate_controller.simulator import SimGate, Vehicle, random_plate
from parking.admin import repository as admin
from parking.app import create_app
from parking.auth import repository as auth_repo
from parking.auth.tokens import hash_password
from parking.db import create_pool
from parking.infra import endpoints
from parking.lanes.repository import PayLater
from parking.lanes.rules import exit_rule
from parking.migrate import migrate
from parking.occupancy import repository as occupancy_repo
from parking.partitions.service import SESSION_ID_DAY_FACTOR, session_id_floor
from parking.payments.qr import gate_payment_page_url
from parking.runtime import ProviderEndpoint, Runtime
from parking.settings import Settings
from parking_dev.bench import drive, lane_service
from parking_dev.demo import (
    PAY_LATER_LIMIT_FEN,
    TARIFF,
    DemoCity,
    percentiles,
    with_simulated_cameras,
)

CITY_CAR_PARKS = 3476  # DESIGN.md: the reference deployment's city-wide count
CITY_STAYS_PER_DAY = 1_000_000

# Districts of Hangzhou: (name, latitude, longitude, share of the car parks, tariff).
DISTRICTS = (
    ("上城", 30.2427, 120.1692, 0.14, "core"),
    ("拱墅", 30.3195, 120.1418, 0.14, "core"),
    ("西湖", 30.2594, 120.1305, 0.14, "core"),
    ("滨江", 30.2084, 120.2118, 0.10, "city"),
    ("萧山", 30.1838, 120.2645, 0.12, "city"),
    ("余杭", 30.2800, 120.0200, 0.10, "city"),
    ("临平", 30.4199, 120.2993, 0.07, "suburb"),
    ("钱塘", 30.3050, 120.4932, 0.06, "suburb"),
    ("富阳", 30.0489, 119.9600, 0.05, "suburb"),
    ("临安", 30.2335, 119.7245, 0.02, "city"),  # where the reference deployment began
)
# The city-wide group owns this share of the car parks; district operators own the rest.
CITY_GROUP = "杭州市停车产业集团"
CITY_GROUP_SHARE = 0.3


def _doubled(tariff: Tariff) -> Tariff:
    """The same rate table at twice the prices: the city centre's."""
    rules = tariff.to_json()
    for band in rules["bands"]:
        for line in band["lines"]:
            line["amount_fen"] *= 2
        if band.get("max_fen"):
            band["max_fen"] *= 2
    if rules.get("daily_cap_fen"):
        rules["daily_cap_fen"] *= 2
    return Tariff.from_json(rules)


TARIFFS: dict[str, Tariff] = {
    "core": _doubled(TARIFF),
    "city": TARIFF,
    "suburb": Tariff.hourly(free_minutes=15, hourly_fen=300, daily_cap_fen=2500),
}

# Arrivals per local hour (relative): a weekday of a Chinese city's car parks.
ARRIVALS_BY_HOUR = (
    0.5, 0.3, 0.2, 0.2, 0.3, 0.6, 1.5, 4.5, 8.0, 8.5, 7.0, 6.0,
    5.5, 6.0, 6.5, 6.5, 6.5, 7.0, 6.5, 5.5, 4.5, 3.5, 2.0, 1.2,
)  # fmt: skip
# Stay durations: (share, median minutes, lognormal sigma).
DURATIONS = (
    (0.10, 8.0, 0.5),  # drop-offs, mostly within the free minutes
    (0.35, 45.0, 0.6),  # errands
    (0.35, 150.0, 0.5),  # shopping, visits
    (0.17, 540.0, 0.25),  # a working day
    (0.03, 1200.0, 0.4),  # overnight
)
_DURATION_CUM = [sum(d[0] for d in DURATIONS[: n + 1]) for n in range(len(DURATIONS))]
STAYS_PER_CAR = 2.0
BOUND_SHARE = 0.7
PAY_LATER_SHARE = 0.9  # of bound cars
DECLINED_SHARE = 0.01  # of pay-later agreements: every deduction declined (no funds)
GREEN_SHARE = 0.2
DOUBLE_READ_SHARE = 0.02  # entries read twice at the barrier
UNREADABLE_SHARE = 0.003  # exits held for an attendant
# A held exit's frame, as large as the average camera frame in ../shared/data/plates.
FRAME_BYTES = 67_000
CHUNK_STAYS = 10_000
LARGE_TABLE_ROWS = 10_000
# Reports are also explained for a day this long ago (see _days_earlier).
PAST_DAYS = 30
# Tables that grow with every stay (the rest grow with car parks and drivers).
PER_STAY_TABLES = (
    "sessions",
    "captures",
    "capture_keys",
    "charges",
    "payments",
    "debts",
    "ledger_entries",
    "notifications",
    "outbox",
    "lane_exceptions",
)


def _counter(table: str) -> str:
    """The sequence part of a table's ids (a stay's id also carries its day)."""
    return f"id % {SESSION_ID_DAY_FACTOR}" if table == "sessions" else "id"


def _columns(names: str) -> tuple[str, ...]:
    return tuple(names.split())


# What the loader COPYs into each table, in an order that satisfies the foreign keys.
_COLUMNS: dict[str, tuple[str, ...]] = {
    "accounts": _columns("id phone created_at"),
    "plate_bindings": _columns("account_id plate color bound_at verified_by licence_ref"),
    "pay_later_agreements": _columns(
        "id account_id provider agreement_no per_session_limit_fen signed_at"
    ),
    "sessions": _columns(
        "id car_park_id plate plate_color status entered_at entry_capture_id exited_at "
        "exit_capture_id fee_fen account_id settlement entry_certain entry_proven"
    ),
    "captures": _columns(
        "capture_id gate_id car_park_id seq direction plate plate_color read_confidence "
        "captured_at received_at outcome session_id command plate_source match_status "
        "read_certain"
    ),
    # A capture's identity across months (migration 0013), written with every capture.
    "capture_keys": _columns("capture_id captured_at"),
    "charges": _columns(
        "id session_id account_id agreement_id amount_fen idempotency_key status attempts "
        "provider_ref last_error created_at settled_at submitted_at provider_finished_at"
    ),
    "payments": _columns(
        "id out_trade_no provider purpose account_id session_id capture_id capture_captured_at "
        "stay_fee_fen "
        "debt_fen debt_ids amount_fen status pay_url provider_ref created_at paid_at "
        "provider_finished_at"
    ),
    "ledger_entries": _columns(
        "transaction_id ledger_account amount_fen kind session_id charge_id payment_id created_at"
    ),
    "notifications": _columns("id account_id kind source_key body status created_at sent_at"),
    "outbox": _columns("kind ref_id available_at attempts created_at done_at"),
    "lane_exceptions": _columns(
        "capture_id capture_captured_at car_park_id gate_id reason candidates image status "
        "resolved_plate "
        "resolved_by created_at resolved_at"
    ),
    "debts": _columns(
        "id account_id charge_id amount_fen created_at settled_at payment_id session_id"
    ),
}
# Tables whose ids the loader assigns itself (rows of other tables refer to them).
_ASSIGNED_IDS = (
    "accounts",
    "pay_later_agreements",
    "sessions",
    "charges",
    "payments",
    "debts",
    "notifications",
)
PROVIDER = "sandbox"
PROVIDER_PAY_URL = "https://pay.sandbox.invalid/pay/"


def progress(message: str) -> None:
    print(f"city-day: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class CityDayConfig:
    car_parks: int = CITY_CAR_PARKS
    stays: int = CITY_STAYS_PER_DAY
    rate: float = 100.0
    replay_seconds: float = 60.0
    query_calls: int = 20
    load_workers: int = 2
    # Kept afterwards for inspection when given (it must not exist yet); else dropped.
    database: str | None = None
    seed: int | None = None
    explain_path: Path = Path(".artifacts/city-day-explain.txt")


@dataclass(frozen=True, slots=True)
class PlannedCarPark:
    id: int
    code: str
    name: str
    capacity: int
    operator_id: int
    tariff: str
    gates_in: tuple[int, ...]
    gates_out: tuple[int, ...]


@dataclass(frozen=True)
class LoadPart:
    """One loader process's share: its car parks, its stays and its cars."""

    dsn: str
    index: int
    parts: int
    car_parks: list[PlannedCarPark]
    stays: int
    start: float
    end: float
    seed: int
    first_ids: dict[str, int]
    timezone: str
    public_base_url: str
    command_ttl_s: int
    tariff_since: datetime


# Seeding.


def _district_point(
    rng: random.Random, lat: float, lon: float, spread_km: float
) -> tuple[float, float]:
    km_per_degree_lon = 111.32 * math.cos(math.radians(lat))
    return (
        round(lat + rng.gauss(0, spread_km) / 110.57, 6),
        round(lon + rng.gauss(0, spread_km) / km_per_degree_lon, 6),
    )


def _gates_for(capacity: int) -> tuple[tuple[str, str], ...]:
    if capacity < 150:
        return (("in1", "in"), ("out1", "out"))
    if capacity < 600:
        return (("in1", "in"), ("out1", "out"), ("out2", "out"))
    return (("in1", "in"), ("in2", "in"), ("out1", "out"), ("out2", "out"))


async def seed_car_parks(
    pool: asyncpg.Pool, rng: random.Random, count: int, tariff_since: datetime
) -> list[PlannedCarPark]:
    """Car parks, their gates and tariffs, and their operators, through the admin repository."""
    planned: list[PlannedCarPark] = []
    weights = [d[3] for d in DISTRICTS]
    async with pool.acquire() as conn, conn.transaction():
        group_id = await admin.create_operator(conn, CITY_GROUP)
        operators: dict[str, int] = {}
        numbers: Counter[str] = Counter()
        for n in range(count):
            district, lat, lon, _, tariff = rng.choices(DISTRICTS, weights)[0]
            if district not in operators:
                operators[district] = await admin.create_operator(conn, f"{district}城市停车运营")
            numbers[district] += 1
            capacity = min(2000, max(50, round(rng.lognormvariate(math.log(140), 0.75))))
            latitude, longitude = _district_point(rng, lat, lon, 3.0)
            operator_id = group_id if rng.random() < CITY_GROUP_SHARE else operators[district]
            code = f"hz{n + 1:04d}"
            name = f"{district}{numbers[district]}号停车场"
            car_park_id = await admin.create_car_park(
                conn,
                operator_id=operator_id,
                code=code,
                name=name,
                capacity=capacity,
                latitude=latitude,
                longitude=longitude,
            )
            await admin.create_tariff(
                conn, car_park_id, effective_from=tariff_since, tariff=TARIFFS[tariff]
            )
            gates: dict[str, list[int]] = {"in": [], "out": []}
            for gate, direction in _gates_for(capacity):
                gates[direction].append(await admin.create_gate(conn, car_park_id, gate, direction))
            planned.append(
                PlannedCarPark(
                    car_park_id,
                    code,
                    name,
                    capacity,
                    operator_id,
                    tariff,
                    tuple(gates["in"]),
                    tuple(gates["out"]),
                )
            )
    return planned


# History: one loader process's day.


@dataclass(slots=True)
class _Car:
    plate: str
    color: str
    account_id: int | None = None
    agreement_id: int | None = None
    declined: bool = False
    # Open debts: (debt id, fen). While there are any, pay-later is blocked.
    debts: list[tuple[int, int]] = field(default_factory=list)

    def pay_later(self) -> PayLater | None:
        """The car's binding, agreement and arrears as the lane reads them with its stay
        (parking.lanes.repository): None when unbound; the account is blocked for arrears, and
        its debts known, while it has open debts."""
        if self.account_id is None:
            return None
        return PayLater(
            self.account_id,
            self.agreement_id,
            PAY_LATER_LIMIT_FEN if self.agreement_id is not None else None,
            blocked_for_arrears=bool(self.debts),
            debt_fen=sum(fen for _, fen in self.debts),
        )


class _Day:
    """Generates one part's day in time order and COPYs it, one transaction per chunk."""

    def __init__(self, part: LoadPart) -> None:
        self.part = part
        self.rng = random.Random(part.seed)
        self.tz = ZoneInfo(part.timezone)
        self.ttl = timedelta(seconds=part.command_ttl_s)
        self.next_id = dict(part.first_ids)
        self.max_id: dict[str, int] = {}
        self.rows: defaultdict[str, list[tuple[Any, ...]]] = defaultdict(list)
        self.row_counts: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.captures_by_hour = [0] * 24
        self.seq: Counter[int] = Counter()
        self.order = 0
        # Decided exits, materialised when the day reaches them: (time, order, rows).
        self.exits: list[tuple[float, int, list[tuple[str, tuple[Any, ...]]]]] = []
        # Cars that left, free again at: (time, order, car).
        self.busy: list[tuple[float, int, _Car]] = []
        self.free: list[_Car] = []
        self.debts: dict[int, list[Any]] = {}
        self.versions: dict[str, fees.TariffVersions] = {
            key: [(part.tariff_since, tariff)] for key, tariff in TARIFFS.items()
        }
        # Stays come to a car park in proportion to its spaces.
        self.park_cum = list(itertools.accumulate(p.capacity for p in part.car_parks))
        self.copy_s = 0.0

    def _id(self, table: str) -> int:
        value = self.next_id[table]
        self.next_id[table] = value + 1
        self.max_id[table] = value
        return value

    def _add(self, table: str, row: tuple[Any, ...]) -> None:
        self.rows[table].append(row)

    # The fleet.

    def fleet(self) -> None:
        part, rng = self.part, self.rng
        size = math.ceil(part.stays / STAYS_PER_CAR)
        plates: set[str] = set()
        end = part.end
        while len(self.free) < size:
            green = rng.random() < GREEN_SHARE
            plate = random_plate(rng, green=green)
            # Plates are unique city-wide: each loader takes its own share of them.
            if plate in plates or zlib.crc32(plate.encode()) % part.parts != part.index:
                continue
            plates.add(plate)
            car = _Car(plate, "green" if green else "blue")
            if rng.random() < BOUND_SHARE:
                car.account_id = self._id("accounts")
                joined = end - rng.uniform(2, 400) * 86400
                self._add(
                    "accounts",
                    (car.account_id, f"+86-1{3 + part.index}{car.account_id:09d}", _dt(joined)),
                )
                self._add(
                    "plate_bindings",
                    (car.account_id, plate, car.color, _dt(joined + 600), "dev-registry", None),
                )
                if rng.random() < PAY_LATER_SHARE:
                    car.agreement_id = self._id("pay_later_agreements")
                    car.declined = rng.random() < DECLINED_SHARE
                    self._add(
                        "pay_later_agreements",
                        (
                            car.agreement_id,
                            car.account_id,
                            PROVIDER,
                            f"AGR-HZ-{car.agreement_id:09d}",
                            PAY_LATER_LIMIT_FEN,
                            _dt(joined + 900),
                        ),
                    )
            self.free.append(car)

    # Arrivals.

    def arrivals(self) -> list[float]:
        """Entry times over the day, following ARRIVALS_BY_HOUR in local time."""
        part = self.part
        slots: list[tuple[float, float]] = []
        weights: list[float] = []
        t = part.start
        while t < part.end:
            local = datetime.fromtimestamp(t, self.tz)
            slot_end = min(part.end, t + 3600 - (local.minute * 60 + local.second))
            slots.append((t, slot_end))
            weights.append(ARRIVALS_BY_HOUR[local.hour] * (slot_end - t))
            t = slot_end
        chosen = self.rng.choices(slots, weights, k=part.stays)
        return sorted(self.rng.uniform(a, b) for a, b in chosen)

    def _duration_s(self) -> float:
        _, median, sigma = self.rng.choices(DURATIONS, cum_weights=_DURATION_CUM)[0]
        return max(60.0, self.rng.lognormvariate(math.log(median), sigma) * 60)

    # Rows.

    def _command(
        self,
        capture_id: uuid.UUID,
        action: str,
        display: list[str],
        at: float,
        fee: int | None = None,
        qr: str | None = None,
    ) -> str:
        """The command as the lane stores it (Command.model_dump(mode="json", exclude_none))."""
        issued = _dt(at)
        command: dict[str, Any] = {"capture_id": capture_id, "action": action, "display": display}
        if fee is not None:
            command["fee_fen"] = fee
        if qr is not None:
            command["payment_qr_url"] = qr
        command["issued_at"] = issued
        command["expires_at"] = issued + self.ttl
        return orjson.dumps(command, option=orjson.OPT_UTC_Z).decode()

    def _capture(
        self,
        gate_id: int,
        park: PlannedCarPark,
        capture_id: uuid.UUID,
        direction: str,
        car: _Car,
        at: float,
        outcome: str,
        session_id: int | None,
        command: str,
        *,
        captured: float | None = None,
        plate_source: str = "camera",
        match_status: str | None = None,
        confidence: float | None = None,
        unread: bool = False,
    ) -> tuple[Any, ...]:
        """A captures row; its seq is given when the day reaches it (see _emit). `captured`:
        when the camera took it (default: a moment before it reached the lane at `at`)."""
        if captured is None:
            captured = at - self.rng.uniform(0.05, 0.4)
        # The day's cameras are calibrated ones whose reads are certain from 0.98 (the lane's
        # default threshold, parking.lanes.rules.is_certain); an attendant's plate is certain.
        score = confidence if confidence is not None else round(self.rng.uniform(0.98, 0.999), 3)
        certain = not unread and (plate_source == "operator" or score >= 0.98)
        return (
            capture_id,
            gate_id,
            park.id,
            None,
            direction,
            None if unread else car.plate,
            car.color,
            score,
            _dt(captured),
            _dt(at),
            outcome,
            session_id,
            command,
            plate_source,
            match_status,
            certain,
        )

    def _emit(self, table: str, row: tuple[Any, ...]) -> None:
        if table == "captures":
            gate_id = row[1]
            self.seq[gate_id] += 1
            row = (*row[:3], self.seq[gate_id], *row[4:])
            hour = int((row[9].timestamp() - self.part.start) // 3600)
            self.captures_by_hour[min(23, max(0, hour))] += 1
            self._add("capture_keys", (row[0], row[8]))
        self._add(table, row)

    def _post(
        self,
        bundle: list[tuple[str, tuple[Any, ...]]],
        kind: str,
        lines: list[tuple[str, int]],
        at: float,
        *,
        session_id: int,
        charge_id: int | None = None,
        payment_id: int | None = None,
    ) -> None:
        """A balanced ledger transaction (as billing.ledger.post writes it)."""
        transaction_id = uuid.uuid4()
        for account, amount in ledger.balanced(kind, lines):
            if amount:
                bundle.append(
                    (
                        "ledger_entries",
                        (
                            transaction_id,
                            account,
                            amount,
                            kind,
                            session_id,
                            charge_id,
                            payment_id,
                            _dt(at),
                        ),
                    )
                )

    def _notify(
        self,
        bundle: list[tuple[str, tuple[Any, ...]]],
        account_id: int,
        kind: str,
        source_key: str,
        body: str,
        at: float,
    ) -> None:
        notification_id = self._id("notifications")
        sent = at + self.rng.uniform(0.05, 1.0)
        bundle.append(
            (
                "notifications",
                (notification_id, account_id, kind, source_key, body, "sent", _dt(at), _dt(sent)),
            )
        )
        bundle.append(("outbox", ("notification", notification_id, _dt(at), 1, _dt(at), _dt(sent))))

    # One stay.

    def stay(self, t: float) -> None:
        self.release(t)
        busy, rng = self.busy, self.rng
        while busy and busy[0][0] <= t:
            self.free.append(heapq.heappop(busy)[2])
        if self.free:
            index = rng.randrange(len(self.free))
            self.free[index], self.free[-1] = self.free[-1], self.free[index]
            car = self.free.pop()
        else:  # every car of the fleet is parked: a visitor from elsewhere
            car = _Car(random_plate(rng, province="皖"), "blue")
        park = self.part.car_parks[
            bisect.bisect_left(self.park_cum, rng.random() * self.park_cum[-1])
        ]
        stay_id = session_id_floor(_dt(t).date()) + self._id("sessions")
        entry_id = uuid.uuid4()
        debt = sum(fen for _, fen in car.debts)
        gate_in = rng.choice(park.gates_in)
        display = [car.plate, "欢迎光临", *_debt_line(debt)]
        self._emit(
            "captures",
            self._capture(
                gate_in,
                park,
                entry_id,
                "in",
                car,
                t,
                "entered",
                stay_id,
                self._command(entry_id, "open", display, t),
            ),
        )
        self.outcomes["entered"] += 1
        if rng.random() < DOUBLE_READ_SHARE:
            again_id, again_at = uuid.uuid4(), t + rng.uniform(1.0, 4.0)
            self._emit(
                "captures",
                self._capture(
                    gate_in,
                    park,
                    again_id,
                    "in",
                    car,
                    again_at,
                    "duplicate_read",
                    stay_id,
                    self._command(again_id, "open", [car.plate, "一路顺风"], again_at),
                ),
            )
            self.outcomes["duplicate_read"] += 1
        status, exited_at, exit_id, fee, account_id, settlement = self._exit(
            car, park, stay_id, t, t + self._duration_s(), debt
        )
        self._add(
            "sessions",
            (
                stay_id,
                park.id,
                car.plate,
                car.color,
                status,
                _dt(t),
                entry_id,
                exited_at,
                exit_id,
                fee,
                account_id,
                settlement,
                True,  # entered on a certain camera read
                True,  # of a calibrated camera model (`with_simulated_cameras`)
            ),
        )

    def _exit(
        self,
        car: _Car,
        park: PlannedCarPark,
        stay_id: int,
        entered: float,
        leaves: float,
        debt: int,
    ) -> tuple[Any, ...]:
        """Decides the stay's exit as the lane would and queues its rows for when the day gets
        there; returns the session's status, exited_at, exit_capture_id, fee_fen, account_id
        and settlement."""
        entered_at = _dt(entered)
        still_open: tuple[Any, ...] = ("open", None, None, None, None, None)
        part, rng = self.part, self.rng
        if leaves >= part.end:
            return still_open  # parked now
        exit_id = uuid.uuid4()
        exit_captured = leaves - rng.uniform(0.05, 0.4)
        gate_out = rng.choice(park.gates_out)
        bundle: list[tuple[str, tuple[Any, ...]]] = []
        order = self.order = self.order + 1
        decided = leaves
        unreadable = rng.random() < UNREADABLE_SHARE
        if unreadable:
            decided = leaves + rng.uniform(30, 300)  # an attendant reads the frame
            resolved = decided < part.end
            bundle.append(
                (
                    "lane_exceptions",
                    (
                        exit_id,
                        _dt(exit_captured),
                        park.id,
                        gate_out,
                        "unreadable",
                        orjson.dumps(
                            [{"plate": car.plate[:-2], "score": 0.41, "kind": "read"}]
                        ).decode(),
                        os.urandom(FRAME_BYTES),
                        "resolved" if resolved else "open",
                        car.plate if resolved else None,
                        f"operator_user:{park.operator_id}" if resolved else None,
                        _dt(leaves),
                        _dt(decided) if resolved else None,
                    ),
                )
            )
            if not resolved:
                hold = self._command(exit_id, "hold", ["车牌待确认", "请稍候 人工处理"], leaves)
                bundle.append(
                    (
                        "captures",
                        self._capture(
                            gate_out, park, exit_id, "out", car, leaves, "held_unreadable", None,
                            hold, captured=exit_captured, plate_source="ocr", confidence=0.41,
                            unread=True,
                        ),
                    )
                )  # fmt: skip
                self.outcomes["held_unreadable"] += 1
                heapq.heappush(self.exits, (leaves, order, bundle))
                return still_open
        # An attendant's plate: the capture keeps the camera's doubtful read's confidence.
        source: dict[str, Any] = (
            {"plate_source": "operator", "confidence": 0.41} if unreadable else {}
        )
        # The lane's own rule (parking.lanes.rules): the fee, and free, pay-later or held.
        rule = exit_rule(
            self.versions[park.tariff],
            entered_at=entered_at,
            at=_dt(decided),
            plate_color=car.color,
            fixed_fee_fen=None,
            pay_later_state=car.pay_later(),
            # Certain camera reads at entry and exit (or an attendant's plate at the exit).
            reads_certain=True,
            uncertain_policy="open_confirm",
        )
        assert rule is not None, "every car park has had its tariff since before the day"
        fee = rule.fee_fen
        closed = decided
        account_id: int | None
        if rule.outcome == "exited_free":
            outcome, settlement, account_id = "exited_free", "free", None
            command = self._command(
                exit_id, "open", [car.plate, "一路顺风", *_debt_line(debt)], decided, fee
            )
        elif rule.charge_to is not None:
            outcome, settlement, account_id = "exited_pay_later", "pay_later", rule.charge_to[0]
            command = self._command(
                exit_id, "open", [car.plate, f"{format_fen(fee)} 离场后扣款"], decided, fee
            )
            self._charge(bundle, car, park, stay_id, fee, entered, decided)
        else:
            held = rule.outcome
            paid = decided + rng.uniform(20, 120)
            if paid >= part.end:  # still at the barrier, paying
                due = [
                    f"应缴 {format_fen(rule.due_fen)}",
                    *([f"含欠费 {format_fen(rule.debt_fen)}"] if rule.debt_fen else []),
                ]
                hold = self._command(
                    exit_id,
                    "hold",
                    [car.plate, *due, "请扫码缴费"],
                    decided,
                    rule.due_fen,
                    gate_payment_page_url(part.public_base_url, exit_id),
                )
                bundle.append(
                    (
                        "captures",
                        self._capture(
                            gate_out, park, exit_id, "out", car, leaves, held, stay_id, hold,
                            captured=exit_captured, match_status="exact", **source,
                        ),
                    )
                )  # fmt: skip
                self.outcomes[held] += 1
                heapq.heappush(self.exits, (leaves, order, bundle))
                return still_open
            outcome, settlement, account_id = "paid_at_gate", "paid_at_gate", car.account_id
            command = self._command(exit_id, "open", [car.plate, "已缴费 一路顺风"], paid)
            self._pay(bundle, car, park, stay_id, (exit_id, exit_captured), fee, decided, paid)
            closed = paid
        bundle.insert(
            0,
            (
                "captures",
                self._capture(
                    gate_out, park, exit_id, "out", car, leaves, outcome, stay_id, command,
                    captured=exit_captured, match_status="exact", **source,
                ),
            ),
        )  # fmt: skip
        self.outcomes[outcome] += 1
        heapq.heappush(self.exits, (leaves, order, bundle))
        heapq.heappush(self.busy, (closed, order, car))
        return ("closed", _dt(closed), exit_id, fee, account_id, settlement)

    def _charge(
        self,
        bundle: list[tuple[str, tuple[Any, ...]]],
        car: _Car,
        park: PlannedCarPark,
        stay_id: int,
        fee: int,
        entered: float,
        left: float,
    ) -> None:
        """The charge queued at the exit and what the worker and the provider made of it."""
        assert car.account_id is not None and car.agreement_id is not None
        rng = self.rng
        charge_id = self._id("charges")
        submitted = left + rng.uniform(0.05, 1.0)
        finished = submitted + rng.uniform(0.05, 0.5)
        failed = car.declined
        bundle.append(
            (
                "charges",
                (
                    charge_id,
                    stay_id,
                    car.account_id,
                    car.agreement_id,
                    fee,
                    new_idempotency_key(stay_id),
                    "failed" if failed else "succeeded",
                    1,
                    f"sbx_{uuid.uuid4().hex}",
                    "declined: insufficient_funds" if failed else None,
                    _dt(left),
                    None if failed else _dt(finished),
                    _dt(submitted),
                    None if failed else _dt(finished),
                ),
            )
        )
        self._post(
            bundle,
            "fee_accrued",
            charges.accrual_lines(car.account_id, park.id, fee),
            left,
            session_id=stay_id,
            charge_id=charge_id,
        )
        bundle.append(("outbox", ("charge", charge_id, _dt(left), 1, _dt(left), _dt(finished))))
        if failed:
            debt_id = self._id("debts")
            self.debts[debt_id] = [
                debt_id,
                car.account_id,
                charge_id,
                fee,
                _dt(finished),
                None,
                None,
                stay_id,
            ]
            car.debts.append((debt_id, fee))
            self._notify(
                bundle,
                car.account_id,
                "charge_failed",
                f"charge:{charge_id}:failed",
                f"{car.plate}: the parking fee at {park.name} could not be collected; "
                "pay it in the app to keep leaving without stopping",
                finished,
            )
            return
        self._post(
            bundle,
            "charge_settled",
            charges.settlement_lines(PROVIDER, car.account_id, fee),
            finished,
            session_id=stay_id,
            charge_id=charge_id,
        )
        self._notify(
            bundle,
            car.account_id,
            "exit_charged",
            f"charge:{charge_id}:succeeded",
            exit_charged_text(car.plate, park.name, _dt(entered), _dt(left), fee, self.tz),
            finished,
        )

    def _pay(
        self,
        bundle: list[tuple[str, tuple[Any, ...]]],
        car: _Car,
        park: PlannedCarPark,
        stay_id: int,
        capture: tuple[uuid.UUID, float],
        fee: int,
        held: float,
        paid: float,
    ) -> None:
        """The held driver paid the fee and any debts through the gate's QR code for the held
        exit `capture` (its id and capture time)."""
        payment_id = self._id("payments")
        out_trade_no = new_out_trade_no()
        debt_ids = [debt_id for debt_id, _ in car.debts]
        debt = sum(fen for _, fen in car.debts)
        bundle.append(
            (
                "payments",
                (
                    payment_id,
                    out_trade_no,
                    PROVIDER,
                    "gate",
                    car.account_id,
                    stay_id,
                    capture[0],
                    _dt(capture[1]),
                    fee,
                    debt,
                    debt_ids,
                    fee + debt,
                    "succeeded",
                    PROVIDER_PAY_URL + out_trade_no,
                    f"sbx_{uuid.uuid4().hex}",
                    _dt(held + (paid - held) * self.rng.uniform(0.1, 0.6)),
                    _dt(paid),
                    _dt(paid),
                ),
            )
        )
        lines = received_lines(
            PROVIDER,
            fee + debt,
            stay_fen=fee,
            car_park_id=park.id,
            debt_fen=debt,
            account_id=car.account_id,
        )
        self._post(
            bundle, "payment_received", lines, paid, session_id=stay_id, payment_id=payment_id
        )
        for debt_id in debt_ids:
            self.debts[debt_id][5:7] = [_dt(paid), payment_id]
        car.debts.clear()
        bundle.append(
            ("outbox", ("gate_command", payment_id, _dt(paid), 1, _dt(paid), _dt(paid + 0.05)))
        )
        if car.account_id is not None:
            self._notify(
                bundle,
                car.account_id,
                "payment_received",
                f"payment:{payment_id}:succeeded",
                notifications.render("payment_received", "zh", amount=format_fen(fee + debt)),
                paid,
            )

    def release(self, until: float) -> None:
        """Writes the exits the day has reached."""
        exits = self.exits
        while exits and exits[0][0] <= until:
            for table, row in heapq.heappop(exits)[2]:
                self._emit(table, row)

    async def flush(self, conn: asyncpg.Connection) -> None:
        started = time.perf_counter()
        async with conn.transaction():
            for table in _COLUMNS:
                records = self.rows.get(table)
                if records:
                    await conn.copy_records_to_table(
                        table, records=records, columns=_COLUMNS[table]
                    )
                    self.row_counts[table] += len(records)
        self.rows.clear()
        self.copy_s += time.perf_counter() - started

    async def run(self) -> dict[str, Any]:
        part = self.part
        started = time.perf_counter()
        # A plain connection: COPY needs asyncpg's own binary codecs (jsonb as text).
        conn = await asyncpg.connect(part.dsn)
        try:
            self.fleet()
            await self.flush(conn)
            arrivals = self.arrivals()
            for n, t in enumerate(arrivals, 1):
                self.stay(t)
                if n % CHUNK_STAYS == 0:
                    await self.flush(conn)
                    if n % (CHUNK_STAYS * 10) == 0:
                        rate = n / (time.perf_counter() - started)
                        progress(f"loader {part.index}: {n:,}/{part.stays:,} stays ({rate:,.0f}/s)")
            self.release(part.end)
            self.rows["debts"] = [tuple(row) for row in self.debts.values()]
            await self.flush(conn)
            blocked = sorted({row[1] for row in self.debts.values() if row[5] is None})
            await conn.execute(
                "UPDATE accounts SET blocked_for_arrears = true WHERE id = ANY($1::bigint[])",
                blocked,
            )
        finally:
            await conn.close()
        return {
            "rows": dict(self.row_counts),
            "outcomes": dict(self.outcomes),
            "captures_by_hour": self.captures_by_hour,
            "max_ids": self.max_id,
            "seconds": time.perf_counter() - started,
            "copy_seconds": self.copy_s,
        }


def _debt_line(debt: int) -> list[str]:
    return [f"欠费 {format_fen(debt)} 请在App缴纳"] if debt else []


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _load_part(part: LoadPart) -> dict[str, Any]:
    """Runs in a loader process."""
    return uvloop.run(_Day(part).run())


async def load_history(
    dsn: str,
    car_parks: list[PlannedCarPark],
    *,
    stays: int,
    workers: int,
    start: float,
    end: float,
    seed: int,
    settings: Settings,
    tariff_since: datetime,
) -> dict[str, Any]:
    """A day of stays in `workers` processes; returns their merged counts."""
    workers = max(1, min(workers, len(car_parks)))
    conn = await asyncpg.connect(dsn)
    try:
        first = {
            table: await conn.fetchval(
                f"SELECT COALESCE(max({_counter(table)}), 0) + 1 FROM {table}"
            )
            for table in _ASSIGNED_IDS
        }
    finally:
        await conn.close()
    parts: list[LoadPart] = []
    for index in range(workers):
        share = stays // workers + (1 if index < stays % workers else 0)
        parts.append(
            LoadPart(
                dsn=dsn,
                index=index,
                parts=workers,
                car_parks=car_parks[index::workers],
                stays=share,
                start=start,
                end=end,
                seed=seed * 1000 + index,
                first_ids=dict(first),
                timezone=settings.timezone,
                public_base_url=settings.public_base_url,
                command_ttl_s=settings.command_ttl_s,
                tariff_since=tariff_since,
            )
        )
        # Each part's ids lie above the previous part's (a stay has at most one of each row).
        for table in _ASSIGNED_IDS:
            first[table] += share
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool_:
        results = await asyncio.gather(*(loop.run_in_executor(pool_, _load_part, p) for p in parts))
    conn = await asyncpg.connect(dsn)
    try:
        # The loaders chose these ids themselves: the sequences continue after them.
        for table in _ASSIGNED_IDS:
            top = max((r["max_ids"].get(table, 0) for r in results), default=0)
            if top:
                await conn.execute(
                    "SELECT setval(pg_get_serial_sequence($1, 'id'), $2)", table, top
                )
    finally:
        await conn.close()
    merged: dict[str, Any] = {
        "rows": Counter(),
        "outcomes": Counter(),
        "captures_by_hour": [0] * 24,
    }
    for result in results:
        merged["rows"].update(result["rows"])
        merged["outcomes"].update(result["outcomes"])
        for hour, n in enumerate(result["captures_by_hour"]):
            merged["captures_by_hour"][hour] += n
    merged["copy_seconds"] = round(sum(r["copy_seconds"] for r in results), 1)
    merged["generate_seconds"] = round(sum(r["seconds"] - r["copy_seconds"] for r in results), 1)
    return merged


# After the load: the database's shape and consistency.


async def table_sizes(conn: asyncpg.Connection) -> dict[str, dict[str, int]]:
    """Every table's rows (as VACUUM counted them), heap + TOAST and index bytes; a
    partitioned table's partitions are summed under its name."""
    rows = await conn.fetch(
        """SELECT COALESCE(pg_partition_root(c.oid), c.oid)::regclass::text AS name,
                  sum(c.reltuples)::bigint AS rows,
                  sum(pg_total_relation_size(c.oid))::bigint AS total,
                  sum(pg_indexes_size(c.oid))::bigint AS indexes
           FROM pg_class c
           WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace
           GROUP BY 1 ORDER BY 3 DESC"""
    )
    return {
        r["name"]: {"rows": max(0, r["rows"]), "bytes": r["total"], "index_bytes": r["indexes"]}
        for r in rows
    }


async def consistency(conn: asyncpg.Connection) -> dict[str, Any]:
    """The invariants the history (and the replay on top of it) must keep."""
    row = await conn.fetchrow(
        f"""SELECT
             (SELECT count(*) FROM sessions s WHERE s.settlement = 'pay_later'
                AND NOT EXISTS (SELECT 1 FROM charges c WHERE c.session_id = s.id))
                 AS pay_later_stays_without_charge,
             (SELECT count(*) FROM charges c JOIN sessions s ON s.id = c.session_id
                WHERE s.settlement IS DISTINCT FROM 'pay_later') AS charges_of_other_stays,
             (SELECT COALESCE(max(n), 0) FROM (SELECT count(*) AS n FROM charges
                GROUP BY session_id) per_stay) AS charges_per_session_max,
             (SELECT count(*) FROM sessions s WHERE s.entry_capture_id IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM captures c
                                WHERE c.capture_id = s.entry_capture_id AND c.session_id = s.id))
                 AS entries_without_capture,
             (SELECT count(*) FROM sessions s WHERE s.status = 'closed'
                AND NOT EXISTS (SELECT 1 FROM captures c
                                WHERE c.capture_id = s.exit_capture_id AND c.session_id = s.id))
                 AS exits_without_capture,
             (SELECT count(*) FROM debts d JOIN accounts a ON a.id = d.account_id
                WHERE d.settled_at IS NULL AND NOT a.blocked_for_arrears
                  AND {debts.UNDISPUTED.format(d="d")})
                 AS open_debts_of_unblocked_accounts,
             (SELECT count(*) FROM captures c WHERE NOT EXISTS (
                SELECT 1 FROM capture_keys k
                WHERE k.capture_id = c.capture_id AND k.captured_at = c.captured_at))
                 AS captures_without_key"""
    )
    return {"ledger_balanced": await ledger.is_balanced(conn), **dict(row)}


# The replay.


async def _city_for_gates(conn: asyncpg.Connection, operator_id: int) -> DemoCity:
    """The simulated gates' view of the city: the cars parked now (the open stays) and every
    other car seen in the day or bound to an account."""
    gates = [
        SimGate(r["lot"], r["gate"], r["direction"])
        for r in await conn.fetch(
            """SELECT cp.code AS lot, g.code AS gate, g.direction FROM gates g
               JOIN car_parks cp ON cp.id = g.car_park_id ORDER BY g.id"""
        )
    ]
    bound = {
        r["plate"]
        for r in await conn.fetch("SELECT plate FROM plate_bindings WHERE unbound_at IS NULL")
    }
    inside: dict[str, list[tuple[Vehicle, datetime]]] = defaultdict(list)
    parked: set[str] = set()
    for r in await conn.fetch(
        """SELECT cp.code, s.plate, s.plate_color, s.entered_at FROM sessions s
           JOIN car_parks cp ON cp.id = s.car_park_id WHERE s.status = 'open'"""
    ):
        parked.add(r["plate"])
        inside[r["code"]].append((_vehicle(r["plate"], r["plate_color"], bound), r["entered_at"]))
    outside = [
        _vehicle(r["plate"], r["color"], bound)
        for r in await conn.fetch(
            "SELECT plate, min(plate_color) AS color FROM sessions GROUP BY plate ORDER BY plate"
        )
        if r["plate"] not in parked
    ]
    car_park_ids = [r["id"] for r in await conn.fetch("SELECT id FROM car_parks ORDER BY id")]
    return DemoCity("cityday", operator_id, car_park_ids, gates, dict(inside), outside)


def _vehicle(plate: str, color: str | None, bound: set[str]) -> Vehicle:
    return Vehicle(plate, "green" if color == "green" else "blue", plate in bound)


async def replay_day(
    runtime: Runtime, operator_id: int, *, rate: float, seconds: float
) -> dict[str, Any]:
    """The lane across all the car parks on top of the day; its figures, and how many car
    parks' live counters differ from their open stays afterwards."""
    async with runtime.pool.acquire() as conn:
        city = await _city_for_gates(conn, operator_id)
    progress(f"replay across {len(city.car_park_ids):,} car parks at {rate}/s for {seconds} s")
    replay = await drive(runtime, city, rate=rate, duration_s=seconds, exit_share=0.5)
    # Its first seconds meet cold caches (gates, tariffs, pages of 3,476 car parks), and on a
    # shared machine some windows meet other people's work: p99 per 10 s shows which.
    latencies = list(runtime.lanes.stats.latencies_ms)
    replay["second_half"] = percentiles(latencies[len(latencies) // 2 :])
    window = max(1, round(rate * 10))
    replay["p99_ms_by_10s"] = [
        percentiles(latencies[n : n + window])["p99_ms"] for n in range(0, len(latencies), window)
    ]
    async with runtime.pool.acquire() as conn:
        stays = await occupancy_repo.open_counts(conn)
    counters = await runtime.occupancy.get_many(list(stays))
    replay["occupancy_counters_off"] = sum(1 for i, n in stays.items() if counters[i] != n)
    return replay


# The views.


@dataclass(frozen=True)
class _View:
    name: str
    path: str
    params: dict[str, Any]
    staff: bool


class _Tracer:
    """Collects the SQL each traced request ran (asyncpg's query logger)."""

    def __init__(self) -> None:
        self.route: str | None = None
        self.queries: defaultdict[str, list[tuple[str, tuple[Any, ...]]]] = defaultdict(list)

    def __call__(self, record: Any) -> None:
        text = record.query.lstrip()
        if (
            self.route is not None
            and re.match(r"(?i)(select|with)\b", text)
            and not re.search(r"(?i)\b(insert|update|delete)\b", text)
            and "typeinfo_tree" not in text  # asyncpg's own type introspection
        ):
            self.queries[self.route].append((record.query, tuple(record.args)))


async def _views_of(
    conn: asyncpg.Connection, operator_id: int, start: float, end: float, timezone: str
) -> list[_View]:
    busiest = await conn.fetchrow(
        """SELECT cp.id, cp.code, cp.latitude, cp.longitude
           FROM car_parks cp JOIN sessions s ON s.car_park_id = cp.id
           WHERE cp.operator_id = $1 GROUP BY cp.id ORDER BY count(*) DESC LIMIT 1""",
        operator_id,
    )
    plate = await conn.fetchval(
        "SELECT plate FROM sessions WHERE car_park_id = $1 ORDER BY entered_at DESC LIMIT 1",
        busiest["id"],
    )
    tz = ZoneInfo(timezone)
    day = {
        "from": datetime.fromtimestamp(start, tz).date().isoformat(),
        "to": datetime.fromtimestamp(end, tz).date().isoformat(),
    }
    # Around the busiest car park: a driver looking for space where it is scarcest.
    lat, lon = busiest["latitude"], busiest["longitude"]
    stays, revenue = "/api/v1/operator/stays", "/api/v1/operator/reports/revenue"
    return [
        _View("operator.stays.car_park", stays, {"car_park": busiest["code"]}, True),
        _View("operator.stays.plate", stays, {"plate": plate}, True),
        _View("operator.exceptions", "/api/v1/operator/exceptions", {"status": "open"}, True),
        _View("operator.dashboard", "/api/v1/operator/dashboard/summary", {}, True),
        _View("operator.revenue", revenue, day, True),
        _View("operator.revenue_csv", revenue, {**day, "format": "csv"}, True),
        _View("operator.debts", "/api/v1/operator/reports/debts", {}, True),
        _View("public.car_parks", "/api/v1/public/car-parks", {}, False),
        _View(
            "public.nearby",
            "/api/v1/public/car-parks/nearby",
            {"lat": lat, "lon": lon, "radius_m": 1000},
            False,
        ),
        _View("public.places", "/api/v1/public/places", {}, False),
        _View("public.car_park", f"/api/v1/public/car-parks/{busiest['code']}", {}, False),
    ]


async def _explain(
    conn: asyncpg.Connection, query: str, args: tuple[Any, ...], *, generic: bool
) -> tuple[list[str], float]:
    """EXPLAIN (ANALYZE, BUFFERS) of the query with these arguments: the custom plan the
    first executions of a prepared statement get, or the generic plan it may switch to."""
    async with conn.transaction(readonly=True):
        if not generic:
            rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {query}", *args)
        else:
            statement = await conn.prepare(query)
            types = [
                await conn.fetchval("SELECT format_type($1, NULL)", p.oid)
                for p in statement.get_parameters()
            ]
            literals = [
                await conn.fetchval(f"SELECT quote_nullable($1::{t}::text)", a)
                for t, a in zip(types, args, strict=True)
            ]
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            params = f"({', '.join(types)})" if types else ""
            await conn.execute(f"PREPARE cityday_explained {params} AS {query}")
            try:
                values = ", ".join(f"{v}::{t}" for v, t in zip(literals, types, strict=True))
                rows = await conn.fetch(
                    "EXPLAIN (ANALYZE, BUFFERS) EXECUTE cityday_explained"
                    + (f"({values})" if values else "")
                )
            finally:
                await conn.execute("DEALLOCATE cityday_explained")
    plan = [r[0] for r in rows]
    executed = next((float(m[1]) for line in plan if (m := _EXECUTION_TIME.match(line))), 0.0)
    return plan, executed


_EXECUTION_TIME = re.compile(r"Execution Time: ([\d.]+) ms")
_SEQ_SCAN = re.compile(r"Seq Scan on (\w+)")


async def time_views(
    runtime: Runtime,
    dsn: str,
    operator_id: int,
    *,
    calls: int,
    start: float,
    end: float,
    explain_path: Path,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each view over HTTP `calls` times (after one traced call), p50/p99; the EXPLAIN of the
    SQL each ran goes to `explain_path`. Returns the figures and the flagged scans."""
    tracer = _Tracer()
    pool = await create_pool(dsn, min_size=4, max_size=4, stateless=True)
    try:
        held = [await pool.acquire() for _ in range(4)]
        for conn in held:
            conn.add_query_logger(tracer)
        for conn in held:
            await pool.release(conn)
        app = create_app(dataclasses.replace(runtime, pool=pool, read_pool=pool))
        async with pool.acquire() as conn:
            views = await _views_of(conn, operator_id, start, end, runtime.settings.timezone)
            user_id = await auth_repo.create_operator_user(
                conn,
                operator_id,
                f"bench-{secrets.token_hex(4)}@city-day.invalid",
                "City-day bench",
                "admin",
                hash_password(secrets.token_urlsafe(12)),
            )
        token = app.state.signer.issue(f"operator_user:{user_id}", "admin", operator_id)
        staff = {"Authorization": f"Bearer {token}"}
        figures: dict[str, dict[str, Any]] = {}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as http:
            for view in views:
                headers = staff if view.staff else {}
                tracer.route = view.name
                first = await http.get(view.path, params=view.params, headers=headers)
                tracer.route = None
                times: list[float] = []
                errors = int(first.status_code != 200)
                for _ in range(calls):
                    began = time.perf_counter()
                    response = await http.get(view.path, params=view.params, headers=headers)
                    times.append((time.perf_counter() - began) * 1000)
                    errors += response.status_code != 200
                shown = percentiles(times)
                figures[view.name] = {
                    "p50_ms": shown["p50_ms"],
                    "p99_ms": shown["p99_ms"],
                    "max_ms": shown["max_ms"],
                    "response_bytes": len(first.content),
                    "errors": errors,
                }
                progress(
                    f"{view.name}: p50 {shown['p50_ms']} ms, p99 {shown['p99_ms']} ms "
                    f"({len(first.content):,} bytes)"
                )
        async with pool.acquire() as conn:
            flags = await _write_explains(conn, views, figures, tracer, explain_path)
    finally:
        await pool.close()
    return figures, flags


async def _write_explains(
    conn: asyncpg.Connection,
    views: list[_View],
    figures: dict[str, dict[str, Any]],
    tracer: _Tracer,
    path: Path,
) -> list[str]:
    sizes = {
        r["relname"]: r["reltuples"]
        for r in await conn.fetch(
            """SELECT relname, reltuples::bigint AS reltuples FROM pg_class
               WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace"""
        )
    }
    out: list[str] = []
    flags: list[str] = []
    for view in views:
        shown = figures[view.name]
        out.append(
            f"==== {view.name}: GET {view.path} {view.params or ''}\n"
            f"     HTTP p50 {shown['p50_ms']} ms, p99 {shown['p99_ms']} ms\n"
        )
        slowest = 0.0
        seen: set[str] = set()
        for query, args in tracer.queries.get(view.name, []):
            if query in seen:
                continue
            seen.add(query)
            out.append(f"---- SQL ({len(args)} args: {_shorten(args)})\n{query.strip()}\n")
            earlier = _days_earlier(args, PAST_DAYS)
            for kind, explained_args, generic in (
                ("custom plan", args, False),
                ("generic plan", args, True),
                (f"custom plan, dates {PAST_DAYS} days earlier", earlier, False),
            ):
                if explained_args is None:
                    continue
                plan, executed = await _explain(conn, query, explained_args, generic=generic)
                if explained_args is args and not generic:
                    slowest = max(slowest, executed)
                out.append(f"---- {kind}\n" + "\n".join(plan) + "\n")
                for table in _SEQ_SCAN.findall("\n".join(plan)):
                    if sizes.get(table, 0) >= LARGE_TABLE_ROWS:
                        flag = f"{view.name}: Seq Scan on {table} ({sizes[table]:,} rows, {kind})"
                        if flag not in flags:
                            flags.append(flag)
        shown["sql_ms"] = round(slowest, 2)
        out.append("\n")
    body = "".join(out)
    if flags:
        body = "Sequential scans of large tables:\n" + "\n".join(flags) + "\n\n" + body
    path.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(path.write_text, body, encoding="utf-8")
    return flags


def _days_earlier(args: tuple[Any, ...], days: int) -> tuple[Any, ...] | None:
    """The arguments with every date moved `days` back, or None when there is none. The
    database holds one day, so today's reports rightly read whole tables; a day of a
    database that holds many (here: one with no rows, estimated as few) is read through an
    index only if there is one."""
    if not any(isinstance(a, date) for a in args):
        return None
    return tuple(a - timedelta(days=days) if isinstance(a, date) else a for a in args)


def _shorten(args: tuple[Any, ...]) -> str:
    text = repr(args)
    return text if len(text) <= 200 else text[:200] + "…"


# The whole bench.


def _database_dsn(server_dsn: str, name: str) -> str:
    parts = urlsplit(server_dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _create_database(server_dsn: str, name: str) -> None:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"database name {name!r}: lower-case letters, digits and _ only")
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(server_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def extrapolation(
    *,
    stays: int,
    per_stay_bytes: int,
    captures_by_hour: list[int],
    start: float,
    timezone: str,
    load_stays_per_s: float,
    replay: dict[str, Any],
) -> dict[str, Any]:
    """From this run's figures to the city's: storage a day and a year, the day's traffic
    against what this machine decided, and how long loading a full day takes."""
    scale = CITY_STAYS_PER_DAY / stays
    day_captures = sum(captures_by_hour) * scale
    peak_hour = max(range(24), key=lambda h: captures_by_hour[h])
    peak_per_s = captures_by_hour[peak_hour] * scale / 3600
    peak_from = datetime.fromtimestamp(start + peak_hour * 3600, ZoneInfo(timezone))
    per_day = per_stay_bytes * CITY_STAYS_PER_DAY // stays
    rate, seconds = replay["rate"], replay["duration_s"]
    throughput = replay["throughput_deciding_per_s"] or replay["throughput_per_s"] or 0.0
    day_hours = day_captures / throughput / 3600 if throughput else None
    return {
        "city_stays_per_day": CITY_STAYS_PER_DAY,
        "bytes_per_day": per_day,
        "bytes_per_year": per_day * 365,
        "storage_note": (
            "the per-stay tables (sessions, captures, charges, payments, debts, ledger, "
            "notifications, outbox, exceptions with their frames) with their indexes, "
            "bulk-loaded and vacuumed, times the city's stays. The live system writes a stay at "
            "entry and again at exit and a charge three times: dead tuples and index bloat "
            "come on top until vacuum reuses the space. Frames are erased after "
            "PARKING_IMAGE_RETENTION_DAYS, done outbox jobs and sent notifications could be "
            "pruned, so a year keeps less of those than 365 days' worth"
        ),
        "city_captures_per_day": round(day_captures),
        "city_average_captures_per_s": round(day_captures / 86400, 1),
        "city_peak_hour_captures_per_s": round(peak_per_s, 1),
        "city_peak_hour_starts": peak_from.strftime("%H:%M"),
        "replay_rate_vs_city_peak_hour": round(rate / peak_per_s, 2),
        "replay_throughput_vs_city_peak_hour": round(throughput / peak_per_s, 2),
        "day_at_replay_throughput_h": round(day_hours, 2) if day_hours else None,
        "replay_note": (
            f"a day of {CITY_STAYS_PER_DAY:,} stays is {day_captures:,.0f} captures (an entry and "
            f"an exit each, and double reads): {day_captures / 86400:.1f}/s on average, "
            f"{peak_per_s:.1f}/s in the busiest hour (from {peak_from:%H:%M}). The replay "
            f"offered {rate}/s for {seconds} s, {rate / peak_per_s:.1f}x the peak hour, and the "
            f"lane decided {throughput}/s with the day's data in the database"
            + (
                f": a whole day at that rate would take {day_hours:.1f} h "
                f"({24 / day_hours:.1f}x compressed)"
                if day_hours
                else ""
            )
        ),
        "load_note": (
            f"loaded {stays:,} stays at {load_stays_per_s:,.0f}/s: a day of "
            f"{CITY_STAYS_PER_DAY:,} takes {CITY_STAYS_PER_DAY / load_stays_per_s / 60:.1f} min "
            "at that rate"
        ),
    }


async def run_city_day(
    settings: Settings, provider: ProviderEndpoint, config: CityDayConfig
) -> dict[str, Any]:
    began = time.monotonic()
    timings: dict[str, float] = {}
    rng = random.Random(config.seed)
    seed = config.seed if config.seed is not None else rng.randrange(1 << 30)
    run = secrets.token_hex(3)
    name = config.database or f"parking_cityday_{run}"
    async with endpoints(settings) as eps:
        server = eps.database_url
        await _create_database(server, name)
        dsn = _database_dsn(server, name)
        progress(f"database {name}")
        city_settings = with_simulated_cameras(settings).model_copy(
            update={
                "database_url": dsn,
                "redis_url": eps.redis_url,
                "mqtt_url": eps.mqtt_url,
                # Its own keys and topics on servers other people use.
                "redis_key_prefix": f"cityday-{run}:",
                "mqtt_topic_prefix": f"cityday-{run}",
            }
        )
        try:
            result = await _run(city_settings, provider, config, dsn, seed, timings)
        finally:
            await _forget_redis_keys(city_settings, eps.redis_url)
            if config.database is None:
                await _drop_database(server, name)
    timings["total"] = time.monotonic() - began
    result["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    result["database"] = config.database
    return result


async def _forget_redis_keys(settings: Settings, redis_url: str) -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    try:
        keys = [key async for key in redis.scan_iter(match=f"{settings.redis_key_prefix}*")]
        for n in range(0, len(keys), 1000):
            await redis.delete(*keys[n : n + 1000])
    finally:
        await redis.aclose()


async def _run(
    settings: Settings,
    provider: ProviderEndpoint,
    config: CityDayConfig,
    dsn: str,
    seed: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    rng = random.Random(seed)
    end = time.time()
    start = end - 86400
    tariff_since = _dt(start) - timedelta(days=30)
    pool = await create_pool(dsn, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        phase = time.monotonic()
        car_parks = await seed_car_parks(pool, rng, config.car_parks, tariff_since)
        timings["seed"] = time.monotonic() - phase
        progress(
            f"{len(car_parks):,} car parks, {sum(p.capacity for p in car_parks):,} spaces, "
            f"{sum(len(p.gates_in) + len(p.gates_out) for p in car_parks):,} gates in "
            f"{timings['seed']:.1f} s; loading {config.stays:,} stays "
            f"with {config.load_workers} loaders"
        )
        phase = time.monotonic()
        history = await load_history(
            dsn,
            car_parks,
            stays=config.stays,
            workers=config.load_workers,
            start=start,
            end=end,
            seed=seed,
            settings=settings,
            tariff_since=tariff_since,
        )
        timings["load"] = time.monotonic() - phase
        load_rate = config.stays / timings["load"]
        progress(f"history loaded in {timings['load']:.1f} s ({load_rate:,.0f} stays/s)")
        phase = time.monotonic()
        async with pool.acquire() as conn:
            # What autovacuum does after a day: statistics for the planner, visibility maps.
            await conn.execute("VACUUM (ANALYZE)")
            timings["vacuum_analyze"] = time.monotonic() - phase
            # The load's writes flushed now rather than during the replay (a day spreads them).
            with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
                await conn.execute("CHECKPOINT")
            tables = await table_sizes(conn)
            database_bytes = await conn.fetchval("SELECT pg_database_size(current_database())")
            open_stays = await conn.fetchval("SELECT count(*) FROM sessions WHERE status = 'open'")
            operator_id = await conn.fetchval(
                "SELECT operator_id FROM car_parks GROUP BY 1 ORDER BY count(*) DESC LIMIT 1"
            )
        per_stay_bytes = sum(tables[t]["bytes"] for t in PER_STAY_TABLES if t in tables)
        progress(
            f"vacuum analyze {timings['vacuum_analyze']:.1f} s; database {database_bytes:,} bytes, "
            f"{per_stay_bytes * 1_000_000 // config.stays:,} bytes per million stays; "
            f"{open_stays:,} cars parked now"
        )
        phase = time.monotonic()
        async with lane_service(settings, provider) as runtime:
            replay = await replay_day(
                runtime, operator_id, rate=config.rate, seconds=config.replay_seconds
            )
            timings["replay"] = time.monotonic() - phase
            phase = time.monotonic()
            queries, seq_scans = await time_views(
                runtime,
                dsn,
                operator_id,
                calls=config.query_calls,
                start=start,
                end=end,
                explain_path=config.explain_path,
            )
            timings["queries"] = time.monotonic() - phase
        phase = time.monotonic()
        async with pool.acquire() as conn:
            checks = await consistency(conn)
        timings["checks"] = time.monotonic() - phase
        checks["occupancy_counters_off"] = replay.pop("occupancy_counters_off")
    finally:
        await pool.close()
    return {
        "car_parks": len(car_parks),
        "spaces": sum(p.capacity for p in car_parks),
        "stays": config.stays,
        "open_stays_before_replay": open_stays,
        "load_stays_per_s": round(load_rate, 1),
        "db_bytes_per_million_stays": per_stay_bytes * 1_000_000 // config.stays,
        "db_bytes": database_bytes,
        "tables": tables,
        "history": {
            "outcomes": dict(history["outcomes"]),
            "rows": dict(history["rows"]),
            "loader_copy_s": history["copy_seconds"],
            "loader_generate_s": history["generate_seconds"],
        },
        "replay": {
            key: replay[key]
            for key in (
                "rate",
                "duration_s",
                "throughput_per_s",
                "throughput_deciding_per_s",
                "p50_ms",
                "p95_ms",
                "p99_ms",
                "max_ms",
                "errors",
                "captures_sent",
                "decisions",
                "exits",
                "charged",
                "charges_pending",
                "exits_wrong_plate",
                "outcomes",
                "gate_round_trip",
                "second_half",
                "p99_ms_by_10s",
            )
        },
        "queries": queries,
        "seq_scans_on_large_tables": seq_scans,
        "explain_file": str(config.explain_path),
        "checks": checks,
        "extrapolation": extrapolation(
            stays=config.stays,
            per_stay_bytes=per_stay_bytes,
            captures_by_hour=history["captures_by_hour"],
            start=start,
            timezone=settings.timezone,
            load_stays_per_s=load_rate,
            replay=replay,
        ),
    }
