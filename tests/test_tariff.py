"""Fees in integer fen: free minutes, started hours, daily cap, stays over several days."""

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from billing.tariff import Tariff, format_fen

TARIFF = Tariff(free_minutes=15, hourly_fen=500, daily_cap_fen=4000)


def test_free_minutes_then_every_started_hour() -> None:
    assert TARIFF.fee_for_seconds(0) == 0
    assert TARIFF.fee_for_seconds(15 * 60) == 0
    assert TARIFF.fee_for_seconds(15 * 60 + 1) == 500
    assert TARIFF.fee_for_seconds(3600) == 500
    assert TARIFF.fee_for_seconds(3601) == 1000
    assert TARIFF.fee_for_seconds(2 * 3600 + 10 * 60) == 1500


def test_daily_cap_and_several_days() -> None:
    assert TARIFF.fee_for_seconds(10 * 3600) == 4000
    assert TARIFF.fee_for_seconds(24 * 3600) == 4000
    assert TARIFF.fee_for_seconds(24 * 3600 + 60) == 4500
    assert TARIFF.fee_for_seconds(3 * 24 * 3600 + 3 * 3600) == 3 * 4000 + 1500
    assert Tariff(0, 500, None).fee_for_seconds(2 * 24 * 3600) == 2 * 24 * 500


def test_fee_from_timestamps_and_clock_going_backwards() -> None:
    start = datetime(2026, 11, 21, 23, 30, tzinfo=UTC)
    assert TARIFF.fee(start, start + timedelta(hours=1, minutes=1)) == 1000
    assert TARIFF.fee(start, start - timedelta(minutes=5)) == 0


def test_format_fen_is_exact() -> None:
    assert format_fen(1200) == "¥12.00"
    assert format_fen(5) == "¥0.05"
    assert format_fen(123456789) == "¥1234567.89"


tariffs = st.builds(
    Tariff,
    free_minutes=st.integers(0, 120),
    hourly_fen=st.integers(0, 5000),
    daily_cap_fen=st.one_of(st.none(), st.integers(0, 50_000)),
)
durations = st.integers(0, 10 * 24 * 3600)


@given(tariffs, durations, durations)
def test_fee_never_decreases_with_duration(tariff: Tariff, a: int, b: int) -> None:
    short, long = sorted((a, b))
    assert tariff.fee_for_seconds(short) <= tariff.fee_for_seconds(long)


@given(tariffs, durations)
def test_daily_cap_holds_for_every_started_day(tariff: Tariff, seconds: int) -> None:
    fee = tariff.fee_for_seconds(seconds)
    assert isinstance(fee, int) and fee >= 0
    if tariff.daily_cap_fen is not None:
        started_days = -(-seconds // (24 * 3600))
        assert fee <= max(1, started_days) * tariff.daily_cap_fen
