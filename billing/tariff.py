"""Fee engine. Integer fen only; a stay is priced by the tariff in force when it began.

A tariff follows the APDS rate structure: bands (rate tables) tile the local day, each band a
list of rate lines over duration ranges, flat or per started increment, with an optional maximum.
Pricing a stay:

1. A stay of at most ``free_minutes`` is free; a longer one is charged from entry (the free
   minutes are a grace period, not deducted). Stays are measured in whole seconds, the
   sub-second remainder dropped.
2. The stay is cut into consecutive 24 h blocks from entry, the last one partial.
3. Inside a block the stay is cut wherever the band changes on the wall clock of the tariff's
   timezone. Each piece is keyed (day type, band name): "holiday" on holiday dates when the
   tariff has holiday bands, else "regular". Consecutive pieces with equal keys form one
   segment, so a 20:00-08:00 night is one segment across midnight unless the day type changes
   there; a block boundary always ends a segment. Durations are elapsed time (UTC arithmetic),
   so a night across a DST change is an hour shorter or longer.
4. Segment fee, for a segment of duration d: a flat line adds its amount once if d passes the
   line's start; a per-increment line adds its amount per started increment of the part of
   [from, to) that d covers. The sum is capped at the band's ``max_fen``.
5. A block's fee is the sum of its segments' fees, capped at ``daily_cap_fen``.
6. The stay's fee is the sum of its blocks' fees, capped at ``stay_cap_fen``, then reduced by
   the plate colour's discount, rounded down.
"""

import re
from bisect import bisect_right
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import cached_property
from itertools import pairwise
from typing import Annotated, Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

DayType = Literal["regular", "holiday"]

# Strict: money and durations arrive as JSON integers, never as floats or numeric strings.
Fen = Annotated[int, Field(strict=True, ge=0)]
Minutes = Annotated[int, Field(strict=True, ge=0)]
PositiveMinutes = Annotated[int, Field(strict=True, gt=0)]
Percent = Annotated[int, Field(strict=True, ge=0, le=100)]
Weekday = Annotated[int, Field(strict=True, ge=0, le=6)]  # Monday = 0, as date.weekday()

# Instants are integer microseconds: exact, and datetimes carry microseconds.
_US_PER_S = 1_000_000
_US_PER_MIN = 60 * _US_PER_S
_DAY_US = 24 * 3600 * _US_PER_S
_MINUTES_PER_DAY = 24 * 60
_ONE_US = timedelta(microseconds=1)
_UTC_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_HH_MM = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _minute_of_day(value: time) -> int:
    return value.hour * 60 + value.minute


def _utc_us(instant: datetime, name: str) -> int:
    if instant.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got {instant!r}")
    return (instant - _UTC_EPOCH) // _ONE_US


class RateLine(BaseModel):
    """One line of a band's rate table, over minutes [from_minute, to_minute) of a segment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    from_minute: Minutes
    to_minute: PositiveMinutes | None = None  # None: open-ended
    kind: Literal["flat", "per_increment"]
    increment_minutes: PositiveMinutes = 60  # per_increment only
    amount_fen: Fen

    @model_validator(mode="after")
    def _range_is_not_empty(self) -> Self:
        if self.to_minute is not None and self.to_minute <= self.from_minute:
            raise ValueError(
                f"to_minute ({self.to_minute}) must be greater than from_minute "
                f"({self.from_minute})"
            )
        return self

    def fee(self, duration_us: int) -> int:
        """This line's part of the fee for a segment lasting duration_us microseconds."""
        start_us = self.from_minute * _US_PER_MIN
        if duration_us <= start_us:
            return 0
        if self.kind == "flat":
            return self.amount_fen
        end_us = duration_us
        if self.to_minute is not None:
            end_us = min(end_us, self.to_minute * _US_PER_MIN)
        return self.amount_fen * _ceil_div(end_us - start_us, self.increment_minutes * _US_PER_MIN)


class Band(BaseModel):
    """A band of the local day, [start, end), possibly across midnight; start == end is the
    whole day. Its lines are priced from the start of each segment spent in it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(min_length=1)]
    start: time
    end: time
    lines: Annotated[tuple[RateLine, ...], Field(min_length=1)]
    max_fen: Fen | None = None  # cap per segment

    @field_validator("start", "end", mode="before")
    @classmethod
    def _time_of_day(cls, value: object) -> time:
        if isinstance(value, str) and (match := _HH_MM.fullmatch(value)):
            return time(int(match[1]), int(match[2]))
        if (
            isinstance(value, time)
            and value.tzinfo is None
            and value.second == 0
            and value.microsecond == 0
        ):
            return value
        raise ValueError(f"expected a local time of day 'HH:MM' (00:00 to 23:59), got {value!r}")

    @field_validator("lines")
    @classmethod
    def _lines_are_contiguous(cls, lines: tuple[RateLine, ...]) -> tuple[RateLine, ...]:
        if lines[0].from_minute != 0:
            raise ValueError(f"the first line must start at minute 0, not {lines[0].from_minute}")
        for previous, line in pairwise(lines):
            if previous.to_minute is None:
                raise ValueError("only the last line may be open-ended (to_minute null)")
            if line.from_minute != previous.to_minute:
                raise ValueError(
                    f"lines must be contiguous: a line ends at minute {previous.to_minute} "
                    f"but the next one starts at minute {line.from_minute}"
                )
        return lines

    @field_serializer("start", "end", when_used="json")
    def _hh_mm(self, value: time) -> str:
        return value.strftime("%H:%M")

    def fee(self, duration_us: int) -> int:
        """The fee for a segment in this band lasting duration_us microseconds."""
        total = sum(line.fee(duration_us) for line in self.lines)
        return total if self.max_fen is None else min(total, self.max_fen)


def _check_bands_tile_the_day(bands: tuple[Band, ...]) -> tuple[Band, ...]:
    names = [band.name for band in bands]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"band names must be unique, repeated: {', '.join(repeated)}")
    ordered = sorted(bands, key=lambda band: band.start)
    if len(ordered) == 1 and ordered[0].start != ordered[0].end:
        only = ordered[0]
        raise ValueError(
            f"bands must tile the 24 h day: the only band, {only.name!r}, covers "
            f"{only.start:%H:%M}-{only.end:%H:%M} (a whole-day band has start == end)"
        )
    for band, following in pairwise(ordered):
        if band.start == following.start:
            raise ValueError(
                f"bands {band.name!r} and {following.name!r} both start at {band.start:%H:%M}"
            )
    for band, following in zip(ordered, ordered[1:] + ordered[:1], strict=True):
        if band.end != following.start:
            raise ValueError(
                f"bands must tile the 24 h day without gap or overlap: {band.name!r} ends at "
                f"{band.end:%H:%M} but the next band, {following.name!r}, starts at "
                f"{following.start:%H:%M}"
            )
    return bands


@dataclass(frozen=True, slots=True)
class _BandTable:
    """The bands of one day type, precomputed: the band of each minute of the day, and the
    wall times where the band (or, at midnight, possibly the day type) changes, each with both
    folds, for the two instants of a wall time that DST repeats."""

    band_at_minute: tuple[Band, ...]
    boundaries: tuple[time, ...]

    @classmethod
    def build(cls, bands: tuple[Band, ...], cut_at_midnight: bool) -> "_BandTable":
        ordered = sorted(bands, key=lambda band: band.start)
        starts = [_minute_of_day(band.start) for band in ordered]
        # Before the first start, the last band (the one across midnight) applies: index -1.
        band_at_minute = tuple(
            ordered[bisect_right(starts, minute) - 1] for minute in range(_MINUTES_PER_DAY)
        )
        boundaries = {band.start for band in bands} | ({time(0)} if cut_at_midnight else set())
        both_folds = [wall.replace(fold=fold) for wall in sorted(boundaries) for fold in (0, 1)]
        return cls(band_at_minute, tuple(both_folds))


@dataclass(frozen=True, slots=True)
class PricedSegment:
    """A run of the stay in one band on one day type, within one block."""

    start: datetime  # in the tariff's timezone
    end: datetime
    day_type: DayType
    band: str
    fen: int  # after the band's max_fen


@dataclass(frozen=True, slots=True)
class PricedBlock:
    """A 24 h block of the stay from entry (the last one partial)."""

    start: datetime  # in the tariff's timezone
    end: datetime
    gross_fen: int  # sum of its segments
    fen: int  # after the daily cap


@dataclass(frozen=True, slots=True)
class Quote:
    """A priced stay. One within the free minutes has no segments or blocks."""

    total_fen: int  # payable
    gross_fen: int  # sum of the segments, before daily and stay caps and discount
    discount_fen: int  # taken off after the caps
    segments: tuple[PricedSegment, ...]
    blocks: tuple[PricedBlock, ...]


@dataclass(slots=True)
class _Segment:
    start_us: int
    end_us: int
    block: int
    day_type: DayType
    band: Band


class _Schedule:
    """Where a tariff's bands fall in time: cuts a stay into segments."""

    __slots__ = ("holiday_weekdays", "holidays", "tables", "zone")

    def __init__(
        self,
        zone: ZoneInfo,
        bands: tuple[Band, ...],
        holiday_bands: tuple[Band, ...] | None,
        holidays: frozenset[date],
        holiday_weekdays: frozenset[int],
    ) -> None:
        self.zone = zone
        # Without holiday bands every day is regular: holiday dates play no part, and midnight
        # needs no cut as the day type never changes there.
        has_holiday_bands = holiday_bands is not None
        self.holidays = holidays if has_holiday_bands else frozenset()
        self.holiday_weekdays = holiday_weekdays if has_holiday_bands else frozenset()
        self.tables: dict[DayType, _BandTable] = {
            "regular": _BandTable.build(bands, has_holiday_bands)
        }
        if holiday_bands is not None:
            self.tables["holiday"] = _BandTable.build(holiday_bands, has_holiday_bands)

    def local(self, instant_us: int) -> datetime:
        return (_UTC_EPOCH + timedelta(microseconds=instant_us)).astimezone(self.zone)

    def day_type(self, day: date) -> DayType:
        if day in self.holidays or day.weekday() in self.holiday_weekdays:
            return "holiday"
        return "regular"

    def segments(self, start_us: int, end_us: int) -> Iterator[_Segment]:
        """The stay's segments: runs of equal (day type, band) within a block."""
        current: _Segment | None = None
        for piece_start, piece_end in self._pieces(start_us, end_us):
            local = self.local(piece_start)
            day_type = self.day_type(local.date())
            band = self.tables[day_type].band_at_minute[local.hour * 60 + local.minute]
            block = (piece_start - start_us) // _DAY_US
            if (
                current is not None
                and current.block == block
                and current.day_type == day_type
                and current.band.name == band.name
            ):
                current.end_us = piece_end
                continue
            if current is not None:
                yield current
            current = _Segment(piece_start, piece_end, block, day_type, band)
        if current is not None:
            yield current

    def _pieces(self, start_us: int, end_us: int) -> Iterator[tuple[int, int]]:
        """Consecutive intervals covering the stay, each within one block and one band, with one
        UTC offset; neighbours may share a band (they are merged into segments)."""
        piece_start = start_us
        for cut in self._cuts(start_us, end_us):
            while (change := self._offset_change(piece_start, cut)) is not None:
                yield piece_start, change
                piece_start = change
            yield piece_start, cut
            piece_start = cut

    def _cuts(self, start_us: int, end_us: int) -> list[int]:
        """Sorted instants in (start, end] where a block ends or the wall clock reaches a band
        boundary. A wall time that DST repeats gives two instants, one it skips gives a spurious
        one; the band changes in the skipped hour happen at the offset change instead."""
        cuts = set(range(start_us + _DAY_US, end_us, _DAY_US))
        cuts.add(end_us)
        # A day either side: around a DST change the wall clock may leave the stay's dates.
        day = self.local(start_us).date() - timedelta(days=1)
        last_day = self.local(end_us).date() + timedelta(days=1)
        while day <= last_day:
            for boundary in self.tables[self.day_type(day)].boundaries:
                wall = datetime.combine(day, boundary, tzinfo=self.zone)
                instant = (wall - _UTC_EPOCH) // _ONE_US  # honours the fold
                if start_us < instant < end_us:
                    cuts.add(instant)
            day += timedelta(days=1)
        return sorted(cuts)

    def _utc_offset(self, instant_us: int) -> timedelta | None:
        return self.local(instant_us).utcoffset()

    def _offset_change(self, start_us: int, end_us: int) -> int | None:
        """The instant in (start, end) where the UTC offset changes, if it does. Zones change
        offset at most once a day and pieces are cut at least daily, so once at most."""
        offset = self._utc_offset(start_us)
        if self._utc_offset(end_us - 1) == offset:
            return None
        # tzdata changes offsets on whole seconds: bisect for the first second with the new one.
        low, high = start_us // _US_PER_S, (end_us - 1) // _US_PER_S
        while high - low > 1:
            middle = (low + high) // 2
            if self._utc_offset(middle * _US_PER_S) == offset:
                low = middle
            else:
                high = middle
        return high * _US_PER_S


class Tariff(BaseModel):
    """A car park's rates; see the module docstring for how a stay is priced."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    free_minutes: Minutes = 0
    bands: Annotated[tuple[Band, ...], Field(min_length=1)]
    holiday_bands: Annotated[tuple[Band, ...], Field(min_length=1)] | None = None
    holidays: frozenset[date] = frozenset()  # local dates
    holiday_weekdays: frozenset[Weekday] = frozenset()  # 5, 6: Saturday and Sunday
    daily_cap_fen: Fen | None = None  # per 24 h block from entry
    stay_cap_fen: Fen | None = None
    colour_discount_percent: dict[str, Percent] = Field(default_factory=dict)
    timezone: str = "Asia/Shanghai"

    @field_validator("bands", "holiday_bands")
    @classmethod
    def _bands_tile_the_day(cls, bands: tuple[Band, ...] | None) -> tuple[Band, ...] | None:
        return None if bands is None else _check_bands_tile_the_day(bands)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(
                f"unknown timezone {name!r}, expected an IANA name such as 'Asia/Shanghai'"
            ) from None
        return name

    @field_serializer("holidays", when_used="json")
    def _sorted_dates(self, holidays: frozenset[date]) -> list[str]:
        return [day.isoformat() for day in sorted(holidays)]

    @field_serializer("holiday_weekdays", when_used="json")
    def _sorted_weekdays(self, weekdays: frozenset[int]) -> list[int]:
        return sorted(weekdays)

    def model_post_init(self, context: Any, /) -> None:
        # Build the schedule at construction, not on the first exit.
        self._schedule  # noqa: B018

    @cached_property
    def _schedule(self) -> _Schedule:
        # Cached in the instance's __dict__, which pydantic leaves out of equality and hashing.
        return _Schedule(
            ZoneInfo(self.timezone),
            self.bands,
            self.holiday_bands,
            self.holidays,
            self.holiday_weekdays,
        )

    @classmethod
    def hourly(cls, free_minutes: int, hourly_fen: int, daily_cap_fen: int | None = None) -> Self:
        """Every started hour from entry, each started 24 h block capped at the daily cap."""
        per_hour = RateLine(
            from_minute=0, kind="per_increment", increment_minutes=60, amount_fen=hourly_fen
        )
        all_day = Band(name="all day", start=time(0), end=time(0), lines=(per_hour,))
        return cls(free_minutes=free_minutes, bands=(all_day,), daily_cap_fen=daily_cap_fen)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A validated copy, always deep: pydantic's own skips validation and would keep the
        original's schedule."""
        return self.model_validate({**self.model_dump(), **(update or {})})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        return cls.model_validate(data)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fee(self, entered_at: datetime, exited_at: datetime, plate_color: str | None = None) -> int:
        return self.quote(entered_at, exited_at, plate_color).total_fen

    def quote(
        self, entered_at: datetime, exited_at: datetime, plate_color: str | None = None
    ) -> Quote:
        start_us = _utc_us(entered_at, "entered_at")
        stay_s = max(0, (_utc_us(exited_at, "exited_at") - start_us) // _US_PER_S)
        if stay_s <= self.free_minutes * 60:
            return Quote(total_fen=0, gross_fen=0, discount_fen=0, segments=(), blocks=())
        end_us = start_us + stay_s * _US_PER_S
        schedule = self._schedule

        segments: list[PricedSegment] = []
        block_gross = [0] * _ceil_div(end_us - start_us, _DAY_US)
        for segment in schedule.segments(start_us, end_us):
            fen = segment.band.fee(segment.end_us - segment.start_us)
            block_gross[segment.block] += fen
            segments.append(
                PricedSegment(
                    schedule.local(segment.start_us),
                    schedule.local(segment.end_us),
                    segment.day_type,
                    segment.band.name,
                    fen,
                )
            )
        blocks = tuple(
            PricedBlock(
                schedule.local(start_us + index * _DAY_US),
                schedule.local(min(end_us, start_us + (index + 1) * _DAY_US)),
                gross,
                gross if self.daily_cap_fen is None else min(gross, self.daily_cap_fen),
            )
            for index, gross in enumerate(block_gross)
        )
        capped = sum(block.fen for block in blocks)
        if self.stay_cap_fen is not None:
            capped = min(capped, self.stay_cap_fen)
        percent = self.colour_discount_percent.get(plate_color, 0) if plate_color else 0
        payable = capped * (100 - percent) // 100
        return Quote(
            total_fen=payable,
            gross_fen=sum(block_gross),
            discount_fen=capped - payable,
            segments=tuple(segments),
            blocks=blocks,
        )


def format_fen(amount_fen: int) -> str:
    """¥12.00 for 1200 fen, exactly (no float on the way); a negative amount has its sign
    before the currency sign: -¥0.05 for -5 fen (divmod of a negative number would give
    ¥-1.95)."""
    sign = "-" if amount_fen < 0 else ""
    yuan, fen = divmod(abs(amount_fen), 100)
    return f"{sign}¥{yuan}.{fen:02d}"
