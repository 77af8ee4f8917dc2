"""SQL of data retention."""

from datetime import datetime

import asyncpg


async def erase_images_before(conn: asyncpg.Connection, before: datetime) -> int:
    """Erases capture frames kept for operators (the exception queue) older than `before`."""
    erased: int = await conn.fetchval(
        """WITH erased AS (
               UPDATE lane_exceptions SET image = NULL
               WHERE image IS NOT NULL AND created_at < $1 RETURNING 1)
           SELECT count(*) FROM erased""",
        before,
    )
    return erased
