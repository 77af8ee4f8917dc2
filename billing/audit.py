"""The audit log: who did what to which record, written in the caller's transaction (so it is
there exactly when the change is). One writer for billing and the service's domains alike."""

from typing import Any

import asyncpg


async def record(
    conn: asyncpg.Connection, actor: str, action: str, subject: str, detail: dict[str, Any]
) -> None:
    await conn.execute(
        "INSERT INTO audit_log (actor, action, subject, detail) VALUES ($1, $2, $3, $4)",
        actor,
        action,
        subject,
        detail,
    )
