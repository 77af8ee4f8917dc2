"""Migrations apply once, in order, and give exactly the schema in schema_snapshot.txt."""

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from billing import ledger
from parking.cli import SNAPSHOT_PATH
from parking.migrate import migrate, schema_snapshot
from tests.conftest import ADMIN_DSN, _dsn_for


@pytest.fixture
async def fresh_db() -> AsyncIterator[asyncpg.Connection]:
    name = f"parking_mig_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(_dsn_for(name))
    try:
        yield conn
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def test_migrations_give_the_snapshot_schema_and_apply_once(
    fresh_db: asyncpg.Connection,
) -> None:
    applied = await migrate(fresh_db)
    assert applied and applied == sorted(applied)
    snapshot = await schema_snapshot(fresh_db)
    assert snapshot == SNAPSHOT_PATH.read_text(encoding="utf-8"), (
        "schema differs from migrations/schema_snapshot.txt: run `parking migrate --snapshot`"
    )
    assert await migrate(fresh_db) == []
    assert await fresh_db.fetchval("SELECT count(*) FROM schema_migrations") == len(applied)


async def test_the_queue_tables_are_vacuumed_after_a_fixed_number_of_dead_rows(
    fresh_db: asyncpg.Connection,
) -> None:
    """The outbox and the feeds' deliveries churn (each row updated once or twice within
    seconds): autovacuum's default, a fifth of the table, lets their dead rows pile up under
    every claim (migration 0043)."""
    await migrate(fresh_db)
    for table in ("outbox", "feed_deliveries"):
        options = await fresh_db.fetchval(
            "SELECT reloptions FROM pg_class WHERE oid = $1::regclass", table
        )
        settings = dict(option.split("=", 1) for option in options or [])
        assert settings["autovacuum_vacuum_scale_factor"] == "0", (table, settings)
        assert int(settings["autovacuum_vacuum_threshold"]) <= 10_000, (table, settings)
        assert settings["autovacuum_vacuum_cost_delay"] == "0", (table, settings)


async def test_ledger_is_append_only_and_balanced(fresh_db: asyncpg.Connection) -> None:
    await migrate(fresh_db)
    async with fresh_db.transaction():
        await ledger.post(fresh_db, "test", [("a", 100), ("b", -100)])
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="append-only"):
        await fresh_db.execute("UPDATE ledger_entries SET amount_fen = 1")
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="append-only"):
        await fresh_db.execute("DELETE FROM ledger_entries")
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="append-only"):
        await fresh_db.execute("TRUNCATE ledger_entries")
    # The database itself refuses an unbalanced transaction at commit.
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="does not balance"):
        async with fresh_db.transaction():
            await fresh_db.execute(
                """INSERT INTO ledger_entries (transaction_id, ledger_account, amount_fen, kind)
                   VALUES (gen_random_uuid(), 'a', 5, 'test')"""
            )
    with pytest.raises(ledger.UnbalancedTransaction):
        await ledger.post(fresh_db, "test", [("a", 100), ("b", -99)])
    assert await ledger.is_balanced(fresh_db)
    assert await fresh_db.fetchval("SELECT count(*) FROM ledger_entries") == 2
