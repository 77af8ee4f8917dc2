"""Monthly partitions ahead of time. The migration creates the current month and two ahead;
the worker role checks every hour (and `parking partitions` on demand) that the next
PARKING_PARTITION_MONTHS_AHEAD months exist, so a month's first write never lands in the
default partition. Old months are never dropped here: stays and ledger lines are books a
finance team keeps for years (docs/partitioning.md, "Old months")."""

from dataclasses import dataclass
from datetime import date

import asyncpg

from parking.logging import get_logger
from parking.partitions import repository as repo

log = get_logger(__name__)

# A stay's id is the UTC day it was recorded times this, plus a sequence number: its month
# partition follows from the id alone (migration 0012, next_session_id()).
SESSION_ID_DAY_FACTOR = 10_000_000_000
_EPOCH = date(2000, 1, 1)

# Creating a partition locks its parent briefly; queued behind a long read it would stop the
# lanes' writes too, so it gives up after this and is tried again at the next run.
_LOCK_TIMEOUT = "2s"
# One maintainer at a time (several worker replicas run this).
_ADVISORY_LOCK = 0x70617274  # "part"


def session_id_floor(day: date) -> int:
    """The first stay id of `day` (UTC), as next_session_id() makes them."""
    return (day - _EPOCH).days * SESSION_ID_DAY_FACTOR


def months_from(today: date, count: int) -> list[date]:
    """The first days of `count` months from `today`'s month on."""
    months = []
    year, month = today.year, today.month
    for _ in range(count):
        months.append(date(year, month, 1))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months


@dataclass(frozen=True, slots=True)
class Maintained:
    created: list[str]
    # Rows per table that no month partition covered (a gate clock far off, or months not
    # created in time): they are kept and counted, but sit outside the monthly layout.
    rows_in_default: dict[str, int]


async def ensure_partitions(pool: asyncpg.Pool, months_ahead: int, today: date) -> Maintained:
    """This month's and the next `months_ahead` months' partitions of every partitioned table."""
    created: list[str] = []
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _ADVISORY_LOCK):
            return Maintained(created, {})  # another replica is at it
        await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
        for month in months_from(today, months_ahead + 1):
            for table in repo.PARTITIONED_TABLES:
                name = await repo.ensure_month_partition(conn, table, month)
                if name is not None:
                    created.append(name)
        stranded = {t: n for t, n in (await repo.rows_in_default(conn)).items() if n}
    if created:
        log.info("partitions.created", partitions=created)
    if stranded:
        log.warning("partitions.rows_in_default", rows=stranded)
    return Maintained(created, stranded)
