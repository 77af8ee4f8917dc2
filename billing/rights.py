"""Rights (monthly passes, whitelists, free minutes, discounts, flat fees) as pure terms, and what
a stay costs under them. Integer fen only; no I/O.

A right is shaped on APDS's right specification and assigned right: what (`kind`), when
(validity `[valid_from, valid_until)`, ISO weekdays, an hours window in `time_zone`; a window
whose start is after its end crosses midnight and belongs to the weekday it starts on), and
(in the database) where and for whom. It is *in force* at an instant inside its validity and
inside a window occurrence (every instant of an allowed weekday when it has no window).

What a stay costs under one right (`fee_under`), given the tariff's fee for any interval:

- free passage: the stay's time while the right is in force is free; each stretch outside it
  (before the night window opened, after the pass expired) is priced by the tariff as a stay
  of its own. A whitelist is a free passage with no window.
- free minutes N: the stay is priced as if it had begun N minutes later;
- a discount of p %: the tariff's fee less p %, rounded down in the driver's favour;
- a flat fee: the flat fee, or the tariff's fee when that is lower.
The last three apply when the right is in force at some moment of the stay.

Overlapping rights (`best`): the one giving the lowest fee applies, ties to the lowest id;
rights are never combined, and a right that lowers nothing is not recorded as applied. A
blacklist is decided before any of this (the lane holds the car).
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from typing import Any, Literal
from zoneinfo import ZoneInfo

RightKind = Literal["free_passage", "free_minutes", "discount", "flat_fee"]
RIGHT_KINDS: tuple[RightKind, ...] = ("free_passage", "free_minutes", "discount", "flat_fee")
ALL_WEEKDAYS = frozenset(range(1, 8))  # ISO: Monday 1 … Sunday 7
# A stay longer than this is priced without its rights past this many days (a ghost stay).
_MAX_DAYS = 400

Interval = tuple[datetime, datetime]
# The tariff's fee for a stay from the first instant to the second.
IntervalFee = Callable[[datetime, datetime], int]


@cache
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@dataclass(frozen=True, slots=True)
class RightTerms:
    id: int
    kind: RightKind
    valid_from: datetime
    valid_until: datetime
    free_minutes: int | None = None
    discount_percent: int | None = None
    flat_fee_fen: int | None = None
    weekdays: frozenset[int] = ALL_WEEKDAYS
    window: tuple[time, time] | None = None
    time_zone: str = "Asia/Shanghai"
    name: str = field(default="", compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RightTerms":
        """From the lane's JSON of a right (see parking/lanes/repository.py)."""
        start, end = data.get("window_start"), data.get("window_end")
        return cls(
            id=int(data["id"]),
            kind=data["kind"],
            valid_from=_instant(data["valid_from"]),
            valid_until=_instant(data["valid_until"]),
            free_minutes=data.get("free_minutes"),
            discount_percent=data.get("discount_percent"),
            flat_fee_fen=data.get("flat_fee_fen"),
            weekdays=frozenset(data.get("weekdays") or ALL_WEEKDAYS),
            window=(time.fromisoformat(start), time.fromisoformat(end)) if start and end else None,
            time_zone=data.get("time_zone") or "Asia/Shanghai",
            name=data.get("name") or "",
        )

    def covered(self, start: datetime, end: datetime) -> list[Interval]:
        """The parts of [start, end) while the right is in force, in order, merged."""
        lo, hi = max(start, self.valid_from), min(end, self.valid_until)
        if lo >= hi:
            return []
        zone = _zone(self.time_zone)
        first = lo.astimezone(zone).date() - timedelta(days=1)
        last = min(hi.astimezone(zone).date(), first + timedelta(days=_MAX_DAYS))
        parts: list[Interval] = []
        day = first
        while day <= last:
            if day.isoweekday() in self.weekdays:
                occ_start, occ_end = self._occurrence(day, zone)
                s, e = max(lo, occ_start), min(hi, occ_end)
                if s < e:
                    if parts and parts[-1][1] >= s:
                        parts[-1] = (parts[-1][0], max(parts[-1][1], e))
                    else:
                        parts.append((s, e))
            day += timedelta(days=1)
        return parts

    def in_force(self, at: datetime) -> bool:
        return bool(self.covered(at, at + timedelta(microseconds=1)))

    def in_force_until(self, start: datetime, horizon: datetime) -> datetime | None:
        """The end of the stretch from `start` during which the right is in force without a
        break, looking no further than `horizon`; None when it is not in force at `start`. A
        free passage makes a stay from `start` free up to this instant, and no later."""
        parts = self.covered(start, horizon)
        return parts[0][1] if parts and parts[0][0] == start else None

    def _occurrence(self, day: date, zone: ZoneInfo) -> Interval:
        if self.window is None:
            begin, finish, next_day = time(0), time(0), True
        else:
            begin, finish = self.window
            next_day = finish <= begin  # crosses midnight
        opens = datetime.combine(day, begin, tzinfo=zone)
        closes = datetime.combine(day + timedelta(days=1 if next_day else 0), finish, tzinfo=zone)
        return opens.astimezone(UTC), closes.astimezone(UTC)


def _instant(value: Any) -> datetime:
    instant = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if instant.utcoffset() is None:
        raise ValueError(f"a right's validity must be timezone-aware, got {value!r}")
    return instant


def uncovered(start: datetime, end: datetime, covered: Sequence[Interval]) -> list[Interval]:
    """[start, end) less the covered parts (sorted, disjoint, inside it)."""
    gaps: list[Interval] = []
    cursor = start
    for s, e in covered:
        if s > cursor:
            gaps.append((cursor, s))
        cursor = max(cursor, e)
    if cursor < end:
        gaps.append((cursor, end))
    return gaps


def fee_under(
    right: RightTerms, tariff_fee: IntervalFee, entered_at: datetime, at: datetime, base_fen: int
) -> int | None:
    """The stay's fee under `right` (`base_fen`: the tariff's fee for the whole stay); None when
    the right is never in force during the stay."""
    covered = right.covered(entered_at, at)
    if not covered:
        return None
    if right.kind == "free_passage":
        return sum(tariff_fee(s, e) for s, e in uncovered(entered_at, at, covered))
    if right.kind == "free_minutes":
        assert right.free_minutes is not None
        begins = entered_at + timedelta(minutes=right.free_minutes)
        return tariff_fee(begins, at) if at > begins else 0
    if right.kind == "discount":
        assert right.discount_percent is not None
        return base_fen * (100 - right.discount_percent) // 100
    assert right.flat_fee_fen is not None
    return min(base_fen, right.flat_fee_fen)


@dataclass(frozen=True, slots=True)
class Validation:
    """A merchant's validation of one stay: free minutes or an amount (billing.fees.stay_fee
    applies it after the right). `cost_fen`: what it cost the merchant's budget when given, the
    most it ever takes off (None: one being priced, not yet given)."""

    id: int
    free_minutes: int | None = None
    amount_fen: int | None = None
    cost_fen: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Validation":
        return cls(
            int(data["id"]), data.get("free_minutes"), data.get("amount_fen"), data.get("cost_fen")
        )


@dataclass(frozen=True, slots=True)
class Applied:
    """The right a stay's fee was reduced by: the fee under it and the tariff's without it."""

    right: RightTerms
    fee_fen: int
    tariff_fen: int

    @property
    def reduction_fen(self) -> int:
        return self.tariff_fen - self.fee_fen


def best(
    rights: Iterable[RightTerms],
    tariff_fee: IntervalFee,
    entered_at: datetime,
    at: datetime,
    base_fen: int,
) -> Applied | None:
    """The right most favourable to the driver (lowest fee, ties to the lowest id), or None
    when none is in force during the stay or none lowers its fee."""
    found: Applied | None = None
    for right in sorted(rights, key=lambda r: r.id):
        fee = fee_under(right, tariff_fee, entered_at, at, base_fen)
        if fee is None or fee >= base_fen:
            continue
        if found is None or fee < found.fee_fen:
            found = Applied(right, fee, base_fen)
    return found
