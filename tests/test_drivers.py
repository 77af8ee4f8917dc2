"""The driver app (/api/v1/me): a driver sees and changes only their own account. Plates are
bound only with proof of ownership and never move to a second claimant; a binding sees no
stays from before it; debts are paid in the app; the account can be exported and deleted."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import structlog
from fastapi import FastAPI

from billing import notifications, refunds
from parking.admin import repository as admin
from parking.auth.tokens import verify_password
from parking.drivers import service as drivers_service
from parking.drivers.verification import DevRegistry, dev_licence_no, registry_of
from parking.logging import pseudonym
from parking.runtime import ProviderEndpoint, Runtime
from tests.conftest import (
    Driver,
    Lot,
    backdate_entry,
    bearer,
    driver_in_debt,
    driver_token,
    eventually,
    exit_after,
    make_driver,
    make_staff,
    staff_token,
    unique_plate,
)
from tests.gates import GateProbe
from tests.test_evidence import exit_with_frames, receipt_token_of

Headers = dict[str, str]


@pytest.fixture
def registry(app: FastAPI) -> DevRegistry:
    """The app's vehicle registry: a DevRegistry made on first use, the one the API asks."""
    made = registry_of(app)
    assert isinstance(made, DevRegistry) and registry_of(app) is made
    return made


async def _new_driver(runtime: Runtime, app: FastAPI) -> tuple[int, Headers]:
    async with runtime.pool.acquire() as conn:
        account_id = await admin.create_account(conn, _phone())
    return account_id, bearer(driver_token(app, account_id))


def _phone() -> str:
    return f"139{uuid.uuid4().int % 10**8:08d}"


def _green_plate() -> str:
    return f"浙AD{uuid.uuid4().int % 100000:05d}"


def _claim(plate: str, licence_no: str, owner: str = "张三", color: str = "blue") -> dict[str, str]:
    return {"plate": plate, "color": color, "licence_no": licence_no, "owner_name": owner}


async def _bind(
    api: httpx.AsyncClient, headers: Headers, registry: DevRegistry, plate: str
) -> dict[str, Any]:
    """Registers the vehicle to this driver and binds it."""
    licence_no = f"LIC{uuid.uuid4().hex[:10].upper()}"
    registry.register(plate, "blue", licence_no, "车主")
    bound = await api.post(
        "/api/v1/me/plates", json=_claim(plate, licence_no, "车主"), headers=headers
    )
    assert bound.status_code == 201, bound.text
    binding: dict[str, Any] = bound.json()
    return binding


async def _bind_unregistered(api: httpx.AsyncClient, headers: Headers, plate: str) -> None:
    """Binds a plate the registry has no record of: a second claim of it opens a dispute
    (the registry cannot tell who owns it now)."""
    bound = await api.post(
        "/api/v1/me/plates", json=_claim(plate, dev_licence_no(plate)), headers=headers
    )
    assert bound.status_code == 201, bound.text


def _error(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


async def _stay_ids(api: httpx.AsyncClient, headers: Headers, **params: Any) -> list[int]:
    listed = await api.get("/api/v1/me/stays", params=params, headers=headers)
    assert listed.status_code == 200, listed.text
    return [s["id"] for s in listed.json()["items"]]


async def _insert_stay(
    runtime: Runtime,
    lot: Lot,
    plate: str,
    entered_at: datetime,
    *,
    minutes: int | None = 90,
    account_id: int | None = None,
    color: str = "blue",
    entry_certain: bool = True,
) -> int:
    """A stay as the lanes would have stored it (closed after `minutes`, or still open);
    `entry_certain=False`: its entry read was not sure of the vehicle (its colour, say, only
    guessed from the characters)."""
    async with runtime.pool.acquire() as conn:
        stay_id: int = await conn.fetchval(
            """INSERT INTO sessions (car_park_id, plate, plate_color, status, entered_at,
                                     exited_at, fee_fen, account_id, settlement, entry_certain)
               VALUES ($1, $2, $9, $3, $4, $5, $6, $7, $8, $10) RETURNING id""",
            lot.id,
            plate,
            "open" if minutes is None else "closed",
            entered_at,
            None if minutes is None else entered_at + timedelta(minutes=minutes),
            None if minutes is None else 1200,
            account_id,
            None if minutes is None else "paid_at_gate",
            color,
            entry_certain,
        )
    return stay_id


async def test_only_a_signed_in_driver_sees_their_account(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, lot: Lot, registry: DevRegistry
) -> None:
    assert (await api.get("/api/v1/me")).status_code == 401
    staff = bearer(staff_token(app, await make_staff(runtime, lot.operator_id)))
    assert _error(await api.get("/api/v1/me/plates", headers=staff)) == (403, "forbidden")

    account_id, headers = await _new_driver(runtime, app)
    fresh = (await api.get("/api/v1/me", headers=headers)).json()
    async with runtime.pool.acquire() as conn:
        phone = await conn.fetchval("SELECT phone FROM accounts WHERE id = $1", account_id)
    assert fresh == {
        "account_id": account_id,
        "phone": phone,
        "display_name": None,
        "blocked_for_arrears": False,
        "plates": [],
        "agreement": None,
        "open_debt_fen": 0,
        "plate_claims": [],
    }

    plate = unique_plate()
    await _bind(api, headers, registry, plate)
    signed = await api.put(
        "/api/v1/me/agreement", json={"per_session_limit_fen": 5000}, headers=headers
    )
    assert signed.status_code == 201, signed.text
    me = (await api.get("/api/v1/me", headers=headers)).json()
    assert [p["plate"] for p in me["plates"]] == [plate]
    assert me["agreement"]["per_session_limit_fen"] == 5000


async def test_a_plate_is_bound_only_with_proof_and_only_a_hash_of_the_licence_is_kept(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, registry: DevRegistry
) -> None:
    account_id, headers = await _new_driver(runtime, app)
    plate = unique_plate()
    licence_no = "330100123456"
    registry.register(plate, "blue", licence_no, "张 三")

    async def claim(body: dict[str, str]) -> httpx.Response:
        return await api.post("/api/v1/me/plates", json=body, headers=headers)

    assert _error(await claim(_claim("ABC", licence_no))) == (422, "invalid_plate")
    assert _error(await claim(_claim(plate, licence_no, color="green"))) == (422, "invalid_plate")
    assert _error(await claim(_claim(plate, licence_no, color="red"))) == (422, "invalid_request")
    assert _error(await claim(_claim(plate, "330100999999", "张 三"))) == (
        422,
        "ownership_not_proven",
    )
    assert _error(await claim(_claim(plate, licence_no, "李四"))) == (422, "ownership_not_proven")
    assert _error(await claim(_claim(plate, dev_licence_no(plate)))) == (
        422,
        "ownership_not_proven",
    ), "a registered vehicle is proven only by its own licence"

    # Written loosely (lower case, a separator, spacing of the name): the same vehicle.
    loose = f"{plate[0]}{plate[1].lower()}·{plate[2:]}"
    bound = await claim(_claim(loose, licence_no, " 张  三 "))
    assert bound.status_code == 201, bound.text
    binding = bound.json()
    assert (binding["plate"], binding["color"], binding["verified_by"]) == (
        plate,
        "blue",
        "dev-registry",
    )
    assert _error(await claim(_claim(plate, licence_no, "张 三"))) == (409, "already_bound")

    green = _green_plate()
    assert _error(await claim(_claim(green, "x", color="green"))) == (422, "ownership_not_proven")
    second = await claim(_claim(green, dev_licence_no(green), color="green"))
    assert second.status_code == 201, second.text

    listed = (await api.get("/api/v1/me/plates", headers=headers)).json()
    assert [(p["plate"], p["color"]) for p in listed] == [(plate, "blue"), (green, "green")]
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT plate, account_id, licence_ref FROM plate_bindings WHERE plate = ANY($1)",
            [plate, green],
        )
    assert len(rows) == 2 and {r["account_id"] for r in rows} == {account_id}
    [ref] = [r["licence_ref"] for r in rows if r["plate"] == plate]
    assert licence_no not in ref and verify_password(licence_no, ref)


async def test_a_plate_claimed_by_a_second_driver_opens_a_dispute_and_stays_put(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, registry: DevRegistry
) -> None:
    holder_id, holder = await _new_driver(runtime, app)
    claimant_id, claimant = await _new_driver(runtime, app)
    plate = unique_plate()
    # A vehicle the registry has no record of, proven as the dev registry allows.
    bound = await api.post(
        "/api/v1/me/plates", json=_claim(plate, dev_licence_no(plate)), headers=holder
    )
    assert bound.status_code == 201, bound.text
    binding = bound.json()

    # Without proof nothing happens at all.
    unproven = await api.post(
        "/api/v1/me/plates", json=_claim(plate, "WRONG-LICENCE"), headers=claimant
    )
    assert _error(unproven) == (422, "ownership_not_proven")
    # The claimant proves the plate as well as the registry can (it has no record to tell
    # who owns it now): bound to another, so a dispute, and the plate stays put.
    disputed = await api.post(
        "/api/v1/me/plates", json=_claim(plate, dev_licence_no(plate), "王五"), headers=claimant
    )
    assert _error(disputed) == (409, "plate_disputed")
    dispute_id = disputed.json()["error"]["details"]["dispute_id"]
    again = await api.post(
        "/api/v1/me/plates", json=_claim(plate, dev_licence_no(plate), "王五"), headers=claimant
    )
    assert again.json()["error"]["details"]["dispute_id"] == dispute_id, "one open dispute"

    async with runtime.pool.acquire() as conn:
        dispute = await conn.fetchrow("SELECT * FROM plate_disputes WHERE id = $1", dispute_id)
        active = await conn.fetch(
            "SELECT id, account_id FROM plate_bindings WHERE plate = $1 AND unbound_at IS NULL",
            plate,
        )
    assert (dispute["claimant_account_id"], dispute["holder_account_id"]) == (
        claimant_id,
        holder_id,
    )
    assert (dispute["status"], dispute["plate"], dispute["claimant_verified_by"]) == (
        "open",
        plate,
        "dev-registry",
    )
    assert verify_password(dev_licence_no(plate), dispute["claimant_licence_ref"])
    assert [(r["id"], r["account_id"]) for r in active] == [(binding["id"], holder_id)]
    assert (await api.get("/api/v1/me/plates", headers=claimant)).json() == []
    assert [p["plate"] for p in (await api.get("/api/v1/me/plates", headers=holder)).json()] == [
        plate
    ]


async def test_the_yellow_and_the_blue_plate_of_one_text_are_two_vehicles(
    api: httpx.AsyncClient,
    app: FastAPI,
    runtime: Runtime,
    registry: DevRegistry,
    lot: Lot,
) -> None:
    car_id, car_owner = await _new_driver(runtime, app)
    lorry_id, lorry_owner = await _new_driver(runtime, app)
    plate = unique_plate()
    registry.register(plate, "blue", "CAR-LIC", "轿车车主")
    registry.register(plate, "yellow", "LORRY-LIC", "货车车主")
    car = await api.post(
        "/api/v1/me/plates", json=_claim(plate, "CAR-LIC", "轿车车主"), headers=car_owner
    )
    assert car.status_code == 201, car.text
    # The registry answers for a (plate, type): the blue car's licence proves no yellow plate.
    assert _error(
        await api.post(
            "/api/v1/me/plates",
            json=_claim(plate, "CAR-LIC", "轿车车主", color="yellow"),
            headers=car_owner,
        )
    ) == (422, "ownership_not_proven")
    lorry = await api.post(
        "/api/v1/me/plates",
        json=_claim(plate, "LORRY-LIC", "货车车主", color="yellow"),
        headers=lorry_owner,
    )
    assert lorry.status_code == 201, lorry.text
    assert (lorry.json()["plate"], lorry.json()["color"]) == (plate, "yellow")
    assert [
        (p["plate"], p["color"])
        for p in (await api.get("/api/v1/me/plates", headers=car_owner)).json()
    ] == [(plate, "blue")]
    async with runtime.pool.acquire() as conn:
        active = await conn.fetch(
            """SELECT account_id, color FROM plate_bindings
               WHERE plate = $1 AND unbound_at IS NULL ORDER BY id""",
            plate,
        )
        disputes = await conn.fetchval(
            "SELECT count(*) FROM plate_disputes WHERE plate = $1", plate
        )
    assert [(r["account_id"], r["color"]) for r in active] == [
        (car_id, "blue"),
        (lorry_id, "yellow"),
    ]
    assert disputes == 0, "no dispute: another vehicle"

    # Each owner sees the stays of their own vehicle only.
    blue_stay = await _insert_stay(runtime, lot, plate, datetime.now(UTC) + timedelta(seconds=1))
    async with runtime.pool.acquire() as conn:
        await conn.execute("UPDATE sessions SET plate_color = 'yellow' WHERE id = $1", blue_stay)
    assert await _stay_ids(api, car_owner) == []
    assert await _stay_ids(api, lorry_owner) == [blue_stay]


async def test_a_stay_not_surely_of_the_vehicle_is_shown_only_with_evidence_it_is_the_drivers(
    api: httpx.AsyncClient,
    app: FastAPI,
    runtime: Runtime,
    registry: DevRegistry,
    lot: Lot,
) -> None:
    """A stay whose entry read did not name the vehicle surely (its colour was not read: the
    lane files it under the colour the characters' form suggests, blue) may be the yellow
    浙A12345's: the blue one's holder sees it only when it is charged to them. Before, every
    stay of the characters filed under the binding's colour was shown, so the blue car's holder
    saw where and when the yellow lorry parked. Nor is a doubtful read of a small new-energy
    plate's eight characters shown, though they settle the colour: the characters may be
    misread, another car's (review 30: that stay and its frame were shown)."""
    car_id, car_owner = await _new_driver(runtime, app)
    _, lorry_owner = await _new_driver(runtime, app)
    plate = unique_plate()
    registry.register(plate, "yellow", "LORRY-LIC", "货车车主")
    await _bind(api, car_owner, registry, plate)
    lorry = await api.post(
        "/api/v1/me/plates",
        json=_claim(plate, "LORRY-LIC", "货车车主", color="yellow"),
        headers=lorry_owner,
    )
    assert lorry.status_code == 201, lorry.text
    green = _green_plate()
    bound = await api.post(
        "/api/v1/me/plates",
        json=_claim(green, dev_licence_no(green), color="green"),
        headers=car_owner,
    )
    assert bound.status_code == 201, bound.text
    start = datetime.now(UTC) + timedelta(seconds=1)

    guessed = await _insert_stay(runtime, lot, plate, start, entry_certain=False)
    sure = await _insert_stay(runtime, lot, plate, start + timedelta(minutes=1))
    charged = await _insert_stay(
        runtime, lot, plate, start + timedelta(minutes=2), account_id=car_id, entry_certain=False
    )
    settled = await _insert_stay(
        runtime, lot, green, start + timedelta(minutes=3), color="green", entry_certain=False
    )

    assert await _stay_ids(api, car_owner) == [charged, sure]
    assert await _stay_ids(api, lorry_owner) == []
    for stay in (guessed, settled):
        for path in ("", "/frames/entry"):
            shown = await api.get(f"/api/v1/me/stays/{stay}{path}", headers=car_owner)
            assert _error(shown) == (404, "stay_not_found")
    exported = (await api.get("/api/v1/me/export", headers=car_owner)).json()
    assert sorted(s["id"] for s in exported["stays"]) == sorted([sure, charged])


async def test_unbinding_is_for_the_own_bindings_only(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, registry: DevRegistry
) -> None:
    _, owner = await _new_driver(runtime, app)
    _, other = await _new_driver(runtime, app)
    plate = unique_plate()
    binding = await _bind(api, owner, registry, plate)
    path = f"/api/v1/me/plates/{binding['id']}"

    assert _error(await api.delete(path, headers=other)) == (404, "binding_not_found")
    assert len((await api.get("/api/v1/me/plates", headers=owner)).json()) == 1
    assert (await api.delete(path, headers=owner)).status_code == 204
    assert (await api.get("/api/v1/me/plates", headers=owner)).json() == []
    assert _error(await api.delete(path, headers=owner)) == (404, "binding_not_found")
    async with runtime.pool.acquire() as conn:
        unbound_at = await conn.fetchval(
            "SELECT unbound_at FROM plate_bindings WHERE id = $1", binding["id"]
        )
    assert unbound_at is not None
    # The plate is free again: the next owner binds it without a dispute.
    assert (await _bind(api, other, registry, plate))["plate"] == plate


async def test_plates_per_account_and_ownership_checks_per_hour_are_limited(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, registry: DevRegistry
) -> None:
    _, headers = await _new_driver(runtime, app)
    answers = []
    for _ in range(6):
        plate = unique_plate()
        answers.append(
            await api.post(
                "/api/v1/me/plates", json=_claim(plate, dev_licence_no(plate)), headers=headers
            )
        )
    assert [a.status_code for a in answers[:5]] == [201] * 5
    assert _error(answers[5]) == (409, "too_many_plates")
    guesses = [
        await api.post("/api/v1/me/plates", json=_claim(unique_plate(), "GUESS"), headers=headers)
        for _ in range(5)
    ]
    assert [g.status_code for g in guesses] == [422] * 4 + [429]
    assert _error(guesses[4]) == (429, "rate_limited")


async def test_a_binding_sees_no_history_from_before_it_and_nobody_sees_other_drivers_stays(
    api: httpx.AsyncClient,
    app: FastAPI,
    runtime: Runtime,
    registry: DevRegistry,
    gate: GateProbe,
    lot: Lot,
) -> None:
    plate = unique_plate()
    # The plate's past: a stay paid at the gate long ago, and a previous owner's charged stay.
    paid_long_ago = await _insert_stay(runtime, lot, plate, datetime.now(UTC) - timedelta(days=3))
    previous = await make_driver(runtime, plate)
    assert (await exit_after(runtime, gate, lot, plate, timedelta(minutes=30)))["action"] == "open"
    previous_headers = bearer(driver_token(app, previous.account_id))
    [previous_stay] = await _stay_ids(api, previous_headers)
    [old_binding] = (await api.get("/api/v1/me/plates", headers=previous_headers)).json()

    async def collected() -> bool:
        async with runtime.pool.acquire() as conn:
            status = await conn.fetchval(
                "SELECT status FROM charges WHERE session_id = $1", previous_stay
            )
        return bool(status == "succeeded")

    await eventually(collected)  # no plate is unbound while a charge on it is pending
    unbound = await api.delete(f"/api/v1/me/plates/{old_binding['id']}", headers=previous_headers)
    assert unbound.status_code == 204

    _, headers = await _new_driver(runtime, app)
    await _bind(api, headers, registry, plate)
    await api.put("/api/v1/me/agreement", json={"per_session_limit_fen": 5000}, headers=headers)
    assert await _stay_ids(api, headers) == []
    for hidden in (paid_long_ago, previous_stay):
        assert _error(await api.get(f"/api/v1/me/stays/{hidden}", headers=headers)) == (
            404,
            "stay_not_found",
        )

    # A stay of the new binding: visible while the car is inside, then with its charge.
    await gate.decide(lot.code, "in1", gate.capture("in", plate))
    [inside] = await _stay_ids(api, headers, status="open")
    assert await _stay_ids(api, headers, status="closed") == []
    await backdate_entry(runtime, lot, plate, timedelta(minutes=30))
    left = await gate.decide(lot.code, "out1", gate.capture("out", plate))
    assert (left["action"], left["fee_fen"]) == ("open", 600)
    assert await _stay_ids(api, headers) == [inside]
    assert await _stay_ids(api, headers, status="open") == []

    async def charged() -> dict[str, Any] | None:
        found = (await api.get(f"/api/v1/me/stays/{inside}", headers=headers)).json()
        return found if found["charge"] and found["charge"]["status"] == "succeeded" else None

    receipt = await eventually(charged)
    assert receipt["car_park"] == lot.name and receipt["plate"] == plate
    assert (receipt["fee_fen"], receipt["settlement"], receipt["duration_minutes"]) == (
        600,
        "pay_later",
        30,
    )
    assert receipt["charge"]["amount_fen"] == 600 and receipt["refunds"] == []

    # A refund of part of the fee shows on the receipt.
    async with runtime.pool.acquire() as conn, conn.transaction():
        charge_id = await conn.fetchval("SELECT id FROM charges WHERE session_id = $1", inside)
        await refunds.request_for_charge(
            conn, charge_id=charge_id, amount_fen=200, reason="barrier fault", actor="test"
        )
    refunded = (await api.get(f"/api/v1/me/stays/{inside}", headers=headers)).json()
    assert [(r["amount_fen"], r["kind"], r["reason"]) for r in refunded["refunds"]] == [
        (200, "operator", "barrier fault")
    ]

    # Neither another driver nor the plate's previous owner sees the new owner's stay.
    _, stranger = await _new_driver(runtime, app)
    assert await _stay_ids(api, stranger) == []
    assert _error(await api.get(f"/api/v1/me/stays/{inside}", headers=stranger))[0] == 404
    assert await _stay_ids(api, previous_headers) == [previous_stay]
    assert _error(await api.get(f"/api/v1/me/stays/{inside}", headers=previous_headers))[0] == 404

    # The charge was announced to the driver.
    async def told() -> list[dict[str, Any]]:
        listed = await api.get("/api/v1/me/notifications", headers=headers)
        return [n for n in listed.json() if n["kind"] == "exit_charged"]

    [message] = await eventually(told)
    assert plate in message["body"] and lot.name in message["body"]
    assert await _stay_ids(api, headers) == [inside]


async def test_a_stay_charged_to_another_account_is_theirs_not_the_plate_holders(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, registry: DevRegistry, lot: Lot
) -> None:
    _, holder = await _new_driver(runtime, app)
    payer_id, payer = await _new_driver(runtime, app)
    plate = unique_plate()
    binding = await _bind(api, holder, registry, plate)
    now = datetime.now(UTC)
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE plate_bindings SET bound_at = $2 WHERE id = $1",
            binding["id"],
            now - timedelta(days=1),
        )
    unattributed = await _insert_stay(runtime, lot, plate, now - timedelta(hours=3))
    # Entered under this binding but charged to another account (the car changed hands).
    charged_elsewhere = await _insert_stay(
        runtime, lot, plate, now - timedelta(hours=2), account_id=payer_id
    )
    assert await _stay_ids(api, holder) == [unattributed]
    assert _error(await api.get(f"/api/v1/me/stays/{charged_elsewhere}", headers=holder))[0] == 404
    assert await _stay_ids(api, payer) == [charged_elsewhere]


async def test_stays_are_listed_newest_first_in_pages_and_filtered_by_status(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, registry: DevRegistry, lot: Lot
) -> None:
    _, headers = await _new_driver(runtime, app)
    plate = unique_plate()
    binding = await _bind(api, headers, registry, plate)
    now = datetime.now(UTC)
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE plate_bindings SET bound_at = $2 WHERE id = $1",
            binding["id"],
            now - timedelta(days=10),
        )
    closed = [
        await _insert_stay(runtime, lot, plate, now - timedelta(days=day)) for day in (5, 1, 3, 2)
    ]
    inside = await _insert_stay(runtime, lot, plate, now - timedelta(hours=2), minutes=None)
    newest_first = [inside, closed[1], closed[3], closed[2], closed[0]]

    first = (await api.get("/api/v1/me/stays", params={"limit": 3}, headers=headers)).json()
    assert [s["id"] for s in first["items"]] == newest_first[:3]
    assert first["next_before"] is not None
    rest = (
        await api.get(
            "/api/v1/me/stays",
            params={"limit": 3, "before": first["next_before"]},
            headers=headers,
        )
    ).json()
    assert [s["id"] for s in rest["items"]] == newest_first[3:]
    assert rest["next_before"] is None
    assert await _stay_ids(api, headers, status="open") == [inside]
    assert await _stay_ids(api, headers, status="closed") == newest_first[1:]
    assert _error(await api.get("/api/v1/me/stays?status=gone", headers=headers)) == (
        422,
        "invalid_request",
    )
    assert _error(await api.get("/api/v1/me/stays?limit=0", headers=headers))[0] == 422
    out_of_range = {"before": "0001-01-01T00:00:00+14:00"}
    assert _error(await api.get("/api/v1/me/stays", params=out_of_range, headers=headers)) == (
        422,
        "invalid_request",
    )

    receipt = (await api.get(f"/api/v1/me/stays/{closed[0]}", headers=headers)).json()
    assert (receipt["duration_minutes"], receipt["fee_fen"], receipt["settlement"]) == (
        90,
        1200,
        "paid_at_gate",
    )
    assert receipt["charge"] is None and receipt["status"] == "closed"
    still_inside = (await api.get(f"/api/v1/me/stays/{inside}", headers=headers)).json()
    assert still_inside["exited_at"] is None and still_inside["duration_minutes"] >= 120


async def test_the_agreement_is_signed_changed_and_cancelled_and_the_exit_follows_it(
    api: httpx.AsyncClient,
    app: FastAPI,
    runtime: Runtime,
    registry: DevRegistry,
    gate: GateProbe,
    lot: Lot,
) -> None:
    _, headers = await _new_driver(runtime, app)
    plate = unique_plate()
    await _bind(api, headers, registry, plate)
    path = "/api/v1/me/agreement"
    assert _error(await api.get(path, headers=headers)) == (404, "agreement_not_found")
    assert _error(await api.patch(path, json={"per_session_limit_fen": 100}, headers=headers)) == (
        404,
        "agreement_not_found",
    )
    bad = await api.put(path, json={"per_session_limit_fen": 0}, headers=headers)
    assert _error(bad) == (422, "invalid_request")

    signed = await api.put(path, json={"per_session_limit_fen": 5000}, headers=headers)
    assert signed.status_code == 201, signed.text
    agreement = signed.json()
    assert agreement["provider"] == "sandbox" and agreement["agreement_no"]
    assert (await api.get(path, headers=headers)).json() == agreement
    twice = await api.put(path, json={"per_session_limit_fen": 9000}, headers=headers)
    assert _error(twice) == (409, "agreement_exists")

    lowered = await api.patch(path, json={"per_session_limit_fen": 100}, headers=headers)
    assert lowered.status_code == 200 and lowered.json()["per_session_limit_fen"] == 100
    assert lowered.json()["id"] == agreement["id"]
    # ¥6 is over the new ¥1 limit: the exit holds instead of charging.
    held = await exit_after(runtime, gate, lot, plate, timedelta(minutes=30))
    assert (held["action"], held["fee_fen"]) == ("hold", 600)

    assert (await api.delete(path, headers=headers)).status_code == 204
    assert _error(await api.get(path, headers=headers)) == (404, "agreement_not_found")
    assert _error(await api.delete(path, headers=headers)) == (404, "agreement_not_found")
    async with runtime.pool.acquire() as conn:
        cancelled = await conn.fetchval(
            "SELECT cancelled_at FROM pay_later_agreements WHERE id = $1", agreement["id"]
        )
    assert cancelled is not None
    again = await api.put(path, json={"per_session_limit_fen": 3000}, headers=headers)
    assert again.status_code == 201 and again.json()["id"] != agreement["id"]


async def test_debts_are_listed_and_paid_in_the_app(
    api: httpx.AsyncClient,
    app: FastAPI,
    runtime: Runtime,
    provider: ProviderEndpoint,
    gate: GateProbe,
    lot: Lot,
) -> None:
    driver = await driver_in_debt(runtime, gate, lot)
    headers = bearer(driver_token(app, driver.account_id))
    me = (await api.get("/api/v1/me", headers=headers)).json()
    assert (me["blocked_for_arrears"], me["open_debt_fen"]) == (True, 600)
    owed = (await api.get("/api/v1/me/debts", headers=headers)).json()
    assert owed["total_fen"] == 600
    [debt] = owed["debts"]
    assert (debt["car_park"], debt["amount_fen"]) == (lot.name, 600)
    stay = (await api.get(f"/api/v1/me/stays/{debt['stay_id']}", headers=headers)).json()
    assert stay["charge"]["status"] == "failed" and stay["exited_at"] == debt["exited_at"]
    assert _error(await api.delete("/api/v1/me", headers=headers)) == (409, "settle_debts_first")
    # Unbinding would make the next exit an unbound one: fee only, debts dodged.
    [plate] = (await api.get("/api/v1/me/plates", headers=headers)).json()
    unbind = await api.delete(f"/api/v1/me/plates/{plate['id']}", headers=headers)
    assert _error(unbind) == (409, "settle_debts_first")

    started = await api.post("/api/v1/me/debts/payment", headers=headers)
    assert started.status_code == 200, started.text
    payment = started.json()
    assert (payment["amount_fen"], payment["status"]) == (600, "pending") and payment["pay_url"]
    again = (await api.post("/api/v1/me/debts/payment", headers=headers)).json()
    assert again["out_trade_no"] == payment["out_trade_no"], "the unpaid payment is reused"

    async with httpx.AsyncClient(base_url=provider.url) as wallet:
        paid = await wallet.post(f"/v1/payments/{payment['out_trade_no']}/pay")
        assert paid.status_code == 200, paid.text
    runtime.outbox.query_after_s = 0.0
    await runtime.outbox.sweep(datetime.now(UTC))

    assert (await api.get("/api/v1/me/debts", headers=headers)).json() == {
        "total_fen": 0,
        "debts": [],
    }
    assert _error(await api.post("/api/v1/me/debts/payment", headers=headers)) == (
        409,
        "no_debts",
    )
    assert not (await api.get("/api/v1/me", headers=headers)).json()["blocked_for_arrears"]


async def test_notifications_are_the_drivers_own_newest_first(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime
) -> None:
    account_id, headers = await _new_driver(runtime, app)
    other_id, _ = await _new_driver(runtime, app)
    async with runtime.pool.acquire() as conn:
        for n, owner in enumerate((account_id, account_id, other_id, account_id)):
            await notifications.enqueue(
                conn,
                account_id=owner,
                kind="debt_reminder",
                source_key=f"test:{uuid.uuid4()}",
                body=f"message {n}",
            )
    listed = (await api.get("/api/v1/me/notifications", headers=headers)).json()
    assert [n["body"] for n in listed] == ["message 3", "message 1", "message 0"]
    assert {n["kind"] for n in listed} == {"debt_reminder"} and listed[0]["status"]
    limited = await api.get("/api/v1/me/notifications", params={"limit": 1}, headers=headers)
    assert [n["body"] for n in limited.json()] == ["message 3"]


async def test_the_export_holds_everything_about_the_account_and_nothing_else(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, registry: DevRegistry, lot: Lot
) -> None:
    account_id, headers = await _new_driver(runtime, app)
    _, holder = await _new_driver(runtime, app)
    past, current, theirs = unique_plate(), unique_plate(), unique_plate()
    before = await _insert_stay(runtime, lot, current, datetime.now(UTC) - timedelta(days=2))
    old = await _bind(api, headers, registry, past)
    await api.delete(f"/api/v1/me/plates/{old['id']}", headers=headers)
    await _bind(api, headers, registry, current)
    await _bind_unregistered(api, holder, theirs)
    claimed = await api.post(
        "/api/v1/me/plates", json=_claim(theirs, dev_licence_no(theirs), "赵六"), headers=headers
    )
    assert _error(claimed) == (409, "plate_disputed")
    await api.put("/api/v1/me/agreement", json={"per_session_limit_fen": 4000}, headers=headers)
    await api.delete("/api/v1/me/agreement", headers=headers)
    await api.put("/api/v1/me/agreement", json={"per_session_limit_fen": 6000}, headers=headers)
    mine = await _insert_stay(
        runtime, lot, current, datetime.now(UTC) + timedelta(seconds=1), account_id=account_id
    )
    async with runtime.pool.acquire() as conn:
        await notifications.enqueue(
            conn,
            account_id=account_id,
            kind="debt_reminder",
            source_key=f"t:{uuid.uuid4()}",
            body="you owe",
        )

    exported = await api.get("/api/v1/me/export", headers=headers)
    assert exported.status_code == 200, exported.text
    assert exported.headers["content-disposition"].startswith("attachment")
    document = orjson.loads(exported.content)
    assert document["account"]["id"] == account_id
    assert [(b["plate"], b["unbound_at"] is not None) for b in document["bindings"]] == [
        (past, True),
        (current, False),
    ]
    assert [a["per_session_limit_fen"] for a in document["agreements"]] == [4000, 6000]
    assert [a["cancelled_at"] is not None for a in document["agreements"]] == [True, False]
    assert [s["id"] for s in document["stays"]] == [mine], "not the stay before the binding"
    assert before not in [s["id"] for s in document["stays"]]
    assert [n["body"] for n in document["notifications"]] == ["you owe"]
    assert [(d["plate"], d["role"], d["status"]) for d in document["disputes"]] == [
        (theirs, "claimant", "open")
    ]
    for key in ("charges", "payments", "debts", "refunds"):
        assert document[key] == []
    assert set(document["disputes"][0]) == {
        "id",
        "plate",
        "color",
        "role",
        "status",
        "created_at",
        "resolved_at",
    }, "the other party is not named"

    held = orjson.loads((await api.get("/api/v1/me/export", headers=holder)).content)
    assert [(d["plate"], d["role"]) for d in held["disputes"]] == [(theirs, "holder")]
    assert [b["plate"] for b in held["bindings"]] == [theirs]


async def _sign_in(api: httpx.AsyncClient, app: FastAPI, phone: str) -> dict[str, str]:
    sent = await api.post("/api/v1/auth/sign-in-codes", json={"phone": phone})
    assert sent.status_code == 202, sent.text
    answer = await api.post(
        "/api/v1/auth/token",
        json={
            "grant_type": "sign_in_code",
            "phone": phone,
            "code": app.state.sms.last_code(phone),
            "challenge_id": sent.json()["challenge_id"],
        },
    )
    assert answer.status_code == 200, answer.text
    pair: dict[str, str] = answer.json()
    return pair


async def test_a_deleted_account_loses_its_personal_data_and_signing_in_again_starts_afresh(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, registry: DevRegistry, lot: Lot
) -> None:
    phone = _phone()
    pair = await _sign_in(api, app, phone)
    headers = bearer(pair["access_token"])
    account_id = (await api.get("/api/v1/me", headers=headers)).json()["account_id"]
    plate = unique_plate()
    await _bind(api, headers, registry, plate)
    await api.put("/api/v1/me/agreement", json={"per_session_limit_fen": 5000}, headers=headers)
    _, holder = await _new_driver(runtime, app)
    theirs = unique_plate()
    await _bind_unregistered(api, holder, theirs)
    claim = _claim(theirs, dev_licence_no(theirs), "钱七")
    assert _error(await api.post("/api/v1/me/plates", json=claim, headers=headers))[0] == 409
    stay = await _insert_stay(runtime, lot, plate, datetime.now(UTC), account_id=account_id)
    async with runtime.pool.acquire() as conn:
        await notifications.enqueue(
            conn,
            account_id=account_id,
            kind="debt_reminder",
            source_key=f"t:{uuid.uuid4()}",
            body=f"{plate} reminder",
        )

    assert (await api.delete("/api/v1/me", headers=headers)).status_code == 204

    assert _error(await api.get("/api/v1/me", headers=headers)) == (401, "unauthenticated")
    refreshed = await api.post(
        "/api/v1/auth/token",
        json={"grant_type": "refresh_token", "refresh_token": pair["refresh_token"]},
    )
    assert refreshed.status_code == 401
    async with runtime.pool.acquire() as conn:
        account = await conn.fetchrow("SELECT * FROM accounts WHERE id = $1", account_id)
        bindings = await conn.fetch(
            "SELECT unbound_at FROM plate_bindings WHERE account_id = $1", account_id
        )
        agreements = await conn.fetch(
            "SELECT cancelled_at FROM pay_later_agreements WHERE account_id = $1", account_id
        )
        disputes = await conn.fetch(
            "SELECT status FROM plate_disputes WHERE claimant_account_id = $1", account_id
        )
        live_tokens = await conn.fetchval(
            "SELECT count(*) FROM refresh_tokens WHERE subject = $1 AND revoked_at IS NULL",
            f"account:{account_id}",
        )
        codes = await conn.fetchval("SELECT count(*) FROM login_codes WHERE phone = $1", phone)
        bodies = await conn.fetch(
            "SELECT body, status FROM notifications WHERE account_id = $1", account_id
        )
        kept = await conn.fetchval("SELECT account_id FROM sessions WHERE id = $1", stay)
    assert (account["phone"], account["display_name"]) == (f"deleted:{account_id}", None)
    assert account["deleted_at"] is not None
    assert bindings and all(b["unbound_at"] is not None for b in bindings)
    assert agreements and all(a["cancelled_at"] is not None for a in agreements)
    assert [d["status"] for d in disputes] == ["withdrawn"]
    assert (live_tokens, codes) == (0, 0)
    # Sent already, or never to be sent now.
    assert [n["body"] for n in bodies] == [""] and bodies[0]["status"] != "pending"
    assert kept == account_id, "money records stay"

    again = bearer((await _sign_in(api, app, phone))["access_token"])
    fresh = (await api.get("/api/v1/me", headers=again)).json()
    assert fresh["account_id"] != account_id and fresh["phone"] == phone
    assert (fresh["plates"], fresh["agreement"], fresh["open_debt_fen"]) == ([], None, 0)
    assert await _stay_ids(api, again) == []
    assert (await _bind(api, again, registry, plate))["plate"] == plate, "the plate is free"


# Not yet settled: pending, or awaiting the server's verification or an operator (which a
# "not my car" dispute can hold indefinitely); each may yet become a debt.
UNSETTLED = pytest.mark.parametrize(
    "status", ["pending", "awaiting_verification", "awaiting_confirmation"]
)


async def _unsettled_charge(
    runtime: Runtime, lot: Lot, driver: Driver, status: str, color: str = "blue"
) -> int:
    stay = await _insert_stay(
        runtime, lot, driver.plate, datetime.now(UTC), account_id=driver.account_id, color=color
    )
    async with runtime.pool.acquire() as conn:
        # Queued by no outbox job: it keeps its status for the whole test.
        charge_id: int = await conn.fetchval(
            """INSERT INTO charges (session_id, account_id, agreement_id, amount_fen,
                                    idempotency_key, status)
               VALUES ($1, $2, $3, 1200, $4, $5) RETURNING id""",
            stay,
            driver.account_id,
            driver.agreement_id,
            f"test-{uuid.uuid4().hex}",
            status,
        )
    return charge_id


@UNSETTLED
async def test_an_account_is_not_deleted_while_a_charge_is_in_flight(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, lot: Lot, status: str
) -> None:
    driver = await make_driver(runtime, unique_plate())
    await _unsettled_charge(runtime, lot, driver, status)
    headers = bearer(driver_token(app, driver.account_id))
    assert _error(await api.delete("/api/v1/me", headers=headers)) == (409, "charges_pending")
    assert (await api.get("/api/v1/me", headers=headers)).status_code == 200


async def test_without_a_configured_registry_no_plate_can_be_bound(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime
) -> None:
    """The dev registry proves any plate with `DEV-<plate>`: outside dev runs it is refused."""
    runtime.settings.dev_adapters = False
    _, headers = await _new_driver(runtime, app)
    plate = unique_plate()
    answer = await api.post(
        "/api/v1/me/plates", json=_claim(plate, dev_licence_no(plate)), headers=headers
    )
    assert _error(answer) == (503, "vehicle_registry_unavailable")


@UNSETTLED
async def test_a_plate_is_not_unbound_while_a_charge_on_it_is_pending(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, lot: Lot, status: str
) -> None:
    driver = await make_driver(runtime, unique_plate())
    charge_id = await _unsettled_charge(runtime, lot, driver, status)
    headers = bearer(driver_token(app, driver.account_id))
    [binding] = (await api.get("/api/v1/me/plates", headers=headers)).json()
    unbind = await api.delete(f"/api/v1/me/plates/{binding['id']}", headers=headers)
    assert _error(unbind) == (409, "charges_pending")
    async with runtime.pool.acquire() as conn:
        await conn.execute("UPDATE charges SET status = 'succeeded' WHERE id = $1", charge_id)
    assert (
        await api.delete(f"/api/v1/me/plates/{binding['id']}", headers=headers)
    ).status_code == 204


async def test_a_pending_charge_of_another_colours_vehicle_does_not_hold_an_unbinding(
    api: httpx.AsyncClient, app: FastAPI, runtime: Runtime, lot: Lot
) -> None:
    """A yellow lorry of the same characters is another vehicle: its charge in flight is none
    of the blue car's holder's business (before, it kept them from unbinding their plate)."""
    driver = await make_driver(runtime, unique_plate())
    await _unsettled_charge(runtime, lot, driver, "pending", color="yellow")
    headers = bearer(driver_token(app, driver.account_id))
    [binding] = (await api.get("/api/v1/me/plates", headers=headers)).json()
    unbind = await api.delete(f"/api/v1/me/plates/{binding['id']}", headers=headers)
    assert unbind.status_code == 204, unbind.text


async def test_binding_and_disputing_a_plate_log_only_its_pseudonym(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient
) -> None:
    """The lines name the vehicle by its pseudonym at the call, not through the masking
    processor alone: a process whose logging is not configured as ours has no such net."""
    plate = unique_plate()
    _, holder = await _new_driver(runtime, app)
    _, claimant = await _new_driver(runtime, app)
    with structlog.testing.capture_logs() as logged:
        await _bind_unregistered(api, holder, plate)
        claim = _claim(plate, dev_licence_no(plate), "孙八")
        claimed = await api.post("/api/v1/me/plates", json=claim, headers=claimant)
    assert _error(claimed) == (409, "plate_disputed")
    lines = {line["event"]: line for line in logged}
    assert lines["drivers.plate_bound"]["plate"] == pseudonym(plate)
    assert lines["drivers.plate_disputed"]["plate"] == pseudonym(plate)
    assert plate not in repr(logged)


async def test_a_message_queued_while_the_account_is_being_deleted_is_not_left_behind(
    runtime: Runtime,
) -> None:
    """A reminder is queued while the account's deletion is under way (its messages erased,
    not yet committed): it waits for the deletion and is not written. Before, it was written
    after the erasure, naming the plate in clear for an account deleted a moment earlier."""
    driver = await make_driver(runtime, unique_plate())
    deleting = await runtime.pool.acquire()
    queueing = await runtime.pool.acquire()
    try:
        deletion = deleting.transaction()
        await deletion.start()
        await drivers_service.delete_account(deleting, driver.account_id)

        async def remind() -> int | None:
            async with queueing.transaction():
                return await notifications.enqueue(
                    queueing,
                    account_id=driver.account_id,
                    kind="pass_expiring",
                    source_key=f"test:{uuid.uuid4().hex}",
                    body=f"{driver.plate} 月卡 将于明天到期，请在App续费",
                )

        reminding = asyncio.create_task(remind())
        await asyncio.sleep(0.2)  # the reminder is queued behind the deletion
        await deletion.commit()
        queued = await asyncio.wait_for(reminding, 10)
    finally:
        await runtime.pool.release(deleting)
        await runtime.pool.release(queueing)
    async with runtime.pool.acquire() as conn:
        written = await conn.fetchval(
            "SELECT count(*) FROM notifications WHERE account_id = $1 AND body <> ''",
            driver.account_id,
        )
    assert (queued, written) == (None, 0)


async def test_a_deleted_accounts_messages_keep_no_plate_or_receipt_link_in_their_fields(
    runtime: Runtime, gate: GateProbe, lot: Lot, app: FastAPI, api: httpx.AsyncClient
) -> None:
    """Deleting the account erases its messages' texts (they name plates and places). The
    charge message also keeps its SMS template's fields (`notifications.params`): the plate in
    clear, the car park, the time and the receipt link. They must go with the text."""
    driver = await make_driver(runtime, unique_plate())
    await exit_with_frames(runtime, gate, lot, driver.plate, timedelta(minutes=40))
    token = await receipt_token_of(runtime, driver)  # the charge was collected and told
    deleted = await api.delete("/api/v1/me", headers=bearer(driver_token(app, driver.account_id)))
    assert deleted.status_code == 204, deleted.text
    async with runtime.pool.acquire() as conn:
        kept = await conn.fetch(
            "SELECT kind, body, params::text AS params FROM notifications WHERE account_id = $1",
            driver.account_id,
        )
    assert kept and all(row["body"] == "" for row in kept)
    leftovers = [row["params"] for row in kept if row["params"] not in (None, "null", "{}")]
    for params in leftovers:
        assert driver.plate not in params, params
        assert token not in params, params
    assert leftovers == [], "a deleted account's messages keep none of their fields"
