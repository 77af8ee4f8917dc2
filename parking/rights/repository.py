"""All SQL of rights and blacklists. Every function runs on the caller's connection."""

from datetime import datetime, time
from typing import Any

import asyncpg

_SPEC_COLUMNS = """sp.id, sp.name, sp.kind, sp.free_minutes, sp.discount_percent, sp.flat_fee_fen,
    (SELECT array_agg(cp.code ORDER BY cp.code) FROM car_parks cp
     WHERE cp.id = ANY (sp.car_park_ids)) AS car_parks,
    sp.car_park_ids IS NULL AS everywhere, sp.weekdays, sp.window_start, sp.window_end,
    sp.created_at"""


async def car_park_ids(conn: asyncpg.Connection, operator_id: int, codes: list[str]) -> list[int]:
    """The company's car parks with these codes (fewer when some are not the company's)."""
    rows = await conn.fetch(
        "SELECT id FROM car_parks WHERE operator_id = $1 AND code = ANY ($2::text[])",
        operator_id,
        codes,
    )
    return [r["id"] for r in rows]


async def insert_spec(
    conn: asyncpg.Connection,
    *,
    operator_id: int,
    name: str,
    kind: str,
    free_minutes: int | None,
    discount_percent: int | None,
    flat_fee_fen: int | None,
    car_park_ids: list[int] | None,
    weekdays: list[int],
    window_start: time | None,
    window_end: time | None,
    created_by: str,
) -> asyncpg.Record | None:
    """None when the company already has a specification of that name."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""WITH sp AS (
                INSERT INTO right_specs (operator_id, name, kind, free_minutes, discount_percent,
                    flat_fee_fen, car_park_ids, weekdays, window_start, window_end, created_by)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                ON CONFLICT (operator_id, name) DO NOTHING
                RETURNING *)
            SELECT {_SPEC_COLUMNS} FROM sp""",
        operator_id,
        name,
        kind,
        free_minutes,
        discount_percent,
        flat_fee_fen,
        car_park_ids,
        weekdays,
        window_start,
        window_end,
        created_by,
    )
    return row


async def specs(conn: asyncpg.Connection, operator_id: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {_SPEC_COLUMNS} FROM right_specs sp WHERE sp.operator_id = $1 ORDER BY sp.id",
        operator_id,
    )
    return rows


async def spec_ids_by_name(conn: asyncpg.Connection, operator_id: int) -> dict[str, int]:
    rows = await conn.fetch("SELECT id, name FROM right_specs WHERE operator_id = $1", operator_id)
    return {r["name"]: r["id"] for r in rows}


async def spec_exists(conn: asyncpg.Connection, operator_id: int, spec_id: int) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM right_specs WHERE id = $1 AND operator_id = $2)",
            spec_id,
            operator_id,
        )
    )


_RIGHT_COLUMNS = """ar.id, ar.spec_id, sp.name AS spec_name, sp.kind,
    (SELECT json_agg(json_build_object('plate', rp.plate, 'color', rp.color)
                     ORDER BY rp.plate, rp.color)
     FROM assigned_right_plates rp WHERE rp.right_id = ar.id) AS vehicles,
    ar.valid_from, ar.valid_until, ar.max_inside, ar.label, ar.status, ar.source,
    ar.created_at, ar.updated_at"""


async def right(
    conn: asyncpg.Connection, operator_id: int, right_id: int, *, lock: bool = False
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {_RIGHT_COLUMNS} FROM assigned_rights ar
            JOIN right_specs sp ON sp.id = ar.spec_id
            WHERE ar.id = $1 AND ar.operator_id = $2
            {"FOR UPDATE OF ar" if lock else ""}""",
        right_id,
        operator_id,
    )
    return row


async def rights(
    conn: asyncpg.Connection,
    operator_id: int,
    *,
    status: str | None,
    plate: str | None,
    color: str | None,
    after_id: int,
    limit: int,
) -> list[asyncpg.Record]:
    """The company's rights by id, of one status and of the vehicles whose characters and
    colour are given (each filter only when given)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_RIGHT_COLUMNS} FROM assigned_rights ar
            JOIN right_specs sp ON sp.id = ar.spec_id
            WHERE ar.operator_id = $1 AND ($2::text IS NULL OR ar.status = $2)
              AND (($3::text IS NULL AND $4::text IS NULL) OR EXISTS (
                  SELECT 1 FROM assigned_right_plates rp
                  WHERE rp.right_id = ar.id AND ($3::text IS NULL OR rp.plate = $3)
                    AND ($4::text IS NULL OR rp.color = $4)))
              AND ar.id > $5
            ORDER BY ar.id LIMIT $6""",
        operator_id,
        status,
        plate,
        color,
        after_id,
        limit,
    )
    return rows


async def update_right(conn: asyncpg.Connection, right_id: int, **changes: Any) -> None:
    sets = ", ".join(f"{column} = ${i}" for i, column in enumerate(changes, start=2))
    await conn.execute(
        f"UPDATE assigned_rights SET {sets}, updated_at = now() WHERE id = $1",
        right_id,
        *changes.values(),
    )


# Blacklist


_BLACKLIST_COLUMNS = "id, plate, color, reason, created_by, created_at, removed_at"


async def insert_blacklist(
    conn: asyncpg.Connection,
    *,
    operator_id: int,
    plate: str,
    color: str,
    reason: str,
    created_by: str,
) -> asyncpg.Record | None:
    """None when the vehicle is already on the company's blacklist."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""INSERT INTO plate_blacklist (operator_id, plate, color, reason, created_by)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (plate, color, operator_id) WHERE removed_at IS NULL DO NOTHING
            RETURNING {_BLACKLIST_COLUMNS}""",
        operator_id,
        plate,
        color,
        reason,
        created_by,
    )
    return row


async def blacklist(
    conn: asyncpg.Connection, operator_id: int, *, include_removed: bool, limit: int
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {_BLACKLIST_COLUMNS} FROM plate_blacklist
            WHERE operator_id = $1 AND ($2 OR removed_at IS NULL)
            ORDER BY id DESC LIMIT $3""",
        operator_id,
        include_removed,
        limit,
    )
    return rows


async def remove_blacklist(
    conn: asyncpg.Connection, operator_id: int, entry_id: int, removed_by: str
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""UPDATE plate_blacklist SET removed_at = now(), removed_by = $3
            WHERE id = $1 AND operator_id = $2 AND removed_at IS NULL
            RETURNING {_BLACKLIST_COLUMNS}""",
        entry_id,
        operator_id,
        removed_by,
    )
    return row


# The lane's entry


async def entry_standing(
    conn: asyncpg.Connection,
    *,
    operator_id: int,
    car_park_id: int,
    plate: str,
    color: str,
    at: datetime,
) -> tuple[str | None, list[tuple[int, int | None]]]:
    """For a vehicle entering: its blacklisting reason in the company (None: not listed), and
    its active rights here not yet expired, as (id, max_inside), by id; a capped pass only
    once in force (one starting next week takes no place now). One round trip."""
    row = await conn.fetchrow(
        """SELECT
               (SELECT reason FROM plate_blacklist
                WHERE plate = $3 AND color = $4 AND operator_id = $1 AND removed_at IS NULL)
               AS blacklisted,
               (SELECT json_agg(json_build_object('id', ar.id, 'max_inside', ar.max_inside)
                                ORDER BY ar.id)
                FROM assigned_right_plates rp
                JOIN assigned_rights ar ON ar.id = rp.right_id AND ar.status = 'active'
                JOIN right_specs sp ON sp.id = ar.spec_id
                WHERE rp.plate = $3 AND rp.color = $4 AND ar.valid_until > $5
                  AND (ar.max_inside IS NULL OR ar.valid_from <= $5)
                  AND ($2 = ANY (sp.car_park_ids)
                       OR (sp.car_park_ids IS NULL AND sp.operator_id = $1))) AS rights""",
        operator_id,
        car_park_id,
        plate,
        color,
        at,
    )
    assert row is not None
    found = row["rights"] or []
    return row["blacklisted"], [(r["id"], r["max_inside"]) for r in found]


async def lock_right(conn: asyncpg.Connection, right_id: int) -> None:
    """Entries of one pass's vehicles take its places one at a time."""
    await conn.execute("SELECT 1 FROM assigned_rights WHERE id = $1 FOR UPDATE", right_id)


async def places_taken(conn: asyncpg.Connection, right_id: int) -> int:
    """Stays inside now holding one of the right's places (read after `lock_right`, in a
    statement of its own so that it sees the entries committed while it waited)."""
    taken: int = await conn.fetchval(
        "SELECT count(*) FROM sessions WHERE assigned_right_id = $1 AND status = 'open'",
        right_id,
    )
    return taken


async def occupancy_by_standing(conn: asyncpg.Connection, operator_id: int) -> list[asyncpg.Record]:
    """Per car park of the company: the stays inside now holding a place of a right (pass
    holders) and the others (visitors)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT cp.code AS car_park, cp.capacity,
                  count(s.id) FILTER (WHERE s.assigned_right_id IS NOT NULL) AS pass_holders,
                  count(s.id) FILTER (WHERE s.assigned_right_id IS NULL) AS visitors
           FROM car_parks cp
           LEFT JOIN sessions s ON s.car_park_id = cp.id AND s.status = 'open'
           WHERE cp.operator_id = $1
           GROUP BY cp.id ORDER BY cp.code""",
        operator_id,
    )
    return rows
