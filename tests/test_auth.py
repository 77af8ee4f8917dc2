"""Signing in: drivers by phone and one-time code, staff by password, refresh tokens that rotate
and betray reuse; tokens that are expired, signed with another key or unsigned are refused."""

import base64
import time
import uuid

import httpx
import jwt
import orjson
import pytest
from fastapi import FastAPI

from parking.app import create_app
from parking.auth import repository as auth_repo
from parking.auth.service import PasswordChecks
from parking.auth.tokens import (
    AUDIENCE,
    DEVICE_AUDIENCE,
    DEVICE_TTL_S,
    ISSUER,
    InvalidToken,
    TokenSigner,
    digest,
    new_secret,
)
from parking.ratelimit import Budget
from parking.runtime import Runtime
from parking.settings import Settings
from tests.conftest import Lot, bearer, make_staff


def _phone() -> str:
    return f"139{uuid.uuid4().int % 10**8:08d}"


async def _sign_in(api: httpx.AsyncClient, app: FastAPI, phone: str) -> dict[str, str]:
    sent = await api.post("/api/v1/auth/sign-in-codes", json={"phone": phone})
    assert sent.status_code == 202, sent.text
    code = app.state.sms.last_code(phone)
    answer = await api.post("/api/v1/auth/token", json=_code_grant(phone, code, _challenge(sent)))
    assert answer.status_code == 200, answer.text
    pair: dict[str, str] = answer.json()
    return pair


async def test_driver_signs_in_with_a_code_and_the_account_is_created_once(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime
) -> None:
    phone = _phone()
    first = await _sign_in(api, app, phone)
    second = await _sign_in(api, app, phone)
    claims = [app.state.signer.decode(pair["access_token"]) for pair in (first, second)]
    assert claims[0].subject == claims[1].subject and claims[0].role == "driver"
    async with runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM accounts WHERE phone = $1", phone) == 1
        stored = await conn.fetchval(
            "SELECT count(*) FROM login_codes WHERE phone = $1 AND code_hash LIKE '%' || $2",
            phone,
            app.state.sms.last_code(phone),
        )
    assert stored == 0, "codes are stored hashed"


async def test_wrong_codes_are_counted_and_end_the_code(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime
) -> None:
    phone = _phone()
    sent = await api.post("/api/v1/auth/sign-in-codes", json={"phone": phone})
    right = app.state.sms.last_code(phone)
    wrong = f"{(int(right) + 1) % 10**6:06d}"
    answers = [
        await api.post("/api/v1/auth/token", json=_code_grant(phone, wrong, _challenge(sent)))
        for _ in range(runtime.settings.login_code_max_attempts)
    ]
    assert {a.json()["error"]["code"] for a in answers} == {"invalid_code"}
    late = await api.post("/api/v1/auth/token", json=_code_grant(phone, right, _challenge(sent)))
    assert late.status_code == 401 and late.json()["error"]["code"] == "too_many_attempts"


def _challenge(sent: httpx.Response) -> str | None:
    challenge: str | None = sent.json().get("challenge_id")
    return challenge


def _code_grant(phone: str, code: str | None, challenge: str | None) -> dict[str, str | None]:
    return {"grant_type": "sign_in_code", "phone": phone, "code": code, "challenge_id": challenge}


async def _attempts(runtime: Runtime, phone: str) -> list[tuple[int, bool]]:
    """(attempts, consumed) of every code texted to `phone`, oldest first."""
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT attempts, consumed_at IS NOT NULL AS consumed FROM login_codes
               WHERE phone = $1 ORDER BY id""",
            phone,
        )
    return [(row["attempts"], row["consumed"]) for row in rows]


async def test_an_attacker_guessing_codes_for_a_phone_cannot_burn_its_owners_code(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime
) -> None:
    """Issue #17: a code's wrong guesses count against the challenge it was asked for only.
    An attacker who asks for a code of their own and guesses it out, and guesses with no or a
    forged challenge, leaves the owner's code and challenge as they were."""
    phone = _phone()
    owner = await api.post("/api/v1/auth/sign-in-codes", json={"phone": phone})
    assert owner.status_code == 202, owner.text
    owners_code = app.state.sms.last_code(phone)
    wrong = f"{(int(owners_code) + 1) % 10**6:06d}"
    mallory = await api.post("/api/v1/auth/sign-in-codes", json={"phone": phone})
    assert mallory.status_code == 202, mallory.text
    tries = runtime.settings.login_code_max_attempts
    forged = "ch_1." + "A" * 22
    for challenge in [_challenge(mallory)] * (tries + 1) + [forged] * tries + [None] * tries:
        guess = await api.post("/api/v1/auth/token", json=_code_grant(phone, wrong, challenge))
        assert guess.status_code in (401, 422), guess.text
    signed_in = await api.post(
        "/api/v1/auth/token", json=_code_grant(phone, owners_code, _challenge(owner))
    )
    assert signed_in.status_code == 200, signed_in.text
    assert app.state.signer.decode(signed_in.json()["access_token"]).role == "driver"


async def test_wrong_guesses_over_all_of_a_phones_codes_slow_down_until_its_owner_signs_in(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime
) -> None:
    """A code allows a few wrong guesses, but codes can be asked for one after another: a
    phone's wrong guesses over all its codes (PARKING_LOGIN_CODE_GUESSES_FREE) are followed by
    waits that double up to PARKING_LOGIN_CODE_GUESS_BACKOFF_MAX_S, a refused guess counting
    nothing; the owner's right code gets in once the wait is over, and forgets them."""
    settings = runtime.settings
    phone = _phone()
    guesses: list[httpx.Response] = []
    while len(guesses) < settings.login_code_guesses_free:
        await _waits_pass(runtime)  # the phone's code requests are not what is measured
        sent = await api.post("/api/v1/auth/sign-in-codes", json={"phone": phone})
        assert sent.status_code == 202, sent.text
        wrong = f"{(int(app.state.sms.last_code(phone)) + 1) % 10**6:06d}"
        for _ in range(settings.login_code_max_attempts - 1):
            if len(guesses) < settings.login_code_guesses_free:
                grant = _code_grant(phone, wrong, _challenge(sent))
                guesses.append(await api.post("/api/v1/auth/token", json=grant))
    assert {g.json()["error"]["code"] for g in guesses} == {"invalid_code"}
    counted = await _attempts(runtime, phone)
    owners_code = app.state.sms.last_code(phone)
    refused = await api.post(
        "/api/v1/auth/token", json=_code_grant(phone, owners_code, _challenge(sent))
    )
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) <= settings.login_code_guess_backoff_max_s
    assert await _attempts(runtime, phone) == counted, "a refused guess counts nothing"
    await _waits_pass(runtime)
    signed_in = await api.post(
        "/api/v1/auth/token", json=_code_grant(phone, owners_code, _challenge(sent))
    )
    assert signed_in.status_code == 200, signed_in.text
    sent = await api.post("/api/v1/auth/sign-in-codes", json={"phone": phone})
    wrong = f"{(int(app.state.sms.last_code(phone)) + 1) % 10**6:06d}"
    after = await api.post("/api/v1/auth/token", json=_code_grant(phone, wrong, _challenge(sent)))
    assert after.status_code == 401 and after.json()["error"]["code"] == "invalid_code"


async def test_a_code_with_a_wrong_challenge_is_refused_and_changes_nothing(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime
) -> None:
    """The right code with another request's challenge, or with a challenge we never gave, is a
    wrong code (401 `invalid_code`); a challenge we never gave counts nothing anywhere, and a
    missing or garbled one is a bad request in the one error shape."""
    phone = _phone()
    first = await api.post("/api/v1/auth/sign-in-codes", json={"phone": phone})
    first_code = app.state.sms.last_code(phone)
    second = await api.post("/api/v1/auth/sign-in-codes", json={"phone": phone})
    second_code = app.state.sms.last_code(phone)
    assert first_code is not None and second_code is not None
    first_id, _, first_mac = (_challenge(first) or "ch_0.x").removeprefix("ch_").partition(".")
    second_id, _, second_mac = (_challenge(second) or "ch_0.x").removeprefix("ch_").partition(".")
    never_given = [
        f"ch_{first_id}.{second_mac}",  # one code's number with another's seal
        f"ch_{second_id}.{first_mac}",
        f"ch_{first_id}.{'A' * len(first_mac)}",
        f"ch_{int(first_id) + 1000}.{first_mac}",
    ]
    for challenge in never_given:
        for code in (first_code, second_code):
            refused = await api.post("/api/v1/auth/token", json=_code_grant(phone, code, challenge))
            assert refused.status_code == 401, (challenge, refused.text)
            assert refused.json()["error"]["code"] == "invalid_code"
    assert await _attempts(runtime, phone) == [(0, False), (0, False)]
    assert _challenge(first) != _challenge(second)
    # Another phone's challenge: nothing either.
    other = _phone()
    elsewhere = await api.post("/api/v1/auth/sign-in-codes", json={"phone": other})
    crossed = await api.post(
        "/api/v1/auth/token", json=_code_grant(phone, first_code, _challenge(elsewhere))
    )
    assert crossed.status_code == 401 and crossed.json()["error"]["code"] == "invalid_code"
    assert await _attempts(runtime, phone) == [(0, False), (0, False)]
    assert await _attempts(runtime, other) == [(0, False)]

    for grant in (
        {"grant_type": "sign_in_code", "phone": phone, "code": first_code},
        _code_grant(phone, first_code, None),
        _code_grant(phone, first_code, ""),
        _code_grant(phone, first_code, "ch_"),
        _code_grant(phone, first_code, "ch_1.💥"),
        _code_grant(phone, first_code, "ch_" + "1" * 5000),
        _code_grant(phone, first_code, f"{_challenge(first)}\n"),
    ):
        bad = await api.post("/api/v1/auth/token", json=grant)
        assert bad.status_code == 422, (grant, bad.text)
        assert set(bad.json()) == {"error"}
        assert bad.json()["error"]["code"] == "invalid_request"
    assert await _attempts(runtime, phone) == [(0, False), (0, False)]

    # The first code with the second's challenge is a wrong guess at the second code.
    crossed = await api.post(
        "/api/v1/auth/token", json=_code_grant(phone, first_code, _challenge(second))
    )
    assert crossed.status_code == 401 and crossed.json()["error"]["code"] == "invalid_code"
    assert await _attempts(runtime, phone) == [(0, False), (1, False)]
    for code, sent in ((first_code, first), (second_code, second)):
        right = await api.post(
            "/api/v1/auth/token", json=_code_grant(phone, code, _challenge(sent))
        )
        assert right.status_code == 200, right.text
    assert await _attempts(runtime, phone) == [(1, True), (2, True)]
    again = await api.post(
        "/api/v1/auth/token", json=_code_grant(phone, first_code, _challenge(first))
    )
    assert again.status_code == 401 and again.json()["error"]["code"] == "invalid_code"


async def test_a_botnet_texting_a_phone_makes_its_owner_wait_no_longer_than_the_phone_cap(
    runtime: Runtime,
) -> None:
    """Issue #17: requests for one phone from many addresses wait at most five minutes
    phone-wide (PARKING_LOGIN_CODE_PHONE_BACKOFF_MAX_S), so the owner, asking from an address of
    their own, waits no longer (one address asking over and over still waits up to 15 min:
    test_code_requests_for_a_phone_wait_longer_and_longer_but_never_past_the_cap)."""
    runtime.settings.trusted_proxies = ["127.0.0.0/8"]
    app = create_app(runtime)
    transport = httpx.ASGITransport(app=app)
    phone = _phone()
    async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as http:

        async def ask(client: str) -> httpx.Response:
            return await http.post(
                "/api/v1/auth/sign-in-codes",
                json={"phone": phone},
                headers={"X-Forwarded-For": client},
            )

        for n in range(12):
            await _waits_pass(runtime)  # each asks when the phone's last wait is over
            answer = await ask(f"203.0.113.{n}")
            assert answer.status_code == 202, answer.text
        owner = await ask("192.0.2.7")
        if owner.status_code == 429:
            settings = runtime.settings
            assert int(owner.headers["Retry-After"]) <= settings.login_code_phone_backoff_max_s
            assert settings.login_code_phone_backoff_max_s < settings.login_code_backoff_max_s
            await _waits_pass(runtime)
            owner = await ask("192.0.2.7")
        assert owner.status_code == 202, owner.text
        signed_in = await http.post(
            "/api/v1/auth/token",
            json=_code_grant(phone, app.state.sms.last_code(phone), _challenge(owner)),
            headers={"X-Forwarded-For": "192.0.2.7"},
        )
        assert signed_in.status_code == 200, signed_in.text


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The process's budget of password checks is the subject of one test, which sets its own;
    the others check as many passwords as they need to."""
    settings.password_checks_per_second = 1000
    return settings


async def _waits_pass(runtime: Runtime) -> None:
    """What the passing of time does to every backoff wait of this test (its own key prefix)."""
    waits = await runtime.redis.keys(f"{runtime.settings.redis_key_prefix}*:wait")
    if waits:
        await runtime.redis.delete(*waits)


async def test_code_requests_for_a_phone_wait_longer_and_longer_but_never_past_the_cap(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime
) -> None:
    """Texting a phone over and over (an attacker's, or an impatient driver's) gets slower, but
    the phone is never blocked for longer than PARKING_LOGIN_CODE_BACKOFF_MAX_S."""
    settings = runtime.settings
    phone = _phone()

    async def ask() -> httpx.Response:
        return await api.post("/api/v1/auth/sign-in-codes", json={"phone": phone})

    free = [(await ask()).status_code for _ in range(settings.login_codes_free)]
    assert free == [202] * settings.login_codes_free
    waits = []
    for _ in range(8):
        refused = await ask()
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limited"
        waits.append(int(refused.headers["Retry-After"]))
        await _waits_pass(runtime)
        assert (await ask()).status_code == 202
    base, cap = settings.login_code_backoff_s, settings.login_code_backoff_max_s
    assert waits == [min(int(base * 2**n), int(cap)) for n in range(8)]
    assert max(waits) == cap
    # The driver signs in with the newest code; that forgives the phone's earlier requests.
    await _waits_pass(runtime)
    sent = await ask()
    answer = await api.post(
        "/api/v1/auth/token",
        json=_code_grant(phone, app.state.sms.last_code(phone), _challenge(sent)),
    )
    assert answer.status_code == 200, answer.text
    assert (await ask()).status_code == 202
    bad = await api.post("/api/v1/auth/sign-in-codes", json={"phone": "12345"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"


async def test_refresh_rotates_and_a_reused_refresh_token_ends_the_sign_in(
    api: httpx.AsyncClient, app: FastAPI
) -> None:
    pair = await _sign_in(api, app, _phone())

    async def refresh(token: str) -> httpx.Response:
        return await api.post(
            "/api/v1/auth/token", json={"grant_type": "refresh_token", "refresh_token": token}
        )

    rotated = await refresh(pair["refresh_token"])
    assert rotated.status_code == 200
    newer = rotated.json()["refresh_token"]
    assert newer != pair["refresh_token"]
    reused = await refresh(pair["refresh_token"])
    assert reused.json()["error"]["code"] == "refresh_token_reused"
    # The thief's reuse also ended the legitimate newer token.
    assert (await refresh(newer)).status_code == 401


async def test_staff_sign_in_with_password_and_carry_their_role(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, lot: Lot
) -> None:
    staff = await make_staff(runtime, lot.operator_id, "attendant")
    answer = await api.post(
        "/api/v1/auth/token",
        json={"grant_type": "password", "email": staff.email, "password": staff.password},
    )
    assert answer.status_code == 200, answer.text
    claims = app.state.signer.decode(answer.json()["access_token"])
    assert (claims.role, claims.operator_id) == ("attendant", lot.operator_id)
    wrong = await api.post(
        "/api/v1/auth/token",
        json={"grant_type": "password", "email": staff.email, "password": "nope"},
    )
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_credentials"


def _unsigned(payload: dict[str, object]) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


async def test_expired_foreign_and_unsigned_tokens_are_refused(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime
) -> None:
    async with runtime.pool.acquire() as conn:
        account_id = await auth_repo.account_for_phone(conn, _phone())
    subject = f"account:{account_id}"
    now = int(time.time())
    claims = {"sub": subject, "role": "driver", "iss": ISSUER, "aud": AUDIENCE, "iat": now}
    key = app.state.signer._key
    bad_tokens = {
        "expired": jwt.encode({**claims, "exp": now - 10}, key, algorithm="HS256"),
        "other key": TokenSigner(new_secret(), 900).issue(subject, "driver"),
        "alg none": _unsigned({**claims, "exp": now + 600}),
        "other audience": jwt.encode(
            {**claims, "aud": "elsewhere", "exp": now + 600}, key, algorithm="HS256"
        ),
        "no expiry": jwt.encode(claims, key, algorithm="HS256"),
        "garbage": "not-a-token",
        "unknown api key": "ck_" + new_secret(),
    }
    good = app.state.signer.issue(subject, "driver")
    assert (await api.get("/api/v1/me", headers=bearer(good))).status_code == 200
    for name, token in bad_tokens.items():
        answer = await api.get("/api/v1/me", headers=bearer(token))
        assert answer.status_code == 401, name
        assert answer.json()["error"]["code"] == "unauthenticated", name
        assert answer.headers["WWW-Authenticate"] == "Bearer", name


def test_a_device_token_names_one_e_mail_for_one_key_and_is_no_access_token() -> None:
    signer = TokenSigner(new_secret(), 900)
    token = signer.device_token("Staff@Example.com")
    device = signer.known_device(token, "staff@example.com")
    assert device is not None and device != signer.known_device(
        signer.device_token("staff@example.com"), "staff@example.com"
    ), "each device token has its own id"
    assert signer.known_device(token, "other@example.com") is None
    assert TokenSigner(new_secret(), 900).known_device(token, "staff@example.com") is None
    assert signer.known_device(None, "staff@example.com") is None
    assert signer.known_device("not-a-token", "staff@example.com") is None
    access = signer.issue("operator_user:1", "admin", 1)
    assert signer.known_device(access, "staff@example.com") is None
    with pytest.raises(InvalidToken):
        signer.decode(token)
    now = int(time.time())
    expired = jwt.encode(
        {
            "sub": digest("staff@example.com"),
            "iss": ISSUER,
            "aud": DEVICE_AUDIENCE,
            "iat": now - DEVICE_TTL_S - 10,
            "exp": now - 10,
            "jti": "x",
        },
        signer._key,
        algorithm="HS256",
    )
    assert signer.known_device(expired, "staff@example.com") is None


async def test_api_keys_are_stored_hashed_and_can_be_revoked(runtime: Runtime) -> None:
    key = "ck_" + new_secret()
    async with runtime.pool.acquire() as conn:
        await auth_repo.create_api_key(conn, "city", digest(key), "guidance signs")
        assert await auth_repo.api_key(conn, digest(key)) is not None
        assert not await conn.fetchval("SELECT count(*) FROM api_keys WHERE key_hash = $1", key)
        await conn.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1", digest(key)
        )
        assert await auth_repo.api_key(conn, digest(key)) is None


def _behind_proxy(runtime: Runtime) -> httpx.AsyncClient:
    """The API behind a trusted local proxy: X-Forwarded-For names each request's client."""
    runtime.settings.trusted_proxies = ["127.0.0.1/32"]
    transport = httpx.ASGITransport(app=create_app(runtime))
    return httpx.AsyncClient(transport=transport, base_url="http://parking.test")


async def test_password_guessing_slows_the_guesser_and_never_locks_the_owner_out(
    runtime: Runtime, lot: Lot
) -> None:
    staff = await make_staff(runtime, lot.operator_id, "admin")
    free = runtime.settings.password_free_failures

    async with _behind_proxy(runtime) as api:

        async def sign_in(client: str, password: str) -> httpx.Response:
            return await api.post(
                "/api/v1/auth/token",
                json={"grant_type": "password", "email": staff.email, "password": password},
                headers={"X-Forwarded-For": client},
            )

        guesses = [await sign_in("203.0.113.9", f"guess-{n}") for n in range(3 * free)]
        statuses = [a.status_code for a in guesses]
        # The free tries are checked; after them the guesser waits (nothing is checked meanwhile).
        assert statuses[:free] == [401] * free and set(statuses[free:]) == {429}, statuses
        assert all(1 <= int(a.headers["Retry-After"]) <= 1 for a in guesses[free:])
        # Each wrong guess after a wait doubles the next wait.
        waits = []
        for n in range(4):
            await _waits_pass(runtime)
            assert (await sign_in("203.0.113.9", f"again-{n}")).status_code == 401
            waits.append(int((await sign_in("203.0.113.9", "x")).headers["Retry-After"]))
        assert waits == [2, 4, 8, 16]

        # Meanwhile the owner, elsewhere, signs in at once with the right password ...
        assert (await sign_in("192.0.2.20", staff.password)).status_code == 200
        # ... and from the guesser's own address too, once its short wait has passed.
        assert (await sign_in("203.0.113.9", staff.password)).status_code == 429
        await _waits_pass(runtime)
        assert (await sign_in("203.0.113.9", staff.password)).status_code == 200
        # Which forgave that address's failures for this e-mail.
        assert (await sign_in("203.0.113.9", "typo")).status_code == 401
        assert (await sign_in("203.0.113.9", staff.password)).status_code == 200

        nul = await api.post(
            "/api/v1/auth/token",
            json={"grant_type": "password", "email": "a\u0000@b.c", "password": "x"},
        )
        assert nul.status_code == 422 and nul.json()["error"]["code"] == "invalid_request"


async def test_guessing_from_many_addresses_delays_an_e_mail_only_briefly(
    runtime: Runtime, lot: Lot
) -> None:
    """A botnet guessing one e-mail from many addresses slows that e-mail's checks to one per
    few seconds, at most PARKING_PASSWORD_EMAIL_BACKOFF_MAX_S: the owner gets in after that."""
    staff = await make_staff(runtime, lot.operator_id, "admin")
    settings = runtime.settings
    async with _behind_proxy(runtime) as api:

        async def sign_in(client: str, password: str) -> httpx.Response:
            return await api.post(
                "/api/v1/auth/token",
                json={"grant_type": "password", "email": staff.email, "password": password},
                headers={"X-Forwarded-For": client},
            )

        waits = []
        for n in range(4 * settings.password_free_failures + 12):
            answer = await sign_in(f"198.51.100.{n}", "wrong")
            if answer.status_code == 429:
                waits.append(int(answer.headers["Retry-After"]))
                await _waits_pass(runtime)
        assert waits and max(waits) == settings.password_email_backoff_max_s
        owner = await sign_in("192.0.2.20", staff.password)
        assert owner.status_code == 429
        assert int(owner.headers["Retry-After"]) <= settings.password_email_backoff_max_s
        await _waits_pass(runtime)
        assert (await sign_in("192.0.2.20", staff.password)).status_code == 200


async def test_guesses_beyond_the_process_budget_are_refused_unhashed_and_uncounted(
    runtime: Runtime, lot: Lot
) -> None:
    """Guesses each from a fresh address at a fresh e-mail are all within their free tries, so
    only the process's budget (PARKING_PASSWORD_CHECKS_PER_SECOND) bounds the CPU they take:
    beyond it a guess is answered 429 at once, before any try is counted or hashed."""
    runtime.settings.password_checks_per_second = 0.01  # one check, then one per 100 s
    async with _behind_proxy(runtime) as api:
        statuses, retry_after = [], []
        for n in range(6):
            answer = await api.post(
                "/api/v1/auth/token",
                json={
                    "grant_type": "password",
                    "email": f"guess-{n}@example.test",
                    "password": "wrong",
                },
                headers={"X-Forwarded-For": f"198.51.100.{n}"},
            )
            statuses.append(answer.status_code)
            retry_after.append(answer.headers.get("Retry-After"))
    assert statuses == [401] + [429] * 5, statuses
    assert all(wait is not None and int(wait) >= 1 for wait in retry_after[1:]), retry_after
    # Only the checked guess was counted (each scope's key ends in its address or e-mail's
    # digest, then `:count`).
    counted = await runtime.redis.keys(f"{runtime.settings.redis_key_prefix}backoff:password*")
    assert len(counted) == 3, counted
    assert all(key.endswith(":count") for key in counted), counted
    assert {key.split(":")[-2] for key in counted if ":client:" in key} == {"198.51.100.0"}


async def test_a_browser_that_signed_in_before_is_never_kept_out_by_strangers_guesses(
    runtime: Runtime, lot: Lot
) -> None:
    """A botnet keeps an e-mail waiting and uses up the process's password checks; the owner's
    browser, which signed in with the e-mail before, presents the device token it was given
    then and gets in at once. The token signs nobody in by itself, is no access token, and its
    own wrong passwords back off."""
    staff = await make_staff(runtime, lot.operator_id, "admin")
    settings = runtime.settings
    settings.trusted_proxies = ["127.0.0.1/32"]
    app = create_app(runtime)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as api:

        async def sign_in(
            client: str, password: str, device: str | None = None, email: str = staff.email
        ) -> httpx.Response:
            return await api.post(
                "/api/v1/auth/token",
                json={
                    "grant_type": "password",
                    "email": email,
                    "password": password,
                    "device_token": device,
                },
                headers={"X-Forwarded-For": client},
            )

        first = await sign_in("192.0.2.20", staff.password)
        assert first.status_code == 200, first.text
        device = first.json()["device_token"]
        for n in range(4 * settings.password_free_failures + 4):
            await sign_in(f"198.51.100.{n}", "wrong")
        # The e-mail waits: a browser without the token too ...
        assert (await sign_in("192.0.2.20", staff.password)).status_code == 429
        # ... the owner's browser does not.
        again = await sign_in("192.0.2.20", staff.password, device)
        assert again.status_code == 200, again.text
        # Strangers use up the process's checks: the owner's browser has a budget of its own.
        app.state.password_checks = PasswordChecks(Budget(0.01), Budget(0.01))
        for n in range(3):
            await sign_in(f"203.0.113.{n}", "x", email=f"x{n}@example.test")
        assert (await sign_in("203.0.113.9", "x", email="y@example.test")).status_code == 429
        owner = await sign_in("192.0.2.20", staff.password, device)
        assert owner.status_code == 200, owner.text
        # A device token is no bearer token.
        refused = await api.get(
            f"/api/v1/operator/car-parks/{lot.code}", headers={"Authorization": f"Bearer {device}"}
        )
        assert refused.status_code == 401
        # Its own wrong passwords back off like a guesser's.
        app.state.password_checks = PasswordChecks.from_settings(settings)
        statuses = [
            (await sign_in("192.0.2.21", f"typo-{n}", device)).status_code
            for n in range(settings.password_free_failures + 1)
        ]
        assert statuses[-1] == 429 and set(statuses[:-1]) == {401}, statuses


async def test_a_demoted_or_disabled_user_loses_rights_with_the_same_token(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, lot: Lot
) -> None:
    staff = await make_staff(runtime, lot.operator_id, "admin")
    headers = bearer(
        app.state.signer.issue(f"operator_user:{staff.user_id}", "admin", lot.operator_id)
    )
    change = {"capacity": 60}
    path = f"/api/v1/operator/car-parks/{lot.code}"
    assert (await api.patch(path, json=change, headers=headers)).status_code == 200
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE operator_users SET role = 'attendant' WHERE id = $1", staff.user_id
        )
    assert (await api.patch(path, json=change, headers=headers)).status_code == 403
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE operator_users SET disabled_at = now() WHERE id = $1", staff.user_id
        )
    assert (await api.get(path, headers=headers)).status_code == 401


async def test_staff_change_their_password_and_that_ends_their_other_sign_ins(
    api: httpx.AsyncClient, runtime: Runtime, lot: Lot
) -> None:
    staff = await make_staff(runtime, lot.operator_id, "attendant")

    async def sign_in(password: str) -> httpx.Response:
        return await api.post(
            "/api/v1/auth/token",
            json={"grant_type": "password", "email": staff.email, "password": password},
        )

    here, elsewhere = (await sign_in(staff.password)).json(), (await sign_in(staff.password)).json()
    # The other sign-in (a thief's, say) was refreshed once already: it is still the same one.
    refreshed_once = await api.post(
        "/api/v1/auth/token",
        json={"grant_type": "refresh_token", "refresh_token": elsewhere["refresh_token"]},
    )
    assert refreshed_once.status_code == 200
    elsewhere = refreshed_once.json()
    change = "/api/v1/auth/password"
    mine = f"/api/v1/operator/car-parks/{lot.code}"
    new_password = "correct horse battery staple"

    wrong = await api.post(
        change,
        json={"current_password": "not-it", "new_password": new_password},
        headers=bearer(here["access_token"]),
    )
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "wrong_password"
    short = await api.post(
        change,
        json={"current_password": staff.password, "new_password": "short"},
        headers=bearer(here["access_token"]),
    )
    assert short.status_code == 422
    changed = await api.post(
        change,
        json={"current_password": staff.password, "new_password": new_password},
        headers=bearer(here["access_token"]),
    )
    assert changed.status_code == 204, changed.text

    # The other sign-in ends at once: its access token and its refresh token.
    assert (await api.get(mine, headers=bearer(elsewhere["access_token"]))).status_code == 401
    refreshed = await api.post(
        "/api/v1/auth/token",
        json={"grant_type": "refresh_token", "refresh_token": elsewhere["refresh_token"]},
    )
    assert refreshed.status_code == 401
    # This one goes on.
    assert (await api.get(mine, headers=bearer(here["access_token"]))).status_code == 200
    rotated = await api.post(
        "/api/v1/auth/token",
        json={"grant_type": "refresh_token", "refresh_token": here["refresh_token"]},
    )
    assert rotated.status_code == 200
    assert (await sign_in(staff.password)).status_code == 401
    assert (await sign_in(new_password)).status_code == 200


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def test_the_token_endpoint_takes_the_oauth2_form_encoding(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, lot: Lot
) -> None:
    staff = await make_staff(runtime, lot.operator_id, "admin")
    # RFC 6749 §4.3: the password grant's `username` is the staff e-mail.
    signed_in = await api.post(
        "/api/v1/auth/token",
        data={"grant_type": "password", "username": staff.email, "password": staff.password},
    )
    assert signed_in.status_code == 200, signed_in.text
    pair = signed_in.json()
    assert app.state.signer.decode(pair["access_token"]).role == "admin"
    refreshed = await api.post(
        "/api/v1/auth/token",
        data={"grant_type": "refresh_token", "refresh_token": pair["refresh_token"]},
    )
    assert refreshed.status_code == 200, refreshed.text

    phone = _phone()
    sent = await api.post("/api/v1/auth/sign-in-codes", json={"phone": phone})
    driver = await api.post(
        "/api/v1/auth/token",
        data={
            "grant_type": "sign_in_code",
            "phone": phone,
            "code": app.state.sms.last_code(phone),
            "challenge_id": sent.json()["challenge_id"],
        },
    )
    assert driver.status_code == 200, driver.text


async def test_bad_token_forms_are_refused_in_the_one_error_shape(
    api: httpx.AsyncClient, runtime: Runtime, lot: Lot
) -> None:
    staff = await make_staff(runtime, lot.operator_id, "admin")
    for body in (
        f"grant_type=password&username={staff.email}&password={staff.password}&password=x",
        f"grant_type=password&username={staff.email}",
        "grant_type=client_credentials&client_id=x",
        "=&&=",
        "grant_type=password&username=%FF%FE&password=x",
    ):
        answer = await api.post("/api/v1/auth/token", content=body.encode(), headers=FORM)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.json()["error"]["code"] == "invalid_request", body
        assert staff.password not in answer.text
    not_json = await api.post(
        "/api/v1/auth/token", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert not_json.status_code == 422 and not_json.json()["error"]["code"] == "invalid_request"
