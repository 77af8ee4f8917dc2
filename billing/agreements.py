"""Pay-later agreements: a driver signs one with a provider (with a per-session limit), may
change the limit and may cancel it. One active agreement per account; a cancelled one is kept
(charges already queued under it still refer to it)."""

from datetime import datetime

import asyncpg

from billing.providers import ServiceState


class AgreementError(ValueError):
    pass


async def sign(
    conn: asyncpg.Connection,
    account_id: int,
    *,
    provider: str,
    agreement_no: str,
    per_session_limit_fen: int,
    signed_at: datetime | None = None,
) -> int:
    """An agreement signed now, or at `signed_at` (imported with its history: an agreement pays
    only for stays that began after it)."""
    if per_session_limit_fen <= 0:
        raise AgreementError("the per-session limit must be positive")
    try:
        agreement_id: int = await conn.fetchval(
            """INSERT INTO pay_later_agreements
                   (account_id, provider, agreement_no, per_session_limit_fen, signed_at)
               VALUES ($1, $2, $3, $4, COALESCE($5, now())) RETURNING id""",
            account_id,
            provider,
            agreement_no,
            per_session_limit_fen,
            signed_at,
        )
    except asyncpg.UniqueViolationError as exc:
        raise AgreementError("the account already has an active agreement") from exc
    return agreement_id


async def set_limit(conn: asyncpg.Connection, account_id: int, per_session_limit_fen: int) -> None:
    if per_session_limit_fen <= 0:
        raise AgreementError("the per-session limit must be positive")
    updated = await conn.fetchval(
        """UPDATE pay_later_agreements SET per_session_limit_fen = $2
           WHERE account_id = $1 AND cancelled_at IS NULL RETURNING id""",
        account_id,
        per_session_limit_fen,
    )
    if updated is None:
        raise AgreementError("no active agreement")


async def cancel(conn: asyncpg.Connection, account_id: int) -> bool:
    """From now on the account's exits hold (no agreement); False when none was active."""
    cancelled = await conn.fetchval(
        """UPDATE pay_later_agreements SET cancelled_at = now()
           WHERE account_id = $1 AND cancelled_at IS NULL RETURNING id""",
        account_id,
    )
    return cancelled is not None


async def record_service_state(
    conn: asyncpg.Connection,
    provider: str,
    plate: str,
    color: str,
    state: ServiceState,
    changed_at: datetime,
) -> bool:
    """What the provider said about a plate's pay-later service (a state-change notification,
    an entry's registration, a service query). A word as new or newer wins (the provider's
    times are to the second: `changed_at` is taken to the second too, and of two words in one
    second the later arrival wins); an older one (a notification retried late, out of order)
    changes nothing and returns False."""
    changed_at = changed_at.replace(microsecond=0)
    recorded = await conn.fetchval(
        """INSERT INTO plate_services (provider, plate, plate_color, state, changed_at)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (provider, plate, plate_color) DO UPDATE
               SET state = EXCLUDED.state, changed_at = EXCLUDED.changed_at, recorded_at = now()
               WHERE plate_services.changed_at <= EXCLUDED.changed_at
           RETURNING true""",
        provider,
        plate,
        color,
        state,
        changed_at,
    )
    return bool(recorded)
