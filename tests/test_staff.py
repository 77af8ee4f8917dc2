"""The company's staff over the API (admins): added with a password, listed, disabled at once;
an admin cannot disable themselves; another company's member is not found; bad input changes
nothing."""

import httpx
from fastapi import FastAPI

from parking.runtime import Runtime
from tests.conftest import Lot, bearer, create_lot, make_staff, staff_token, unique_plate

STAFF = "/api/v1/operator/staff"


async def _count(runtime: Runtime, operator_id: int) -> int:
    async with runtime.pool.acquire() as conn:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM operator_users WHERE operator_id = $1", operator_id
        )
    return count


async def test_an_admin_adds_lists_and_disables_staff(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, lot: Lot
) -> None:
    admin = await make_staff(runtime, lot.operator_id, "admin")
    headers = bearer(staff_token(app, admin))
    email = f"Att-{unique_plate()[-5:]}@Operator.test"
    body = {
        "email": email,
        "name": "收费员",
        "password": "a long first password",
        "role": "attendant",
    }
    added = await api.post(STAFF, json=body, headers=headers)
    assert added.status_code == 201, added.text
    member = added.json()
    assert (member["email"], member["role"], member["disabled_at"]) == (
        email.lower(),
        "attendant",
        None,
    )
    # The new member signs in with that password.
    signed_in = await api.post(
        "/api/v1/auth/token",
        json={"grant_type": "password", "email": email, "password": body["password"]},
    )
    assert signed_in.status_code == 200, signed_in.text
    their_token = {"Authorization": f"Bearer {signed_in.json()['access_token']}"}
    assert (await api.get("/api/v1/operator/car-parks", headers=their_token)).status_code == 200

    again = await api.post(STAFF, json=body, headers=headers)
    assert again.status_code == 409 and again.json()["error"]["code"] == "staff_exists"
    listed = (await api.get(STAFF, headers=headers)).json()
    assert {m["id"] for m in listed} == {admin.user_id, member["id"]}

    disabled = await api.post(f"{STAFF}/{member['id']}/disable", headers=headers)
    assert disabled.status_code == 200 and disabled.json()["disabled_at"] is not None
    # At once: their token no longer passes, and their refresh token is revoked.
    assert (await api.get("/api/v1/operator/car-parks", headers=their_token)).status_code == 401
    refreshed = await api.post(
        "/api/v1/auth/token",
        json={"grant_type": "refresh_token", "refresh_token": signed_in.json()["refresh_token"]},
    )
    assert refreshed.status_code == 401
    twice = await api.post(f"{STAFF}/{member['id']}/disable", headers=headers)
    assert twice.status_code == 409 and twice.json()["error"]["code"] == "already_disabled"


async def test_no_self_disabling_no_other_company_and_bad_input_changes_nothing(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, lot: Lot
) -> None:
    admin = await make_staff(runtime, lot.operator_id, "admin")
    headers = bearer(staff_token(app, admin))
    other = await make_staff(runtime, (await create_lot(runtime)).operator_id, "attendant")
    before = await _count(runtime, lot.operator_id)

    itself = await api.post(f"{STAFF}/{admin.user_id}/disable", headers=headers)
    assert itself.status_code == 409 and itself.json()["error"]["code"] == "cannot_disable_self"
    foreign = await api.post(f"{STAFF}/{other.user_id}/disable", headers=headers)
    assert foreign.status_code == 404
    good = {"email": "x@y.test", "name": "n", "password": "a long first password"}
    for bad in (
        {**good, "password": "short", "role": "attendant"},
        {**good, "role": "merchant"},
        {**good, "email": "not-an-email", "role": "admin"},
    ):
        response = await api.post(STAFF, json=bad, headers=headers)
        assert response.status_code == 422, (bad, response.text)
        assert "error" in response.json()
    assert await _count(runtime, lot.operator_id) == before
    async with runtime.pool.acquire() as conn:
        enabled = await conn.fetchval(
            "SELECT count(*) FROM operator_users WHERE id = ANY($1) AND disabled_at IS NULL",
            [admin.user_id, other.user_id],
        )
    assert enabled == 2
