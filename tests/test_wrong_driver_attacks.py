"""Issue #15's adversarial findings, each tried the way the review described it and as an
attacker would try next (numbered by the finding: f1 a consistent misread, f2 colour, f3 the
margin, f4 no entry record and look-alikes, f5 the fixed fee, f6 ownership disputes, f7 gate
clocks, f8 the plate type's discount, f9 whose binding pays), through the real lane, worker and
servers with conftest's settings (cameras calibrated; test_wrong_driver_attacks_uncalibrated.py
has the production default)."""

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI

from billing.tariff import Tariff
from parking.admin import repository as admin
from parking.runtime import Runtime
from tests.conftest import (
    Driver,
    Lot,
    bearer,
    driver_token,
    enter,
    eventually,
    make_driver,
    make_staff,
    set_car_park,
    staff_token,
    unique_plate,
)
from tests.gates import GateProbe


async def _charges(runtime: Runtime, *drivers: Driver) -> list[dict[str, Any]]:
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT * FROM charges WHERE account_id = ANY($1) ORDER BY id",
            [d.account_id for d in drivers],
        )
    return [dict(r) for r in rows]


async def _debts(runtime: Runtime, driver: Driver) -> list[dict[str, Any]]:
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM debts WHERE account_id = $1", driver.account_id)
    return [dict(r) for r in rows]


async def _blocked(runtime: Runtime, driver: Driver) -> bool:
    async with runtime.pool.acquire() as conn:
        return bool(
            await conn.fetchval(
                "SELECT blocked_for_arrears FROM accounts WHERE id = $1", driver.account_id
            )
        )


async def _open_stays(runtime: Runtime, lot: Lot) -> list[tuple[str, str]]:
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT plate, plate_color FROM sessions WHERE car_park_id = $1 AND status = 'open'"
            " ORDER BY plate, plate_color",
            lot.id,
        )
    return [(r["plate"], r["plate_color"]) for r in rows]


async def _outcome(runtime: Runtime, capture_id: object) -> str | None:
    async with runtime.pool.acquire() as conn:
        outcome: str | None = await conn.fetchval(
            "SELECT outcome FROM captures WHERE capture_id = $1", capture_id
        )
    return outcome


async def _backdate_binding(runtime: Runtime, plate: str, by: timedelta) -> None:
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE plate_bindings SET bound_at = bound_at - $2::interval WHERE plate = $1",
            plate,
            by,
        )


# 1. One consistent misread charges a stranger: the held exit of a misread stay becomes the
# bound plate's owner's debt when the owner's own car next comes in.


async def _misread_held_then_owner_enters(
    runtime: Runtime, gate: GateProbe, lot: Lot, owner: Driver, confidence: float
) -> dict[str, Any]:
    await _backdate_binding(runtime, owner.plate, timedelta(days=30))
    # A stranger's car read as the owner's plate at `confidence`, at entry and at exit.
    await enter(runtime, gate, lot, owner.plate, confidence=confidence)
    held = await gate.decide(
        lot.code, "out1", gate.capture("out", owner.plate, confidence=confidence)
    )
    assert held["action"] == "hold", held
    # The stranger's car leaves without paying (tailgating, a barrier lifted by hand);
    # the owner's own car comes in later, read with certainty.
    command = await gate.decide(lot.code, "in1", gate.capture("in", owner.plate, confidence=0.99))
    assert command["action"] == "open"
    return held


async def test_f1_doubtful_misread_held_for_no_agreement_never_becomes_the_owners_debt(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    owner = await make_driver(runtime, unique_plate(), pay_later=False)
    await _misread_held_then_owner_enters(runtime, gate, lot, owner, 0.85)
    assert await _debts(runtime, owner) == [], "a debt on two reads that were never certain"
    assert not await _blocked(runtime, owner)


async def test_f1_doubtful_misread_held_over_the_limit_never_becomes_the_owners_debt(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    owner = await make_driver(runtime, unique_plate(), limit_fen=1000)  # stay costs ¥12
    await _misread_held_then_owner_enters(runtime, gate, lot, owner, 0.82)
    assert await _debts(runtime, owner) == []
    assert await _charges(runtime, owner) == []


async def test_f1_misread_at_085_charges_nothing_without_a_person(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    owner = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, owner.plate, confidence=0.85)
    await gate.decide(lot.code, "out1", gate.capture("out", owner.plate, confidence=0.85))
    (charge,) = await _charges(runtime, owner)
    assert charge["status"] == "awaiting_confirmation"


async def test_f1_misread_entry_ghost_never_charges_the_plates_owner(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """皖ACC998-like: the real car enters misread as the owner's plate, leaves read right (no
    entry record). The owner's own later visit is charged once, never for the ghost."""
    owner = await make_driver(runtime, unique_plate())
    real = unique_plate()
    await enter(runtime, gate, lot, owner.plate, confidence=0.85, parked_for=timedelta(hours=5))
    left = await gate.decide(lot.code, "out1", gate.capture("out", real, confidence=0.99))
    assert left["action"] == "hold"
    # The owner comes in and leaves 30 minutes later.
    await enter(runtime, gate, lot, owner.plate, confidence=0.99, parked_for=timedelta(minutes=30))
    out = await gate.decide(lot.code, "out1", gate.capture("out", owner.plate, confidence=0.99))
    assert (out["action"], out["fee_fen"]) == ("open", 600)
    assert [c["amount_fen"] for c in await _charges(runtime, owner)] == [600]
    assert await _debts(runtime, owner) == []


# 2. Colour is part of a plate's identity.


async def test_f2_a_yellow_lorry_read_certain_never_charges_the_blue_owner(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    owner = await make_driver(runtime, "浙X" + unique_plate()[2:])
    await enter(runtime, gate, lot, owner.plate, confidence=0.99, color="yellow")
    out = await gate.decide(
        lot.code, "out1", gate.capture("out", owner.plate, confidence=0.99, color="yellow")
    )
    assert out["action"] == "hold"
    # The lorry tailgates out; the blue car comes in: no debt for the lorry's stay.
    await enter(runtime, gate, lot, owner.plate, confidence=0.99, color="blue")
    assert await _charges(runtime, owner) == []
    assert await _debts(runtime, owner) == []


async def test_f2_the_lorrys_owner_binds_the_yellow_plate_of_a_bound_blue_text(
    runtime: Runtime, api: httpx.AsyncClient, app: FastAPI
) -> None:
    from parking.drivers.verification import dev_licence_no

    plate = unique_plate()
    ids = []
    for _ in range(2):
        async with runtime.pool.acquire() as conn:
            ids.append(await admin.create_account(conn, f"137{uuid.uuid4().int % 10**8:08d}"))
    for account_id, color in zip(ids, ("blue", "yellow"), strict=True):
        answer = await api.post(
            "/api/v1/me/plates",
            json={
                "plate": plate,
                "color": color,
                "licence_no": dev_licence_no(plate),
                "owner_name": "车主",
            },
            headers=bearer(driver_token(app, account_id)),
        )
        assert answer.status_code == 201, (color, answer.text)


# 3. No margin check from 0.80.


async def test_f3_a_read_of_an_absent_look_alike_is_never_the_parked_one(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    serial = unique_plate()[2:]
    parked = await make_driver(runtime, "浙U" + serial[:2] + "8" + serial[3:])
    await enter(runtime, gate, lot, parked.plate)
    look_alike = parked.plate[:4] + "B" + parked.plate[5:]
    for confidence in (0.80, 0.85, 0.89, 0.95, 0.97):
        capture = gate.capture("out", look_alike, confidence=confidence)
        command = await gate.decide(lot.code, "out1", capture)
        assert command["action"] == "hold", confidence
    assert await _charges(runtime, parked) == []
    assert await _open_stays(runtime, lot) == [(parked.plate, "blue")]


async def test_f3_two_parked_look_alikes_at_scores_below_certain(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    serial = unique_plate()[2:]
    first = await make_driver(runtime, "浙U" + serial[:2] + "8" + serial[3:])
    second = await make_driver(runtime, "浙U" + serial[:2] + "B" + serial[3:])
    for driver in (first, second):
        await enter(runtime, gate, lot, driver.plate)
    for confidence in (0.90, 0.93, 0.979):
        command = await gate.decide(
            lot.code, "out1", gate.capture("out", second.plate, confidence=confidence)
        )
        assert command["action"] == "hold", confidence
    assert await _charges(runtime, first, second) == []


# 4. A car with no entry record is bent onto the one parked look-alike.


async def test_f4_province_swaps_and_look_alikes_are_no_entry_at_any_score(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    parked = await make_driver(runtime, "浙W" + unique_plate()[2:])
    await enter(runtime, gate, lot, parked.plate)
    serial = parked.plate[1:]
    strangers = [
        ("皖" + serial, 0.95),
        ("皖" + serial, 0.99),
        ("沪" + serial, 0.7),  # same radical as 浙
        ("湘" + serial, 0.85),
    ]
    for plate, confidence in strangers:
        command = await gate.decide(
            lot.code, "out1", gate.capture("out", plate, confidence=confidence)
        )
        assert command["action"] == "hold", (plate, confidence)
    assert await _charges(runtime, parked) == []
    real = await gate.decide(lot.code, "out1", gate.capture("out", parked.plate))
    assert (real["action"], real["fee_fen"]) == ("open", 1200)
    assert [c["amount_fen"] for c in await _charges(runtime, parked)] == [1200]


# 5. Fixed-fee no-entry charging on one read.


async def test_f5_fixed_fee_on_doubtful_or_certain_reads_never_reaches_the_account(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    await set_car_park(runtime, lot, no_entry_policy="fixed_fee", no_entry_fee_fen=2000)
    driver = await make_driver(runtime, unique_plate())
    await _backdate_binding(runtime, driver.plate, timedelta(days=30))
    doubtful = await gate.decide(
        lot.code, "out1", gate.capture("out", driver.plate, confidence=0.85)
    )
    assert doubtful["action"] == "hold"
    certain = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert (certain["action"], certain["fee_fen"]) == ("hold", 2000)
    # The stranger leaves unpaid; the real car comes in and leaves later.
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=30))
    assert await _debts(runtime, driver) == []
    assert await _charges(runtime, driver) == []


async def test_f5_fixed_fee_offline_upload_never_charges_the_bound_plate(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    await set_car_park(runtime, lot, no_entry_policy="fixed_fee", no_entry_fee_fen=2000)
    driver = await make_driver(runtime, unique_plate())
    await _backdate_binding(runtime, driver.plate, timedelta(days=30))
    upload = gate.capture("out", driver.plate).model_copy(
        update={"offline": True, "offline_action": "open"}
    )
    await gate.decide(lot.code, "out1", upload)
    assert await _charges(runtime, driver) == []
    assert await _debts(runtime, driver) == []


# 7. Offline captures priced by the gate's clock.


async def test_f7_an_offline_entry_with_a_clock_26h_behind_never_prices_a_day(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """The entry gate was offline for a moment, its clock 26 h behind; the car stays 30
    minutes. The gate was online and answering live captures just before."""
    driver = await make_driver(runtime, unique_plate())
    await _backdate_binding(runtime, driver.plate, timedelta(days=30))
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE pay_later_agreements SET signed_at = signed_at - interval '30 days'"
            " WHERE id = $1",
            driver.agreement_id,
        )
    live = await gate.decide(lot.code, "in1", gate.capture("in", unique_plate()))
    assert live["action"] == "open"
    upload = gate.capture("in", driver.plate).model_copy(
        update={
            "offline": True,
            "offline_action": "open",
            "captured_at": datetime.now(UTC) - timedelta(hours=26),
        }
    )
    await gate.decide(lot.code, "in1", upload)
    async with runtime.pool.acquire() as conn:
        skews = await conn.fetchval(
            "SELECT count(*) FROM gate_clock_skews WHERE capture_id = $1", upload.capture_id
        )
    out = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert out["fee_fen"] <= 600 or skews == 1, (out["fee_fen"], "no skew flagged")
    assert out["fee_fen"] <= 600, out


async def test_f7_an_offline_exit_with_a_clock_behind_but_after_entry_is_not_free(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """A 3-hour stay; the exit gate's clock 2 h 50 behind. Its previous capture, answered live
    a minute ago with a lower seq, proves the gate's time wrong."""
    async with runtime.pool.acquire() as conn:
        await admin.create_tariff(
            conn,
            lot.id,
            effective_from=datetime.now(UTC) - timedelta(days=1),
            tariff=Tariff.hourly(free_minutes=15, hourly_fen=600, daily_cap_fen=5000),
        )
    runtime.lanes.service.forget_tariffs(lot.id)
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=3))
    await gate.decide(lot.code, "out1", gate.capture("out", unique_plate()))  # live, seq n
    upload = gate.capture("out", driver.plate).model_copy(
        update={
            "offline": True,
            "offline_action": "open",
            "captured_at": datetime.now(UTC) - timedelta(hours=2, minutes=50),
        }
    )
    command = await gate.decide(lot.code, "out1", upload)
    assert command["fee_fen"] == 1800, command


async def test_f7_an_offline_entry_with_a_clock_26h_ahead_is_clamped(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    plate = unique_plate()
    upload = gate.capture("in", plate).model_copy(
        update={
            "offline": True,
            "offline_action": "open",
            "captured_at": datetime.now(UTC) + timedelta(hours=26),
        }
    )
    await gate.decide(lot.code, "in1", upload)
    async with runtime.pool.acquire() as conn:
        entered = await conn.fetchval(
            "SELECT entered_at FROM sessions WHERE entry_capture_id = $1", upload.capture_id
        )
        skews = await conn.fetchval(
            "SELECT count(*) FROM gate_clock_skews WHERE capture_id = $1", upload.capture_id
        )
    assert entered <= datetime.now(UTC) and skews == 1


# 8. The new-energy discount follows the camera's colour guess.


async def test_f8_a_bound_blue_plate_read_green_at_both_ends_pays_full_price(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    async with runtime.pool.acquire() as conn:
        await admin.create_tariff(
            conn,
            lot.id,
            effective_from=datetime.now(UTC) - timedelta(days=1),
            tariff=Tariff.hourly(free_minutes=0, hourly_fen=600).model_copy(
                update={"colour_discount_percent": {"green": 50}}
            ),
        )
    runtime.lanes.service.forget_tariffs(lot.id)
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, confidence=0.99, color="green")
    out = await gate.decide(
        lot.code, "out1", gate.capture("out", driver.plate, confidence=0.99, color="green")
    )
    assert out["fee_fen"] == 1200, out


async def test_f8_a_seven_character_plate_cannot_be_bound_as_green(
    runtime: Runtime, api: httpx.AsyncClient, app: FastAPI
) -> None:
    from parking.drivers.verification import dev_licence_no

    plate = unique_plate()
    async with runtime.pool.acquire() as conn:
        account_id = await admin.create_account(conn, f"137{uuid.uuid4().int % 10**8:08d}")
    answer = await api.post(
        "/api/v1/me/plates",
        json={
            "plate": plate,
            "color": "green",
            "licence_no": dev_licence_no(plate),
            "owner_name": "车主",
        },
        headers=bearer(driver_token(app, account_id)),
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"]


# 9. The account charged is whoever holds the binding at exit.


async def test_f9_an_agreement_signed_minutes_before_the_exit_pays_nothing(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    driver = await make_driver(runtime, unique_plate(), pay_later=False)
    await _backdate_binding(runtime, driver.plate, timedelta(days=30))
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(days=2))
    late = await make_driver(runtime, unique_plate())  # a fresh agreement, moved over
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE pay_later_agreements SET account_id = $1 WHERE id = $2",
            driver.account_id,
            late.agreement_id,
        )
    out = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert out["action"] == "hold", out
    assert await _charges(runtime, driver) == []


async def test_f9_a_plate_handed_over_during_a_stay_charges_neither_holder(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    first = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, first.plate, parked_for=timedelta(days=2))
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE plate_bindings SET unbound_at = now() WHERE plate = $1", first.plate
        )
    second = await make_driver(runtime, first.plate)  # bound minutes before the exit
    out = await gate.decide(lot.code, "out1", gate.capture("out", first.plate))
    assert out["action"] == "hold", out
    assert await _charges(runtime, first, second) == []


# Bad input.


async def test_bad_input_unknown_receipts_and_bad_dispute_ids_change_nothing(
    runtime: Runtime, api: httpx.AsyncClient, app: FastAPI, lot: Lot
) -> None:
    async with runtime.pool.acquire() as conn:
        before = await conn.fetchval("SELECT count(*) FROM charge_disputes")
        account_id = await admin.create_account(conn, f"137{uuid.uuid4().int % 10**8:08d}")
    me = bearer(driver_token(app, account_id))
    for method, path, status, code in (
        ("post", "/api/v1/receipts/" + "y" * 32 + "/dispute", 404, "receipt_not_found"),
        ("post", "/r/" + "y" * 32 + "/dispute", 404, "receipt_not_found"),
        ("get", "/api/v1/receipts/short", 422, "invalid_request"),
        ("post", "/api/v1/me/stays/0/dispute", 422, "invalid_request"),
        ("post", "/api/v1/me/stays/999999999/dispute", 404, None),
    ):
        answer = await getattr(api, method)(path, headers=me)
        assert answer.status_code == status, (path, answer.text)
        assert answer.headers["content-type"].startswith("application/json"), path
        body = answer.json()
        assert set(body) == {"error"} and body["error"]["code"], (path, body)
        if code:
            assert body["error"]["code"] == code, (path, body)
    for plate in ("浙a 1234", "浙A1234567", "ABC", "浙A12345\u0000"):
        answer = await api.post(
            "/api/v1/me/plates",
            json={"plate": plate, "color": "blue", "licence_no": "X", "owner_name": "Y"},
            headers=me,
        )
        assert answer.status_code == 422, (plate, answer.text)
        assert set(answer.json()) == {"error"}
    async with runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM charge_disputes") == before
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM plate_disputes WHERE claimant_account_id = $1", account_id
            )
            == 0
        )


# 6. Ownership disputes that never end.


async def _account(
    runtime: Runtime, app: FastAPI, *, pay_later: bool
) -> tuple[int, dict[str, str]]:
    async with runtime.pool.acquire() as conn:
        account_id = await admin.create_account(conn, f"137{uuid.uuid4().int % 10**8:08d}")
        if pay_later:
            await conn.execute(
                """INSERT INTO pay_later_agreements (account_id, provider, agreement_no,
                                                     per_session_limit_fen, signed_at)
                   VALUES ($1, 'sandbox', $2, 20000, now() - interval '30 days')""",
                account_id,
                f"AGR-{uuid.uuid4().hex[:12]}",
            )
    return account_id, bearer(driver_token(app, account_id))


def _claim(plate: str, licence_no: str, owner: str) -> dict[str, str]:
    return {"plate": plate, "color": "blue", "licence_no": licence_no, "owner_name": owner}


async def test_f6_a_stay_that_straddles_the_proof_is_never_the_sellers(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    from parking.drivers.verification import registry_of

    registry: Any = registry_of(app)
    plate = unique_plate()
    seller_id, seller = await _account(runtime, app, pay_later=True)
    _buyer_id, buyer = await _account(runtime, app, pay_later=True)
    registry.register(plate, "blue", "SELLER-LIC", "卖家")
    bound = await api.post(
        "/api/v1/me/plates", json=_claim(plate, "SELLER-LIC", "卖家"), headers=seller
    )
    assert bound.status_code == 201, bound.text
    await _backdate_binding(runtime, plate, timedelta(days=30))
    # The car (already the buyer's) comes in; the buyer proves ownership while it is parked.
    await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=2))
    registry.register(plate, "blue", "BUYER-LIC", "买家")
    taken = await api.post(
        "/api/v1/me/plates", json=_claim(plate, "BUYER-LIC", "买家"), headers=buyer
    )
    assert taken.status_code == 201, taken.text
    out = await gate.decide(lot.code, "out1", gate.capture("out", plate))
    async with runtime.pool.acquire() as conn:
        charged = await conn.fetch(
            "SELECT account_id FROM charges WHERE account_id = $1", seller_id
        )
    assert charged == [], "the previous holder charged after the proof"
    assert out["action"] in ("open", "hold")


async def test_f6_after_the_platform_decides_the_seller_cannot_take_the_plate_back(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    from parking.drivers.verification import dev_licence_no

    plate = unique_plate()
    seller_id, seller = await _account(runtime, app, pay_later=True)
    buyer_id, buyer = await _account(runtime, app, pay_later=True)
    assert (
        await api.post(
            "/api/v1/me/plates", json=_claim(plate, dev_licence_no(plate), "卖家"), headers=seller
        )
    ).status_code == 201
    disputed = await api.post(
        "/api/v1/me/plates", json=_claim(plate, dev_licence_no(plate), "买家"), headers=buyer
    )
    assert disputed.status_code == 409, disputed.text
    dispute_id = disputed.json()["error"]["details"]["dispute_id"]
    async with runtime.pool.acquire() as conn:
        company = await admin.create_operator(conn, f"城市平台-{uuid.uuid4().hex[:8]}")
    platform = bearer(staff_token(app, await make_staff(runtime, company, "platform")))
    decided = await api.post(
        f"/api/v1/operator/ownership-claims/{dispute_id}/decision",
        json={"in_favour_of": "claimant", "reason": "过户已核实"},
        headers=platform,
    )
    assert decided.status_code == 200, decided.text
    # The seller tries to take it back with the same proof as before.
    again = await api.post(
        "/api/v1/me/plates", json=_claim(plate, dev_licence_no(plate), "卖家"), headers=seller
    )
    assert again.status_code == 409, again.text
    async with runtime.pool.acquire() as conn:
        holders = await conn.fetch(
            "SELECT account_id FROM plate_bindings WHERE plate = $1 AND unbound_at IS NULL", plate
        )
    assert [h["account_id"] for h in holders] == [buyer_id]
    # The buyer's next stay (entered after the proof) is the buyer's.
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE plate_bindings SET bound_at = bound_at - interval '3 hours' WHERE plate = $1"
            " AND unbound_at IS NULL",
            plate,
        )
    await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=1))
    await gate.decide(lot.code, "out1", gate.capture("out", plate))

    async def charged() -> list[dict[str, Any]]:
        async with runtime.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT c.account_id FROM charges c JOIN sessions s ON s.id = c.session_id"
                " WHERE s.plate = $1",
                plate,
            )
        return [dict(r) for r in rows]

    assert [c["account_id"] for c in await eventually(charged)] == [buyer_id]
    assert seller_id != buyer_id


async def test_f7_a_fast_clock_on_a_gate_offline_for_hours_never_charges_the_hours(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """A 30-minute stay; the exit gate lost its link right after the car left and came back
    10 hours later; its clock is 26 h fast. The server can prove the stay began 10.5 h ago and
    ended before the upload, not that it lasted 10.5 h."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=10, minutes=30))
    upload = gate.capture("out", driver.plate).model_copy(
        update={
            "offline": True,
            "offline_action": "open",
            "captured_at": datetime.now(UTC) - timedelta(hours=10) + timedelta(hours=26),
        }
    )
    command = await gate.decide(lot.code, "out1", upload)
    charges = await _charges(runtime, driver)
    automatic = [
        c for c in charges if c["status"] not in ("awaiting_confirmation", "awaiting_verification")
    ]
    assert not (command["fee_fen"] > 600 and automatic), (
        command["fee_fen"],
        [c["status"] for c in charges],
    )


async def test_bad_input_unknown_or_malformed_captures_in_payment_links(
    runtime: Runtime, api: httpx.AsyncClient
) -> None:
    unknown = str(uuid.uuid4())
    for method, path, status in (
        ("get", f"/api/v1/gate-payments/{unknown}", 404),
        ("post", f"/api/v1/gate-payments/{unknown}", 404),
        ("get", "/api/v1/gate-payments/not-a-uuid", 422),
        ("post", "/api/v1/gate-payments/not-a-uuid", 422),
    ):
        answer = await getattr(api, method)(path)
        assert answer.status_code == status, (path, answer.text)
        assert set(answer.json()) == {"error"}, (path, answer.text)
    page = await api.get(f"/pay/{unknown}")
    assert page.status_code == 404, page.text
    async with runtime.pool.acquire() as conn:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM payments WHERE capture_id = $1", uuid.UUID(unknown)
            )
            == 0
        )


async def test_f6_a_claim_the_registry_refutes_opens_no_dispute_against_the_owner(
    runtime: Runtime, api: httpx.AsyncClient, app: FastAPI
) -> None:
    from parking.drivers.verification import dev_licence_no, registry_of

    registry: Any = registry_of(app)
    plate = unique_plate()
    owner_id, owner = await _account(runtime, app, pay_later=False)
    griefer_id, griefer = await _account(runtime, app, pay_later=False)
    registry.register(plate, "blue", "OWNER-LIC", "车主")
    assert (
        await api.post("/api/v1/me/plates", json=_claim(plate, "OWNER-LIC", "车主"), headers=owner)
    ).status_code == 201
    for licence in ("WRONG-LIC", dev_licence_no(plate)):
        answer = await api.post(
            "/api/v1/me/plates", json=_claim(plate, licence, "别人"), headers=griefer
        )
        assert answer.status_code in (403, 409, 422), answer.text
        assert set(answer.json()) == {"error"}
    async with runtime.pool.acquire() as conn:
        opened = await conn.fetchval(
            "SELECT count(*) FROM plate_disputes WHERE claimant_account_id = $1", griefer_id
        )
    assert opened == 0, "the registry's owner is disputed by anyone"
    plates = (await api.get("/api/v1/me/plates", headers=owner)).json()
    assert [p["disputed"] for p in plates] == [False]
    assert owner_id != griefer_id


async def test_f6_a_stay_held_after_the_proof_never_becomes_the_sellers_debt(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    """The car (the buyer's) is parked when the registry proves the buyer the owner; it is
    held at the exit (nobody's binding covers its entry), slips out unpaid, and comes in
    again: the debt must not land on the previous holder."""
    from parking.drivers.verification import registry_of

    registry: Any = registry_of(app)
    plate = unique_plate()
    seller_id, seller = await _account(runtime, app, pay_later=True)
    buyer_id, buyer = await _account(runtime, app, pay_later=True)
    registry.register(plate, "blue", "SELLER-LIC", "卖家")
    bound = await api.post(
        "/api/v1/me/plates", json=_claim(plate, "SELLER-LIC", "卖家"), headers=seller
    )
    assert bound.status_code == 201, bound.text
    await _backdate_binding(runtime, plate, timedelta(days=30))
    await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=2))
    registry.register(plate, "blue", "BUYER-LIC", "买家")
    taken = await api.post(
        "/api/v1/me/plates", json=_claim(plate, "BUYER-LIC", "买家"), headers=buyer
    )
    assert taken.status_code == 201, taken.text
    held = await gate.decide(lot.code, "out1", gate.capture("out", plate))
    assert held["action"] == "hold", held
    await gate.decide(lot.code, "in1", gate.capture("in", plate))
    async with runtime.pool.acquire() as conn:
        debts = await conn.fetch("SELECT * FROM debts WHERE account_id = $1", seller_id)
        blocked = await conn.fetchval(
            "SELECT blocked_for_arrears FROM accounts WHERE id = $1", seller_id
        )
    assert debts == [] and not blocked, "the previous holder owes the buyer's stay"
    assert buyer_id != seller_id
