"""Signing in: drivers by phone and one-time code, staff by password, refresh tokens that rotate
and betray reuse; tokens that are expired, signed with another key or unsigned are refused."""

import base64
import time
import uuid

import httpx
import jwt
import orjson
from fastapi import FastAPI

from parking.auth import repository as auth_repo
from parking.auth.tokens import AUDIENCE, ISSUER, TokenSigner, digest, new_secret
from parking.runtime import Runtime
from tests.conftest import Lot, bearer, make_staff


def _phone() -> str:
    return f"139{uuid.uuid4().int % 10**8:08d}"


async def _sign_in(api: httpx.AsyncClient, app: FastAPI, phone: str) -> dict[str, str]:
    sent = await api.post("/api/v1/auth/sign-in-codes", json={"phone": phone})
    assert sent.status_code == 202, sent.text
    code = app.state.sms.last_code(phone)
    answer = await api.post(
        "/api/v1/auth/token", json={"grant_type": "sign_in_code", "phone": phone, "code": code}
    )
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
    await api.post("/api/v1/auth/sign-in-codes", json={"phone": phone})
    right = app.state.sms.last_code(phone)
    wrong = f"{(int(right) + 1) % 10**6:06d}"
    answers = [
        await api.post(
            "/api/v1/auth/token",
            json={"grant_type": "sign_in_code", "phone": phone, "code": wrong},
        )
        for _ in range(runtime.settings.login_code_max_attempts)
    ]
    assert {a.json()["error"]["code"] for a in answers} == {"invalid_code"}
    late = await api.post(
        "/api/v1/auth/token", json={"grant_type": "sign_in_code", "phone": phone, "code": right}
    )
    assert late.status_code == 401 and late.json()["error"]["code"] == "too_many_attempts"


async def test_code_requests_are_rate_limited_per_phone(
    api: httpx.AsyncClient, runtime: Runtime
) -> None:
    phone = _phone()
    statuses = [
        (await api.post("/api/v1/auth/sign-in-codes", json={"phone": phone})).status_code
        for _ in range(runtime.settings.login_codes_per_hour + 1)
    ]
    assert statuses[:-1] == [202] * runtime.settings.login_codes_per_hour
    refused = await api.post("/api/v1/auth/sign-in-codes", json={"phone": phone})
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
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


async def test_staff_password_guessing_is_rate_limited(
    api: httpx.AsyncClient, runtime: Runtime, lot: Lot
) -> None:
    staff = await make_staff(runtime, lot.operator_id, "admin")
    limit = runtime.settings.password_attempts_per_hour
    answers = [
        await api.post(
            "/api/v1/auth/token",
            json={"grant_type": "password", "email": staff.email, "password": f"guess-{n}"},
        )
        for n in range(limit + 1)
    ]
    assert [a.status_code for a in answers[:limit]] == [401] * limit
    assert answers[limit].status_code == 429
    nul = await api.post(
        "/api/v1/auth/token",
        json={"grant_type": "password", "email": "a\u0000@b.c", "password": "x"},
    )
    assert nul.status_code == 422 and nul.json()["error"]["code"] == "invalid_request"


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
