"""Writes that set up the world: operators, car parks, gates, tariffs, drivers, bindings.

Used by seeding (demo, tests) today and by the operator and driver APIs later.
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
) -> int:
    car_park_id: int = await conn.fetchval(
        """INSERT INTO car_parks (operator_id, code, name, capacity, latitude, longitude,
                                  no_entry_policy, no_entry_fee_fen, uncertain_exit_policy)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id""",
        operator_id,
        code,
        check_car_park_name(name),
        capacity,
        latitude,
        longitude,
        no_entry_policy,
        no_entry_fee_fen,
        uncertain_exit_policy,
    )
    return car_park_id


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
