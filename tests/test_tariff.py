"""Fees in integer fen: the hourly tariff, a banded city tariff with holidays and caps, DST,
validation of operator input, JSON, and properties of random tariffs against a per-minute model."""

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from billing.tariff import Band, RateLine, Tariff, format_fen

SHANGHAI = ZoneInfo("Asia/Shanghai")
BERLIN = ZoneInfo("Europe/Berlin")
DAY_S = 24 * 3600

# --- the hourly tariff -----------------------------------------------------------------------

HOURLY = Tariff.hourly(free_minutes=15, hourly_fen=500, daily_cap_fen=4000)
START = datetime(2026, 11, 21, 23, 30, tzinfo=UTC)


def hourly_fee(tariff: Tariff, seconds: float) -> int:
    return tariff.fee(START, START + timedelta(seconds=seconds))


def test_free_minutes_then_every_started_hour() -> None:
    assert hourly_fee(HOURLY, 0) == 0
    assert hourly_fee(HOURLY, 15 * 60) == 0
    assert hourly_fee(HOURLY, 15 * 60 + 1) == 500
    assert hourly_fee(HOURLY, 3600) == 500
    assert hourly_fee(HOURLY, 3600.9) == 500  # whole seconds, as before
    assert hourly_fee(HOURLY, 3601) == 1000
    assert hourly_fee(HOURLY, 2 * 3600 + 10 * 60) == 1500


def test_daily_cap_and_several_days() -> None:
    assert hourly_fee(HOURLY, 10 * 3600) == 4000
    assert hourly_fee(HOURLY, DAY_S) == 4000
    assert hourly_fee(HOURLY, DAY_S + 60) == 4500
    assert hourly_fee(HOURLY, 3 * DAY_S + 3 * 3600) == 3 * 4000 + 1500
    assert hourly_fee(Tariff.hourly(0, 500), 2 * DAY_S) == 2 * 24 * 500


def test_fee_from_timestamps_and_clock_going_backwards() -> None:
    assert HOURLY.fee(START, START + timedelta(hours=1, minutes=1)) == 1000
    assert HOURLY.fee(START, START - timedelta(minutes=5)) == 0


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        HOURLY.fee(datetime(2026, 5, 11, 10), START)


def test_format_fen_is_exact() -> None:
    assert format_fen(1200) == "¥12.00"
    assert format_fen(5) == "¥0.05"
    assert format_fen(123456789) == "¥1234567.89"


def previous_hourly_fee(
    free_minutes: int, hourly_fen: int, daily_cap_fen: int | None, seconds: int
) -> int:
    """The hourly engine this module replaced, kept as the reference for Tariff.hourly."""
    if seconds <= free_minutes * 60:
        return 0
    full_days, rest = divmod(seconds, DAY_S)
    day_fee = 24 * hourly_fen
    rest_fee = -(-rest // 3600) * hourly_fen
    if daily_cap_fen is not None:
        day_fee = min(day_fee, daily_cap_fen)
        rest_fee = min(rest_fee, daily_cap_fen)
    return full_days * day_fee + rest_fee


@settings(max_examples=200, deadline=None)
@given(
    free_minutes=st.integers(0, 120),
    hourly_fen=st.integers(0, 5000),
    daily_cap_fen=st.none() | st.integers(0, 50_000),
    entered_at=st.datetimes(
        min_value=datetime(2020, 1, 1),
        max_value=datetime(2030, 1, 1),
        timezones=st.sampled_from([UTC, SHANGHAI, BERLIN]),
    ),
    stay=st.timedeltas(min_value=timedelta(seconds=-60), max_value=timedelta(days=10)),
)
def test_hourly_keeps_the_previous_semantics(
    free_minutes: int,
    hourly_fen: int,
    daily_cap_fen: int | None,
    entered_at: datetime,
    stay: timedelta,
) -> None:
    tariff = Tariff.hourly(free_minutes, hourly_fen, daily_cap_fen)
    # Elapsed time: across a DST change it differs from same-zone datetime subtraction.
    elapsed = (entered_at + stay).astimezone(UTC) - entered_at.astimezone(UTC)
    seconds = max(0, int(elapsed.total_seconds()))
    assert tariff.fee(entered_at, entered_at + stay) == previous_hourly_fee(
        free_minutes, hourly_fen, daily_cap_fen, seconds
    )


# --- a city tariff, as an operator would send it ----------------------------------------------

NIGHT = {
    "name": "night",
    "start": "20:00",
    "end": "08:00",
    "lines": [
        {
            "from_minute": 0,
            "to_minute": None,
            "kind": "per_increment",
            "increment_minutes": 120,
            "amount_fen": 100,
        }
    ],
    "max_fen": 500,
}
CITY_JSON: dict[str, Any] = {
    "free_minutes": 15,
    "bands": [
        {
            "name": "day",
            "start": "08:00",
            "end": "20:00",
            "lines": [
                {
                    "from_minute": 0,
                    "to_minute": 60,
                    "kind": "flat",
                    "increment_minutes": 60,
                    "amount_fen": 500,
                },
                {
                    "from_minute": 60,
                    "to_minute": None,
                    "kind": "per_increment",
                    "increment_minutes": 30,
                    "amount_fen": 200,
                },
            ],
            "max_fen": None,
        },
        NIGHT,
    ],
    "holiday_bands": [
        {
            "name": "day",
            "start": "08:00",
            "end": "20:00",
            "lines": [
                {
                    "from_minute": 0,
                    "to_minute": None,
                    "kind": "per_increment",
                    "increment_minutes": 60,
                    "amount_fen": 300,
                }
            ],
            "max_fen": None,
        },
        NIGHT,
    ],
    "holidays": ["2026-10-01", "2026-10-02"],
    "holiday_weekdays": [],
    "daily_cap_fen": 4000,
    "stay_cap_fen": None,
    "colour_discount_percent": {"green": 50},
    "timezone": "Asia/Shanghai",
}
# Day: first hour ¥5, then ¥2 per started 30 min. Night: ¥1 per started 2 h, at most ¥5.
# At most ¥40 per 24 h; 15 minutes free; new-energy (green) plates pay half.
CITY = Tariff.from_json(CITY_JSON)


def shanghai(month: int, day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, second, tzinfo=SHANGHAI)


def test_city_day_rates() -> None:
    assert CITY.fee(shanghai(5, 11, 10), shanghai(5, 11, 10, 15)) == 0
    assert CITY.fee(shanghai(5, 11, 10), shanghai(5, 11, 10, 15, 1)) == 500
    assert CITY.fee(shanghai(5, 11, 10), shanghai(5, 11, 11)) == 500
    assert CITY.fee(shanghai(5, 11, 10), shanghai(5, 11, 11, 0, 1)) == 700
    assert CITY.fee(shanghai(5, 11, 10), shanghai(5, 11, 12, 10)) == 500 + 3 * 200


def test_city_evening_into_night_with_green_discount() -> None:
    quote = CITY.quote(shanghai(5, 11, 19), shanghai(5, 11, 21), "green")
    assert [(s.band, s.fen) for s in quote.segments] == [("day", 500), ("night", 100)]
    assert quote.segments[1].start == shanghai(5, 11, 20)
    assert (quote.gross_fen, quote.discount_fen, quote.total_fen) == (600, 300, 300)
    assert CITY.fee(shanghai(5, 11, 19), shanghai(5, 11, 21), "blue") == 600


def test_city_night_is_one_segment_across_midnight_with_its_maximum() -> None:
    quote = CITY.quote(shanghai(5, 11, 22), shanghai(5, 12, 7))
    assert [(s.band, s.fen) for s in quote.segments] == [("night", 5 * 100)]
    assert CITY.fee(shanghai(5, 11, 20), shanghai(5, 12, 8)) == 500  # 6 x ¥1, at most ¥5


def test_city_several_days_are_capped_per_24_hours_from_entry() -> None:
    quote = CITY.quote(shanghai(5, 11, 9), shanghai(5, 13, 11, 30))
    # Each full block: day 09-20 ¥45, night ¥5, day 08-09 ¥5 = ¥55, capped at ¥40.
    assert [(b.gross_fen, b.fen) for b in quote.blocks] == [
        (5500, 4000),
        (5500, 4000),
        (1100, 1100),
    ]
    assert quote.total_fen == 9100
    assert quote.blocks[1].start == shanghai(5, 12, 9)
    assert CITY.fee(shanghai(5, 11, 9), shanghai(5, 13, 11, 30), "green") == 4550


def test_stay_cap_then_discount() -> None:
    capped = Tariff.from_json({**CITY_JSON, "stay_cap_fen": 6000})
    assert capped.fee(shanghai(5, 11, 9), shanghai(5, 13, 11, 30)) == 6000
    quote = capped.quote(shanghai(5, 11, 9), shanghai(5, 13, 11, 30), "green")
    assert (quote.gross_fen, quote.discount_fen, quote.total_fen) == (12100, 3000, 3000)


def test_holiday_dates_use_holiday_bands() -> None:
    quote = CITY.quote(shanghai(10, 1, 10), shanghai(10, 1, 12, 30))
    assert [(s.day_type, s.band, s.fen) for s in quote.segments] == [("holiday", "day", 900)]
    # The night splits at midnight when the day type changes there, not otherwise.
    into_holiday = CITY.quote(shanghai(9, 30, 23), shanghai(10, 1, 1))
    assert [(s.day_type, s.fen) for s in into_holiday.segments] == [
        ("regular", 100),
        ("holiday", 100),
    ]
    assert CITY.fee(shanghai(9, 29, 23), shanghai(9, 30, 1)) == 100
    assert CITY.fee(shanghai(10, 1, 23), shanghai(10, 2, 1)) == 100  # holiday to holiday


def test_holiday_weekdays() -> None:
    weekends = Tariff.from_json({**CITY_JSON, "holidays": [], "holiday_weekdays": [5, 6]})
    saturday, monday = shanghai(5, 16, 10), shanghai(5, 18, 10)
    assert weekends.fee(saturday, saturday + timedelta(hours=2)) == 600
    assert weekends.fee(monday, monday + timedelta(hours=2)) == 900


def test_without_holiday_bands_holidays_are_regular_days() -> None:
    tariff = Tariff.from_json({**CITY_JSON, "holiday_bands": None})
    assert tariff.fee(shanghai(10, 1, 10), shanghai(10, 1, 12, 30)) == 1100


def test_json_round_trip() -> None:
    assert CITY.to_json() == CITY_JSON
    assert Tariff.from_json(json.loads(json.dumps(CITY.to_json()))) == CITY
    assert Tariff.from_json(HOURLY.to_json()) == HOURLY


# --- daylight saving time ---------------------------------------------------------------------


def utc(instant: datetime) -> datetime:
    # Compare instants in UTC: == between zones is False for a time in a repeated hour.
    return instant.astimezone(UTC)


def berlin(month: int, day: int, hour: int, minute: int = 0, fold: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=BERLIN, fold=fold)


def per_hour(name: str, start: str, end: str, fen: int) -> dict[str, Any]:
    line = {"from_minute": 0, "kind": "per_increment", "increment_minutes": 60, "amount_fen": fen}
    return {"name": name, "start": start, "end": end, "lines": [line]}


BERLIN_TARIFF = Tariff.from_json(
    {
        "bands": [per_hour("day", "08:00", "20:00", 100), per_hour("night", "20:00", "08:00", 50)],
        "timezone": "Europe/Berlin",
    }
)


def test_dst_nights_are_priced_by_elapsed_time() -> None:
    # 29 March 2026 has 23 hours, 25 October 25.
    assert BERLIN_TARIFF.fee(berlin(3, 28, 20), berlin(3, 29, 8)) == 11 * 50
    assert BERLIN_TARIFF.fee(berlin(10, 24, 20), berlin(10, 25, 8)) == 13 * 50


def test_dst_fees_never_decrease() -> None:
    for entered_at in (berlin(3, 28, 18, 10), berlin(10, 24, 18, 10)):
        fees = [
            BERLIN_TARIFF.fee(entered_at, entered_at + timedelta(minutes=minutes))
            for minutes in range(0, 40 * 60, 7)
        ]
        assert fees == sorted(fees)


def test_band_boundary_in_a_skipped_or_repeated_hour_follows_the_wall_clock() -> None:
    tariff = Tariff.from_json(
        {
            "bands": [
                per_hour("early", "00:00", "02:30", 10),
                per_hour("late", "02:30", "00:00", 1),
            ],
            "timezone": "Europe/Berlin",
        }
    )

    def bands(entered_at: datetime, exited_at: datetime) -> list[tuple[str, datetime]]:
        segments = tariff.quote(entered_at, exited_at).segments
        return [(s.band, utc(s.start)) for s in segments]

    # Spring: the clock jumps from 02:00 to 03:00, past 02:30: "late" starts at the jump.
    assert bands(berlin(3, 29, 0), berlin(3, 29, 4)) == [
        ("early", utc(berlin(3, 29, 0))),
        ("late", utc(berlin(3, 29, 3))),
    ]
    # Autumn: 02:00-03:00 happens twice, so does 02:30, and "early" comes back in between.
    assert bands(berlin(10, 25, 0), berlin(10, 25, 4)) == [
        ("early", utc(berlin(10, 25, 0))),
        ("late", utc(berlin(10, 25, 2, 30))),
        ("early", utc(berlin(10, 25, 2, fold=1))),
        ("late", utc(berlin(10, 25, 2, 30, fold=1))),
    ]


# --- validation of operator input ---------------------------------------------------------------


Change = Callable[[dict[str, Any]], object]


def city_with(change: Change) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(json.dumps(CITY_JSON))  # unshares the night band
    change(data)
    return data


def set_band(index: int, **fields: Any) -> Change:
    return lambda data: data["bands"][index].update(fields)


def set_line(band: int, line: int, **fields: Any) -> Change:
    return lambda data: data["bands"][band]["lines"][line].update(fields)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            set_band(1, start="21:00"),
            "'day' ends at 20:00 but the next band, 'night', starts at 21:00",
        ),
        (set_band(0, end="21:00"), "without gap or overlap"),
        (set_band(1, name="day"), "band names must be unique, repeated: day"),
        (set_band(1, start="08:00", end="08:00"), "'day' and 'night' both start at 08:00"),
        (lambda data: data["bands"].pop(), "the only band, 'day', covers 08:00-20:00"),
        (lambda data: data["holiday_bands"][1].update(end="07:00"), "without gap or overlap"),
        (set_band(0, start="8:00"), "expected a local time of day 'HH:MM'"),
        (set_band(0, start="08:00:30"), "expected a local time of day 'HH:MM'"),
        (set_band(0, start=480), "expected a local time of day 'HH:MM'"),
        (set_band(0, lines=[]), "at least 1 item"),
        (set_line(0, 0, from_minute=5), "the first line must start at minute 0, not 5"),
        (
            set_line(0, 1, from_minute=90),
            "a line ends at minute 60 but the next one starts at minute 90",
        ),
        (set_line(0, 0, to_minute=None), "only the last line may be open-ended"),
        (set_line(0, 0, to_minute=0), "greater than 0"),
        (set_line(0, 1, to_minute=60), "to_minute (60) must be greater than from_minute (60)"),
        (set_line(0, 1, increment_minutes=0), "greater than 0"),
        (set_line(0, 0, amount_fen=-1), "greater than or equal to 0"),
        (set_line(0, 0, amount_fen=5.0), "valid integer"),
        (set_line(0, 0, amount_fen="500"), "valid integer"),
        (set_line(0, 0, kind="hourly"), "'flat' or 'per_increment'"),
        (set_line(0, 0, amount=500), "Extra inputs are not permitted"),
        (lambda data: data.update(timezone="Mars/Olympus"), "unknown timezone 'Mars/Olympus'"),
        (lambda data: data.update(timezone="Asia"), "unknown timezone 'Asia'"),
        (lambda data: data.update(colour_discount_percent={"green": 101}), "less than or equal"),
        (lambda data: data.update(holiday_weekdays=[7]), "less than or equal to 6"),
        (lambda data: data.update(holidays=["2026-02-30"]), "valid date"),
        (lambda data: data.update(daily_cap_fen=-100), "greater than or equal to 0"),
    ],
)
def test_invalid_tariffs_are_refused_with_a_clear_message(change: Change, message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Tariff.from_json(city_with(change))
    assert message in str(refused.value)


def test_tariffs_are_immutable_and_copies_are_validated() -> None:
    with pytest.raises(ValidationError):
        CITY.free_minutes = 0
    assert isinstance(CITY.bands, tuple)
    in_berlin = CITY.model_copy(update={"timezone": "Europe/Berlin"})
    # 19:00-21:00 in Berlin is evening and night there, but 01:00-03:00 in Shanghai.
    assert in_berlin.fee(berlin(5, 11, 19), berlin(5, 11, 21)) == 600
    assert CITY.fee(berlin(5, 11, 19), berlin(5, 11, 21)) == 100
    with pytest.raises(ValidationError, match="unknown timezone"):
        CITY.model_copy(update={"timezone": "Mars/Olympus"})


# --- properties of random tariffs ----------------------------------------------------------------

ZONES = ["Asia/Shanghai", "UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]
# Stays start near the 2026 DST changes of those zones (UTC), where cutting is hardest.
DST_CHANGES = [
    datetime(2026, 3, 8, 7, tzinfo=UTC),
    datetime(2026, 3, 29, 1, tzinfo=UTC),
    datetime(2026, 4, 4, 15, tzinfo=UTC),
    datetime(2026, 10, 3, 15, 30, tzinfo=UTC),
    datetime(2026, 10, 25, 1, tzinfo=UTC),
    datetime(2026, 11, 1, 6, tzinfo=UTC),
]
NEARBY_DATES = sorted(
    {(change + timedelta(days=days)).date() for change in DST_CHANGES for days in range(-4, 12)}
)


# Strategies are built once: hypothesis validates each new strategy object on its first draw.
LINE_EDGES = st.sets(st.integers(1, 720), min_size=1, max_size=2)
LINE_PRICES = st.tuples(
    st.sampled_from(["flat", "per_increment"]), st.integers(1, 180), st.integers(0, 2000)
)
OPEN_ENDED = st.booleans()
BAND_MAX = st.none() | st.integers(0, 5000)
ROTATIONS = st.integers(0, 2)


@st.composite
def rate_lines(draw: st.DrawFn) -> list[RateLine]:
    edges = [0, *sorted(draw(LINE_EDGES))]
    if draw(OPEN_ENDED):
        edges.append(None)
    lines = []
    for start, end in pairwise(edges):
        kind, increment_minutes, amount_fen = draw(LINE_PRICES)
        lines.append(
            RateLine(
                from_minute=start,
                to_minute=end,
                kind=kind,
                increment_minutes=increment_minutes,
                amount_fen=amount_fen,
            )
        )
    return lines


RATE_LINES = rate_lines()


@st.composite
def band_sets(draw: st.DrawFn, starts: st.SearchStrategy[set[int]]) -> list[Band]:
    ordered = sorted(draw(starts))
    bands = [
        Band(
            name=f"band {index}",
            start=f"{start // 60:02d}:{start % 60:02d}",
            end=f"{end // 60:02d}:{end % 60:02d}",
            lines=draw(RATE_LINES),
            max_fen=draw(BAND_MAX),
        )
        for index, (start, end) in enumerate(zip(ordered, [*ordered[1:], ordered[0]], strict=True))
    ]
    rotation = draw(ROTATIONS) % len(bands)  # the band across midnight need not come last
    return bands[rotation:] + bands[:rotation]


ANY_BANDS = band_sets(st.sets(st.integers(0, 24 * 60 - 1), min_size=1, max_size=3))
CHANGING_BANDS = band_sets(st.sets(st.integers(0, 24 * 60 - 1), min_size=2, max_size=3))
HOLIDAY_BANDS = st.none() | ANY_BANDS
FREE_MINUTES = st.integers(0, 120)
HOLIDAYS = st.frozensets(st.sampled_from(NEARBY_DATES), max_size=10)
HOLIDAY_WEEKDAYS = st.frozensets(st.integers(0, 6), max_size=3)
DAILY_CAP = st.none() | st.integers(0, 20_000)
STAY_CAP = st.none() | st.integers(0, 100_000)
PERCENT = st.integers(0, 100)
ZONE_NAMES = st.sampled_from(ZONES)


@st.composite
def tariffs(draw: st.DrawFn, plain: bool = False) -> Tariff:
    """Random valid tariffs; plain ones have bands that change, and no free minutes, caps or
    discounts."""
    return Tariff(
        free_minutes=0 if plain else draw(FREE_MINUTES),
        bands=draw(CHANGING_BANDS if plain else ANY_BANDS),
        holiday_bands=draw(HOLIDAY_BANDS),
        holidays=draw(HOLIDAYS),
        holiday_weekdays=draw(HOLIDAY_WEEKDAYS),
        daily_cap_fen=None if plain else draw(DAILY_CAP),
        stay_cap_fen=None if plain else draw(STAY_CAP),
        colour_discount_percent={} if plain else {"green": draw(PERCENT)},
        timezone=draw(ZONE_NAMES),
    )


TARIFFS = tariffs()
PLAIN_TARIFFS = tariffs(plain=True)
# Hypothesis takes about 5 ms to draw a random tariff: 100 examples a test keep this file fast.
RANDOM_TARIFF_SETTINGS = settings(max_examples=100, deadline=None)


def entries(microseconds: bool = True) -> st.SearchStrategy[datetime]:
    return st.builds(
        lambda change, seconds, micro: change + timedelta(seconds=seconds, microseconds=micro),
        st.sampled_from(DST_CHANGES),
        st.integers(-4 * DAY_S, DAY_S),
        st.integers(0, 999_999) if microseconds else st.just(0),
    )


STAYS = st.integers(0, 10 * DAY_S)
COLOURS = st.sampled_from([None, "green", "blue"])


@RANDOM_TARIFF_SETTINGS
@given(TARIFFS, entries(), STAYS, STAYS, COLOURS)
def test_fee_never_decreases_with_duration(
    tariff: Tariff, entered_at: datetime, a: int, b: int, colour: str | None
) -> None:
    short, long = sorted((a, b))
    assert tariff.fee(entered_at, entered_at + timedelta(seconds=short), colour) <= tariff.fee(
        entered_at, entered_at + timedelta(seconds=long), colour
    )


@RANDOM_TARIFF_SETTINGS
@given(TARIFFS, entries(), STAYS, COLOURS)
def test_caps_hold_and_the_breakdown_adds_up(
    tariff: Tariff, entered_at: datetime, seconds: int, colour: str | None
) -> None:
    exited_at = entered_at + timedelta(seconds=seconds)
    quote = tariff.quote(entered_at, exited_at, colour)
    assert isinstance(quote.total_fen, int) and quote.total_fen >= 0
    assert tariff.fee(entered_at, exited_at, colour) == quote.total_fen
    started_blocks = -(-seconds // DAY_S)
    if tariff.daily_cap_fen is not None:
        assert quote.total_fen <= started_blocks * tariff.daily_cap_fen
    if tariff.stay_cap_fen is not None:
        assert quote.total_fen <= tariff.stay_cap_fen
    assert sum(s.fen for s in quote.segments) == quote.gross_fen
    assert sum(b.gross_fen for b in quote.blocks) == quote.gross_fen
    if seconds <= tariff.free_minutes * 60:
        assert quote.total_fen == quote.gross_fen == 0 and not quote.segments
        return
    capped = sum(b.fen for b in quote.blocks)
    if tariff.stay_cap_fen is not None:
        capped = min(capped, tariff.stay_cap_fen)
    assert quote.total_fen + quote.discount_fen == capped
    assert len(quote.blocks) == started_blocks
    ends = [utc(entered_at), *(utc(s.end) for s in quote.segments)]
    assert [utc(s.start) for s in quote.segments] == ends[:-1]
    assert ends[-1] == utc(entered_at) + timedelta(seconds=seconds)


def wall_clock_keys(tariff: Tariff) -> Callable[[datetime], tuple[str, str]]:
    """The (day type, band name) of an instant, read straight off the wall clock."""
    zone = ZoneInfo(tariff.timezone)

    def spans(bands: Sequence[Band]) -> list[tuple[int, int, str]]:
        return [
            (
                band.start.hour * 60 + band.start.minute,
                band.end.hour * 60 + band.end.minute,
                band.name,
            )
            for band in bands
        ]

    regular = spans(tariff.bands)
    holiday = None if tariff.holiday_bands is None else spans(tariff.holiday_bands)

    def key_at(instant: datetime) -> tuple[str, str]:
        local = instant.astimezone(zone)
        is_holiday = holiday is not None and (
            local.date() in tariff.holidays or local.weekday() in tariff.holiday_weekdays
        )
        minute = local.hour * 60 + local.minute
        today = holiday if holiday is not None and is_holiday else regular
        for start, end, name in today:
            if start <= minute < end if start < end else (minute >= start or minute < end):
                return ("holiday" if is_holiday else "regular", name)
        raise AssertionError(f"no band at {local}")

    return key_at


@RANDOM_TARIFF_SETTINGS
@given(PLAIN_TARIFFS, entries(microseconds=False), st.integers(1, DAY_S), st.data())
def test_splitting_at_a_band_boundary_adds_up(
    tariff: Tariff, entered_at: datetime, seconds: int, data: st.DataObject
) -> None:
    exited_at = entered_at + timedelta(seconds=seconds)
    key_at = wall_clock_keys(tariff)
    # Band and DST changes fall on whole minutes. Look for changes every 10 minutes, then find
    # the first changing minute in each window where the key changed.
    boundaries = []
    window_start = entered_at.replace(second=0)
    while window_start < exited_at:
        window = [window_start + timedelta(minutes=n) for n in range(11)]
        if key_at(window[0]) != key_at(window[-1]):
            boundary = next(
                minute
                for previous, minute in pairwise(window)
                if key_at(minute) != key_at(previous)
            )
            if entered_at < boundary < exited_at:
                boundaries.append(boundary)
        window_start = window[-1]
    if not boundaries:
        return
    boundary = data.draw(st.sampled_from(boundaries))
    assert tariff.fee(entered_at, exited_at) == tariff.fee(entered_at, boundary) + tariff.fee(
        boundary, exited_at
    )


def segment_fee(band: Band, minutes: int) -> int:
    fen = 0
    for line in band.lines:
        if minutes <= line.from_minute:
            continue
        if line.kind == "flat":
            fen += line.amount_fen
        else:
            end = minutes if line.to_minute is None else min(minutes, line.to_minute)
            covered = end - line.from_minute
            fen += line.amount_fen * -(-covered // line.increment_minutes)
    return fen if band.max_fen is None else min(fen, band.max_fen)


@RANDOM_TARIFF_SETTINGS
@given(TARIFFS, entries(microseconds=False), st.integers(0, 36 * 60), COLOURS)
def test_matches_a_minute_by_minute_model(
    tariff: Tariff, entered_at: datetime, minutes: int, colour: str | None
) -> None:
    """Walk the stay a minute at a time and group minutes by block and band key: the segments,
    their fees and the total must be the engine's. (Band and DST changes fall on whole minutes.)"""
    entered_at = entered_at.replace(second=0)
    quote = tariff.quote(entered_at, entered_at + timedelta(minutes=minutes), colour)
    if minutes <= tariff.free_minutes:
        assert quote.total_fen == 0
        return
    key_at = wall_clock_keys(tariff)
    runs: list[list[Any]] = []  # [block, key, first minute, minute count]
    for minute in range(minutes):
        block = minute // (24 * 60)
        key = key_at(entered_at + timedelta(minutes=minute))
        if runs and runs[-1][:2] == [block, key]:
            runs[-1][3] += 1
        else:
            runs.append([block, key, minute, 1])
    expected_segments = []
    block_fees = [0] * -(-minutes // (24 * 60))
    for block, (day_type, name), first, count in runs:
        bands = tariff.holiday_bands if day_type == "holiday" else tariff.bands
        assert bands is not None
        fen = segment_fee(next(band for band in bands if band.name == name), count)
        block_fees[block] += fen
        start = entered_at + timedelta(minutes=first)
        expected_segments.append((start, start + timedelta(minutes=count), day_type, name, fen))
    segments = [(utc(s.start), utc(s.end), s.day_type, s.band, s.fen) for s in quote.segments]
    assert segments == expected_segments
    if tariff.daily_cap_fen is not None:
        block_fees = [min(fen, tariff.daily_cap_fen) for fen in block_fees]
    fee = sum(block_fees)
    if tariff.stay_cap_fen is not None:
        fee = min(fee, tariff.stay_cap_fen)
    percent = tariff.colour_discount_percent.get(colour, 0) if colour else 0
    assert quote.total_fen == fee * (100 - percent) // 100
