"""Our data in APDS v4's shapes (the official OpenAPI document is kept, with its licence note,
in tests/fixtures/apds/; tests/test_apds.py validates every answer against it).

- A car park is a `Place` (layer 0 of its hierarchy, `id` its code, `version` bumped by the
  database whenever its name, capacity, location or closure changes). Its live occupancy is
  APDS's: `hierarchyElementReference` with the `supply` (spaces; none while closed) and a
  `demandTable` (occupied spaces, counted at the gates), included with `expand=occupancy`.
- A tariff version in force now or later is a `RateTable`: one `RateLineCollection` per band
  of the day (holiday bands after the regular ones), each line flat or incrementing per
  started period, amounts in yuan (CNY). What APDS has no field for (the free minutes, the
  24-hour and per-stay caps, the discounts per plate colour, the hours of each band) is said
  in the lines' descriptions.
- A stay is a `Session` with the plate as its vehicle credential and one segment naming the
  right it used: the company's assigned right it entered under, else its own pay-as-you-go
  right (`AssignedRight` "stay-<id>", of the specification "pay-as-you-go": the car park's
  rates); both are served, neither is listed.
- A right specification (`parking.rights`) is a `RightSpecification` (`permitParking`, plates as
  credentials, its car parks as `hierarchyElements`, its weekdays and hours window as the
  validity's recurring period; what it grants in `description`); it is never changed, so its
  version is 1. An assigned right is an `AssignedRight`: its plates as the holder's vehicle
  credentials, `[valid_from, valid_until)` as its one planned use (a cancelled one with its
  `cancelTime`, and its `expiry` then), `expiry` its end; its version stays 1 (we keep none).
  APDS gives an assigned right no status: ours is in `validityStatus` (APDS's values; an
  extension), "suspended" while suspended or once cancelled. Both are the company's own (they
  name plates): staff only.
Lists are `…List`s with APDS paging (`page`, `meta`).
"""

from collections.abc import Iterable
from datetime import UTC, datetime

import asyncpg

from billing.tariff import Band, RateLine, Tariff
from parking.apds import repository as repo
from parking.apds.repository import AssignedFilter, Near, Page, SessionFilter
from parking.apds.shapes import (
    PAY_AS_YOU_GO,
    PLATE_COLOURS,
    STAY_RIGHT_PREFIX,
    Json,
    occupancy_reference,
    operator_reference,
    plate_credential,
    session_view,
    stay_right_id,
    text,
    time_of,
)
from parking.errors import AppError, NotFound
from parking.public import service as public
from parking.runtime import Runtime

CURRENCY = "CNY"
# Our names are Chinese; fixed texts come in Chinese and English.
NAME_LANGUAGE = "zh"
PLACE_EXPANSIONS = frozenset(
    {
        "rightSpecifications",
        "occupancy",
        "areaLocation",
        "pointLocation",
        "contacts",
        "operatingRestrictions",
        "characteristics",
        "paymentMethods",
        "openingTimes",
        "streetAddress",
    }
)
RATE_EXPANSIONS = frozenset({"rateLineCollections", "rateLineCollections.rateLines"})
RIGHT_SPEC_EXPANSIONS = frozenset({"rateEligibility", "validity", "credentials", "rightPools"})
ASSIGNED_EXPANSIONS = frozenset({"plannedUses", "assignedRightIssuer"})
SESSION_EXPANSIONS = frozenset(
    {
        "credentials",
        "vehicleAncillaryIdentification",
        "segments",
        "segments.space",
        "segments.assignedRight",
    }
)


class BadRequest(AppError):
    def __init__(self, message: str) -> None:
        super().__init__(400, "invalid_request", message)


def expansions(values: Iterable[str], known: frozenset[str]) -> frozenset[str]:
    """APDS's `expand`: comma-separated names, `all` or `none`; an unknown name is a 400."""
    names = {name.strip() for value in values for name in value.split(",") if name.strip()}
    unknown = names - known - {"all", "none"}
    if unknown:
        raise BadRequest(f"unknown expand value(s): {', '.join(sorted(unknown))}")
    if "all" in names:
        return known
    return frozenset(names - {"none"})


def near(latitude: float | None, longitude: float | None, radius: int | None) -> Near | None:
    """APDS's geographic filter: all three parameters or none."""
    given = [value is not None for value in (latitude, longitude, radius)]
    if not any(given):
        return None
    if not all(given):
        raise BadRequest("latitude, longitude and radius go together")
    assert latitude is not None and longitude is not None and radius is not None
    return Near(latitude, longitude, radius)


def instant(value: int | None) -> datetime | None:
    """A unix epoch instant (APDS's filters) as a datetime."""
    return None if value is None else datetime.fromtimestamp(value, UTC)


def page_of(page: int | None, size: int) -> Page:
    return Page(limit=size, offset=((page or 1) - 1) * size)


def _listed(data: list[Json], total: int, page: Page, now: datetime) -> Json:
    return {
        "meta": {
            "referenceInstant": int(now.timestamp()),
            "offset": page.offset,
            "pageSize": page.limit,
            "total": total,
        },
        "data": data,
    }


# ===== Places =====


def _place(row: asyncpg.Record, timezone: str, expand: frozenset[str], view: Json | None) -> Json:
    closed = row["closed_at"] is not None
    place: Json = {
        "id": row["code"],
        "version": row["version"],
        "type": "place",
        "name": [{"language": NAME_LANGUAGE, "string": row["name"]}],
        "layer": 0,
        "hierarchyElementRecord": {"creationTime": time_of(row["updated_at"])},
        "timeZone": timezone,
    }
    if "pointLocation" in expand and row["latitude"] is not None and row["longitude"] is not None:
        place["indicativePlacePointLocation"] = [
            {"type": "Point", "coordinates": [row["longitude"], row["latitude"]]}
        ]
    if "characteristics" in expand:
        place["characteristics"] = {
            "openToPublic": True,
            "accessControlled": True,
            "operatingModes": ["payByPlate", "app"],
            "spacesTotal": row["capacity"],
        }
    if "openingTimes" in expand:
        place["times"] = {
            "available24hours": not closed,
            "openAllYear": not closed,
            "openingTimesNotSpecified": False,
            "openingTimesUnknown": False,
        }
    if "operatingRestrictions" in expand and closed:
        place["operatingRestrictions"] = [
            {
                "operatingRestriction": "noParking",
                "operatingRestrictionContext": text("停车场暂停开放", "car park closed"),
            }
        ]
    if view is not None:
        place["hierarchyElementReference"] = occupancy_reference(
            row, view["occupied"], view["updated_at"]
        )
    return place


async def _places(
    runtime: Runtime, rows: list[asyncpg.Record], expand: frozenset[str]
) -> list[Json]:
    views: list[Json | None] = (
        list(await public.availabilities(runtime, rows))
        if "occupancy" in expand
        else [None] * len(rows)
    )
    return [
        _place(row, runtime.settings.timezone, expand, view)
        for row, view in zip(rows, views, strict=True)
    ]


async def places(
    conn: asyncpg.Connection,
    runtime: Runtime,
    *,
    near: Near | None,
    modified_since: datetime | None,
    name: str | None,
    types: frozenset[str],
    expand: frozenset[str],
    page: Page,
) -> Json:
    """A `HierarchyElementList` of car parks (all of layer 0: `layer` filters nothing)."""
    now = datetime.now(UTC)
    if types and "place" not in types:
        return _listed([], 0, page, now)
    rows, total = await repo.places(
        conn, near=near, modified_since=modified_since, name=name, page=page
    )
    return _listed(await _places(runtime, rows, expand), total, page, now)


async def place(
    conn: asyncpg.Connection, runtime: Runtime, code: str, expand: frozenset[str]
) -> Json:
    row = await repo.place(conn, code)
    if row is None:
        raise NotFound("place")
    return (await _places(runtime, [row], expand))[0]


# ===== Rates =====


def _yuan(fen: int) -> float:
    return fen / 100


def _duration(minutes: int) -> str:
    """APDS's rate line offsets: hh:mm, or dd:hh:mm from a day on."""
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    return f"{days:02d}:{hours:02d}:{mins:02d}" if days else f"{hours:02d}:{mins:02d}"


def _rulestext(tariff: Tariff) -> tuple[str, str]:
    zh: list[str] = []
    en: list[str] = []
    if tariff.free_minutes:
        zh.append(f"{tariff.free_minutes}分钟内离场免费（超时从入场起计费）")
        en.append(f"free within {tariff.free_minutes} min (longer stays are charged from entry)")
    if tariff.daily_cap_fen is not None:
        zh.append(f"自入场起每24小时最高¥{tariff.daily_cap_fen / 100:.2f}")
        en.append(f"at most CNY {tariff.daily_cap_fen / 100:.2f} per 24 h from entry")
    if tariff.stay_cap_fen is not None:
        zh.append(f"单次停车最高¥{tariff.stay_cap_fen / 100:.2f}")
        en.append(f"at most CNY {tariff.stay_cap_fen / 100:.2f} per stay")
    for colour, percent in sorted(tariff.colour_discount_percent.items()):
        name = PLATE_COLOURS.get(colour, colour)
        zh.append(f"{name}优惠{percent}%")
        en.append(f"{percent}% off for {colour} plates")
    return "；".join(zh), "; ".join(en)


def _line(prefix: str, sequence: int, line: RateLine, notes: list[Json] | None) -> Json:
    rate_line: Json = {
        "id": f"{prefix}-{sequence}",
        "version": 1,
        "sequence": sequence,
        "rateLineType": "flatRate" if line.kind == "flat" else "incrementingRate",
        "durationStart": _duration(line.from_minute),
        "value": _yuan(line.amount_fen),
    }
    if line.to_minute is not None:
        rate_line["durationEnd"] = _duration(line.to_minute)
    if line.kind == "per_increment":
        rate_line["incrementPeriod"] = f"PT{line.increment_minutes}M"
    if notes:
        rate_line["description"] = notes
    return rate_line


def _collection(
    tariff_id: int,
    sequence: int,
    band: Band,
    holiday: bool,
    valid_from: datetime,
    rules: tuple[str, str],
) -> Json:
    hours = f"{band.start:%H:%M}-{band.end:%H:%M}"
    zh = f"{'节假日' if holiday else ''}{band.name} {hours}"
    en = f"{'holidays, ' if holiday else ''}{band.name} {hours}"
    if rules[0]:
        zh, en = f"{zh}；{rules[0]}", f"{en}; {rules[1]}"
    collection: Json = {
        "id": f"{tariff_id}-{sequence}",
        "version": 1,
        "collectionSequence": sequence,
        "applicableCurrency": CURRENCY,
        "resetTime": f"{band.start:%H:%M}",
        "validStart": time_of(valid_from),
        "relativeTimes": False,
        "taxIncluded": True,
        "rateLines": [
            _line(f"{tariff_id}-{sequence}", n, line, text(zh, en) if n == 1 else None)
            for n, line in enumerate(band.lines, start=1)
        ],
    }
    if band.max_fen is not None:
        collection["maxValueCollection"] = {
            "currencyType": CURRENCY,
            "currencyValue": _yuan(band.max_fen),
        }
    return collection


def _rate_table(row: asyncpg.Record) -> Json:
    tariff = Tariff.from_json(row["rules"])
    rules = _rulestext(tariff)
    bands = [(band, False) for band in tariff.bands] + [
        (band, True) for band in tariff.holiday_bands or ()
    ]
    table: Json = {
        "id": str(row["id"]),
        "version": 1,
        "rateTableName": text(f"{row['car_park_name']}收费标准", f"{row['car_park']} rates"),
        "availability": "public",
        "rateType": "hourly",
        "rateResponsibleParty": operator_reference(row["operator_id"]),
        "validityStart": time_of(row["effective_from"]),
        "activeTimes": {
            "available24hours": True,
            "openAllYear": True,
            "openingTimesNotSpecified": False,
            "openingTimesUnknown": False,
        },
        # Always whole: APDS requires the collections and each its lines, so `expand` (checked)
        # changes nothing here; likewise a session's credentials and segments.
        "rateLineCollections": [
            _collection(
                row["id"],
                n,
                band,
                holiday,
                row["effective_from"],
                rules,
            )
            for n, (band, holiday) in enumerate(bands, start=1)
        ],
    }
    if row["previous_id"] is not None:
        table["rateSupersedeLink"] = {
            "id": str(row["previous_id"]),
            "version": 1,
            "className": "RateTable",
        }
    return table


async def rates(
    conn: asyncpg.Connection,
    *,
    near: Near | None,
    car_parks: list[str] | None,
    modified_since: datetime | None,
    page: Page,
) -> Json:
    """A `RateTableList` of the tariff versions in force now or later."""
    now = datetime.now(UTC)
    rows, total = await repo.rates(
        conn, near=near, car_parks=car_parks, modified_since=modified_since, page=page
    )
    return _listed([_rate_table(row) for row in rows], total, page, now)


async def rate(conn: asyncpg.Connection, rate_id: str) -> Json:
    row = await repo.rate(conn, int(rate_id)) if rate_id.isascii() and rate_id.isdigit() else None
    if row is None:
        raise NotFound("rate_table")
    return _rate_table(row)


# ===== Sessions =====


async def sessions(
    conn: asyncpg.Connection, operator_id: int, wanted: SessionFilter, page: Page
) -> Json:
    """A `SessionList` of the company's stays, newest first."""
    now = datetime.now(UTC)
    rows, total = await repo.sessions(conn, operator_id, wanted, page)
    return _listed([session_view(row, operator_id) for row in rows], total, page, now)


async def session(conn: asyncpg.Connection, operator_id: int, session_id: str) -> Json:
    row = (
        await repo.session(conn, operator_id, int(session_id))
        if session_id.isascii() and session_id.isdigit() and len(session_id) < 19
        else None
    )
    if row is None:
        raise NotFound("session")
    return session_view(row, operator_id)


# ===== Rights =====

_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _grants(row: asyncpg.Record) -> tuple[str, str]:
    """What a specification grants, in Chinese and English."""
    kind = row["kind"]
    if kind == "free_minutes":
        return f"免费停车{row['free_minutes']}分钟", f"{row['free_minutes']} free minutes"
    if kind == "discount":
        return f"停车费优惠{row['discount_percent']}%", f"{row['discount_percent']}% off the fee"
    if kind == "flat_fee":
        yuan = row["flat_fee_fen"] / 100
        return f"每次停车¥{yuan:.2f}", f"CNY {yuan:.2f} per stay"
    return "免费通行", "free passage"


def _right_spec(row: asyncpg.Record) -> Json:
    zh, en = _grants(row)
    period: Json = {
        "recurringDayWeekMonthPeriod": [
            {"applicableDay": [_DAYS[d - 1] for d in sorted(row["weekdays"])]}
        ]
    }
    if row["window_start"] is not None:
        period["recurringTimePeriodOfDay"] = [
            {
                "startTimeOfPeriod": f"{row['window_start']:%H:%M}",
                "endTimeOfPeriod": f"{row['window_end']:%H:%M}",
            }
        ]
    return {
        "id": str(row["id"]),
        "version": 1,
        "description": text(f"{row['name']}：{zh}", f"{row['name']}: {en}"),
        "type": "permitParking",
        "transferable": False,
        "credentials": ["licensePlate"],
        "validity": {
            "validityStatus": "definedByValidityTimeSpec",
            "validityTimeSpecification": {
                "overallStartTime": time_of(row["created_at"]),
                "validPeriods": [period],
            },
        },
        "issuer": operator_reference(row["operator_id"]),
        "hierarchyElements": [
            {"id": code, "version": version, "className": "Place"}
            for code, version in zip(row["car_parks"], row["car_park_versions"], strict=True)
        ],
    }


def _number(value: str, limit: int = 18) -> int | None:
    """A path id as our integer id (None: no such object)."""
    return int(value) if value.isascii() and value.isdigit() and len(value) <= limit else None


async def right_specs(
    conn: asyncpg.Connection,
    operator_id: int,
    *,
    near: Near | None,
    car_parks: list[str] | None,
    modified_since: datetime | None,
    page: Page,
) -> Json:
    """A `RightSpecificationList` of the company's right specifications."""
    now = datetime.now(UTC)
    rows, total = await repo.right_specs(
        conn,
        operator_id,
        near=near,
        car_parks=car_parks,
        modified_since=modified_since,
        page=page,
    )
    return _listed([_right_spec(row) for row in rows], total, page, now)


def _pay_as_you_go(operator_id: int, places: asyncpg.Record) -> Json:
    """The right a stay without one parks under: once, at the car park's rates."""
    return {
        "id": PAY_AS_YOU_GO,
        "version": 1,
        "description": text(
            "按次停车，按停车场收费标准计费", "pay as you go, at the car park's rates"
        ),
        "type": "oneTimeUseParking",
        "transferable": False,
        "credentials": ["licensePlate"],
        "validity": {
            "validityStatus": "active",
            "validityTimeSpecification": {"overallStartTime": time_of(places["created_at"])},
        },
        "issuer": operator_reference(operator_id),
        "hierarchyElements": [
            {"id": code, "version": version, "className": "Place"}
            for code, version in zip(places["car_parks"], places["car_park_versions"], strict=True)
        ],
    }


async def right_spec(conn: asyncpg.Connection, operator_id: int, spec_id: str) -> Json:
    if spec_id == PAY_AS_YOU_GO:
        places = await repo.company_places(conn, operator_id)
        if places["car_parks"] is None:
            raise NotFound("right_specification")
        return _pay_as_you_go(operator_id, places)
    number = _number(spec_id)
    row = await repo.right_spec(conn, operator_id, number) if number is not None else None
    if row is None:
        raise NotFound("right_specification")
    return _right_spec(row)


# A right's status as APDS's ValidityStatusEnum (`validityStatus`, which APDS gives
# validities and not assigned rights: an extension, ignored by clients that do not know it).
# A cancelled right is suspended for good: its use carries its `cancelTime`, it expired then.
_VALIDITY_STATUS = {
    "active": "definedByValidityTimeSpec",
    "suspended": "suspended",
    "cancelled": "suspended",
}


def _assigned_right(row: asyncpg.Record) -> Json:
    expiry = row["valid_until"]
    use: Json = {
        "startTime": time_of(row["valid_from"]),
        "endTime": time_of(row["valid_until"]),
        "issuanceTime": time_of(row["created_at"]),
        "issueMethod": "electronic",
    }
    if row["status"] == "cancelled":
        use["cancelTime"] = time_of(row["updated_at"])
        expiry = min(expiry, row["updated_at"])
    vehicles = row["vehicles"] or []
    right: Json = {
        "id": str(row["id"]),
        "version": 1,
        "rightSpecification": {
            "id": str(row["spec_id"]),
            "version": 1,
            "className": "RightSpecification",
        },
        "rightHolder": {"credentials": [plate_credential(v["plate"]) for v in vehicles]},
        "assignedRightIssuer": operator_reference(row["operator_id"]),
        "issueMethod": "electronic",
        "issuanceTime": time_of(row["created_at"]),
        "expiry": time_of(expiry),
        "plannedUses": [use],
        "validityStatus": _VALIDITY_STATUS[row["status"]],
    }
    return right


def _stay_right(row: asyncpg.Record, operator_id: int) -> Json:
    """The pay-as-you-go right of a stay that used none (its sessions' segments name it)."""
    use: Json = {
        "startTime": time_of(row["entered_at"]),
        "issuanceTime": time_of(row["entered_at"]),
        "issueMethod": "electronic",
    }
    if row["exited_at"] is not None:
        use["endTime"] = time_of(row["exited_at"])
    right: Json = {
        "id": stay_right_id(row),
        "version": 1,
        "rightSpecification": {
            "id": PAY_AS_YOU_GO,
            "version": 1,
            "className": "RightSpecification",
        },
        "rightHolder": {"credentials": [plate_credential(row["plate"])]},
        "assignedRightIssuer": operator_reference(operator_id),
        "issueMethod": "electronic",
        "issuanceTime": time_of(row["entered_at"]),
        "plannedUses": [use],
    }
    if row["exited_at"] is not None:
        right["expiry"] = time_of(row["exited_at"])
    return right


async def assigned_rights(
    conn: asyncpg.Connection, operator_id: int, wanted: AssignedFilter, page: Page
) -> Json:
    """An `AssignedRightList` of the company's assigned rights."""
    now = datetime.now(UTC)
    rows, total = await repo.assigned_rights(conn, operator_id, wanted, page)
    return _listed([_assigned_right(row) for row in rows], total, page, now)


async def assigned_right(conn: asyncpg.Connection, operator_id: int, right_id: str) -> Json:
    if right_id.startswith(STAY_RIGHT_PREFIX):
        stay = _number(right_id.removeprefix(STAY_RIGHT_PREFIX))
        row = await repo.session(conn, operator_id, stay) if stay is not None else None
        if row is None or row["assigned_right_id"] is not None:
            raise NotFound("assigned_right")
        return _stay_right(row, operator_id)
    number = _number(right_id)
    row = await repo.assigned_right(conn, operator_id, number) if number is not None else None
    if row is None:
        raise NotFound("assigned_right")
    return _assigned_right(row)
