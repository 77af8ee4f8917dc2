"""SQL of data retention."""

from datetime import datetime

import asyncpg

from billing.queue import delete_in_batches


async def erase_images_before(conn: asyncpg.Connection, before: datetime) -> int:
    """Erases capture frames older than `before`: those kept for operators (the exception
    queue) and every capture's first frame, the evidence of its stay (confirming a charge,
    receipts, disputes); the rows stay, so a receipt can say its frame has expired. An
    exception's copy goes with its capture's frame, however late the exception was filed (a
    charge rejected weeks after its exit copies the frame into a new one)."""
    erased: int = await conn.fetchval(
        """WITH erased AS (
               UPDATE lane_exceptions e SET image = NULL
               WHERE image IS NOT NULL
                 AND (created_at < $1
                      OR EXISTS (SELECT 1 FROM capture_frames f
                                 WHERE f.capture_id = e.capture_id AND f.created_at < $1))
               RETURNING 1),
           evidence AS (
               UPDATE capture_frames SET image = NULL, more_images = NULL
               WHERE image IS NOT NULL AND created_at < $1 RETURNING 1)
           SELECT (SELECT count(*) FROM erased) + (SELECT count(*) FROM evidence)""",
        before,
    )
    return erased


async def erase_dead_letter_payloads_before(conn: asyncpg.Connection, before: datetime) -> int:
    """Dead letters keep their reason, size and time; the payload (a bad capture carries a
    plate and frames) goes when capture images do."""
    erased: int = await conn.fetchval(
        """WITH erased AS (
               UPDATE dead_letters SET payload = NULL
               WHERE payload IS NOT NULL AND received_at < $1 RETURNING 1)
           SELECT count(*) FROM erased""",
        before,
    )
    return erased


async def delete_dead_letters_before(conn: asyncpg.Connection, before: datetime) -> int:
    """Bad gate messages (and forged notifications) recorded before `before`."""
    return await delete_in_batches(
        conn,
        """WITH gone AS (
               DELETE FROM dead_letters WHERE id IN (
                   SELECT id FROM dead_letters WHERE received_at < $1 LIMIT $2)
               RETURNING 1)
           SELECT count(*) FROM gone""",
        before,
    )


async def delete_refresh_tokens_before(conn: asyncpg.Connection, before: datetime) -> int:
    """Refresh tokens that expired, or were revoked, before `before`. Presenting one after it
    is gone fails as it did before (401). A rotated token is kept until it expires: presenting
    it again until then still revokes its whole sign-in."""
    return await delete_in_batches(
        conn,
        """WITH gone AS (
               DELETE FROM refresh_tokens WHERE id IN (
                   SELECT id FROM refresh_tokens WHERE expires_at < $1
                   UNION
                   SELECT id FROM refresh_tokens WHERE revoked_at < $1
                   LIMIT $2)
               RETURNING 1)
           SELECT count(*) FROM gone""",
        before,
    )
