"""Every route against every kind of caller: anonymous, driver A, driver B, staff of car park X
(admin and attendant), an admin of car park Y, a merchant's staff of X, the city platform's
staff, a gate credential and a city key. Each gets only
what it should: another driver's objects and another company's car parks are 404, the wrong
kind of caller 403, no credential 401. A route added without a row here fails the test.

The result table is written to .artifacts/access-matrix.txt.
"""

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from billing.tariff import Tariff
from parking.admin import repository as admin_repo
from parking.auth import repository as auth_repo
from parking.auth.tokens import digest, new_secret
from parking.runtime import Runtime
from tests.conftest import (
    Lot,
    Staff,
    backdate_entry,
    bearer,
    charges_of,
    create_lot,
    driver_token,
    eventually,
    exit_after,
    make_driver,
    make_staff,
    staff_token,
    unique_plate,
)
from tests.gates import GateProbe

ARTIFACTS = Path(__file__).resolve().parent.parent / ".artifacts"
CALLERS = (
    "anonymous",
    "driver_a",
    "driver_b",
    "admin_x",
    "attendant_x",
    "admin_y",
    "merchant_x",
    "platform",
    "gate",
    "city",
)


class Access(Enum):
    PUBLIC = "anyone"
    SIGNED = "provider signature only"
    DRIVER = "any driver, about themselves"
    DRIVER_A = "driver A only (A's object)"
    STAFF = "any staff, own company's data only"
    STAFF_X = "staff of X (X's object)"
    ADMIN_X = "admins of X (X's object)"
    ADMIN = "any company's admin, about their own company"
    MERCHANT = "a merchant's staff, about their merchant"
    PLATFORM = "the city platform's staff (the city's, no company's object)"
    SELF_STAFF = "any company's or the platform's staff, about themselves"


def expected(access: Access, caller: str) -> str:
    """'allowed', or the status a denial must have."""
    if access is Access.PUBLIC:
        return "allowed"
    if access is Access.SIGNED:
        return "401"
    if caller == "anonymous":
        return "401"
    if access is Access.MERCHANT:
        return "allowed" if caller == "merchant_x" else "403"
    if access is Access.PLATFORM:
        return "allowed" if caller == "platform" else "403"
    if access is Access.SELF_STAFF:
        return "allowed" if caller in ("admin_x", "attendant_x", "admin_y", "platform") else "403"
    # The platform's staff pass no company route either: every branch below answers 403.
    # A merchant's staff (of X) pass no other staff route: every branch below answers 403.
    staff = caller in ("admin_x", "attendant_x", "admin_y")
    if access is Access.DRIVER:
        return "allowed" if caller.startswith("driver") else "403"
    if access is Access.DRIVER_A:
        return {"driver_a": "allowed", "driver_b": "404"}.get(caller, "403")
    if access is Access.STAFF:
        return "allowed" if staff else "403"
    if access is Access.ADMIN:
        return "allowed" if caller in ("admin_x", "admin_y") else "403"
    if access is Access.STAFF_X:
        return {"admin_x": "allowed", "attendant_x": "allowed", "admin_y": "404"}.get(caller, "403")
    return {"admin_x": "allowed", "attendant_x": "403", "admin_y": "404"}.get(caller, "403")


@dataclass
class World:
    lot_x: Lot
    lot_y: Lot
    tokens: dict[str, str]
    stay_a: int
    binding_a: int
    charge_a: int
    exception_x: int
    held_capture_x: uuid.UUID
    parked_plate_x: str
    plate_a: str
    # The outbox job of A's charge (done: a retry answers 409 to those allowed to ask).
    job_x: int
    stays_x: list[int] = field(default_factory=list)
    charge_exception_x: int = 0
    # The receipt link in A's exit message, a signed link to its entry frame, A's dispute.
    receipt_token: str = ""
    frame_query: dict[str, str] = field(default_factory=dict)
    dispute_x: int = 0
    # A charge of X awaiting an operator's confirmation, with both frames kept.
    confirmation_x: int = 0
    ownership_claim: int = 0
    # An assigned right, a blacklist entry and a merchant of X.
    right_x: int = 0
    spec_x: int = 0
    blacklist_x: int = 0
    merchant_x: int = 0
    # The tariff of X, as an APDS rate table.
    rate_x: int = 0
    # An APDS subscription and the city platform of X.
    subscription_x: str = ""
    # A staff member of X (an attendant) for the disable route.
    staff_x: int = 0


Body = Callable[[World], dict[str, Any]] | None


@dataclass(frozen=True)
class Row:
    method: str
    path: str
    access: Access
    body: Body = None
    query: Callable[[World], dict[str, str]] | None = None


def _plate_body(_: World) -> dict[str, Any]:
    plate = unique_plate()
    return {"plate": plate, "color": "blue", "licence_no": f"DEV-{plate}", "owner_name": "X"}


def _tariff_body(_: World) -> dict[str, Any]:
    start = datetime.now(UTC) + timedelta(days=1, seconds=uuid.uuid4().int % 10**6)
    return {
        "effective_from": start.isoformat(),
        "rules": Tariff.hourly(free_minutes=15, hourly_fen=600).to_json(),
    }


ROWS = [
    Row("GET", "/health", Access.PUBLIC),
    Row(
        "POST",
        "/api/v1/auth/sign-in-codes",
        Access.PUBLIC,
        lambda w: {"phone": f"138{uuid.uuid4().int % 10**8:08d}"},
    ),
    Row(
        "POST",
        "/api/v1/auth/token",
        Access.PUBLIC,
        lambda w: {"grant_type": "refresh_token", "refresh_token": "rt_" + "x" * 40},
    ),
    Row("POST", "/api/v1/auth/sign-out", Access.PUBLIC, lambda w: {"refresh_token": "x" * 40}),
    # A wrong current password (403 wrong_password) for those allowed: nobody's changes.
    Row(
        "POST",
        "/api/v1/auth/password",
        Access.SELF_STAFF,
        lambda w: {"current_password": "not-it", "new_password": "a long new passphrase"},
    ),
    Row("GET", "/api/v1/car-parks", Access.PUBLIC),
    Row("GET", "/api/v1/car-parks/{code}", Access.PUBLIC),
    Row(
        "GET",
        "/api/v1/car-parks/{code}/quote",
        Access.PUBLIC,
        query=lambda w: {"plate": w.parked_plate_x},
    ),
    Row("POST", "/api/v1/gate-payments/{capture_id}", Access.PUBLIC),
    Row("GET", "/api/v1/gate-payments/{capture_id}", Access.PUBLIC),
    Row("POST", "/api/v1/payments/notifications/{provider}", Access.SIGNED, lambda w: {}),
    Row("GET", "/api/v1/public/car-parks", Access.PUBLIC),
    Row("GET", "/api/v1/public/car-parks/{code}", Access.PUBLIC),
    Row(
        "GET",
        "/api/v1/public/car-parks/nearby",
        Access.PUBLIC,
        query=lambda w: {"lat": "30.23", "lon": "119.72", "radius_m": "5000"},
    ),
    Row("GET", "/api/v1/public/places", Access.PUBLIC),
    Row("GET", "/api/v1/public/signs", Access.PUBLIC),
    Row("GET", "/apds/v4/places", Access.PUBLIC),
    Row("GET", "/apds/v4/places/{place_id}", Access.PUBLIC),
    Row("GET", "/apds/v4/rates", Access.PUBLIC),
    Row("GET", "/apds/v4/rates/{rate_id}", Access.PUBLIC),
    # The company's own stays: staff of X see X's, an admin of Y an empty list (STAFF), and
    # one of X's stays is not found for Y (STAFF_X).
    Row("GET", "/apds/v4/sessions", Access.STAFF),
    Row("GET", "/apds/v4/sessions/{session_id}", Access.STAFF_X),
    # Right specifications and assigned rights (they name plates) likewise.
    Row("GET", "/apds/v4/rights/specs", Access.STAFF),
    Row("GET", "/apds/v4/rights/specs/{right_spec_id}", Access.STAFF_X),
    Row("GET", "/apds/v4/rights/assigned", Access.STAFF),
    Row("GET", "/apds/v4/rights/assigned/{assigned_right_id}", Access.STAFF_X),
    # Subscriptions are the company's: created by its admins, listed by its staff.
    Row(
        "POST",
        "/apds/v4/webhooks",
        Access.ADMIN,
        lambda w: {"endpoint": "http://127.0.0.1:9/hook", "topics": ["SessionCreated"]},
    ),
    Row("GET", "/apds/v4/webhooks", Access.STAFF),
    Row("POST", "/apds/v4/webhooks/{subscription_id}/resume", Access.ADMIN_X),
    # The company's own (no object of another company to ask for).
    Row("GET", "/api/v1/operator/city-platform", Access.STAFF),
    Row(
        "PUT",
        "/api/v1/operator/city-platform",
        Access.ADMIN,
        lambda w: {"endpoint": "http://127.0.0.1:9/city", "key": "k" * 32},
    ),
    Row("GET", "/dashboard", Access.PUBLIC),
    Row("GET", "/pay/{capture_id}", Access.PUBLIC),
    Row("GET", "/app", Access.PUBLIC),
    Row("GET", "/openapi.json", Access.PUBLIC),
    Row("GET", "/docs", Access.PUBLIC),
    Row("GET", "/docs/oauth2-redirect", Access.PUBLIC),
    Row("GET", "/redoc", Access.PUBLIC),
    Row("GET", "/api/v1/me", Access.DRIVER),
    Row("GET", "/api/v1/me/plates", Access.DRIVER),
    Row("POST", "/api/v1/me/plates", Access.DRIVER, _plate_body),
    Row("GET", "/api/v1/me/agreement", Access.DRIVER),
    Row("PUT", "/api/v1/me/agreement", Access.DRIVER, lambda w: {"per_session_limit_fen": 9000}),
    Row("PATCH", "/api/v1/me/agreement", Access.DRIVER, lambda w: {"per_session_limit_fen": 20000}),
    Row("GET", "/api/v1/me/stays", Access.DRIVER),
    Row("GET", "/api/v1/me/stays/{stay_id}", Access.DRIVER_A),
    Row("GET", "/api/v1/me/stays/{stay_id}/frames/{which}", Access.DRIVER_A),
    Row("GET", "/api/v1/me/debts", Access.DRIVER),
    Row("POST", "/api/v1/me/debts/payment", Access.DRIVER),
    Row("GET", "/api/v1/me/notifications", Access.DRIVER),
    Row("GET", "/api/v1/me/export", Access.DRIVER),
    Row("GET", "/api/v1/operator/car-parks", Access.STAFF),
    Row("GET", "/api/v1/operator/car-parks/{code}", Access.STAFF_X),
    Row("PATCH", "/api/v1/operator/car-parks/{code}", Access.ADMIN_X, lambda w: {"capacity": 50}),
    Row("GET", "/api/v1/operator/car-parks/{code}/gates", Access.STAFF_X),
    Row(
        "POST",
        "/api/v1/operator/car-parks/{code}/gates",
        Access.ADMIN_X,
        lambda w: {"code": f"g{uuid.uuid4().hex[:6]}", "direction": "in"},
    ),
    Row("GET", "/api/v1/operator/car-parks/{code}/tariffs", Access.STAFF_X),
    Row("POST", "/api/v1/operator/car-parks/{code}/tariffs", Access.ADMIN_X, _tariff_body),
    Row("GET", "/api/v1/operator/stays", Access.STAFF),
    Row("GET", "/api/v1/operator/exceptions", Access.STAFF),
    Row("GET", "/api/v1/operator/capture-conflicts", Access.STAFF),
    Row("GET", "/api/v1/operator/gate-events", Access.STAFF),
    Row("GET", "/api/v1/operator/audit-log", Access.ADMIN),
    Row("GET", "/api/v1/operator/charge-exceptions", Access.STAFF),
    Row("POST", "/api/v1/operator/charge-exceptions/{charge_exception_id}/retry", Access.ADMIN_X),
    Row("GET", "/api/v1/operator/exceptions/{exception_id}/image", Access.STAFF_X),
    Row(
        "POST",
        "/api/v1/operator/exceptions/{exception_id}/resolve",
        Access.STAFF_X,
        lambda w: {"plate": unique_plate(), "color": "blue"},
    ),
    Row(
        "POST",
        "/api/v1/operator/exceptions/{exception_id}/end-stay",
        Access.STAFF_X,
        lambda w: {"reason": "access matrix test"},
    ),
    Row(
        "POST",
        "/api/v1/operator/car-parks/{code}/gates/{gate}/open",
        Access.STAFF_X,
        lambda w: {"reason": "access matrix test"},
    ),
    Row(
        "POST",
        "/api/v1/operator/charges/{charge_id}/refunds",
        Access.ADMIN_X,
        lambda w: {"amount_fen": 1, "reason": "access matrix test"},
    ),
    # A wrong amount: those allowed get 409 amount_mismatch and the held car stays held.
    Row(
        "POST",
        "/api/v1/operator/car-parks/{code}/booth-payments",
        Access.STAFF_X,
        lambda w: {"capture_id": str(w.held_capture_x), "method": "cash", "amount_fen": 1},
    ),
    Row("GET", "/api/v1/operator/clock-skews", Access.STAFF),
    Row("GET", "/api/v1/operator/refunds", Access.STAFF),
    Row("GET", "/api/v1/operator/reports/revenue", Access.STAFF),
    Row("GET", "/api/v1/operator/reports/debts", Access.STAFF),
    Row("GET", "/api/v1/operator/jobs", Access.STAFF),
    Row("POST", "/api/v1/operator/jobs/{job_id}/retry", Access.ADMIN_X),
    Row("GET", "/r/{receipt_token}", Access.PUBLIC),
    Row("GET", "/r/{receipt_token}/frames/{which}", Access.PUBLIC, query=lambda w: w.frame_query),
    Row("POST", "/r/{receipt_token}/dispute", Access.PUBLIC),
    Row("GET", "/api/v1/receipts/{receipt_token}", Access.PUBLIC),
    Row("POST", "/api/v1/receipts/{receipt_token}/dispute", Access.PUBLIC),
    Row("POST", "/api/v1/me/stays/{dispute_stay_id}/dispute", Access.DRIVER_A),
    Row("GET", "/api/v1/operator/disputes", Access.STAFF),
    Row("GET", "/api/v1/operator/disputes/{dispute_id}", Access.STAFF_X),
    Row("GET", "/api/v1/operator/disputes/{dispute_id}/frames/{which}", Access.STAFF_X),
    Row(
        "POST",
        "/api/v1/operator/disputes/{dispute_id}/decision",
        Access.ADMIN_X,
        lambda w: {"outcome": "charge_stands", "note": "access matrix test"},
    ),
    Row("GET", "/api/v1/operator/confirmations", Access.STAFF),
    Row("GET", "/api/v1/operator/confirmations/{confirmation_id}/entry-image", Access.STAFF_X),
    Row("GET", "/api/v1/operator/confirmations/{confirmation_id}/exit-image", Access.STAFF_X),
    Row(
        "POST",
        "/api/v1/operator/confirmations/{confirmation_id}/confirm",
        Access.STAFF_X,
        lambda w: {"reason": "access matrix test"},
    ),
    Row(
        "POST",
        "/api/v1/operator/confirmations/{confirmation_id}/reject",
        Access.STAFF_X,
        lambda w: {"reason": "access matrix test"},
    ),
    Row("GET", "/api/v1/operator/ownership-claims", Access.PLATFORM),
    Row("GET", "/api/v1/operator/ownership-claims/{ownership_claim_id}", Access.PLATFORM),
    Row(
        "POST",
        "/api/v1/operator/ownership-claims/{ownership_claim_id}/decision",
        Access.PLATFORM,
        lambda w: {"in_favour_of": "holder", "reason": "access matrix test"},
    ),
    Row(
        "POST",
        "/api/v1/operator/right-specs",
        Access.ADMIN,
        lambda w: {"name": f"spec-{uuid.uuid4().hex[:8]}", "kind": "free_passage"},
    ),
    Row("GET", "/api/v1/operator/right-specs", Access.STAFF),
    # No vehicle: 422 for those allowed, nothing created.
    Row(
        "POST",
        "/api/v1/operator/rights",
        Access.ADMIN,
        lambda w: {
            "spec_id": 1,
            "vehicles": [],
            "valid_from": "2026-12-01T00:00:00+08:00",
            "valid_until": "2027-01-01T00:00:00+08:00",
        },
    ),
    Row("GET", "/api/v1/operator/rights", Access.STAFF),
    # Not a CSV with the columns: 422 invalid_csv for those allowed.
    Row("POST", "/api/v1/operator/rights/import", Access.ADMIN, lambda w: {}),
    Row(
        "POST",
        "/api/v1/operator/rights/{right_id}/renew",
        Access.ADMIN_X,
        lambda w: {"valid_until": (datetime.now(UTC) + timedelta(days=400)).isoformat()},
    ),
    Row("POST", "/api/v1/operator/rights/{right_id}/suspend", Access.ADMIN_X),
    Row("POST", "/api/v1/operator/rights/{right_id}/resume", Access.ADMIN_X),
    Row("POST", "/api/v1/operator/rights/{right_id}/cancel", Access.ADMIN_X),
    Row("GET", "/api/v1/operator/blacklist", Access.STAFF),
    Row("GET", "/api/v1/operator/reports/pass-occupancy", Access.STAFF),
    Row(
        "POST",
        "/api/v1/operator/blacklist",
        Access.ADMIN,
        lambda w: {"plate": unique_plate(), "color": "blue", "reason": "access matrix test"},
    ),
    Row("DELETE", "/api/v1/operator/blacklist/{blacklist_id}", Access.ADMIN_X),
    Row(
        "POST",
        "/api/v1/operator/merchants",
        Access.ADMIN,
        lambda w: {
            "name": f"shop-{uuid.uuid4().hex[:8]}",
            "budget_fen": 100,
            "user": {
                "email": f"shop-{uuid.uuid4().hex[:8]}@merchant.test",
                "name": "shop",
                "password": "a long shop password",
            },
        },
    ),
    Row("GET", "/api/v1/operator/merchants", Access.STAFF),
    Row(
        "POST",
        "/api/v1/operator/merchants/{merchant_id}/budget",
        Access.ADMIN_X,
        lambda w: {"add_fen": 100},
    ),
    Row("GET", "/api/v1/operator/reports/validations", Access.STAFF),
    Row("GET", "/api/v1/operator/staff", Access.ADMIN),
    Row(
        "POST",
        "/api/v1/operator/staff",
        Access.ADMIN,
        lambda w: {
            "email": f"staff-{uuid.uuid4().hex[:8]}@operator.test",
            "name": "new attendant",
            "password": "a long staff password",
            "role": "attendant",
        },
    ),
    Row("POST", "/api/v1/operator/staff/{staff_id}/disable", Access.ADMIN_X),
    Row("GET", "/api/v1/merchant", Access.MERCHANT),
    Row(
        "POST",
        "/api/v1/merchant/validations",
        Access.MERCHANT,
        lambda w: {"car_park": w.lot_x.code, "plate": w.parked_plate_x, "free_minutes": 10},
    ),
    Row("GET", "/api/v1/merchant/validations", Access.MERCHANT),
    # An empty offer or purchase: 422 for those allowed, nothing created.
    Row("POST", "/api/v1/operator/pass-offers", Access.ADMIN, lambda w: {}),
    Row("GET", "/api/v1/operator/pass-offers", Access.STAFF),
    Row("GET", "/api/v1/operator/reports/pass-revenue", Access.STAFF),
    Row(
        "GET",
        "/api/v1/me/pass-offers",
        Access.DRIVER,
        query=lambda w: {"car_park": w.lot_x.code},
    ),
    Row("POST", "/api/v1/me/passes", Access.DRIVER, lambda w: {}),
    Row("GET", "/api/v1/me/passes", Access.DRIVER),
    Row("GET", "/api/v1/operator/dashboard/summary", Access.STAFF),
    # An event stream never ends: its allowed callers are tested in test_dashboard.py.
    Row("GET", "/api/v1/operator/dashboard/events", Access.STAFF),
    Row("DELETE", "/apds/v4/webhooks/{subscription_id}", Access.ADMIN_X),
    Row("DELETE", "/api/v1/operator/city-platform", Access.ADMIN),
    # Last: these end A's binding, agreement and account.
    Row("DELETE", "/api/v1/me/plates/{binding_id}", Access.DRIVER_A),
    Row("DELETE", "/api/v1/me/agreement", Access.DRIVER),
    Row("DELETE", "/api/v1/me", Access.DRIVER),
]
STREAMS = {"/api/v1/operator/dashboard/events"}


def _fill(path: str, world: World) -> str:
    return path.format(
        code=world.lot_x.code,
        gate="out1",
        capture_id=world.held_capture_x,
        provider="sandbox",
        stay_id=world.stay_a,
        binding_id=world.binding_a,
        exception_id=world.exception_x,
        charge_exception_id=world.charge_exception_x,
        charge_id=world.charge_a,
        job_id=world.job_x,
        receipt_token=world.receipt_token,
        which="entry",
        dispute_stay_id=world.stay_a,
        dispute_id=world.dispute_x,
        confirmation_id=world.confirmation_x,
        ownership_claim_id=world.ownership_claim,
        right_id=world.right_x,
        right_spec_id=world.spec_x,
        assigned_right_id=world.right_x,
        blacklist_id=world.blacklist_x,
        merchant_id=world.merchant_x,
        place_id=world.lot_x.code,
        rate_id=world.rate_x,
        session_id=world.stay_a,
        subscription_id=world.subscription_x,
        staff_id=world.staff_x,
    )


# Image routes answer with the stored bytes: no picture needed.
FAKE_JPEG = b"\xff\xd8\xff\xe0fake-jpeg"


@pytest.fixture
async def world(runtime: Runtime, app: FastAPI, gate: GateProbe, lot: Lot) -> World:
    """Every caller of the matrix with the objects each may or may not reach (car park X is
    the `lot` fixture's), made afresh for each test: allowed calls change them."""
    lot_x = lot
    lot_y = await create_lot(runtime)
    admin_x = await make_staff(runtime, lot_x.operator_id, "admin")
    attendant_x = await make_staff(runtime, lot_x.operator_id, "attendant")
    admin_y = await make_staff(runtime, lot_y.operator_id, "admin")
    async with runtime.pool.acquire() as conn:
        platform_company = await admin_repo.create_operator(conn, f"平台-{uuid.uuid4().hex[:8]}")
    platform = await make_staff(runtime, platform_company, "platform")
    driver_a = await make_driver(runtime, unique_plate())
    driver_b = await make_driver(runtime, unique_plate())
    await exit_after(runtime, gate, lot_x, driver_a.plate, timedelta(minutes=90))

    async def charged() -> int | None:
        rows = await charges_of(runtime, lot_x)
        return rows[0]["id"] if rows and rows[0]["status"] == "succeeded" else None

    charge_a = await eventually(charged)
    # An exit with no entry record: an exception of X, with a frame for the image route.
    stranger = gate.capture("out", unique_plate())
    await gate.decide(lot_x.code, "out1", stranger)
    # An unbound car held at X's exit: the QR code's payment routes.
    parked = unique_plate()
    await exit_after(runtime, gate, lot_x, parked, timedelta(minutes=90))
    held = gate.capture("out", parked)
    await gate.decide(lot_x.code, "out1", held)
    inside = unique_plate()
    await gate.decide(lot_x.code, "in1", gate.capture("in", inside))
    # A bound car that came in on a read that was not certain: its charge awaits a person.
    unsure = await make_driver(runtime, unique_plate())
    unsure_entry = gate.capture("in", unsure.plate, confidence=0.9)
    await gate.decide(lot_x.code, "in1", unsure_entry)
    await backdate_entry(runtime, lot_x, unsure.plate, timedelta(minutes=90))
    unsure_exit = gate.capture("out", unsure.plate)
    await gate.decide(lot_x.code, "out1", unsure_exit)
    claim_holder = await make_driver(runtime, unique_plate())
    claimant = await make_driver(runtime, unique_plate())
    gate_key, city_key = "gk_" + new_secret(), "ck_" + new_secret()
    async with runtime.pool.acquire() as conn:
        exception_x = await conn.fetchval(
            "UPDATE lane_exceptions SET image = $2 WHERE capture_id = $1 RETURNING id",
            stranger.capture_id,
            FAKE_JPEG,
        )
        stay_a = await conn.fetchval("SELECT session_id FROM charges WHERE id = $1", charge_a)
        # A charge of X the provider refused for the car park's own reason.
        charge_exception_x = await conn.fetchval(
            """INSERT INTO charge_exceptions (charge_id, car_park_id, provider, http_status,
                                              code, reason)
               VALUES ($1, $2, 'sandbox', 400, 'invalid_request', 'access matrix test')
               RETURNING id""",
            charge_a,
            lot_x.id,
        )
        job_x = await conn.fetchval(
            "SELECT id FROM outbox WHERE kind = 'charge' AND ref_id = $1", charge_a
        )
        binding_a = await conn.fetchval(
            "SELECT id FROM plate_bindings WHERE account_id = $1", driver_a.account_id
        )
        gate_id = await conn.fetchval(
            "SELECT id FROM gates WHERE car_park_id = $1 AND code = 'out1'", lot_x.id
        )
        await auth_repo.create_api_key(conn, "gate", digest(gate_key), "matrix gate", gate_id)
        await auth_repo.create_api_key(conn, "city", digest(city_key), "matrix city")
        stays_x = [
            r["id"]
            for r in await conn.fetch("SELECT id FROM sessions WHERE car_park_id = $1", lot_x.id)
        ]
        # A's receipt link (in the exit message), a frame of A's entry, and A's dispute.
        message = await conn.fetchval(
            "SELECT body FROM notifications WHERE account_id = $1 AND kind = 'exit_charged'",
            driver_a.account_id,
        )
        receipt_token = message.rsplit("/r/", 1)[1]
        await conn.execute(
            """INSERT INTO capture_frames (capture_id, captured_at, car_park_id, image)
               SELECT s.entry_capture_id, k.captured_at, s.car_park_id, $2 FROM sessions s
               JOIN capture_keys k ON k.capture_id = s.entry_capture_id WHERE s.id = $1""",
            stay_a,
            FAKE_JPEG,
        )
        dispute_x = await conn.fetchval(
            """INSERT INTO charge_disputes (charge_id, session_id, amount_fen, account_id,
                                            car_park_id, via, held)
               SELECT $1, session_id, amount_fen, $2, $3, 'app', false FROM charges
               WHERE id = $1 RETURNING id""",
            charge_a,
            driver_a.account_id,
            lot_x.id,
        )
        confirmation_x = await conn.fetchval(
            "SELECT id FROM charges WHERE account_id = $1 AND status = 'awaiting_confirmation'",
            unsure.account_id,
        )
        for capture in (unsure_entry, unsure_exit):
            await conn.execute(
                """INSERT INTO capture_frames (capture_id, captured_at, car_park_id, image)
                   VALUES ($1, $2, $3, $4)""",
                capture.capture_id,
                capture.captured_at,
                lot_x.id,
                FAKE_JPEG,
            )
        # An open ownership claim between two other drivers.
        ownership_claim = await conn.fetchval(
            """INSERT INTO plate_disputes (plate, color, claimant_account_id, holder_account_id)
               VALUES ($1, 'blue', $2, $3) RETURNING id""",
            claim_holder.plate,
            claimant.account_id,
            claim_holder.account_id,
        )
        # A right, a blacklist entry and a merchant (with its sign-in) of X.
        spec_x = await conn.fetchval(
            """INSERT INTO right_specs (operator_id, name, kind, created_by)
               VALUES ($1, 'matrix', 'free_passage', 'test') RETURNING id""",
            lot_x.operator_id,
        )
        right_x = await conn.fetchval(
            """WITH ar AS (
                   INSERT INTO assigned_rights (spec_id, operator_id, valid_from, valid_until,
                                                created_by)
                   VALUES ($1, $2, now() - interval '1 day', now() + interval '30 days', 'test')
                   RETURNING id)
               INSERT INTO assigned_right_plates (right_id, plate, color)
               SELECT id, $3, 'blue' FROM ar RETURNING right_id""",
            spec_x,
            lot_x.operator_id,
            unique_plate(),
        )
        blacklist_x = await conn.fetchval(
            """INSERT INTO plate_blacklist (operator_id, plate, color, reason, created_by)
               VALUES ($1, $2, 'blue', 'matrix', 'test') RETURNING id""",
            lot_x.operator_id,
            unique_plate(),
        )
        merchant_x = await conn.fetchval(
            """INSERT INTO merchants (operator_id, name, budget_fen, created_by)
               VALUES ($1, 'matrix shop', 100000, 'test') RETURNING id""",
            lot_x.operator_id,
        )
        merchant_user = await auth_repo.create_operator_user(
            conn,
            lot_x.operator_id,
            f"shop-{uuid.uuid4().hex[:8]}@merchant.test",
            "shop",
            "merchant",
            "not-a-hash",
            merchant_x,
        )
        rate_x = await conn.fetchval("SELECT id FROM tariffs WHERE car_park_id = $1", lot_x.id)
        subscription_x = str(
            await conn.fetchval(
                """INSERT INTO feed_subscriptions (operator_id, format, endpoint, secret, topics)
                   VALUES ($1, 'apds', 'http://127.0.0.1:9/hook', 'whsec_matrix',
                           ARRAY['session_started']) RETURNING public_id""",
                lot_x.operator_id,
            )
        )
        await conn.execute(
            """INSERT INTO feed_subscriptions (operator_id, format, endpoint, secret, topics)
               VALUES ($1, 'city', 'http://127.0.0.1:9/city', 'matrix-city-key',
                       ARRAY['occupancy'])""",
            lot_x.operator_id,
        )
    staff_x = (await make_staff(runtime, lot_x.operator_id, "attendant")).user_id
    frame_url = app.state.frame_signer.url(receipt_token, "entry")
    frame_query = dict(part.split("=", 1) for part in frame_url.split("?", 1)[1].split("&"))
    tokens = {
        "driver_a": driver_token(app, driver_a.account_id),
        "driver_b": driver_token(app, driver_b.account_id),
        "admin_x": staff_token(app, admin_x),
        "attendant_x": staff_token(app, attendant_x),
        "admin_y": staff_token(app, admin_y),
        "merchant_x": staff_token(app, Staff(merchant_user, lot_x.operator_id, "merchant", "", "")),
        "platform": staff_token(app, platform),
        "gate": gate_key,
        "city": city_key,
    }
    return World(
        lot_x,
        lot_y,
        tokens,
        stay_a,
        binding_a,
        charge_a,
        exception_x,
        held.capture_id,
        inside,
        driver_a.plate,
        job_x,
        stays_x,
        charge_exception_x,
        receipt_token,
        frame_query,
        dispute_x,
        confirmation_x,
        ownership_claim,
        right_x,
        spec_x,
        blacklist_x,
        merchant_x,
        rate_x,
        subscription_x,
        staff_x,
    )


def _outcome(response: httpx.Response) -> str:
    """'allowed', or the denial status ('401', '403', '404')."""
    if response.status_code >= 500:
        return f"server error {response.status_code}"
    json_body = response.headers.get("content-type", "").startswith("application/json")
    if json_body and response.status_code >= 400 and response.json().get("status") == "error":
        # APDS's error shape (/apds/…): the status says it all.
        return {401: "401", 403: "403", 404: "404"}.get(response.status_code, "allowed")
    code = (
        response.json().get("error", {}).get("code")
        if response.headers.get("content-type", "").startswith("application/json")
        and response.status_code >= 400
        else None
    )
    if response.status_code == 401 and code in ("unauthenticated", "invalid_notification"):
        return "401"
    if response.status_code == 403 and code == "forbidden":
        return "403"
    if response.status_code == 404:
        return "404"
    return "allowed"


async def test_every_route_gives_each_caller_only_what_it_should(
    app: FastAPI, api: httpx.AsyncClient, world: World
) -> None:
    schema_routes = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    covered = {(row.method, row.path) for row in ROWS}
    assert schema_routes - covered == set(), "routes without an access row"

    table: list[str] = [f"{'route':62} " + " ".join(f"{c:>11}" for c in CALLERS)]
    mismatches: list[str] = []
    for row in ROWS:
        cells: list[str] = []
        # Denials first: an allowed call may change what later calls see.
        for caller in sorted(CALLERS, key=lambda c: expected(row.access, c) == "allowed"):
            want = expected(row.access, caller)
            if row.path in STREAMS and want == "allowed":
                cells.append(f"{caller}:skipped")
                continue
            headers = bearer(world.tokens[caller]) if caller in world.tokens else {}
            response = await api.request(
                row.method,
                _fill(row.path, world),
                headers=headers,
                json=row.body(world) if row.body else None,
                params=row.query(world) if row.query else None,
            )
            got = _outcome(response)
            cells.append(f"{caller}:{response.status_code}")
            if got != want:
                mismatches.append(
                    f"{row.method} {row.path} as {caller}: {response.status_code} "
                    f"({got}), expected {want}: {response.text[:200]}"
                )
        by_caller = dict(cell.split(":") for cell in cells)
        table.append(
            f"{row.method + ' ' + row.path:62} " + " ".join(f"{by_caller[c]:>11}" for c in CALLERS)
        )
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "access-matrix.txt").write_text("\n".join(table) + "\n", encoding="utf-8")
    assert mismatches == [], "\n".join(mismatches)


async def test_lists_never_show_another_drivers_or_companys_objects(
    api: httpx.AsyncClient, world: World
) -> None:
    as_b = bearer(world.tokens["driver_b"])
    stays_b = (await api.get("/api/v1/me/stays", headers=as_b)).json()
    assert world.stay_a not in {s["id"] for s in stays_b["items"]}
    export_b = (await api.get("/api/v1/me/export", headers=as_b)).text
    assert world.plate_a not in export_b

    as_y = bearer(world.tokens["admin_y"])
    codes_y = {
        c["code"] for c in (await api.get("/api/v1/operator/car-parks", headers=as_y)).json()
    }
    assert codes_y == {world.lot_y.code}
    stays_y = (await api.get("/api/v1/operator/stays", headers=as_y)).json()
    assert not {s["id"] for s in stays_y} & set(world.stays_x)
    exceptions_y = (await api.get("/api/v1/operator/exceptions", headers=as_y)).json()
    assert world.exception_x not in {e["id"] for e in exceptions_y}
    summary_y = (await api.get("/api/v1/operator/dashboard/summary", headers=as_y)).json()
    assert world.lot_x.code not in str(summary_y)
    revenue_y = await api.get(
        "/api/v1/operator/reports/revenue", headers=as_y, params={"format": "csv"}
    )
    assert world.lot_x.code not in revenue_y.text

    as_x = bearer(world.tokens["admin_x"])
    stays_x = (await api.get("/api/v1/operator/stays", headers=as_x)).json()
    assert set(world.stays_x) <= {s["id"] for s in stays_x}


async def test_a_manual_open_takes_only_a_capture_of_the_gate_it_opens(
    runtime: Runtime, api: httpx.AsyncClient, gate: GateProbe, lot: Lot, world: World
) -> None:
    """Gate in1 opened by hand with the capture of a car held at out1: refused. Taken, it would
    close that car's stay as let out by an operator while in1's barrier lifted for someone
    else, and out1 would hold the car still."""
    as_x = bearer(world.tokens["admin_x"])
    held = str(world.held_capture_x)
    response = await api.post(
        f"/api/v1/operator/car-parks/{lot.code}/gates/in1/open",
        headers=as_x,
        json={"reason": "access matrix test", "capture_id": held},
    )
    assert response.status_code == 404, response.text
    async with runtime.pool.acquire() as conn:
        stay = await conn.fetchrow(
            """SELECT s.status, c.command->>'action' AS action
               FROM captures c JOIN sessions s ON s.id = c.session_id
               WHERE c.capture_id = $1""",
            world.held_capture_x,
        )
    assert (stay["status"], stay["action"]) == ("open", "hold")
    # At its own gate the same capture is let out (the path above was the only difference).
    response = await api.post(
        f"/api/v1/operator/car-parks/{lot.code}/gates/out1/open",
        headers=as_x,
        json={"reason": "access matrix test", "capture_id": held},
    )
    assert response.status_code == 200, response.text
    opened = await eventually(lambda: _commands_for(gate, held, "open"), timeout_s=10.0)
    assert {command["_topic"].rsplit("/", 2)[1] for command in opened} == {"out1"}


async def _commands_for(gate: GateProbe, capture_id: str, action: str) -> list[dict[str, Any]]:
    return [c for c in gate.commands[capture_id] if c["action"] == action]
