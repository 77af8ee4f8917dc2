"""Signing in: drivers by phone and one-time code, operator staff by password; refresh tokens
that rotate and betray their reuse.

A failed attempt must be remembered even though the request fails, so these functions commit
their own transaction and raise only after it.
"""

import asyncio
import hmac
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from parking.auth import repository as repo
from parking.auth.principal import Principal
from parking.auth.schemas import CodeSent, TokenPair
from parking.auth.sms import SmsSender
from parking.auth.tokens import (
    Role,
    TokenSigner,
    digest,
    hash_password,
    new_code,
    new_secret,
    verify_password,
)
from parking.errors import AppError
from parking.ratelimit import Backoff, Budget, RateLimited, forgive, hit, take, uncount
from parking.runtime import Runtime
from parking.settings import Settings


class SignInFailed(AppError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(401, code, message)


def _code_hash(phone: str, code: str) -> str:
    return digest(f"{phone}:{code}")


def normalise_phone(phone: str) -> str:
    return phone.removeprefix("+86")


async def _issue(
    conn: asyncpg.Connection,
    runtime: Runtime,
    signer: TokenSigner,
    subject: str,
    role: Role,
    operator_id: int | None,
    family: uuid.UUID | None = None,
) -> TokenPair:
    refresh = new_secret("rt_")
    family = family or uuid.uuid4()
    await repo.insert_refresh(
        conn,
        digest(refresh),
        subject,
        family,
        datetime.now(UTC) + timedelta(days=runtime.settings.refresh_token_ttl_days),
    )
    return TokenPair(
        # The access token names its sign-in: staff tokens die with it (principal.py).
        access_token=signer.issue(subject, role, operator_id, session=str(family)),
        expires_in=signer.access_ttl_s,
        refresh_token=refresh,
    )


def _code_backoffs(runtime: Runtime, phone: str, client: str) -> list[Backoff]:
    """Codes texted to one phone slow down but never stop for long. Per phone from one address
    (one asking over and over waits longer and longer, up to PARKING_LOGIN_CODE_BACKOFF_MAX_S),
    and per phone from all addresses (a botnet texting it: capped at
    PARKING_LOGIN_CODE_PHONE_BACKOFF_MAX_S, so its owner, asking from an address of their own,
    gets a code within that)."""
    settings = runtime.settings
    prefix = f"{settings.redis_key_prefix}backoff:sign-in-code"
    free, base = settings.login_codes_free, settings.login_code_backoff_s
    return [
        Backoff(
            f"{prefix}:phone-client:{digest(phone)}:{client}",
            free,
            base,
            settings.login_code_backoff_max_s,
        ),
        Backoff(
            f"{prefix}:phone:{digest(phone)}",
            free,
            min(base, settings.login_code_phone_backoff_max_s),
            settings.login_code_phone_backoff_max_s,
        ),
    ]


def _guess_backoff(runtime: Runtime, phone: str) -> Backoff:
    """Wrong guesses at any of the phone's codes, from anywhere (settings'
    login_code_guesses_free): what bounds a botnet's guesses a day, which a code's own
    attempts cannot once codes are asked for one after another."""
    settings = runtime.settings
    return Backoff(
        f"{settings.redis_key_prefix}backoff:sign-in-guess:{digest(phone)}",
        settings.login_code_guesses_free,
        settings.login_code_backoff_s,
        settings.login_code_guess_backoff_max_s,
    )


_GUESS_MEMORY_S = 86400


async def request_code(
    runtime: Runtime, sms: SmsSender, signer: TokenSigner, phone: str, client: str
) -> CodeSent:
    """Texts a code to the phone; the answer's challenge goes with it to `sign_in_with_code`.
    Nobody else learns the challenge, so nobody else's guesses use up this code's tries."""
    settings = runtime.settings
    phone = normalise_phone(phone)
    prefix = f"{settings.redis_key_prefix}ratelimit:sign-in-code"
    await take(runtime.redis, _code_backoffs(runtime, phone, client))
    await hit(
        runtime.redis,
        f"{prefix}:client:{client}",
        settings.login_codes_per_hour_per_client,
        3600,
    )
    code = new_code()
    async with runtime.pool.acquire() as conn:
        code_id = await repo.insert_code(
            conn,
            phone,
            _code_hash(phone, code),
            datetime.now(UTC) + timedelta(seconds=settings.login_code_ttl_s),
        )
    await sms.send_code(phone, code)
    return CodeSent(
        expires_in=settings.login_code_ttl_s, challenge_id=signer.code_challenge(code_id, phone)
    )


async def sign_in_with_code(
    runtime: Runtime,
    signer: TokenSigner,
    phone: str,
    code: str,
    challenge: str,
    client: str,
) -> TokenPair:
    """A driver's sign-in with the code texted for `challenge`. Its wrong guesses count against
    that code alone (PARKING_LOGIN_CODE_MAX_ATTEMPTS); a challenge we did not give for this
    phone is a wrong code that counts nothing."""
    phone = normalise_phone(phone)
    code_id = signer.challenged_code(challenge, phone)
    if code_id is None:
        raise SignInFailed("invalid_code", "wrong code")
    failure: SignInFailed | None = None
    pair: TokenPair | None = None
    async with runtime.pool.acquire() as conn, conn.transaction():
        found = await repo.unused_code(conn, code_id, phone)
        if found is None:
            failure = SignInFailed("invalid_code", "the code was used; ask for a new one")
        elif found.expires_at < datetime.now(UTC):
            failure = SignInFailed("code_expired", "the code expired; ask for a new one")
        elif found.attempts >= runtime.settings.login_code_max_attempts:
            failure = SignInFailed("too_many_attempts", "too many wrong codes; ask for a new one")
        else:
            # Counted before the check, so a burst of concurrent guesses gets only the free ones
            # compared; refused, it changes nothing (a right code takes its count back below).
            await take(runtime.redis, [_guess_backoff(runtime, phone)], _GUESS_MEMORY_S)
            right = hmac.compare_digest(found.code_hash, _code_hash(phone, code))
            await repo.count_attempt(conn, found.id, consumed=right)
            if not right:
                failure = SignInFailed("invalid_code", "wrong code")
            else:
                account_id = await repo.account_for_phone(conn, phone)
                pair = await _issue(conn, runtime, signer, f"account:{account_id}", "driver", None)
    if failure is not None:
        raise failure
    assert pair is not None
    # Signed in: the phone's code requests and guesses so far were the driver's own.
    await forgive(
        runtime.redis, [*_code_backoffs(runtime, phone, client), _guess_backoff(runtime, phone)]
    )
    return pair


def _password_backoffs(runtime: Runtime, email: str, client: str) -> list[Backoff]:
    """Per e-mail from one address (a guesser waits longer and longer), per e-mail from all
    addresses (a botnet: capped low, so the owner gets in after a short wait), per address
    over all e-mails (spraying one password over many)."""
    settings = runtime.settings
    prefix = f"{settings.redis_key_prefix}backoff:password"
    free = settings.password_free_failures
    longest = settings.password_backoff_max_s
    return [
        Backoff(f"{prefix}:email-client:{digest(email)}:{client}", free, 1.0, longest),
        Backoff(
            f"{prefix}:email:{digest(email)}", 4 * free, 1.0, settings.password_email_backoff_max_s
        ),
        Backoff(f"{prefix}:client:{client}", 6 * free, 1.0, longest),
    ]


@dataclass(slots=True)
class PasswordChecks:
    """scrypt costs tens of milliseconds of CPU and 16 MiB a check: one at a time per API
    process, and at most PARKING_PASSWORD_CHECKS_PER_SECOND of them, so that a flood of
    password guesses (each from a fresh address at a fresh e-mail, all within their free tries)
    takes a bounded share of one core from the lanes and the rest of the API. A guess beyond
    the budget is refused before anything is counted or hashed. Sign-ins from a known device
    (`known`) have a budget of their own: strangers' guesses cannot use up the owners' share.
    One per app (`create_app`)."""

    budget: Budget
    known: Budget
    one_at_a_time: asyncio.Semaphore = field(default_factory=asyncio.Semaphore)

    @classmethod
    def from_settings(cls, settings: Settings) -> "PasswordChecks":
        rate = settings.password_checks_per_second
        return cls(Budget(rate), Budget(rate))


async def _counted_check(
    runtime: Runtime, checks: PasswordChecks, scopes: list[Backoff], *, known: bool = False
) -> None:
    """One password check out of the budget (the known devices' when `known`), and the try
    counted in its backoff `scopes`; or RateLimited, with neither taken."""
    budget = checks.known if known else checks.budget
    budget.take()
    try:
        await take(runtime.redis, scopes)
    except RateLimited:
        budget.give_back()
        raise


async def _verify(checks: PasswordChecks, password: str, stored: str) -> bool:
    async with checks.one_at_a_time:
        # Off the event loop, which the lanes share.
        return await asyncio.to_thread(verify_password, password, stored)


# Checked when the e-mail is unknown, so that both answers take as long (no e-mail probing).
_NO_SUCH_USER = hash_password(new_secret())


async def sign_in_with_password(
    runtime: Runtime,
    signer: TokenSigner,
    checks: PasswordChecks,
    email: str,
    password: str,
    client: str,
    device_token: str | None = None,
) -> TokenPair:
    """A staff sign-in. Guesses back off per e-mail and address, per address and per e-mail
    over all addresses (a botnet). A browser that signed in with this e-mail before presents
    the device token it was given then: the e-mail-wide wait, which strangers drive, does not
    apply to it (its own failures back off per device instead), and its check comes out of the
    known devices' budget. So guessing slows the guessers and never locks the owner out."""
    email = email.lower()
    per_email_client, per_email, per_client = _password_backoffs(runtime, email, client)
    device = signer.known_device(device_token, email)
    if device is None:
        scopes = [per_email_client, per_email, per_client]
    else:
        settings = runtime.settings
        per_device = Backoff(
            f"{settings.redis_key_prefix}backoff:password:device:{digest(device)}",
            settings.password_free_failures,
            1.0,
            settings.password_backoff_max_s,
        )
        scopes = [per_device, per_client]
    # Every try is counted before the password is checked (atomically: a burst of concurrent
    # guesses gets only the free tries checked); a right password takes its count back.
    await _counted_check(runtime, checks, scopes, known=device is not None)
    async with runtime.pool.acquire() as conn:
        user = await repo.operator_user_by_email(conn, email)
    right = await _verify(checks, password, user.password_hash if user else _NO_SUCH_USER)
    if user is None or not right:
        raise SignInFailed("invalid_credentials", "wrong e-mail or password")
    async with runtime.pool.acquire() as conn, conn.transaction():
        pair = await _issue(
            conn, runtime, signer, f"operator_user:{user.id}", user.role, user.operator_id
        )
    await forgive(runtime.redis, [s for s in scopes if s is not per_client])
    await uncount(runtime.redis, per_client)
    return pair.model_copy(update={"device_token": signer.device_token(email)})


async def change_password(
    runtime: Runtime, checks: PasswordChecks, principal: Principal, current: str, new: str
) -> None:
    """A staff member's new password, given the current one. Every other sign-in of theirs
    ends (its refresh tokens revoked, its access tokens refused at once: they name their
    sign-in); the one asking goes on. Wrong current passwords back off like sign-ins."""
    assert principal.operator_user_id is not None
    settings = runtime.settings
    backoff = Backoff(
        f"{settings.redis_key_prefix}backoff:password-change:{principal.operator_user_id}",
        settings.password_free_failures,
        1.0,
        settings.password_backoff_max_s,
    )
    await _counted_check(runtime, checks, [backoff])
    async with runtime.pool.acquire() as conn:
        user = await repo.operator_user_by_id(conn, principal.operator_user_id)
    if user is None:
        raise SignInFailed("invalid_credentials", "the user is disabled")
    if not await _verify(checks, current, user.password_hash):
        raise AppError(403, "wrong_password", "the current password is not right")
    new_hash = await asyncio.to_thread(hash_password, new)
    async with runtime.pool.acquire() as conn, conn.transaction():
        await repo.set_password(conn, user.id, new_hash)
        await repo.revoke_subject_except(conn, f"operator_user:{user.id}", principal.session)
    await forgive(runtime.redis, [backoff])


async def refresh(runtime: Runtime, signer: TokenSigner, token: str) -> TokenPair:
    failure: SignInFailed | None = None
    pair: TokenPair | None = None
    async with runtime.pool.acquire() as conn, conn.transaction():
        found = await repo.refresh_token(conn, digest(token))
        if found is None or found.revoked_at is not None:
            failure = SignInFailed("invalid_refresh_token", "unknown or revoked refresh token")
        elif found.rotated_at is not None:
            # Used twice: someone else has a copy. End the whole sign-in.
            await repo.revoke_family(conn, found.family)
            failure = SignInFailed("refresh_token_reused", "sign in again")
        elif found.expires_at < datetime.now(UTC):
            failure = SignInFailed("invalid_refresh_token", "the refresh token expired")
        else:
            await repo.mark_rotated(conn, found.id)
            pair = await _reissue(conn, runtime, signer, found)
            if pair is None:
                failure = SignInFailed("invalid_refresh_token", "the account is gone")
    if failure is not None:
        raise failure
    assert pair is not None
    return pair


async def _reissue(
    conn: asyncpg.Connection, runtime: Runtime, signer: TokenSigner, found: repo.RefreshToken
) -> TokenPair | None:
    kind, _, raw_id = found.subject.partition(":")
    if kind == "account" and await repo.account_active(conn, int(raw_id)):
        return await _issue(conn, runtime, signer, found.subject, "driver", None, found.family)
    if kind == "operator_user":
        user = await repo.operator_user_by_id(conn, int(raw_id))
        if user is not None:
            return await _issue(
                conn, runtime, signer, found.subject, user.role, user.operator_id, found.family
            )
    return None


async def sign_out(runtime: Runtime, token: str) -> None:
    async with runtime.pool.acquire() as conn, conn.transaction():
        found = await repo.refresh_token(conn, digest(token))
        if found is not None:
            await repo.revoke_family(conn, found.family)
