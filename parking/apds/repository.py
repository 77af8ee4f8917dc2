"""Queries behind the APDS routes: car parks as places, tariff versions as rate tables, a
company's stays as sessions. Lists are pages of (rows, total)."""

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from parking.public.repository import EARTH_RADIUS_M, distance_m_sql


@dataclass(frozen=True, slots=True)
class Near:
    """APDS's latitude/longitude/radius filter: car parks within `radius_m` of the point."""

    latitude: float
    longitude: float
    radius_m: int


@dataclass(frozen=True, slots=True)
class Page:
    limit: int
    offset: int


class _Where:
    """Conditions and their parameters, numbered as they are added."""

    def __init__(self) -> None:
        self.conditions: list[str] = []
        self.args: list[object] = []

    def param(self, value: object) -> str:
        self.args.append(value)
        return f"${len(self.args)}"

    def add(self, condition: str) -> None:
        self.conditions.append(condition)

    def near(self, near: Near | None, table: str) -> None:
        if near is None:
            return
        distance = distance_m_sql(
            self.param(near.latitude),
            self.param(near.longitude),
            self.param(EARTH_RADIUS_M),
            table,
        )
        self.add(
            f"{table}.latitude IS NOT NULL AND {table}.longitude IS NOT NULL"
            f" AND {distance} <= {self.param(near.radius_m)}"
        )

    def period(self, period: "Period", start: str, end: str) -> None:
        """`period`'s bounds on the `start` and `end` columns (each bound exclusive)."""
        for column, bound, value in (
            (start, ">", period.start_after),
            (start, "<", period.start_before),
            (end, ">", period.end_after),
            (end, "<", period.end_before),
        ):
            if value is not None:
                self.add(f"{column} {bound} {self.param(value)}")

    @property
    def sql(self) -> str:
        return " AND ".join(self.conditions) if self.conditions else "true"


async def _page(
    conn: asyncpg.Connection, select: str, count: str, where: _Where, order: str, page: Page
) -> tuple[list[asyncpg.Record], int]:
    total: int = await conn.fetchval(f"{count} WHERE {where.sql}", *where.args)
    limit, offset = where.param(page.limit), where.param(page.offset)
    rows: list[asyncpg.Record] = await conn.fetch(
        f"{select} WHERE {where.sql} ORDER BY {order} LIMIT {limit} OFFSET {offset}", *where.args
    )
    return rows, total


_PLACE = """SELECT c.id, c.code, c.name, c.capacity, c.latitude, c.longitude, c.version,
                   c.created_at, c.updated_at, c.closed_at
            FROM car_parks c"""


async def places(
    conn: asyncpg.Connection,
    *,
    near: Near | None,
    modified_since: datetime | None,
    name: str | None,
    page: Page,
) -> tuple[list[asyncpg.Record], int]:
    where = _Where()
    where.near(near, "c")
    if modified_since is not None:
        where.add(f"c.updated_at >= {where.param(modified_since)}")
    if name is not None:
        where.add(f"strpos(c.name, {where.param(name)}) > 0")
    return await _page(conn, _PLACE, "SELECT count(*) FROM car_parks c", where, "c.code", page)


async def place(conn: asyncpg.Connection, code: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(f"{_PLACE} WHERE c.code = $1", code)
    return row


# Tariff versions in force now or later (a version is superseded once the next one is in
# force), with the version each supersedes.
_RATE = """SELECT t.id, t.rules, t.effective_from, t.created_at, t.previous_id,
                  c.code AS car_park, c.name AS car_park_name, c.operator_id
           FROM (SELECT t.*, lag(t.id) OVER w AS previous_id,
                        lead(t.effective_from) OVER w AS superseded_at
                 FROM tariffs t WINDOW w AS (PARTITION BY t.car_park_id ORDER BY t.effective_from)
                ) t
           JOIN car_parks c ON c.id = t.car_park_id"""
_RATE_COUNT = """SELECT count(*)
           FROM (SELECT t.*, lead(t.effective_from) OVER w AS superseded_at
                 FROM tariffs t WINDOW w AS (PARTITION BY t.car_park_id ORDER BY t.effective_from)
                ) t
           JOIN car_parks c ON c.id = t.car_park_id"""


async def rates(
    conn: asyncpg.Connection,
    *,
    near: Near | None,
    car_parks: list[str] | None,
    modified_since: datetime | None,
    page: Page,
) -> tuple[list[asyncpg.Record], int]:
    where = _Where()
    where.add("(t.superseded_at IS NULL OR t.superseded_at > now())")
    where.near(near, "c")
    if car_parks is not None:
        where.add(f"c.code = ANY({where.param(car_parks)}::text[])")
    if modified_since is not None:
        where.add(f"t.created_at >= {where.param(modified_since)}")
    return await _page(conn, _RATE, _RATE_COUNT, where, "c.code, t.effective_from", page)


async def rate(conn: asyncpg.Connection, tariff_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(f"{_RATE} WHERE t.id = $1", tariff_id)
    return row


_SESSION = """SELECT s.id, s.plate, s.plate_color, s.status, s.entered_at, s.exited_at,
                     s.fee_fen, s.settlement, s.assigned_right_id,
                     c.code AS car_park, c.version AS car_park_version
              FROM sessions s JOIN car_parks c ON c.id = s.car_park_id"""


@dataclass(frozen=True, slots=True)
class Period:
    """APDS's start_after/start_before/end_after/end_before filters on what has a start and an
    end (a session, an assigned right)."""

    start_after: datetime | None = None
    start_before: datetime | None = None
    end_after: datetime | None = None
    end_before: datetime | None = None


@dataclass(frozen=True, slots=True)
class SessionFilter:
    near: Near | None = None
    car_parks: list[str] | None = None
    period: Period = Period()
    modified_since: datetime | None = None


async def sessions(
    conn: asyncpg.Connection, operator_id: int, wanted: SessionFilter, page: Page
) -> tuple[list[asyncpg.Record], int]:
    """The company's stays (not the superseded duplicates), newest first."""
    where = _Where()
    where.add(f"c.operator_id = {where.param(operator_id)}")
    where.add("s.status <> 'superseded'")
    where.near(wanted.near, "c")
    if wanted.car_parks is not None:
        where.add(f"c.code = ANY({where.param(wanted.car_parks)}::text[])")
    where.period(wanted.period, "s.entered_at", "s.exited_at")
    if wanted.modified_since is not None:
        since = where.param(wanted.modified_since)
        where.add(f"(s.entered_at >= {since} OR s.exited_at >= {since})")
    return await _page(
        conn,
        _SESSION,
        "SELECT count(*) FROM sessions s JOIN car_parks c ON c.id = s.car_park_id",
        where,
        "s.entered_at DESC, s.id DESC",
        page,
    )


async def session(
    conn: asyncpg.Connection, operator_id: int, session_id: int
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"{_SESSION} WHERE s.id = $1 AND c.operator_id = $2 AND s.status <> 'superseded'",
        session_id,
        operator_id,
    )
    return row


# A right specification with the company's car parks it applies at (all of them when it names
# none); one that applies at none of them is not served (APDS needs at least one place).
_SPEC_FROM = """FROM right_specs sp
           CROSS JOIN LATERAL (
               SELECT array_agg(c.code ORDER BY c.code) AS codes,
                      array_agg(c.version ORDER BY c.code) AS versions
               FROM car_parks c
               WHERE c.operator_id = sp.operator_id
                 AND (sp.car_park_ids IS NULL OR c.id = ANY (sp.car_park_ids))) places"""
_SPEC = f"""SELECT sp.id, sp.operator_id, sp.name, sp.kind, sp.free_minutes, sp.discount_percent,
                   sp.flat_fee_fen, sp.weekdays, sp.window_start, sp.window_end, sp.created_at,
                   places.codes AS car_parks, places.versions AS car_park_versions
            {_SPEC_FROM}"""
# Conditions on a specification's car parks (`c`), for the place and geographic filters.
_SPEC_AT = """EXISTS (SELECT 1 FROM car_parks c
                      WHERE c.operator_id = sp.operator_id
                        AND (sp.car_park_ids IS NULL OR c.id = ANY (sp.car_park_ids)) AND {})"""


def _spec_places(where: _Where, near: Near | None, car_parks: list[str] | None) -> None:
    if car_parks is not None:
        where.add(_SPEC_AT.format(f"c.code = ANY({where.param(car_parks)}::text[])"))
    if near is not None:
        inner = _Where()
        inner.args = where.args
        inner.near(near, "c")
        where.add(_SPEC_AT.format(inner.sql))


async def right_specs(
    conn: asyncpg.Connection,
    operator_id: int,
    *,
    near: Near | None,
    car_parks: list[str] | None,
    modified_since: datetime | None,
    page: Page,
) -> tuple[list[asyncpg.Record], int]:
    where = _Where()
    where.add(f"sp.operator_id = {where.param(operator_id)}")
    where.add("places.codes IS NOT NULL")
    _spec_places(where, near, car_parks)
    if modified_since is not None:
        where.add(f"sp.created_at >= {where.param(modified_since)}")
    return await _page(conn, _SPEC, f"SELECT count(*) {_SPEC_FROM}", where, "sp.id", page)


async def right_spec(
    conn: asyncpg.Connection, operator_id: int, spec_id: int
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"{_SPEC} WHERE sp.id = $1 AND sp.operator_id = $2 AND places.codes IS NOT NULL",
        spec_id,
        operator_id,
    )
    return row


async def company_places(conn: asyncpg.Connection, operator_id: int) -> asyncpg.Record:
    """The company's car parks (codes and versions, by code; NULL: none) and when its first
    was created."""
    row: asyncpg.Record = await conn.fetchrow(
        """SELECT array_agg(code ORDER BY code) AS car_parks,
                  array_agg(version ORDER BY code) AS car_park_versions,
                  min(created_at) AS created_at
           FROM car_parks WHERE operator_id = $1""",
        operator_id,
    )
    return row


_ASSIGNED = """SELECT ar.id, ar.spec_id, ar.operator_id, ar.valid_from, ar.valid_until,
                      ar.status, ar.source, ar.created_at, ar.updated_at,
                      (SELECT json_agg(json_build_object('plate', rp.plate, 'color', rp.color)
                                       ORDER BY rp.plate, rp.color)
                       FROM assigned_right_plates rp WHERE rp.right_id = ar.id) AS vehicles
               FROM assigned_rights ar JOIN right_specs sp ON sp.id = ar.spec_id"""


@dataclass(frozen=True, slots=True)
class AssignedFilter:
    near: Near | None = None
    car_parks: list[str] | None = None
    specs: list[int] | None = None
    plates: list[str] | None = None
    period: Period = Period()
    modified_since: datetime | None = None


async def assigned_rights(
    conn: asyncpg.Connection, operator_id: int, wanted: AssignedFilter, page: Page
) -> tuple[list[asyncpg.Record], int]:
    """The company's assigned rights, in the order they were given."""
    where = _Where()
    where.add(f"ar.operator_id = {where.param(operator_id)}")
    _spec_places(where, wanted.near, wanted.car_parks)
    if wanted.specs is not None:
        where.add(f"ar.spec_id = ANY({where.param(wanted.specs)}::bigint[])")
    if wanted.plates is not None:
        where.add(
            "EXISTS (SELECT 1 FROM assigned_right_plates rp WHERE rp.right_id = ar.id"
            f" AND rp.plate = ANY({where.param(wanted.plates)}::text[]))"
        )
    where.period(wanted.period, "ar.valid_from", "ar.valid_until")
    if wanted.modified_since is not None:
        where.add(f"ar.updated_at >= {where.param(wanted.modified_since)}")
    return await _page(
        conn,
        _ASSIGNED,
        "SELECT count(*) FROM assigned_rights ar JOIN right_specs sp ON sp.id = ar.spec_id",
        where,
        "ar.id",
        page,
    )


async def assigned_right(
    conn: asyncpg.Connection, operator_id: int, right_id: int
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"{_ASSIGNED} WHERE ar.id = $1 AND ar.operator_id = $2", right_id, operator_id
    )
    return row
