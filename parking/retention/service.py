"""Data retention: plate images are personal data and are kept only as long as an operator may
need them (PARKING_IMAGE_RETENTION_DAYS). Runs hourly inside the service and on demand with
`parking retention`."""

from datetime import datetime, timedelta

import asyncpg

from parking.logging import get_logger
from parking.retention import repository as repo

log = get_logger(__name__)


async def expire_images(pool: asyncpg.Pool, retention_days: int, now: datetime) -> int:
    async with pool.acquire() as conn:
        erased = await repo.erase_images_before(conn, now - timedelta(days=retention_days))
    if erased:
        log.info("retention.images_erased", count=erased, retention_days=retention_days)
    return erased
