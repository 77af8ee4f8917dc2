"""Writes that set up the world: operators, car parks, gates, tariffs, drivers, bindings.

Used by `parking admin …` (parking.admin.service) and by seeding (demo, tests).
"""

from datetime import datetime

import asyncpg

from billing.tariff import Tariff
from parking.car_parks.schemas import check_car_park_name


async def create_operator(conn: asyncpg.Connection, name: str) -> int:
    operator_id: int = await conn.fetchval(
        """INSERT INTO operators (name) VALUES ($1)
           ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id""",
        name,
    )
    return operator_id


async def create_car_park(
    conn: asyncpg.Connection,
    *,
    operator_id: int,
    code: str,
    name: str,
    capacity: int,
    latitude: float | None = None,
    longitude: float | None = None,
    no_entry_policy: str = "exception",
    no_entry_fee_fen: int = 0,
    uncertain_exit_policy: str = "open_confirm",
    address: str | None = None,
) -> int:
    car_park_id: int = await conn.fetchval(
        """INSERT INTO car_parks (operator_id, code, name, capacity, latitude, longitude,
                                  no_entry_policy, no_entry_fee_fen, uncertain_exit_policy,
                                  address)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id""",
        operator_id,
        code,
        check_car_park_name(name),
        capacity,
        latitude,
        longitude,
        no_entry_policy,
        no_entry_fee_fen,
        uncertain_exit_policy,
        address,
    )
    return car_park_id


async def insert_company(conn: asyncpg.Connection, name: str) -> int | None:
    """A new company (operator); None when one of that name exists."""
    operator_id: int | None = await conn.fetchval(
        "INSERT INTO operators (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING id",
        name,
    )
    return operator_id


async def company_id(conn: asyncpg.Connection, ref: str, *, lock: bool = False) -> int | None:
    """A company by its id or its exact name; locked, what is added to it is added one at a
    time (`runs_car_parks`, `has_platform_staff` read before adding)."""
    found: int | None = await conn.fetchval(
        "SELECT id FROM operators WHERE name = $1 OR ($2::bigint IS NOT NULL AND id = $2)"
        + (" FOR UPDATE" if lock else ""),
        ref,
        int(ref) if ref.isdigit() else None,
    )
    return found


async def runs_car_parks(conn: asyncpg.Connection, operator_id: int) -> bool:
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM car_parks WHERE operator_id = $1)", operator_id
    )
    return found


async def has_platform_staff(conn: asyncpg.Connection, operator_id: int) -> bool:
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM operator_users WHERE operator_id = $1 AND role = 'platform')",
        operator_id,
    )
    return found


async def car_park_by_code(conn: asyncpg.Connection, code: str) -> asyncpg.Record | None:
    """id, operator_id and uncertain_exit_policy of the car park with `code`, locked for the
    caller's transaction."""
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT id, operator_id, uncertain_exit_policy FROM car_parks WHERE code = $1 FOR UPDATE",
        code,
    )
    return row


async def set_uncertain_exit_policy(
    conn: asyncpg.Connection, car_park_id: int, policy: str
) -> None:
    await conn.execute(
        "UPDATE car_parks SET uncertain_exit_policy = $2 WHERE id = $1", car_park_id, policy
    )


async def gate_id(conn: asyncpg.Connection, car_park_code: str, gate_code: str) -> int | None:
    found: int | None = await conn.fetchval(
        """SELECT g.id FROM gates g JOIN car_parks cp ON cp.id = g.car_park_id
           WHERE cp.code = $1 AND g.code = $2""",
        car_park_code,
        gate_code,
    )
    return found


async def api_keys(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every API key (never the key itself: only its hash is stored, and not listed)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT k.id, k.kind, k.label, cp.code AS car_park, g.code AS gate, k.created_at,
                  k.revoked_at
           FROM api_keys k LEFT JOIN gates g ON g.id = k.gate_id
           LEFT JOIN car_parks cp ON cp.id = g.car_park_id
           ORDER BY k.id"""
    )
    return rows


async def revoke_api_key(conn: asyncpg.Connection, key_id: int) -> str | None:
    """Revokes a key that is not yet revoked; its kind, or None when there is no such key
    (or it was revoked already)."""
    kind: str | None = await conn.fetchval(
        """UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL
           RETURNING kind""",
        key_id,
    )
    return kind


async def create_gate(conn: asyncpg.Connection, car_park_id: int, code: str, direction: str) -> int:
    gate_id: int = await conn.fetchval(
        "INSERT INTO gates (car_park_id, code, direction) VALUES ($1, $2, $3) RETURNING id",
        car_park_id,
        code,
        direction,
    )
    return gate_id


async def create_tariff(
    conn: asyncpg.Connection,
    car_park_id: int,
    *,
    effective_from: datetime,
    tariff: Tariff,
) -> int:
    tariff_id: int = await conn.fetchval(
        """INSERT INTO tariffs (car_park_id, effective_from, rules) VALUES ($1, $2, $3)
           RETURNING id""",
        car_park_id,
        effective_from,
        tariff.to_json(),
    )
    return tariff_id


async def create_account(conn: asyncpg.Connection, phone: str, name: str | None = None) -> int:
    account_id: int = await conn.fetchval(
        "INSERT INTO accounts (phone, display_name) VALUES ($1, $2) RETURNING id", phone, name
    )
    return account_id


async def bind_plate(
    conn: asyncpg.Connection,
    account_id: int,
    plate: str,
    color: str,
    *,
    since: datetime | None = None,
) -> int:
    """A binding, made now or `since` (an account imported with its history: a binding pays
    only for stays that began after it)."""
    binding_id: int = await conn.fetchval(
        """INSERT INTO plate_bindings (account_id, plate, color, bound_at)
           VALUES ($1, $2, $3, COALESCE($4, now())) RETURNING id""",
        account_id,
        plate,
        color,
        since,
    )
    return binding_id


async def bound_plates(conn: asyncpg.Connection, plates: list[str]) -> list[str]:
    """Those of `plates` that have an active binding."""
    rows = await conn.fetch(
        "SELECT plate FROM plate_bindings WHERE unbound_at IS NULL AND plate = ANY($1)", plates
    )
    return [r["plate"] for r in rows]


async def seed_open_session(
    conn: asyncpg.Connection,
    car_park_id: int,
    plate: str,
    color: str,
    entered_at: datetime,
    *,
    entry_certain: bool = False,
    entry_proven: bool = False,
) -> int:
    """A car already inside when the system starts (imported from the previous system). Its
    entry read counts as certain (and proven: certain by a calibrated score) only when the
    caller knows it was (a simulation does)."""
    session_id: int = await conn.fetchval(
        """INSERT INTO sessions
               (car_park_id, plate, plate_color, entered_at, entry_certain, entry_proven)
           VALUES ($1, $2, $3, $4, $5, $6) RETURNING id""",
        car_park_id,
        plate,
        color,
        entered_at,
        entry_certain,
        entry_proven,
    )
    return session_id
