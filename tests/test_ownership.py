"""Ownership disputes end (issue #15). A claim on a (plate, colour) bound to another account
opens a dispute; the vehicle registry ends it when its own record proves the claimant the
owner (the binding moves at the proof time), otherwise the city platform's staff (role
'platform', never a car park company's) decide with both parties' evidence in front of them.
From the proof on the previous holder is never charged; the stays between the claim and the
proof are listed for review."""

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from parking.admin import repository as admin
from parking.drivers.verification import (
    DevRegistry,
    dev_licence_no,
    registry_of,
    same_licence,
)
from parking.runtime import Runtime
from tests.conftest import (
    Lot,
    bearer,
    charges_of,
    driver_token,
    eventually,
    exit_after,
    make_staff,
    staff_token,
    unique_plate,
)
from tests.gates import GateProbe

Headers = dict[str, str]
CLAIMS = "/api/v1/operator/ownership-claims"


async def _platform(runtime: Runtime, app: FastAPI) -> dict[str, str]:
    """A member of the city platform's staff: of the platform's own company (no car parks)."""
    async with runtime.pool.acquire() as conn:
        company = await admin.create_operator(conn, f"城市平台-{uuid.uuid4().hex[:8]}")
    return bearer(staff_token(app, await make_staff(runtime, company, "platform")))


@pytest.fixture
def registry(app: FastAPI) -> DevRegistry:
    made = registry_of(app)
    assert isinstance(made, DevRegistry)
    return made


async def _driver(
    runtime: Runtime, app: FastAPI, *, pay_later: bool = False
) -> tuple[int, Headers]:
    async with runtime.pool.acquire() as conn:
        account_id = await admin.create_account(conn, f"137{uuid.uuid4().int % 10**8:08d}")
        if pay_later:
            await conn.execute(
                """INSERT INTO pay_later_agreements (account_id, provider, agreement_no,
                                                     per_session_limit_fen)
                   VALUES ($1, 'sandbox', $2, 20000)""",
                account_id,
                f"AGR-{uuid.uuid4().hex[:12]}",
            )
    return account_id, bearer(driver_token(app, account_id))


def _claim(plate: str, licence_no: str, owner: str = "车主", color: str = "blue") -> dict[str, str]:
    return {"plate": plate, "color": color, "licence_no": licence_no, "owner_name": owner}


async def _claim_plate(
    api: httpx.AsyncClient, headers: Headers, body: dict[str, str]
) -> httpx.Response:
    return await api.post("/api/v1/me/plates", json=body, headers=headers)


def _error(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


async def _bindings(runtime: Runtime, plate: str) -> list[dict[str, Any]]:
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT id, account_id, color, bound_at, unbound_at FROM plate_bindings
               WHERE plate = $1 ORDER BY id""",
            plate,
        )
    return [dict(r) for r in rows]


async def _notifications(runtime: Runtime, account_id: int) -> list[str]:
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT kind FROM notifications WHERE account_id = $1 ORDER BY id", account_id
        )
    return [r["kind"] for r in rows]


async def _insert_stay(
    runtime: Runtime, lot: Lot, plate: str, entered_at: datetime, account_id: int | None
) -> int:
    async with runtime.pool.acquire() as conn:
        stay_id: int = await conn.fetchval(
            """INSERT INTO sessions (car_park_id, plate, plate_color, status, entered_at,
                                     exited_at, fee_fen, account_id, settlement)
               VALUES ($1, $2, 'blue', 'closed', $3, $4, 600, $5, 'pay_later') RETURNING id""",
            lot.id,
            plate,
            entered_at,
            entered_at + timedelta(minutes=30),
            account_id,
        )
    return stay_id


async def _open_dispute(
    api: httpx.AsyncClient, runtime: Runtime, app: FastAPI
) -> tuple[str, int, Headers, int, Headers, int]:
    """A plate the registry has no record of, bound to the holder; the claimant's claim can
    only open a dispute (the registry cannot tell who owns it now)."""
    plate = unique_plate()
    holder_id, holder = await _driver(runtime, app)
    claimant_id, claimant = await _driver(runtime, app)
    assert (
        await _claim_plate(api, holder, _claim(plate, dev_licence_no(plate)))
    ).status_code == 201
    disputed = await _claim_plate(api, claimant, _claim(plate, dev_licence_no(plate), "买家"))
    assert _error(disputed) == (409, "plate_disputed")
    dispute_id: int = disputed.json()["error"]["details"]["dispute_id"]
    return plate, holder_id, holder, claimant_id, claimant, dispute_id


async def test_the_registry_ends_a_dispute_and_the_binding_moves_at_the_proof_time(
    api: httpx.AsyncClient,
    app: FastAPI,
    runtime: Runtime,
    registry: DevRegistry,
    gate: GateProbe,
    lot: Lot,
) -> None:
    plate = unique_plate()
    seller_id, seller = await _driver(runtime, app, pay_later=True)
    buyer_id, buyer = await _driver(runtime, app, pay_later=True)
    registry.register(plate, "blue", "SELLER-LIC", "卖家")
    assert (await _claim_plate(api, seller, _claim(plate, "SELLER-LIC", "卖家"))).status_code == 201
    # Sold: the registry now records the car under the buyer's licence.
    registry.register(plate, "blue", "BUYER-LIC", "买家")

    taken = await _claim_plate(api, buyer, _claim(plate, "BUYER-LIC", "买家"))
    assert taken.status_code == 201, taken.text
    assert (taken.json()["plate"], taken.json()["color"]) == (plate, "blue")

    old, new = await _bindings(runtime, plate)
    assert (old["account_id"], new["account_id"]) == (seller_id, buyer_id)
    assert old["unbound_at"] is not None and new["unbound_at"] is None
    assert old["unbound_at"] == new["bound_at"], "the holder's binding ends at the proof time"
    async with runtime.pool.acquire() as conn:
        dispute = await conn.fetchrow(
            "SELECT * FROM plate_disputes WHERE plate = $1 AND claimant_account_id = $2",
            plate,
            buyer_id,
        )
    assert dispute is not None
    assert (dispute["status"], dispute["resolved_by"]) == ("upheld", "registry:dev-registry")
    assert dispute["resolved_at"] == new["bound_at"]
    assert (await api.get("/api/v1/me/plates", headers=seller)).json() == []
    assert "plate_ownership_moved" in await _notifications(runtime, buyer_id)
    assert "plate_ownership_lost" in await _notifications(runtime, seller_id)

    # A stay that enters after the proof is the buyer's, never the seller's.
    assert (await exit_after(runtime, gate, lot, plate, timedelta(minutes=90)))["action"] == "open"
    [charge] = await eventually(lambda: charges_of(runtime, lot))
    assert charge["account_id"] == buyer_id


async def test_a_claim_follows_the_vehicle_to_whoever_binds_it_after_its_holder_let_go(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, registry: DevRegistry
) -> None:
    """The owner's claim was against an account that then gave the plate up; a third account
    bound the free plate. The registry's proof later moves the vehicle from the third account.
    Before, the claim stayed against the account that let go: the proof was a 409
    `plate_rebound` for ever, and the third account kept the owner's car."""
    plate, holder_id, holder, owner_id, owner, dispute_id = await _open_dispute(api, runtime, app)
    [bound] = (await api.get("/api/v1/me/plates", headers=holder)).json()
    assert (await api.delete(f"/api/v1/me/plates/{bound['id']}", headers=holder)).status_code == 204
    third_id, third = await _driver(runtime, app)
    assert (await _claim_plate(api, third, _claim(plate, dev_licence_no(plate)))).status_code == 201
    platform = await _platform(runtime, app)
    [listed] = [
        c for c in (await api.get(CLAIMS, headers=platform)).json() if c["id"] == dispute_id
    ]
    assert listed["holder"]["account_id"] == third_id
    # The owner showed the first holder's very licence; whether it is the third's, nobody knows.
    assert listed["claimant"]["same_licence_as_holder"] is None

    registry.register(plate, "blue", "OWNER-LIC", "真车主")
    proved = await _claim_plate(api, owner, _claim(plate, "OWNER-LIC", "真车主"))
    assert proved.status_code == 201, proved.text
    assert [
        (b["account_id"], b["unbound_at"] is None) for b in await _bindings(runtime, plate)
    ] == [
        (holder_id, False),
        (third_id, False),
        (owner_id, True),
    ]
    assert "plate_ownership_lost" in await _notifications(runtime, third_id)
    assert "plate_ownership_lost" not in await _notifications(runtime, holder_id)
    async with runtime.pool.acquire() as conn:
        licence = await conn.fetchval(
            "SELECT licence_ref FROM plate_bindings WHERE plate = $1 AND unbound_at IS NULL", plate
        )
    assert await same_licence("OWNER-LIC", licence), "bound on the proof just made"


async def test_a_claimant_binding_the_plate_its_holder_let_go_ends_its_own_claim(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime
) -> None:
    """The claimant holds the vehicle now: its claim is moot, withdrawn, no longer in the
    platform's queue (before, it stayed there, and deciding it for the claimant was a 409)."""
    plate, _, holder, _, claimant, dispute_id = await _open_dispute(api, runtime, app)
    [bound] = (await api.get("/api/v1/me/plates", headers=holder)).json()
    assert (await api.delete(f"/api/v1/me/plates/{bound['id']}", headers=holder)).status_code == 204
    again = await _claim_plate(api, claimant, _claim(plate, dev_licence_no(plate), "买家"))
    assert again.status_code == 201, again.text
    platform = await _platform(runtime, app)
    assert dispute_id not in [c["id"] for c in (await api.get(CLAIMS, headers=platform)).json()]
    async with runtime.pool.acquire() as conn:
        status = await conn.fetchval("SELECT status FROM plate_disputes WHERE id = $1", dispute_id)
    assert status == "withdrawn"


async def test_deleting_an_account_withdraws_its_claims_and_those_of_its_vehicles(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime
) -> None:
    """The holder deletes their account: the claim of their vehicle is withdrawn, audit-logged,
    out of the platform's queue, and its claimant is told the vehicle is free to bind (it
    binds at once). The holder's own claim of another vehicle is withdrawn too, audit-logged,
    its holder not told (never told of it). Before, both were withdrawn with no audit entry and
    the claimant never heard of it."""
    plate, holder_id, holder, claimant_id, claimant, dispute_id = await _open_dispute(
        api, runtime, app
    )
    other_plate = unique_plate()
    other_id, other = await _driver(runtime, app)
    assert (
        await _claim_plate(api, other, _claim(other_plate, dev_licence_no(other_plate)))
    ).status_code == 201
    own = await _claim_plate(api, holder, _claim(other_plate, dev_licence_no(other_plate)))
    assert _error(own) == (409, "plate_disputed")
    own_id = own.json()["error"]["details"]["dispute_id"]

    assert (await api.delete("/api/v1/me", headers=holder)).status_code == 204

    platform = await _platform(runtime, app)
    queued = [c["id"] for c in (await api.get(CLAIMS, headers=platform)).json()]
    assert dispute_id not in queued and own_id not in queued
    async with runtime.pool.acquire() as conn:
        audited = await conn.fetch(
            """SELECT actor, action, subject FROM audit_log
               WHERE subject = ANY($1::text[]) ORDER BY id""",
            [f"plate_dispute:{dispute_id}", f"plate_dispute:{own_id}"],
        )
        statuses = await conn.fetch(
            "SELECT status FROM plate_disputes WHERE id = ANY($1::bigint[])", [dispute_id, own_id]
        )
    assert {r["status"] for r in statuses} == {"withdrawn"}
    assert sorted((r["actor"], r["action"], r["subject"]) for r in audited) == sorted(
        [
            (f"account:{holder_id}", "plate_dispute.withdrawn", f"plate_dispute:{dispute_id}"),
            (f"account:{holder_id}", "plate_dispute.withdrawn", f"plate_dispute:{own_id}"),
        ]
    )
    assert "plate_ownership_released" in await _notifications(runtime, claimant_id)
    assert "plate_ownership_released" not in await _notifications(runtime, other_id)
    bound = await _claim_plate(api, claimant, _claim(plate, dev_licence_no(plate), "买家"))
    assert bound.status_code == 201, bound.text


async def test_the_platform_decides_for_the_claimant_with_both_sides_evidence_in_front_of_them(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, lot: Lot
) -> None:
    plate, holder_id, holder, claimant_id, claimant, dispute_id = await _open_dispute(
        api, runtime, app
    )
    before = await _insert_stay(
        runtime, lot, plate, datetime.now(UTC) - timedelta(days=1), holder_id
    )
    async with runtime.pool.acquire() as conn:
        claimed_at = await conn.fetchval(
            "SELECT created_at FROM plate_disputes WHERE id = $1", dispute_id
        )
    # Entered as the claim was made, still inside: between the claim and any later proof.
    between = await _insert_stay(runtime, lot, plate, claimed_at, holder_id)
    platform = await _platform(runtime, app)
    admin_x = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
    attendant = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))
    # A plate is no company's: a car park company's staff neither see nor decide claims.
    for company_staff in (admin_x, attendant):
        assert _error(await api.get(CLAIMS, headers=company_staff)) == (403, "forbidden")

    listed = await api.get(CLAIMS, headers=platform)
    assert listed.status_code == 200, listed.text
    [claim] = [c for c in listed.json() if c["id"] == dispute_id]
    assert (claim["plate"], claim["color"], claim["status"]) == (plate, "blue", "open")
    assert claim["claimant"]["account_id"] == claimant_id
    assert claim["claimant"]["verified_by"] == "dev-registry"
    assert claim["holder"]["account_id"] == holder_id
    assert claim["holder"]["bound_at"] is not None and claim["holder"]["unbound_at"] is None
    assert claim["claimant"]["same_licence_as_holder"] is True
    detail = (await api.get(f"{CLAIMS}/{dispute_id}", headers=platform)).json()
    assert [s["id"] for s in detail["stays_since_claim"]] == [between], "not the stay before"
    assert before != between
    assert detail["stays_since_claim"][0]["charged_to"] == "holder"

    decision = {"in_favour_of": "claimant", "reason": "购车合同与新行驶证已核实"}
    for company_staff in (admin_x, attendant):
        assert _error(
            await api.post(f"{CLAIMS}/{dispute_id}/decision", json=decision, headers=company_staff)
        ) == (403, "forbidden")
    decided = await api.post(f"{CLAIMS}/{dispute_id}/decision", json=decision, headers=platform)
    assert decided.status_code == 200, decided.text
    body = decided.json()
    assert body["status"] == "upheld"
    assert body["resolved_by"].startswith("operator_user:")
    assert [s["id"] for s in body["stays_since_claim"]] == [between], "kept for review"

    old, new = await _bindings(runtime, plate)
    assert (old["account_id"], new["account_id"]) == (holder_id, claimant_id)
    assert old["unbound_at"] == new["bound_at"] and new["unbound_at"] is None
    assert body["holder"]["unbound_at"] is not None
    assert [p["plate"] for p in (await api.get("/api/v1/me/plates", headers=claimant)).json()] == [
        plate
    ]
    assert (await api.get("/api/v1/me/plates", headers=holder)).json() == []
    assert "plate_ownership_moved" in await _notifications(runtime, claimant_id)
    assert "plate_ownership_lost" in await _notifications(runtime, holder_id)
    async with runtime.pool.acquire() as conn:
        audit = await conn.fetchrow(
            "SELECT actor, action, detail FROM audit_log WHERE subject = $1",
            f"plate_dispute:{dispute_id}",
        )
    assert audit is not None and audit["action"] == "plate_dispute.decided"
    assert audit["detail"]["in_favour_of"] == "claimant"

    again = await api.post(f"{CLAIMS}/{dispute_id}/decision", json=decision, headers=platform)
    assert _error(again) == (409, "ownership_claim_decided")
    still_open = (await api.get(CLAIMS, headers=platform)).json()
    assert dispute_id not in [c["id"] for c in still_open], "no longer open"


async def test_the_platform_decides_for_the_holder_and_nothing_moves(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, lot: Lot
) -> None:
    plate, holder_id, holder, claimant_id, claimant, dispute_id = await _open_dispute(
        api, runtime, app
    )
    # Both drivers see the dispute in the app: the holder's plate is disputed, the claimant's
    # claim is under review.
    held = (await api.get("/api/v1/me", headers=holder)).json()
    assert [(p["plate"], p["disputed"]) for p in held["plates"]] == [(plate, True)]
    claims = (await api.get("/api/v1/me", headers=claimant)).json()["plate_claims"]
    assert [(c["id"], c["plate"], c["status"]) for c in claims] == [(dispute_id, plate, "open")]
    decided = await api.post(
        f"{CLAIMS}/{dispute_id}/decision",
        json={"in_favour_of": "holder", "reason": "申请人未提供过户证明"},
        headers=await _platform(runtime, app),
    )
    assert decided.status_code == 200, decided.text
    assert decided.json()["status"] == "rejected"
    claims = (await api.get("/api/v1/me", headers=claimant)).json()["plate_claims"]
    assert [c["status"] for c in claims] == ["rejected"]
    held = (await api.get("/api/v1/me/plates", headers=holder)).json()
    assert [p["disputed"] for p in held] == [False]
    [binding] = await _bindings(runtime, plate)
    assert (binding["account_id"], binding["unbound_at"]) == (holder_id, None)
    assert "plate_ownership_claim_rejected" in await _notifications(runtime, claimant_id)
    assert "plate_ownership_kept" in await _notifications(runtime, holder_id)
    # The dispute ended: a new claim opens a new one.
    again = await _claim_plate(api, claimant, _claim(plate, dev_licence_no(plate), "买家"))
    assert _error(again) == (409, "plate_disputed")
    assert again.json()["error"]["details"]["dispute_id"] != dispute_id


async def test_bad_decisions_and_unknown_claims_change_nothing(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, lot: Lot
) -> None:
    plate, holder_id, _, _, _, dispute_id = await _open_dispute(api, runtime, app)
    admin_x = await _platform(runtime, app)
    path = f"{CLAIMS}/{dispute_id}/decision"
    for body in (
        {"in_favour_of": "nobody", "reason": "x"},
        {"in_favour_of": "claimant"},
        {"in_favour_of": "claimant", "reason": ""},
    ):
        assert _error(await api.post(path, json=body, headers=admin_x)) == (
            422,
            "invalid_request",
        ), body
    ok = {"in_favour_of": "claimant", "reason": "x"}
    for unknown in (f"{CLAIMS}/999999999/decision", f"{CLAIMS}/999999999"):
        answer = await (
            api.post(unknown, json=ok, headers=admin_x)
            if unknown.endswith("decision")
            else api.get(unknown, headers=admin_x)
        )
        assert _error(answer) == (404, "ownership_claim_not_found")
    assert _error(await api.get(f"{CLAIMS}/0", headers=admin_x)) == (422, "invalid_request")
    assert _error(await api.get(f"{CLAIMS}/{2**63}", headers=admin_x)) == (
        422,
        "invalid_request",
    )
    [binding] = await _bindings(runtime, plate)
    assert (binding["account_id"], binding["unbound_at"]) == (holder_id, None)
    async with runtime.pool.acquire() as conn:
        status = await conn.fetchval("SELECT status FROM plate_disputes WHERE id = $1", dispute_id)
    assert status == "open"


async def test_a_claim_in_bad_form_opens_no_dispute(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime
) -> None:
    plate = unique_plate()
    _, holder = await _driver(runtime, app)
    claimant_id, claimant = await _driver(runtime, app)
    assert (
        await _claim_plate(api, holder, _claim(plate, dev_licence_no(plate)))
    ).status_code == 201
    bad_plate = await _claim_plate(api, claimant, _claim(plate[:-1] + "IO", "x"))
    assert _error(bad_plate) == (422, "invalid_plate")
    bad_color = await _claim_plate(api, claimant, _claim(plate, dev_licence_no(plate), color="red"))
    assert _error(bad_color) == (422, "invalid_request")
    assert bad_color.json()["error"]["details"][0]["loc"] == ["body", "color"]
    async with runtime.pool.acquire() as conn:
        disputes = await conn.fetchval(
            "SELECT count(*) FROM plate_disputes WHERE claimant_account_id = $1", claimant_id
        )
    assert disputes == 0


async def test_an_ownership_decision_with_a_nul_in_its_reason_is_a_422_and_decides_nothing(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, lot: Lot
) -> None:
    """The city platform's decision of an ownership claim stores its reason: a NUL in it is a
    422 in the one error shape, and the claim stays open. Before, PostgreSQL refused the text
    and the request was a 500."""
    _, _, _, _, _, dispute_id = await _open_dispute(api, runtime, app)
    platform = await _platform(runtime, app)
    decided = await api.post(
        f"{CLAIMS}/{dispute_id}/decision",
        json={"in_favour_of": "claimant", "reason": "核实\u0000"},
        headers=platform,
    )
    assert decided.status_code == 422, decided.text
    assert _error(decided)[0] == 422
    detail = await api.get(f"{CLAIMS}/{dispute_id}", headers=platform)
    assert detail.json()["status"] == "open"
