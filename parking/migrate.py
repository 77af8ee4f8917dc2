"""Applies the numbered plain-SQL migrations in `migrations/`, each once, in order.

Applied versions are recorded in `schema_migrations` with a checksum; a changed file that was
already applied is an error, not a silent skip. An advisory lock serialises concurrent runs.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import asyncpg


def _migrations_dir() -> Path:
    """`migrations/` at the top of the source tree, or its copy inside an installed wheel."""
    here = Path(__file__).resolve().parent
    packaged = here / "_migrations"
    return packaged if packaged.is_dir() else here.parent / "migrations"


MIGRATIONS_DIR = _migrations_dir()
_LOCK_KEY = 0x7061726B  # "park"


@dataclass(frozen=True)
class Migration:
    version: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


class MigrationError(RuntimeError):
    pass


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    files = sorted(p for p in directory.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    return [Migration(p.name.split("_", 1)[0], p) for p in files]


async def migrate(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Applies pending migrations; returns the versions applied by this call."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        # Checked first: even IF NOT EXISTS needs CREATE on the schema, which the services' role
        # (parking_app) lacks; on an up-to-date database they only read what was applied.
        if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
            await conn.execute(
                """CREATE TABLE schema_migrations (
                       version text PRIMARY KEY,
                       name text NOT NULL,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
        applied = {
            r["version"]: r["checksum"]
            for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        done: list[str] = []
        for migration in discover(directory):
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.path.name} changed after it was applied"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.path.name,
                    migration.checksum,
                )
            done.append(migration.version)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


# Partitions are left out: their names carry the month the migrations ran in, and what they
# hold (columns, constraints, indexes, row triggers) is their parent's.
_SNAPSHOT_QUERIES = {
    "column": """
        SELECT c.table_name || '.' || c.column_name || ' ' || c.data_type
               || CASE WHEN c.is_nullable = 'NO' THEN ' NOT NULL' ELSE '' END
               || COALESCE(' DEFAULT ' || c.column_default, '')
        FROM information_schema.columns c
        JOIN information_schema.tables t USING (table_schema, table_name)
        JOIN pg_class cl ON cl.relname = c.table_name
             AND cl.relnamespace = 'public'::regnamespace
        WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE' AND NOT cl.relispartition
        ORDER BY c.table_name, c.ordinal_position""",
    "constraint": """
        SELECT cl.relname || ' ' || co.conname || ' ' || pg_get_constraintdef(co.oid)
        FROM pg_constraint co JOIN pg_class cl ON cl.oid = co.conrelid
        JOIN pg_namespace n ON n.oid = cl.relnamespace
        WHERE n.nspname = 'public' AND NOT cl.relispartition ORDER BY 1""",
    "index": """
        SELECT i.indexdef FROM pg_indexes i
        JOIN pg_class cl ON cl.relname = i.tablename AND cl.relnamespace = 'public'::regnamespace
        WHERE i.schemaname = 'public' AND NOT cl.relispartition ORDER BY 1""",
    "trigger": """
        SELECT cl.relname || ' ' || pg_get_triggerdef(tg.oid)
        FROM pg_trigger tg JOIN pg_class cl ON cl.oid = tg.tgrelid
        JOIN pg_namespace n ON n.oid = cl.relnamespace
        WHERE n.nspname = 'public' AND NOT tg.tgisinternal AND NOT cl.relispartition
        ORDER BY 1""",
}


async def schema_snapshot(conn: asyncpg.Connection) -> str:
    """A stable text description of the public schema, for the snapshot file and its test."""
    lines: list[str] = []
    for kind, query in _SNAPSHOT_QUERIES.items():
        for row in await conn.fetch(query):
            lines.append(f"{kind} {row[0]}")
    return "\n".join(lines) + "\n"
