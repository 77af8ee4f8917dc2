"""Pay-later agreements: a driver signs one with a provider (with a per-session limit), may
change the limit and may cancel it. One active agreement per account; a cancelled one is kept
(charges already queued under it still refer to it)."""

from collections.abc import Iterable
from datetime import UTC, datetime

import asyncpg
import structlog

from billing.providers import (
    PaymentProvider,
    PlateService,
    ProviderRejected,
    ProviderUnavailable,
    ServiceState,
)

log = structlog.get_logger(__name__)


class AgreementError(ValueError):
    pass


class AgreementNoInUse(AgreementError):
    """Another account's active agreement has this number (on WeChat: the same openid)."""


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
        if exc.constraint_name == "pay_later_active_agreement_no":
            raise AgreementNoInUse("another account's agreement has this number") from exc
        raise AgreementError("the account already has an active agreement") from exc
    return agreement_id


async def displace_unverified(
    conn: asyncpg.Connection, provider: str, agreement_no: str, owner_account_id: int
) -> int | None:
    """Cancels another account's active agreement under this number, unverified (an openid
    the app named before the server took it from WeChat: migration 0049), for the account of
    the number's proven owner; the displaced account, or None."""
    account_id: int | None = await conn.fetchval(
        """UPDATE pay_later_agreements SET cancelled_at = now()
           WHERE provider = $1 AND agreement_no = $2 AND cancelled_at IS NULL
             AND NOT identity_verified AND account_id <> $3
           RETURNING account_id""",
        provider,
        agreement_no,
        owner_account_id,
    )
    return account_id


async def verify_own(conn: asyncpg.Connection, account_id: int, agreement_no: str) -> bool:
    """The account's active agreement is under this number, now proven its own: marked
    verified. False when its active agreement is under another number, or it has none."""
    verified = await conn.fetchval(
        """UPDATE pay_later_agreements SET identity_verified = true
           WHERE account_id = $1 AND agreement_no = $2 AND cancelled_at IS NULL
           RETURNING id""",
        account_id,
        agreement_no,
    )
    return verified is not None


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
    *,
    about_agreement: bool,
) -> bool:
    """What the provider said about a plate's pay-later service (a state-change notification,
    an entry's registration, a service query). A word as new or newer wins (the provider's
    times are to the second: `changed_at` is taken to the second too, and of two words in one
    second the later arrival wins); an older one (a notification retried late, out of order)
    changes nothing and returns False. A service that becomes normal again is so from that word's
    time (`normal_since`): a stay that came in before it is not paid later.

    Only a word `about_agreement` (a service query under the agreement's own user, WeChat's
    openid) makes a service that was not normal normal. An entry's registration and a
    state-change notification name the plate, not the user: on WeChat they are about whoever
    opened the plate's service, perhaps another user (the plate's previous holder), whom a
    deduction, naming only the plate, would then charge. They may only say it is not normal,
    or refresh a state our driver's own answer made normal; False otherwise (the caller asks
    the provider under the driver's user: `ask_if_resumed`). A refresh says nothing new: it
    moves `recorded_at` only, never `changed_at`, so that a word of a state that is not normal,
    dated between the state's own time and the refresh (a "paused" notification retried late),
    still wins when it arrives after the refresh. Had the refresh moved `changed_at`, that
    pause would be dropped as older, and if the plate-only word was about another user's
    service on the plate, our driver's pause lost until the next service query."""
    changed_at = changed_at.replace(microsecond=0)
    if state == "normal" and not about_agreement:
        refreshed = await conn.fetchval(
            """UPDATE plate_services SET recorded_at = now()
               WHERE provider = $1 AND plate = $2 AND plate_color = $3 AND state = 'normal'
                 AND changed_at <= $4
               RETURNING true""",
            provider,
            plate,
            color,
            changed_at,
        )
        return bool(refreshed)
    recorded = await conn.fetchval(
        """INSERT INTO plate_services (provider, plate, plate_color, state, changed_at)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (provider, plate, plate_color) DO UPDATE
               SET state = EXCLUDED.state, changed_at = EXCLUDED.changed_at, recorded_at = now(),
                   normal_since = CASE
                       WHEN EXCLUDED.state <> 'normal' THEN NULL
                       WHEN plate_services.state = 'normal' THEN plate_services.normal_since
                       ELSE EXCLUDED.changed_at END
               WHERE plate_services.changed_at <= EXCLUDED.changed_at
           RETURNING true""",
        provider,
        plate,
        color,
        state,
        changed_at,
    )
    return bool(recorded)


async def look_up_states(
    provider: PaymentProvider, vehicles: Iterable[tuple[str, str, str]]
) -> list[PlateService]:
    """The provider's word on each (agreement_no, plate, colour), for as many as it answered:
    a refused query skips its plate, an outage ends the look-up (what was not answered stays
    as it was and is asked again by the worker's sweep)."""
    answered = []
    for agreement_no, plate, color in vehicles:
        try:
            answered.append(
                await provider.service_state(agreement_no=agreement_no, plate=plate, color=color)
            )
        except ProviderUnavailable as exc:
            log.warning("billing.plate_state_unavailable", provider=provider.name, error=str(exc))
            break
        except ProviderRejected as exc:
            log.warning("billing.plate_state_refused", provider=provider.name, code=exc.code)
    return answered


async def record_looked_up(
    conn: asyncpg.Connection, provider: str, answered: Iterable[PlateService], at: datetime
) -> None:
    for service in answered:
        await record_service_state(
            conn, provider, service.plate, service.color, service.state, at, about_agreement=True
        )


# Bound vehicles of active agreements with a provider: (agreement_no, plate, color).
_BOUND_VEHICLES = """SELECT a.agreement_no, b.plate, b.color
    FROM pay_later_agreements a
    JOIN plate_bindings b ON b.account_id = a.account_id AND b.unbound_at IS NULL
    LEFT JOIN plate_services ps
           ON ps.provider = a.provider AND ps.plate = b.plate AND ps.plate_color = b.color
    WHERE a.provider = $1 AND a.cancelled_at IS NULL"""


async def stale_services(
    conn: asyncpg.Connection, provider: str, *, older_than: datetime, limit: int
) -> list[asyncpg.Record]:
    """Bound vehicles of active agreements with `provider` whose service state was never
    learned or last learned before `older_than`, the longest unchecked first: (agreement_no,
    plate, color)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""{_BOUND_VEHICLES}
              AND (ps.recorded_at IS NULL OR ps.recorded_at < $2)
            ORDER BY ps.recorded_at NULLS FIRST, b.id
            LIMIT $3""",
        provider,
        older_than,
        limit,
    )
    return rows


async def ask_if_resumed(
    pool: asyncpg.Pool, provider: PaymentProvider, plate: str, color: str
) -> None:
    """A word naming only the plate (an entry's registration, a notification) said its service
    is normal, which cannot make it so for our driver (`record_service_state`): the provider is
    asked under the bound agreement's own user, and that answer recorded. An outage leaves the
    state as it was, for the driver's app or the sweep to ask again."""
    async with pool.acquire() as conn:
        vehicles = await conn.fetch(
            f"{_BOUND_VEHICLES} AND b.plate = $2 AND b.color = $3", provider.name, plate, color
        )
    answered = await look_up_states(provider, [tuple(v) for v in vehicles])
    async with pool.acquire() as conn:
        await record_looked_up(conn, provider.name, answered, datetime.now(UTC))
