"""asyncpg pool with JSON codecs; the caller of a unit of work owns its transaction."""

import asyncpg
import orjson


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


class _NoResetConnection(asyncpg.Connection):
    """Skips the reset query asyncpg runs each time a connection returns to the pool: one
    round trip per request, and these connections keep no session state (no LISTEN, no
    session settings, no advisory locks)."""

    def get_reset_query(self) -> str:
        return ""


async def create_pool(
    dsn: str,
    min_size: int = 2,
    max_size: int = 10,
    *,
    stateless: bool = False,
    durable: bool = True,
) -> asyncpg.Pool:
    """`durable=False`: commits return before the WAL reaches the disk (synchronous_commit off):
    a crash may lose the last moments' commits, never corrupt anything. Only for work that is
    done again after such a loss, and never for money."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        command_timeout=30,
        connection_class=_NoResetConnection if stateless else asyncpg.Connection,
        server_settings={} if durable else {"synchronous_commit": "off"},
    )
    return pool
