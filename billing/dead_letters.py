"""Provider answers we could not read, kept with the reason for a person (the dead_letters
table, which also holds bad gate messages and bad notifications)."""

import asyncpg

from billing.providers import ProviderMalformed


async def dead_letter(conn: asyncpg.Connection, provider: str, exc: ProviderMalformed) -> None:
    await conn.execute(
        """INSERT INTO dead_letters (source, topic, reason, detail, payload, payload_size)
           VALUES ('provider_answer', $1, 'malformed_answer', $2, $3, $4)""",
        provider,
        exc.reason[:1000],
        exc.payload[:65536],
        len(exc.payload),
    )
