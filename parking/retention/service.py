"""Data retention: plate images are personal data and are kept only as long as an operator may
need them (PARKING_IMAGE_RETENTION_DAYS); done jobs, dead letters, sent notifications, finished
feed deliveries and old refresh tokens are pruned after theirs (`prune`). Both run hourly
inside the service and on demand with `parking retention` and `parking prune`.

Money is never pruned: charges, payments, refunds, debts and the ledger (append-only) stay, and
so do dead charge and refund jobs, which wait for an operator."""

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from billing import notifications
from billing import queue as job_queue
from billing.worker import PRUNABLE_DEAD_KINDS
from parking.feeds import repository as feeds
from parking.logging import get_logger
from parking.retention import repository as repo
from parking.settings import Settings

log = get_logger(__name__)


async def expire_images(pool: asyncpg.Pool, retention_days: int, now: datetime) -> int:
    """Erases capture frames, and the payloads of dead letters (bad captures carry plates and
    frames too), older than the image retention; returns how many frames."""
    before = now - timedelta(days=retention_days)
    async with pool.acquire() as conn:
        erased = await repo.erase_images_before(conn, before)
        payloads = await repo.erase_dead_letter_payloads_before(conn, before)
    if erased or payloads:
        log.info(
            "retention.images_erased",
            count=erased,
            dead_letter_payloads=payloads,
            retention_days=retention_days,
        )
    return erased


@dataclass(frozen=True, slots=True)
class Retention:
    done_jobs: timedelta
    dead_letters: timedelta
    sent_notifications: timedelta
    refresh_token_grace: timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> "Retention":
        return cls(
            done_jobs=timedelta(days=settings.done_job_retention_days),
            dead_letters=timedelta(days=settings.dead_letter_retention_days),
            sent_notifications=timedelta(days=settings.sent_notification_retention_days),
            refresh_token_grace=timedelta(days=settings.refresh_token_grace_days),
        )


async def prune(pool: asyncpg.Pool, retention: Retention, now: datetime) -> dict[str, int]:
    """Deletes what has outlived its retention, in batches; returns how many rows of each."""
    async with pool.acquire() as conn:
        counts = await job_queue.prune(
            conn,
            done_before=now - retention.done_jobs,
            dead_before=now - retention.dead_letters,
            prunable_dead_kinds=PRUNABLE_DEAD_KINDS,
        )
        counts["dead_letters"] = await repo.delete_dead_letters_before(
            conn, now - retention.dead_letters
        )
        counts["sent_notifications"] = await notifications.prune_sent(
            conn, now - retention.sent_notifications
        )
        counts["refresh_tokens"] = await repo.delete_refresh_tokens_before(
            conn, now - retention.refresh_token_grace
        )
        counts["feed_deliveries"] = await feeds.prune(
            conn, done_before=now - retention.done_jobs, dead_before=now - retention.dead_letters
        )
    if any(counts.values()):
        log.info("retention.pruned", **counts)
    return counts
