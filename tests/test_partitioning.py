"""Stays, captures and ledger lines in monthly partitions (migration 0012, parking/partitions).

The guarantees that unique indexes gave before partitioning must hold across months: one open
stay per plate, one booking per fee, charge, payment and refund, and the ledger append-only in
every partition. Partitions for the months ahead are created by the services' own role through
one function, and rows no month covers are kept and reported, never refused.

The tests share the run's database (and each other's leftovers): each makes its own car park,
plates and stay ids, and compares partitions and default-partition rows with what was there
before it started, so that they pass in any order and when run again.
"""

import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest

from billing import ledger
from parking.admin import repository as admin
from parking.db import create_pool
from parking.partitions.service import (
    SESSION_ID_DAY_FACTOR,
    ensure_partitions,
    months_from,
    session_id_floor,
)
from tests.conftest import unique_plate


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def _car_park(conn: asyncpg.Connection) -> tuple[int, int]:
    suffix = uuid.uuid4().hex[:8]
    operator = await admin.create_operator(conn, f"op-{suffix}")
    car_park = await admin.create_car_park(
        conn, operator_id=operator, code=f"cp-{suffix}", name="P", capacity=10
    )
    return car_park, await admin.create_gate(conn, car_park, "out", "out")


async def _partitions(conn: asyncpg.Connection) -> set[str]:
    """The names of every partition of the partitioned tables now."""
    rows = await conn.fetch(
        """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent IN ('sessions'::regclass, 'captures'::regclass,
                                 'ledger_entries'::regclass)"""
    )
    return {row["relname"] for row in rows}


async def _rows_in_default(conn: asyncpg.Connection) -> dict[str, int]:
    """Rows per table in the default partitions now, tables without any left out (the shape
    of `Maintained.rows_in_default`)."""
    counts = {
        table: await conn.fetchval(f"SELECT count(*) FROM {table}_default")
        for table in ("sessions", "captures", "ledger_entries")
    }
    return {table: n for table, n in counts.items() if n}


async def _partition_of(conn: asyncpg.Connection, table: str, where: str, *args: object) -> str:
    name: str = await conn.fetchval(f"SELECT tableoid::regclass::text FROM {table} {where}", *args)
    return name


async def test_a_new_stay_lands_in_this_months_partition_with_its_day_in_the_id(
    conn: asyncpg.Connection,
) -> None:
    car_park, _ = await _car_park(conn)
    stay = await conn.fetchrow(
        """INSERT INTO sessions (car_park_id, plate, entered_at) VALUES ($1, $2, now())
           RETURNING id, now() AT TIME ZONE 'UTC' AS at""",
        car_park,
        unique_plate(),
    )
    today = stay["at"].date()
    assert session_id_floor(today) < stay["id"] < session_id_floor(today + timedelta(days=1))
    assert await _partition_of(conn, "sessions", "WHERE id = $1", stay["id"]) == (
        f"sessions_{today:%Y_%m}"
    )


async def test_one_open_stay_per_plate_across_months(conn: asyncpg.Connection) -> None:
    car_park, _ = await _car_park(conn)
    plate = unique_plate()
    # A stay recorded months ago (its id in an older partition) that never left; an id of that
    # day no earlier run of this test took.
    old_id = session_id_floor(date(2026, 1, 15)) + 1 + secrets.randbelow(SESSION_ID_DAY_FACTOR - 1)
    await conn.execute(
        """INSERT INTO sessions (id, car_park_id, plate, entered_at)
           VALUES ($1, $2, $3, '2026-01-15T08:00:00Z')""",
        old_id,
        car_park,
        plate,
    )
    with pytest.raises(asyncpg.UniqueViolationError, match="sessions_one_open"):
        await conn.execute(
            "INSERT INTO sessions (car_park_id, plate, entered_at) VALUES ($1, $2, now())",
            car_park,
            plate,
        )
    # Once it is closed the plate may enter again; a superseded stay frees it too.
    await conn.execute(
        "UPDATE sessions SET status = 'closed', exited_at = now() WHERE id = $1", old_id
    )
    new_id = await conn.fetchval(
        """INSERT INTO sessions (car_park_id, plate, entered_at) VALUES ($1, $2, now())
           RETURNING id""",
        car_park,
        plate,
    )
    await conn.execute(
        "UPDATE sessions SET status = 'superseded', exited_at = now() WHERE id = $1", new_id
    )
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM open_stays WHERE car_park_id = $1 AND plate = $2",
            car_park,
            plate,
        )
        == 0
    )
    await conn.execute(
        "INSERT INTO sessions (car_park_id, plate, entered_at) VALUES ($1, $2, now())",
        car_park,
        plate,
    )
    open_ids = await conn.fetch(
        "SELECT session_id FROM open_stays WHERE car_park_id = $1 AND plate = $2",
        car_park,
        plate,
    )
    assert len(open_ids) == 1 and open_ids[0]["session_id"] not in (old_id, new_id)


async def test_a_fee_is_booked_once_across_months_and_no_partition_can_be_rewritten(
    conn: asyncpg.Connection,
) -> None:
    car_park, _ = await _car_park(conn)
    stay = await conn.fetchval(
        """INSERT INTO sessions (car_park_id, plate, entered_at, status, exited_at)
           VALUES ($1, $2, now() - interval '1 hour', 'closed', now()) RETURNING id""",
        car_park,
        unique_plate(),
    )
    # An account of its own: a line on another test's account would change that one's balance.
    account = await conn.fetchval(
        "INSERT INTO accounts (phone) VALUES ($1) RETURNING id",
        f"+86139{uuid.uuid4().int % 10**8:08d}",
    )
    lines = [(ledger.receivable(account), 500), (ledger.revenue(car_park), -500)]
    async with conn.transaction():
        # Written as if last month: the accrual lives in an older partition.
        transaction = uuid.uuid4()
        for account, amount in lines:
            await conn.execute(
                """INSERT INTO ledger_entries
                       (transaction_id, ledger_account, amount_fen, kind, session_id, created_at)
                   VALUES ($1, $2, $3, 'fee_accrued', $4, now() - interval '40 days')""",
                transaction,
                account,
                amount,
                stay,
            )
    with pytest.raises(asyncpg.UniqueViolationError, match="ledger_bookings"):
        async with conn.transaction():
            await ledger.post(conn, "fee_accrued", lines, session_id=stay)
    partitions = await conn.fetch(
        """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = 'ledger_entries'::regclass"""
    )
    assert len(partitions) >= 4  # before this month, this month, ahead, default
    for row in partitions:
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="append-only"):
            await conn.execute(f"TRUNCATE {row['relname']}")
    # Row triggers fire where there are rows: the partition holding last month's accrual.
    holding = await _partition_of(conn, "ledger_entries", "WHERE session_id = $1", stay)
    for statement in ("DELETE FROM {}", "UPDATE {} SET amount_fen = 1"):
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="append-only"):
            await conn.execute(statement.format(holding))
    for statement in ("DELETE FROM ledger_bookings", "TRUNCATE ledger_bookings"):
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="append-only"):
            await conn.execute(statement)
    assert await ledger.is_balanced(conn)


async def test_the_services_role_creates_months_ahead_and_nothing_else(
    conn: asyncpg.Connection, database_url: str
) -> None:
    today = datetime.now(UTC).date()
    ahead = months_from(today, 6)
    wanted = {
        f"{table}_{month:%Y_%m}"
        for month in ahead
        for table in ("sessions", "captures", "ledger_entries")
    }
    before = await _partitions(conn)
    # The migration made this month and two ahead; the rest may be there already when another
    # test (or an earlier run of this one) made them.
    assert {
        f"{table}_{month:%Y_%m}"
        for month in ahead[:3]
        for table in ("sessions", "captures", "ledger_entries")
    } <= before
    stranded = await _rows_in_default(conn)
    # Connected as the services are in production (docs/deployment.md): parking_app's rights.
    pool = await create_pool(f"{database_url}?role=parking_app", min_size=1, max_size=1)
    try:
        maintained = await ensure_partitions(pool, 5, today)
        # Exactly the months that were missing (on a fresh database the three after the
        # migration's), then nothing.
        assert sorted(maintained.created) == sorted(wanted - before)
        assert wanted <= await _partitions(conn)
        # Only the rows other tests left in the default partitions are reported.
        assert maintained.rows_in_default == stranded
        assert (await ensure_partitions(pool, 5, today)).created == []
        async with pool.acquire() as as_app:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await as_app.execute("CREATE TABLE sneaky (id int)")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await as_app.execute("TRUNCATE ledger_entries")
    finally:
        await pool.close()
    # Partitions made through the function refuse the ledger's rewrite as well.
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="append-only"):
        await conn.execute(f"TRUNCATE ledger_entries_{ahead[5]:%Y_%m}")


async def test_a_capture_no_month_covers_is_kept_and_reported(
    conn: asyncpg.Connection, database_url: str
) -> None:
    car_park, gate = await _car_park(conn)
    stranded = await _rows_in_default(conn)
    # A gate whose clock is years ahead: the capture is accepted, into the default partition.
    far = datetime(2031, 5, 4, 12, tzinfo=UTC)
    capture_id = uuid.uuid4()
    insert = """INSERT INTO captures (capture_id, gate_id, car_park_id, seq, direction,
                                      captured_at, received_at, outcome, command)
                VALUES ($1, $2, $3, 1, 'out', $4, now(), 'held_unreadable', '{}')"""
    await conn.execute(insert, capture_id, gate, car_park, far)
    assert await _partition_of(conn, "captures", "WHERE capture_id = $1", capture_id) == (
        "captures_default"
    )
    # The same capture delivered again meets its row.
    with pytest.raises(asyncpg.UniqueViolationError, match="captures_default_pkey"):
        await conn.execute(insert, capture_id, gate, car_park, far)
    # Its month is not created over it (that would fail); the row is reported instead.
    assert await conn.fetchval("SELECT ensure_month_partition('captures', $1)", far.date()) is None
    pool = await create_pool(database_url, min_size=1, max_size=1)
    try:
        maintained = await ensure_partitions(pool, 2, datetime.now(UTC).date())
    finally:
        await pool.close()
    # Reported with whatever earlier tests left there: this one row more than before.
    assert maintained.rows_in_default == stranded | {"captures": stranded.get("captures", 0) + 1}
