"""`parking-dev bench --misreads`: a city's exits with realistic misreads, decided by the lane's
own pure rules, counting every charge to an account that is not the real car's owner.

DESIGN.md, "Numbers the system is built to": wrong-account charges 0 in a simulated million
exits with realistic misreads; exits needing a person ≤ 0.5 %. Nothing here decides: a read is
turned into the lane's `PlateReading` by `lanes.reading.camera_reading` / `ocr_reading`, an
entry is recorded as `LaneService._entry` records it (`identity_color`, `is_certain`), and an
exit is `rules.resolve_plate` then `rules.plan_exit`, a charge on reads not both proven is
settled by `rules.verify_charge` — the very functions the lane and its worker call (a test
decides the same cases through the real lane and here). What is simulated is the world:
cars, their plates, what cameras and the server OCR make of them, and the truth to judge by.

The model (`MisreadModel`, every figure in the JSON). The cameras are a model of our own, not
a measurement (no camera's reads were available to us): right reads score 1 − Exp(mean 0.002),
on a hard frame (night, rain, glare) 1 − Exp(mean 0.03); a wrong read scores uniformly in
0.6–0.975, or 0.975–0.999 when it is a confident error; they are uncalibrated (so, as in
production by default, no camera read is *proven*). The server's reader is measured: each of a
capture's three frames draws its read and calibrated score from what `parking plates
calibrate` measured under that frame's condition (`OcrModel`, `ocr_reads.json`: a hard frame
is one of the six gate conditions, any other frame clean), and the plate's colour it shows
(surely, as a guess, none, or another) from what `colour_table` measured of the reader's colour
on the labelled photos under that condition; the lane reads the frames when
its rules ask (a camera read under `camera_min_confidence`, a doubtful entry, an exit read
that found no stay) and a charge's verification reads them again. Some cars carry a plate
that reads wrong the same way every time (a bolt, dirt, a worn character: C→L, 8→B, 0→D/Q,
2→Z, 5→S, 1→7 and back), a few of them with scores a camera is sure of, and half the server's
frames of them read the same wrong plate (scored as the wrong valid plates measured); other
reads miss one random character, swap a look-alike province or take a yellow
plate for a blue one; some frames show no plate at all. Look-alike pairs (浙U58871, 浙U5B871)
share a home car park; cars with no entry record leave too (look-alikes of a parked bound car,
the same serial of another province, anyone); some exits are read twice. Plates the simulated
population does not hold are still issued to someone: a deterministic registry says whether a
plate (and colour) is issued and bound with pay-later, so a misread onto a stranger's plate
charges that stranger when the rules let it.
"""

import bisect
import heapq
import itertools
import json
import math
import random
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import asdict, astuple, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import cv2
import numpy as np

from billing import fees
from billing.tariff import Tariff
from gate_controller.protocol import CameraRead
from parking.lanes.reading import (
    PlateReading,
    camera_own_read,
    camera_reading,
    frame_reads,
    ocr_reading,
    operator_reading,
    second_reading,
)
from parking.lanes.repository import CameraOwnRead, OpenSession, PayLater
from parking.lanes.rules import (
    Certainty,
    ExitPlan,
    FrameRead,
    Identity,
    Resolution,
    UncertainPolicy,
    Verification,
    better_entry_read,
    entry_wants_second_reader,
    frames_to_verify,
    identity_color,
    is_certain,
    is_proven,
    plan_exit,
    resolve_plate,
    uncertain_policy,
    verify_charge,
    wants_second_reader,
)
from parking.settings import Settings
from plate_recognition import calibration
from plate_recognition.conditions import CONDITIONS, degrade, variants
from plate_recognition.engines import DEFAULT_ENGINE
from plate_recognition.evaluate import load_samples
from plate_recognition.grammar import LETTERS, PROVINCES, Candidate, is_valid
from plate_recognition.localise import plate_color
from plate_recognition.matching import PROVINCE_GROUPS
from plate_recognition.pipeline import Recognition

DIGITS = "0123456789"
ALNUM = LETTERS + DIGITS
# The consistent misreads of issue #15, both ways.
CONSISTENT_PAIRS = ("CL", "8B", "0D", "0Q", "2Z", "5S", "17")
_CONSISTENT: dict[str, str] = {}
for _pair in CONSISTENT_PAIRS:
    _CONSISTENT.setdefault(_pair[0], _pair[1])
    _CONSISTENT.setdefault(_pair[1], _pair[0])
# Home provinces' letters of the city and its neighbours.
HOME = "浙A"
OTHER_PREFIXES = ("浙B", "浙C", "浙D", "浙E", "浙F", "浙G", "浙H", "浙J", "浙K", "浙L", "浙U")
FOREIGN_PREFIXES = ("皖A", "沪A", "苏E", "湘A", "赣A", "闽D", "鲁B", "京N", "粤B", "渝A")
PAY_LATER_LIMIT_FEN = 20_000
NO_ENTRY_FEE_FEN = 1_000
_LOCAL = ZoneInfo("Asia/Shanghai")
_EPOCH = datetime(2026, 12, 7, 0, 0, tzinfo=_LOCAL)
_FREE_MINUTES_TARIFF = Tariff.hourly(free_minutes=15, hourly_fen=500, daily_cap_fen=6000)
TARIFFS: tuple[Tariff, ...] = (
    Tariff.hourly(free_minutes=15, hourly_fen=1000, daily_cap_fen=12000),  # the centre
    _FREE_MINUTES_TARIFF,
    Tariff.hourly(free_minutes=30, hourly_fen=300, daily_cap_fen=2500),  # suburbs
)
# Stay durations: (share, median minutes, lognormal sigma), as the city-day bench's.
DURATIONS = (
    (0.10, 8.0, 0.5),
    (0.35, 45.0, 0.6),
    (0.35, 150.0, 0.5),
    (0.17, 540.0, 0.25),
    (0.03, 1200.0, 0.4),
)

# The height a simulated frame's plate has when it is small (the distant crops' median).
SMALL_FRAME_PX = 10.0
# The server reader's reads as measured, by condition and score bin (`ocr_table`).
OCR_TABLE_PATH = Path(__file__).with_name("ocr_reads.json")
GATE_CONDITIONS = ("night", "glare_rain", "motion_blur", "distant", "jpeg", "tilt")
# What a frame shows of a plate's colour (`ColourModel`, `colour_table`).
COLOUR_OUTCOMES = ("sure", "guess", "none", "other_guess", "other_sure")
_OCR_EDGES = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)


@dataclass(frozen=True, slots=True)
class MisreadModel:
    """Every rate of the simulated world (per read unless it says per car)."""

    car_parks: int = 300
    vehicles: int = 200_000
    # Vehicles: plate types and who is bound with pay-later.
    green_share: float = 0.15
    yellow_share: float = 0.05
    home_prefix_share: float = 0.80
    foreign_share: float = 0.07
    bound_share: float = 0.63  # bound and with a pay-later agreement
    bound_no_agreement_share: float = 0.05
    arrears_share: float = 0.005
    home_car_park_share: float = 0.6
    # Per car: a look-alike twin (one confusable character) sharing its home car park.
    lookalike_pair_share: float = 0.01
    # Per car: its plate reads wrong the same way every time; of those, the share whose wrong
    # read the camera scores like a right one (a confident error); per read the wrong text.
    consistent_car_share: float = 0.002
    consistent_confident_share: float = 0.10
    consistent_read_rate: float = 0.7
    # Per read: a hard frame (scores spread lower); one random character missed; a look-alike
    # province; a yellow plate taken for blue (per read of a yellow plate); no plate found.
    hard_frame_rate: float = 0.015
    random_char_rate: float = 0.006
    province_swap_rate: float = 0.001
    yellow_as_blue_rate: float = 0.01
    # Per frame of a capture whose camera took a yellow plate for blue: the server's reader
    # shows it surely blue too (a guess, and a harsh one: we have no yellow plate to measure
    # on, and a light strong enough to mislead the camera may mislead the server's reader).
    # The other frames show the colour as measured (`ColourModel`).
    yellow_as_blue_frame_share: float = 0.5
    unreadable_rate: float = 0.002
    # Share of a wrong camera read (not a consistent car's) scored like a right one.
    confident_error_share: float = 0.01
    # Per exit: a car with no entry record; a second read of the same exit.
    no_entry_rate: float = 0.003
    double_read_rate: float = 0.01
    # Frames per capture, each read by the server's reader as measured (`OcrModel`: a hard
    # frame under one of the six gate conditions, any other clean). Per frame of a car whose
    # plate reads wrong the same way: the server's reader reads the same wrong plate (scored
    # like the wrong valid plates it was measured on).
    ocr_frames: int = 3
    consistent_ocr_share: float = 0.5
    # A harsher world, for robustness: the server's reads of a *confident* consistent car's
    # wrong plate scored like right reads (as sure as the camera), not like wrong ones.
    consistent_ocr_scored_as_right: bool = False
    # A plate outside the simulated population: issued (to someone) and bound with pay-later.
    registry_density: float = 0.3
    # Car parks: 'hold' policy for reads not both certain; a fixed fee for no entry record.
    hold_policy_share: float = 0.2
    fixed_fee_share: float = 0.3
    occupancy: float = 0.6

    @classmethod
    def harsh(cls) -> "MisreadModel":
        """A harsher world (`bench --misreads --harsh`): what no calibration bounds is worse
        (cameras misread 3-10 times as often, and as confidently; 5 times as many plates that
        read wrong the same way; more hard frames, look-alikes parked together, strangers and
        double reads), while the server's reader reads each frame as it was measured to (its
        calibration is what the rules rest on: making it read a consistent car's wrong plate
        with right reads' scores on more cars would contradict that measurement)."""
        return cls(
            consistent_car_share=0.01,
            consistent_read_rate=0.9,
            confident_error_share=0.1,
            random_char_rate=0.02,
            province_swap_rate=0.005,
            hard_frame_rate=0.05,
            lookalike_pair_share=0.03,
            no_entry_rate=0.01,
            double_read_rate=0.03,
        )


@dataclass(slots=True)
class Vehicle:
    plate: str
    color: str
    account: int | None  # the owner's account when bound with a pay-later agreement
    pay_later: PayLater | None
    home: int
    consistent: str | None = None  # the wrong plate this car always reads as
    confident: bool = False  # and whether cameras are sure of it
    stay: "Stay | None" = None  # the stay the lane recorded when it came in


@dataclass(slots=True)
class Stay:
    """What the lane recorded at the entry: the identity read, whether that read was certain,
    and the car that really came in (the truth, which the lane does not know)."""

    identity: Identity
    vehicle: Vehicle
    entered_s: float
    entry_certain: bool
    entry_proven: bool = False
    # The server reader's reads of the entry's frames (what a charge's verification reads),
    # which reader made the entry's read, and the camera's own read when the server's made it.
    entry_frames: tuple[FrameRead, ...] = ()
    entry_source: str | None = None
    entry_camera: CameraOwnRead | None = None


@dataclass(slots=True)
class Seen:
    """One capture as the world made it: its misread kind, the lane's reading, the camera's
    read and the server reader's reads of its frames."""

    kind: str
    reading: PlateReading
    camera: CameraRead | None
    recognitions: list[Recognition]

    @property
    def frames(self) -> tuple[FrameRead, ...]:
        return frame_reads(self.recognitions)


@dataclass(slots=True)
class CarPark:
    index: int
    tariff: fees.TariffVersions
    policy: UncertainPolicy
    fixed_fee: int | None
    clock: float = 0.0
    # The lane's records: open stays by identity; recently closed ones (the duplicate window).
    stays: dict[Identity, Stay] = field(default_factory=dict)
    parked: dict[Identity, bool] = field(default_factory=dict)  # what resolve_plate is given
    left: deque[tuple[float, Identity]] = field(default_factory=deque)
    # The truth: who is inside, by departure time.
    departures: list[tuple[float, int, Vehicle]] = field(default_factory=list)


@dataclass
class Tally:
    exits: int = 0
    wrong_account_charges: int = 0
    wrong_account_charges_awaiting_confirmation: int = 0
    needs_person: int = 0
    auto_exits: int = 0
    entries: int = 0
    entries_needing_person: int = 0
    superseded_by_misread: int = 0
    stale_stays_closed: int = 0
    entries_by_kind: Counter[str] = field(default_factory=Counter)
    by_outcome: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    verifications: Counter[str] = field(default_factory=Counter)
    second_readings: int = 0
    entry_second_readings: int = 0
    wrong_cases: list[dict[str, Any]] = field(default_factory=list)


class OcrModel:
    """The server reader as measured (`ocr_reads.json`, made by `ocr_table` from the reads of
    `parking plates calibrate`): per condition, score bins with how many reads were exact, a
    different valid plate or neither. A frame draws a bin by its share of reads, an outcome by
    the bin's counts, and a score uniformly within the bin; and whether its plate was small
    by the condition's share of small plates. Frames are drawn independently
    (real frames of one pass are correlated, so voting and verification do a little better
    here than they would)."""

    def __init__(self, table: Mapping[str, Any]) -> None:
        # Per condition, the share of reads whose plate was small (never certain, never a
        # second opinion: `plate_recognition.calibration.SMALL_PLATE_PX`).
        self.small_share: dict[str, float] = dict(table.get("small_share", {}))
        self._bins: dict[str, tuple[list[float], list[list[float]]]] = {}
        self._wrong: dict[str, tuple[list[float], list[list[float]]]] = {}
        self._right = {
            condition: self._cumulative(rows, lambda r: r[2])
            for condition, rows in table["conditions"].items()
        }
        gate_wrong: list[list[float]] = []
        for condition, rows in table["conditions"].items():
            self._bins[condition] = self._cumulative(rows, lambda r: r[2] + r[3] + r[4])
            if condition != "clean":
                gate_wrong.extend(rows)
        pooled = self._cumulative(gate_wrong, lambda r: r[3])
        for condition, rows in table["conditions"].items():
            # Scores of different valid plates: the condition's own when measured on enough
            # of them, else those of every gate condition (higher: the conservative choice).
            enough = sum(r[3] for r in rows) >= 50
            self._wrong[condition] = self._cumulative(rows, lambda r: r[3]) if enough else pooled

    @staticmethod
    def _cumulative(
        rows: list[list[float]], weight: Callable[[list[float]], float]
    ) -> tuple[list[float], list[list[float]]]:
        kept = [r for r in rows if weight(r) > 0]
        cumulative, total = [], 0.0
        for r in kept:
            total += weight(r)
            cumulative.append(total)
        return cumulative, kept

    @classmethod
    def load(cls, path: Path | None = None) -> "OcrModel":
        return cls(json.loads((path or OCR_TABLE_PATH).read_text(encoding="utf-8")))

    @staticmethod
    def _bin(rng: random.Random, table: tuple[list[float], list[list[float]]]) -> list[float]:
        cumulative, rows = table
        return rows[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])]

    def draw(self, rng: random.Random, condition: str) -> tuple[str, float]:
        """(exact | wrong_valid | neither, calibrated score) of one frame."""
        low, high, exact, wrong, neither = self._bin(rng, self._bins[condition])
        u = rng.random() * (exact + wrong + neither)
        outcome = "exact" if u < exact else "wrong_valid" if u < exact + wrong else "neither"
        return outcome, rng.uniform(low, high)

    def right_score(self, rng: random.Random, condition: str) -> float:
        low, high, *_ = self._bin(rng, self._right[condition])
        return rng.uniform(low, high)

    def wrong_score(self, rng: random.Random, condition: str) -> float:
        low, high, *_ = self._bin(rng, self._wrong[condition])
        return rng.uniform(low, high)


class ColourModel:
    """The server reader's plate colour as measured (`ocr_reads.json`'s `colour`, made by
    `colour_table`): per condition, how many frames showed the plate's own colour surely, its
    own colour as a guess, no colour, another colour as a guess, another colour surely.

    Measured on crops: in a whole frame the colour is sure only when the localisation's colour
    agrees as well (`pipeline._best_region`), so real frames show it surely somewhat less often
    and another colour surely no more often. The photos are all blue, so another colour is a
    light-ground one (green, yellow) taken for
    blue's dark ground: the simulation applies the same rates to every colour, the other colour
    being yellow for a blue plate and blue for any other. Not measured, and so not drawn from
    here: the frames of a capture whose camera took a yellow plate for blue
    (`MisreadModel.yellow_as_blue_frame_share`)."""

    def __init__(self, table: Mapping[str, Any]) -> None:
        self.cumulative = {
            condition: list(itertools.accumulate(counts))
            for condition, counts in table["conditions"].items()
        }

    def draw(self, rng: random.Random, condition: str) -> str:
        """One frame's colour outcome (`COLOUR_OUTCOMES`) under `condition`."""
        cumulative = self.cumulative[condition]
        return COLOUR_OUTCOMES[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])]

    def frame_colour(self, outcome: str, color: str) -> tuple[str | None, bool]:
        """(colour, sure) a frame of a `color` plate shows for a drawn outcome."""
        other = "yellow" if color == "blue" else "blue"
        return {
            "sure": (color, True),
            "guess": (color, False),
            "none": (None, False),
            "other_guess": (other, False),
            "other_sure": (other, True),
        }[outcome]


class Registry:
    """Who holds a plate (and colour) the simulated population does not: issued with
    `registry_density`, bound with pay-later like the population, decided by a hash so the
    same plate is always the same stranger."""

    def __init__(self, model: MisreadModel, seed: int, known: dict[Identity, Vehicle]) -> None:
        self.model, self.seed, self.known = model, seed, known

    def owner(self, identity: Identity) -> Vehicle | None:
        found = self.known.get(identity)
        if found is not None:
            return found
        h = zlib.crc32(f"{self.seed}|{identity[0]}|{identity[1]}".encode())
        u = (h & 0xFFFF) / 65536.0
        if u >= self.model.registry_density:
            return None
        v = (h >> 16) / 65536.0
        account = 10_000_000 + h % 10_000_000
        bound = v < self.model.bound_share
        pay_later = PayLater(account, account, PAY_LATER_LIMIT_FEN, False) if bound else None
        return Vehicle(identity[0], identity[1], account if bound else None, pay_later, -1)


def _serial_positions(plate: str, color: str) -> list[int]:
    return list(range(2, len(plate)))


def substitute(plate: str, color: str, position: int, char: str) -> str | None:
    candidate = plate[:position] + char + plate[position + 1 :]
    return candidate if candidate != plate and is_valid(candidate, color) else None


def consistent_misread(plate: str, color: str, rng: random.Random) -> str | None:
    """One of the classic confusions (C→L, 8→B, ...) that still makes a valid plate."""
    options = [
        changed
        for i in _serial_positions(plate, color)
        if plate[i] in _CONSISTENT
        for changed in [substitute(plate, color, i, _CONSISTENT[plate[i]])]
        if changed
    ]
    return rng.choice(options) if options else None


def random_misread(plate: str, color: str, rng: random.Random) -> str:
    for _ in range(20):
        i = rng.randrange(1, len(plate))
        changed = substitute(plate, color, i, rng.choice(ALNUM))
        if changed:
            return changed
    return plate


def province_swap(plate: str, rng: random.Random) -> str:
    group = next((g for g in PROVINCE_GROUPS if plate[0] in g), PROVINCES)
    return rng.choice([p for p in group if p != plate[0]]) + plate[1:]


def random_plate(rng: random.Random, prefix: str, color: str) -> str:
    if color == "green":
        return prefix + rng.choice("DF") + rng.choice(ALNUM) + "".join(rng.choices(DIGITS, k=4))
    # Ordinary serials: mostly digits, at most two letters (as issued).
    serial = [rng.choice(DIGITS) for _ in range(5)]
    for i in rng.sample(range(5), rng.choice((0, 1, 1, 2))):
        serial[i] = rng.choice(LETTERS)
    return prefix + "".join(serial)


def decide_exit(
    reading: PlateReading,
    parked: Mapping[Identity, bool],
    left: Collection[Identity],
    stay_of: Callable[[Identity], OpenSession | None],
    certainty: Certainty,
    versions: fees.TariffVersions,
    *,
    at: datetime,
    no_entry_fee_fen: int | None,
    car_park_policy: str,
    verifiable: bool = False,
) -> tuple[Resolution, ExitPlan]:
    """An exit as the lane decides it (`LaneService._exit`): the read resolved against the
    vehicles parked here and just gone, then `plan_exit` on the stay it resolved to
    (`stay_of`: the open stay of an identity, with its binding as of the stay's start)."""
    resolution = resolve_plate(reading, parked, left, certainty)
    stay = None
    if resolution.status in ("exact", "fuzzy") and not resolution.left:
        assert resolution.identity is not None
        stay = stay_of(resolution.identity)
    plan = plan_exit(
        resolution,
        stay,
        versions,
        at=at,
        no_entry_fee_fen=no_entry_fee_fen,
        uncertain_policy=uncertain_policy(
            car_park_policy, operator_read=reading.source == "operator", offline_open=False
        ),
        verifiable=verifiable,
    )
    return resolution, plan


class City:
    def __init__(self, model: MisreadModel, seed: int, settings: Settings) -> None:
        self.model = model
        self.rng = random.Random(seed)
        self.certainty = Certainty.from_settings(settings)
        self.verification = Verification.from_settings(settings)
        measured = json.loads(OCR_TABLE_PATH.read_text(encoding="utf-8"))
        self.ocr = OcrModel(measured)
        self.colour = ColourModel(measured["colour"])
        self.min_camera = settings.camera_min_confidence
        self.min_entry = settings.plate_min_confidence
        self.window = float(settings.duplicate_read_window_s)
        self.tally = Tally()
        self._seq = 0
        rng = self.rng
        self.car_parks = [
            CarPark(
                i,
                [(_EPOCH - timedelta(days=365), TARIFFS[i % len(TARIFFS)])],
                "hold" if rng.random() < model.hold_policy_share else "open_confirm",
                NO_ENTRY_FEE_FEN if rng.random() < model.fixed_fee_share else None,
            )
            for i in range(model.car_parks)
        ]
        self.capacity = [rng.randint(50, 600) for _ in self.car_parks]
        self._capacity_cum = [sum(self.capacity[: i + 1]) for i in range(len(self.capacity))]
        self.vehicles: list[Vehicle] = []
        self.known: dict[Identity, Vehicle] = {}
        while len(self.vehicles) < model.vehicles:
            vehicle = self._new_vehicle()
            if vehicle is None:
                continue
            self._add(vehicle)
            if rng.random() < model.lookalike_pair_share:
                twin_plate = consistent_misread(vehicle.plate, vehicle.color, rng)
                if twin_plate and (twin_plate, vehicle.color) not in self.known:
                    twin = self._new_vehicle(twin_plate, vehicle.color)
                    if twin is not None:
                        twin.home = vehicle.home
                        self._add(twin)
        self.registry = Registry(model, seed, self.known)
        self.inside: set[int] = set()
        for car_park in self.car_parks:
            for _ in range(int(self.capacity[car_park.index] * model.occupancy)):
                duration = self._duration()
                self._enter(car_park, -duration * rng.random(), duration, record=True)

    # The world.

    def _new_vehicle(self, plate: str | None = None, color: str | None = None) -> Vehicle | None:
        m, rng = self.model, self.rng
        if color is None:
            u = rng.random()
            color = (
                "green"
                if u < m.green_share
                else "yellow"
                if u < m.green_share + m.yellow_share
                else "blue"
            )
        if plate is None:
            u = rng.random()
            prefix = (
                HOME
                if u < m.home_prefix_share
                else rng.choice(FOREIGN_PREFIXES)
                if u < m.home_prefix_share + m.foreign_share
                else rng.choice(OTHER_PREFIXES)
            )
            plate = random_plate(rng, prefix, color)
        if (plate, color) in self.known or not is_valid(plate, color):
            return None
        account = len(self.vehicles) + 1
        u = rng.random()
        pay_later: PayLater | None = None
        if u < m.bound_share:
            blocked = rng.random() < m.arrears_share
            pay_later = PayLater(
                account, account, PAY_LATER_LIMIT_FEN, blocked, 600 if blocked else 0
            )
        elif u < m.bound_share + m.bound_no_agreement_share:
            pay_later = PayLater(account, None, None, False)
        vehicle = Vehicle(
            plate,
            color,
            account if pay_later and pay_later.agreement_id else None,
            pay_later,
            rng.randrange(m.car_parks),
        )
        if rng.random() < m.consistent_car_share:
            vehicle.consistent = consistent_misread(plate, color, rng)
            vehicle.confident = rng.random() < m.consistent_confident_share
        return vehicle

    def _add(self, vehicle: Vehicle) -> None:
        self.vehicles.append(vehicle)
        self.known[(vehicle.plate, vehicle.color)] = vehicle

    def _duration(self) -> float:
        u, rng = self.rng.random(), self.rng
        for share, median, sigma in DURATIONS:
            if u < share:
                return 60.0 * median * math.exp(sigma * rng.gauss(0.0, 1.0))
            u -= share
        return 60.0 * DURATIONS[-1][1]

    def _pick_vehicle(self, car_park: CarPark) -> Vehicle:
        rng = self.rng
        for _ in range(50):
            vehicle = rng.choice(self.vehicles)
            if id(vehicle) in self.inside:
                continue
            if vehicle.home != car_park.index and rng.random() < self.model.home_car_park_share:
                continue
            return vehicle
        return rng.choice(self.vehicles)

    def _score_right(self, hard: bool) -> float:
        """A camera's score for a right read: near 1, lower on a hard frame."""
        return max(0.3, 1.0 - self.rng.expovariate(1 / (0.03 if hard else 0.002)))

    def _score_wrong(self, confident: bool) -> float:
        if confident:
            return self.rng.uniform(0.975, 0.999)
        return self.rng.uniform(0.6, 0.975)

    def read(self, vehicle: Vehicle, *, stranger: bool = False) -> "Seen":
        """One capture of `vehicle`: its misread kind, the lane's reading, and what the camera
        and the server's reader made of it."""
        m, rng = self.model, self.rng
        plate, color = vehicle.plate, vehicle.color
        kind = "clean"
        hard = rng.random() < m.hard_frame_rate
        condition = rng.choice(GATE_CONDITIONS) if hard else "clean"
        score = self._score_right(hard)
        text, seen_color = plate, color
        u = rng.random()
        if u < m.unreadable_rate:
            return Seen("unreadable", self._reading(None, []), None, [])
        if vehicle.consistent and rng.random() < m.consistent_read_rate:
            kind, text = "consistent", vehicle.consistent
            score = self._score_wrong(vehicle.confident)
        elif (u := rng.random()) < m.random_char_rate:
            kind, text = "random_char", random_misread(plate, color, rng)
            score = self._score_wrong(rng.random() < m.confident_error_share)
        elif u < m.random_char_rate + m.province_swap_rate:
            kind, text = "province_swap", province_swap(plate, rng)
            score = self._score_wrong(rng.random() < m.confident_error_share)
        elif color == "yellow" and rng.random() < m.yellow_as_blue_rate:
            kind, seen_color = "yellow_as_blue", "blue"  # the text is right: the score too
        elif hard:
            kind = "hard_frame"
        recognitions = self._ocr(vehicle, kind, condition)
        if stranger:
            kind = f"stranger_{kind}"
        camera = CameraRead(plate=text, color=seen_color, confidence=round(score, 4))  # type: ignore[arg-type]
        return Seen(kind, self._reading(camera, recognitions), camera, recognitions)

    def _reading(self, camera: CameraRead | None, recognitions: list[Recognition]) -> PlateReading:
        decided = camera_reading(camera, self.min_camera, True)
        if decided is not None:
            return decided
        return ocr_reading(camera, recognitions, None)

    def _ocr(self, vehicle: Vehicle, kind: str, condition: str) -> list[Recognition]:
        """The server reader's reads of the capture's frames under `condition`, drawn from
        what it was measured to read (`OcrModel`): the plate, a different valid plate (one
        confusable or random character) or nothing valid, with calibrated scores. A car whose
        plate reads wrong the same way shows the server the same wrong plate on a share of
        frames, scored like the wrong valid plates measured."""
        m, rng, ocr = self.model, self.rng, self.ocr
        out: list[Recognition] = []
        for _ in range(m.ocr_frames):
            if kind == "yellow_as_blue" and rng.random() < m.yellow_as_blue_frame_share:
                color: str | None = "blue"
                color_sure = True
            else:
                color, color_sure = self.colour.frame_colour(
                    self.colour.draw(rng, condition), vehicle.color
                )
            if vehicle.consistent and rng.random() < m.consistent_ocr_share:
                plate: str | None = vehicle.consistent
                score = (
                    ocr.right_score(rng, condition)
                    if m.consistent_ocr_scored_as_right and vehicle.confident
                    else ocr.wrong_score(rng, condition)
                )
            else:
                outcome, score = ocr.draw(rng, condition)
                plate = (
                    vehicle.plate
                    if outcome == "exact"
                    else (
                        consistent_misread(vehicle.plate, vehicle.color, rng)
                        or random_misread(vehicle.plate, vehicle.color, rng)
                    )
                    if outcome == "wrong_valid"
                    else None
                )
            plate_px = SMALL_FRAME_PX if rng.random() < ocr.small_share.get(condition, 0) else 0.0
            score = calibration.capped(score, plate_px, self.certainty.ocr_score)
            candidates = (Candidate(plate, score),) if plate else ()
            out.append(
                Recognition(
                    "sim",
                    "scene",
                    candidates,
                    color,
                    None,
                    plate or "",
                    color_sure=color_sure,
                    plate_px=plate_px,
                )
            )
        return out

    # The lane's records.

    def _enter(self, car_park: CarPark, at: float, duration: float, *, record: bool) -> None:
        vehicle = self._pick_vehicle(car_park)
        self.inside.add(id(vehicle))
        self._seq += 1
        heapq.heappush(car_park.departures, (at + duration, self._seq, vehicle))
        if not record:
            return
        self.tally.entries += 1
        seen = self.read(vehicle)
        kind, reading = seen.kind, seen.reading
        if seen.recognitions and entry_wants_second_reader(reading, self.certainty):
            # As the lane worker: a doubtful camera read, the frames read by the server.
            self.tally.entry_second_readings += 1
            reading = better_entry_read(
                reading, second_reading(seen.camera, seen.recognitions, None), self.verification
            )
        self.tally.entries_by_kind[kind] += 1
        best = reading.best
        if best is None or best.score < self.min_entry:
            # The entry holds for an attendant, who types the plate in.
            self.tally.entries_needing_person += 1
            reading = operator_reading(vehicle.plate, vehicle.color)
            best = reading.best
            assert best is not None
        identity = (best.plate, identity_color(best.plate, reading.color))
        if identity in car_park.stays:
            # The lane supersedes the stay it had (the car it belongs to is still inside).
            self.tally.superseded_by_misread += 1
        stay = Stay(
            identity,
            vehicle,
            at,
            is_certain(reading, self.certainty),
            is_proven(reading, self.certainty),
            seen.frames,
            reading.source,
            camera_own_read(seen.camera, reading),
        )
        self._record(car_park, stay)
        vehicle.stay = stay

    @staticmethod
    def _record(car_park: CarPark, stay: Stay) -> None:
        car_park.stays[stay.identity] = stay
        car_park.parked[stay.identity] = stay.entry_certain

    @staticmethod
    def _close(car_park: CarPark, stay: Stay) -> None:
        del car_park.stays[stay.identity]
        del car_park.parked[stay.identity]

    def _stay_session(self, car_park: CarPark, stay: Stay) -> OpenSession:
        owner = self.registry.owner(stay.identity)
        return OpenSession(
            0,
            _EPOCH + timedelta(seconds=stay.entered_s),
            owner.pay_later if owner else None,
            None,
            stay.identity[1],
            stay.entry_certain,
            entry_proven=stay.entry_proven,
        )

    def exit_once(self) -> None:
        rng = self.rng
        i = bisect.bisect_left(self._capacity_cum, rng.random() * self._capacity_cum[-1])
        car_park = self.car_parks[min(i, len(self.car_parks) - 1)]
        at, _, vehicle = heapq.heappop(car_park.departures)
        car_park.clock = max(car_park.clock, at)
        stranger = rng.random() < self.model.no_entry_rate
        if stranger:
            # Back in: this departure was a car parked here; a car with no entry record leaves.
            self._seq += 1
            heapq.heappush(car_park.departures, (at, self._seq, vehicle))
            vehicle = self._stranger(car_park)
        else:
            self.inside.discard(id(vehicle))
        self._decide(car_park, vehicle, stranger=stranger)
        if rng.random() < self.model.double_read_rate:
            car_park.clock += rng.uniform(1.0, 5.0)
            self._decide(car_park, vehicle, stranger=stranger, double=True)
        # Whatever is left of the car's own record is put right by a person (the exception it
        # raised, or the review of stays left open far longer than normal).
        own = vehicle.stay
        if own is not None and car_park.stays.get(own.identity) is own:
            self._close(car_park, own)
            self.tally.stale_stays_closed += 1
        vehicle.stay = None
        if not stranger:
            self._enter(car_park, car_park.clock, self._duration(), record=True)

    def _stranger(self, car_park: CarPark) -> Vehicle:
        rng = self.rng
        u = rng.random()
        parked = [s for s in (rng.choice(list(car_park.stays.values())) for _ in range(5))]
        bound = next((s for s in parked if s.vehicle.account), parked[0])
        plate = None
        if u < 0.5:
            plate = consistent_misread(bound.vehicle.plate, bound.vehicle.color, rng)
        elif u < 0.75:
            plate = rng.choice(FOREIGN_PREFIXES)[0] + bound.vehicle.plate[1:]
        if plate is None or (plate, bound.vehicle.color) in self.known:
            return rng.choice(self.vehicles)
        owner = self.registry.owner((plate, bound.vehicle.color))
        return owner or Vehicle(plate, bound.vehicle.color, None, None, -1)

    def _decide(
        self, car_park: CarPark, vehicle: Vehicle, *, stranger: bool, double: bool = False
    ) -> None:
        tally = self.tally
        tally.exits += 1
        seen = self.read(vehicle, stranger=stranger)
        kind, reading = seen.kind, seen.reading
        if double:
            kind = f"double_read_{kind}"
        now = car_park.clock
        while car_park.left and car_park.left[0][0] < now - self.window:
            car_park.left.popleft()
        left = {identity for _, identity in car_park.left}

        def decide(reading: PlateReading) -> tuple[Resolution, ExitPlan]:
            return decide_exit(
                reading,
                car_park.parked,
                left,
                lambda identity: self._stay_session(car_park, car_park.stays[identity]),
                self.certainty,
                car_park.tariff,
                at=_EPOCH + timedelta(seconds=now),
                no_entry_fee_fen=car_park.fixed_fee,
                car_park_policy=car_park.policy,
                verifiable=True,
            )

        resolution, plan = decide(reading)
        if seen.recognitions and wants_second_reader(reading, plan.outcome, self.certainty):
            # As the lane worker: the frames read by the server, and the exit decided again.
            tally.second_readings += 1
            reading = second_reading(seen.camera, seen.recognitions, None)
            resolution, plan = decide(reading)
        stay = None
        if (
            plan.rule is not None
            and resolution.identity is not None
            and plan.fixed_fee_stay is None
        ):
            stay = car_park.stays[resolution.identity]
        verdict = None
        if stay is not None and plan.rule is not None and plan.rule.verify:
            # The worker's check before the charge goes to the provider (lanes.verify).
            verdict = verify_charge(
                stay.identity,
                (
                    frames_to_verify(
                        stay.identity,
                        stay.entry_proven,
                        stay.entry_source,
                        stay.entry_frames,
                        stay.entry_camera,
                    ),
                    frames_to_verify(
                        stay.identity,
                        resolution.proven,
                        reading.source,
                        seen.frames,
                        camera_own_read(seen.camera, reading),
                    ),
                ),
                self.verification,
            )
            # "unconfirmed:no_agreeing_frame:exit": the outcome, and why at which end.
            tally.verifications[":".join(filter(None, astuple(verdict)))] += 1
            tally.by_kind.setdefault(kind, Counter())[f"verification_{verdict.outcome}"] += 1
        needs_person = plan.needs_person or (verdict is not None and verdict.outcome != "verified")
        self._judge(car_park, vehicle, kind, reading, plan, stay, resolution.status, needs_person)
        # The lane's records after the exit: a priced stay is closed (pay-later, free, or paid
        # at the gate). Another car's stay that a person looked at (an exception, a charge
        # awaiting confirmation) is opened again: the operator rejects it.
        if stay is not None and plan.rule is not None and plan.outcome != "held_no_tariff":
            self._close(car_park, stay)
            if stay.vehicle is not vehicle and needs_person:
                self._record(car_park, stay)
            else:
                car_park.left.append((now, stay.identity))

    def _judge(
        self,
        car_park: CarPark,
        vehicle: Vehicle,
        kind: str,
        reading: PlateReading,
        plan: ExitPlan,
        stay: Stay | None,
        status: str,
        needs_person: bool,
    ) -> None:
        tally = self.tally
        tally.by_outcome[plan.outcome] += 1
        per_kind = tally.by_kind.setdefault(kind, Counter())
        per_kind["exits"] += 1
        per_kind[plan.outcome] += 1
        if needs_person:
            tally.needs_person += 1
            per_kind["needs_person"] += 1
        else:
            tally.auto_exits += 1
        rule = plan.rule
        if rule is None or rule.charge_to is None:
            return
        if rule.charge_to[0] == vehicle.account:
            return
        # A charge a person must confirm first: recorded awaiting confirmation at the gate, or
        # its verification did not settle it.
        awaiting = needs_person
        if awaiting:
            tally.wrong_account_charges_awaiting_confirmation += 1
            per_kind["wrong_account_awaiting_confirmation"] += 1
        else:
            tally.wrong_account_charges += 1
            per_kind["wrong_account_charges"] += 1
        # Every automatic one is listed; those awaiting confirmation, the first 20.
        listed_awaiting = sum(1 for c in tally.wrong_cases if c["awaiting_confirmation"])
        if not awaiting or listed_awaiting < 20:
            best = reading.best
            tally.wrong_cases.append(
                {
                    "awaiting_confirmation": awaiting,
                    "kind": kind,
                    "car": [vehicle.plate, vehicle.color],
                    "car_account": vehicle.account,
                    "consistent_misread": vehicle.consistent,
                    "stay": list(stay.identity) if stay else None,
                    "stay_car": [stay.vehicle.plate, stay.vehicle.color] if stay else None,
                    "entry_certain": stay.entry_certain if stay else None,
                    "exit_read": [best.plate, round(best.score, 4)] if best else None,
                    "exit_source": reading.source,
                    "exit_color": reading.color,
                    "resolution": status,
                    "charged_account": rule.charge_to[0],
                    "fee_fen": rule.fee_fen,
                    "car_park": car_park.index,
                }
            )


def run_misreads(
    settings: Settings,
    *,
    exits: int = 1_000_000,
    seed: int = 15,
    model: MisreadModel | None = None,
    progress: Iterator[None] | None = None,
) -> dict[str, Any]:
    """Simulates `exits` exit captures and returns the JSON report."""
    model = model or MisreadModel()
    started = time.perf_counter()
    city = City(model, seed, settings)
    built = time.perf_counter() - started
    while city.tally.exits < exits:
        city.exit_once()
    tally = city.tally
    duration = time.perf_counter() - started
    n = tally.exits
    return {
        "exits": n,
        "wrong_account_charges": tally.wrong_account_charges,
        "wrong_account_charges_awaiting_confirmation": (
            tally.wrong_account_charges_awaiting_confirmation
        ),
        "needs_person": tally.needs_person,
        "needs_person_rate": round(tally.needs_person / n, 6) if n else 0.0,
        "auto_exits": tally.auto_exits,
        "auto_exit_rate": round(tally.auto_exits / n, 6) if n else 0.0,
        "by_outcome": dict(sorted(tally.by_outcome.items())),
        # Charges on reads not both proven, checked by the server's reader (verify_charge):
        # 'verified' go to the provider, the others wait for an operator.
        "verifications": dict(sorted(tally.verifications.items())),
        # Exits whose camera read found no stay, read again by the server's reader at the gate.
        "second_readings": tally.second_readings,
        "entry_second_readings": tally.entry_second_readings,
        "by_misread_kind": {k: dict(sorted(v.items())) for k, v in sorted(tally.by_kind.items())},
        "entries": tally.entries,
        "entries_needing_person": tally.entries_needing_person,
        "entries_by_misread_kind": dict(sorted(tally.entries_by_kind.items())),
        "stale_stays_closed": tally.stale_stays_closed,
        "stays_superseded_by_a_misread_entry": tally.superseded_by_misread,
        "wrong_account_cases": tally.wrong_cases,
        "seed": seed,
        "certainty": {
            "ocr_score": city.certainty.ocr_score,
            "camera_default": city.certainty.camera_default,
            "camera_min_confidence": city.min_camera,
            "camera_default_calibrated": city.certainty.camera_default_calibrated,
            "verify_agree_score": city.verification.agree_score,
            "verify_contradict_score": city.verification.contradict_score,
        },
        "model": asdict(model),
        "build_s": round(built, 2),
        "duration_s": round(duration, 2),
    }


def ocr_table(reads: Path) -> dict[str, Any]:
    """Bins reads saved by `parking plates calibrate … --save-reads` (scores mapped through the
    shipped calibration as the lane sees them, a small plate's below the certain threshold):
    per condition and score bin, how many reads were exact, a different valid plate, or
    neither (no plate, or not a valid one); and per condition the share of small plates."""
    assert calibration.calibrator(DEFAULT_ENGINE) is not None
    # Sorted: the certain threshold may fall below some of the fixed edges.
    edges = tuple(sorted({*_OCR_EDGES, calibration.certain_threshold(DEFAULT_ENGINE), 1.0}))
    table: dict[str, list[list[float]]] = {}
    small: Counter[str] = Counter()
    reads_of: Counter[str] = Counter()
    for line in reads.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        reads_of[r["condition"]] += 1
        small[r["condition"]] += calibration.is_small_plate(r.get("plate_px"))
        raw = r["raw_score"]
        score = (
            0.0
            if raw is None
            else calibration.calibrate_score(raw, DEFAULT_ENGINE, r.get("plate_px"))
        )
        i = min(bisect.bisect_right(edges, score) - 1, len(edges) - 2)
        rows = table.setdefault(
            r["condition"], [[edges[j], edges[j + 1], 0, 0, 0] for j in range(len(edges) - 1)]
        )
        rows[i][2 if r["exact"] else 3 if r["wrong_valid"] else 4] += 1
    return {
        "columns": ["score_from", "score_to", "exact", "wrong_valid", "neither"],
        "conditions": {c: [r for r in rows if sum(r[2:]) > 0] for c, rows in sorted(table.items())},
        "small_share": {c: round(small[c] / reads_of[c], 4) for c in sorted(reads_of)},
    }


def colour_table(folder: Path, seeds: int = 16, seed_start: int = 0) -> dict[str, Any]:
    """What the server reader's colour (`plate_recognition.localise.plate_color`: hue and
    character polarity agreeing) makes of every labelled crop of `folder`, clean and under each
    gate condition with `seeds` seeds: per condition, how many showed their own colour surely,
    as a guess, no colour, another colour as a guess, another colour surely
    (`COLOUR_OUTCOMES`). Colour is no model's learning, so every photo counts."""
    counts: dict[str, Counter[str]] = {c: Counter() for c in CONDITIONS}
    for sample in load_samples(folder):
        if sample.kind != "crop":
            continue
        image = np.asarray(cv2.imread(str(sample.path), cv2.IMREAD_COLOR))
        for condition, seed in variants(CONDITIONS, seeds):
            shown, sure = plate_color(
                degrade(image, condition, sample.path.name, seed + seed_start)
            )
            own = shown == sample.color
            outcome = (
                "none"
                if shown is None
                else ("" if own else "other_") + ("sure" if sure else "guess")
            )
            counts[condition][outcome] += 1
    return {
        "columns": list(COLOUR_OUTCOMES),
        "conditions": {c: [counts[c][o] for o in COLOUR_OUTCOMES] for c in CONDITIONS},
    }
