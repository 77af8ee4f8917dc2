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
                     s.fee_fen, s.settlement, c.code AS car_park, c.version AS car_park_version
              FROM sessions s JOIN car_parks c ON c.id = s.car_park_id"""


@dataclass(frozen=True, slots=True)
class SessionFilter:
    near: Near | None = None
    car_parks: list[str] | None = None
    start_after: datetime | None = None
    start_before: datetime | None = None
    end_after: datetime | None = None
    end_before: datetime | None = None
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
    if wanted.start_after is not None:
        where.add(f"s.entered_at > {where.param(wanted.start_after)}")
    if wanted.start_before is not None:
        where.add(f"s.entered_at < {where.param(wanted.start_before)}")
    if wanted.end_after is not None:
        where.add(f"s.exited_at > {where.param(wanted.end_after)}")
    if wanted.end_before is not None:
        where.add(f"s.exited_at < {where.param(wanted.end_before)}")
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
