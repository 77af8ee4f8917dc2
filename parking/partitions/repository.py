"""SQL of the monthly partitions (migration 0012 defines ensure_month_partition)."""

from datetime import date

import asyncpg

# The parents, partitioned by month: stays by their day-keyed id, captures and ledger lines by
# their time.
PARTITIONED_TABLES = ("sessions", "captures", "ledger_entries")


async def ensure_month_partition(conn: asyncpg.Connection, table: str, month: date) -> str | None:
    """Creates `table`'s partition of `month` if missing; its name, or None if there was
    nothing to create (or that month's rows are in the default partition already, see
    `rows_in_default`)."""
    created: str | None = await conn.fetchval("SELECT ensure_month_partition($1, $2)", table, month)
    return created


async def rows_in_default(conn: asyncpg.Connection) -> dict[str, int]:
    """Rows per table in the default partitions: times no month partition covered."""
    counts: dict[str, int] = {}
    for table in PARTITIONED_TABLES:
        counts[table] = await conn.fetchval(f"SELECT count(*) FROM {table}_default")
    return counts
