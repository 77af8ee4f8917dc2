"""billing/rights.py at its boundaries: validity edges, a night window crossing midnight,
weekdays, each kind of right, and overlapping rights (the most favourable to the driver)."""

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from billing import fees
from billing.rights import RightTerms, best, fee_under
from billing.tariff import Tariff

CN = ZoneInfo("Asia/Shanghai")
TARIFF = Tariff.hourly(free_minutes=0, hourly_fen=600)  # ¥6 per started hour, no cap
VERSIONS: fees.TariffVersions = [(datetime(2020, 1, 1, tzinfo=UTC), TARIFF)]


def local(day: int, hour: int, minute: int = 0) -> datetime:
    # December 2026: the 7th is a Monday.
    return datetime(2026, 12, day, hour, minute, tzinfo=CN)


def tariff_fee(start: datetime, end: datetime) -> int:
    return TARIFF.fee(start, end)


def priced(entered: datetime, left: datetime, *rights: RightTerms) -> fees.StayFee:
    result = fees.stay_fee(
        VERSIONS, entered_at=entered, at=left, plate_color="blue", fixed_fee_fen=None, rights=rights
    )
    assert result is not None
    return result


def pass_(right_id: int = 1, **terms: object) -> RightTerms:
    values: dict[str, object] = {
        "id": right_id,
        "kind": "free_passage",
        "valid_from": local(1, 0),
        "valid_until": local(31, 0),
    }
    values.update(terms)
    return RightTerms(**values)  # type: ignore[arg-type]


def test_a_stay_inside_the_validity_is_free_and_the_right_is_named() -> None:
    stay = priced(local(7, 9), local(7, 12), pass_())
    assert stay.fee_fen == 0
    assert stay.right is not None and stay.right.right.id == 1 and stay.right.tariff_fen == 1800


def test_validity_edges_are_half_open() -> None:
    right = pass_(valid_from=local(7, 10), valid_until=local(7, 12))
    assert not right.in_force(local(7, 10) - timedelta(microseconds=1))
    assert right.in_force(local(7, 10))
    assert right.in_force(local(7, 12) - timedelta(microseconds=1))
    assert not right.in_force(local(7, 12))
    # Entered 1 h before it began, left 1 h after it ended: those two hours are priced as stays
    # of their own, the two covered hours are free.
    stay = priced(local(7, 9), local(7, 13), right)
    assert stay.fee_fen == 600 + 600
    # A stay wholly outside the validity gets nothing.
    assert priced(local(7, 12), local(7, 14), right).right is None


def test_a_night_window_crossing_midnight() -> None:
    night = pass_(window=(time(19), time(7)))
    # 20:00 → 06:30 next morning: inside one occurrence, free.
    assert priced(local(7, 20), local(8, 6, 30), night).fee_fen == 0
    # 18:30 → 07:30: the half hour before 19:00 and the half hour after 07:00 are priced.
    assert priced(local(7, 18, 30), local(8, 7, 30), night).fee_fen == 600 + 600
    # Daytime only: not in force at all.
    assert priced(local(8, 9), local(8, 17), night).right is None
    assert night.in_force(local(8, 0, 0)) and night.in_force(local(8, 6, 59))
    assert not night.in_force(local(8, 7, 0))


def test_a_window_belongs_to_the_weekday_it_opens_on() -> None:
    # Friday nights only (ISO 5); 2026-12-11 is a Friday.
    friday_nights = pass_(window=(time(22), time(6)), weekdays=frozenset({5}))
    assert friday_nights.in_force(local(12, 5))  # Saturday 05:00, Friday's window
    assert not friday_nights.in_force(local(13, 5))  # Sunday 05:00, Saturday's (not given)
    assert not friday_nights.in_force(local(10, 23))  # Thursday night


def test_free_minutes_discount_and_flat_fee() -> None:
    entered, left = local(7, 9), local(7, 11, 30)  # 2.5 h: ¥18 by the tariff
    free_90 = pass_(kind="free_minutes", free_minutes=90)
    assert fee_under(free_90, tariff_fee, entered, left, 1800) == 600  # priced from 10:30
    assert (
        fee_under(pass_(kind="free_minutes", free_minutes=180), tariff_fee, entered, left, 1800)
        == 0
    )
    discount = pass_(kind="discount", discount_percent=33)
    assert fee_under(discount, tariff_fee, entered, left, 1800) == 1206  # 1800 * 67 // 100
    flat = pass_(kind="flat_fee", flat_fee_fen=1000)
    assert fee_under(flat, tariff_fee, entered, left, 1800) == 1000
    assert fee_under(flat, tariff_fee, entered, local(7, 10), 600) == 600  # never more


def test_overlapping_rights_the_most_favourable_applies_never_combined() -> None:
    entered, left = local(7, 9), local(7, 11, 30)
    discount = pass_(3, kind="discount", discount_percent=50)  # 900
    flat = pass_(2, kind="flat_fee", flat_fee_fen=900)  # 900: a tie, the lower id wins
    minutes = pass_(4, kind="free_minutes", free_minutes=60)  # 1200
    applied = best([discount, flat, minutes], tariff_fee, entered, left, 1800)
    assert applied is not None and applied.right.id == 2 and applied.fee_fen == 900
    # Not 1800 - 900 - 900 - 600: one right, not a sum of them.
    assert priced(entered, left, discount, flat, minutes).fee_fen == 900
    night = pass_(5, window=(time(19), time(7)))
    # A right not in force during the stay is no candidate; one that lowers nothing is not applied.
    assert best([night], tariff_fee, entered, left, 1800) is None
    assert (
        best([pass_(6, kind="flat_fee", flat_fee_fen=5000)], tariff_fee, entered, left, 1800)
        is None
    )
