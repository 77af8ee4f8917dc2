"""Messages nothing could use, kept with the reason for a person (the dead_letters table): bad
gate messages, provider notifications that failed verification, provider answers we could
not read. Whatever the source, a row keeps one bounded excerpt of the payload and its full
size."""

import asyncpg

from billing.providers import ProviderMalformed

# What a dead letter keeps of its payload for a person to look at: enough to see what it was,
# not so much that junk fills the database (its full size is kept as a number).
EXCERPT_BYTES = 4096
# And of the reason's detail.
DETAIL_CHARS = 1000


def excerpt(payload: bytes) -> bytes:
    """The part of a payload a dead letter keeps."""
    return payload[:EXCERPT_BYTES]


async def insert_dead_letter(
    conn: asyncpg.Connection,
    *,
    source: str,
    topic: str | None,
    reason: str,
    detail: str | None,
    payload: bytes,
) -> None:
    """Keeps a message nothing could use: the reason, its size and an excerpt of it, whatever
    the reason (a junk message of any kind stores a bounded amount)."""
    await conn.execute(
        """INSERT INTO dead_letters (source, topic, reason, detail, payload, payload_size)
           VALUES ($1, $2, $3, $4, $5, $6)""",
        source,
        topic,
        reason,
        detail[:DETAIL_CHARS] if detail is not None else None,
        excerpt(payload),
        len(payload),
    )


async def dead_letter(conn: asyncpg.Connection, provider: str, exc: ProviderMalformed) -> None:
    """A provider's answer we could not read."""
    await insert_dead_letter(
        conn,
        source="provider_answer",
        topic=provider,
        reason="malformed_answer",
        detail=exc.reason,
        payload=exc.payload,
    )
