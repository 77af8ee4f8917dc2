"""The edges of the lane (issues #15 and #16): a held stay left without paying, booth payments,
offline captures sent to the booth, ghost stays and gate clocks that are wrong."""

import asyncio
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from billing import charges, ledger, reconcile, reports
from parking.booth import ghosts
from parking.runtime import Runtime
from tests.conftest import (
    Driver,
    Lot,
    bearer,
    charges_of,
    create_lot,
    decide_dispute,
    driver_token,
    enter,
    eventually,
    holding,
    make_driver,
    make_staff,
    reject_awaiting,
    server_errors,
    staff_token,
    stay_debt,
    unique_plate,
    waiting_on_a_lock,
)
from tests.gates import GateProbe


async def _attendant(runtime: Runtime, app: FastAPI, lot: Lot) -> dict[str, str]:
    return bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))


async def _stay(runtime: Runtime, lot: Lot, plate: str) -> asyncpg.Record:
    """The plate's earliest stay in the car park."""
    async with runtime.pool.acquire() as conn:
        row: asyncpg.Record = await conn.fetchrow(
            """SELECT * FROM sessions WHERE car_park_id = $1 AND plate = $2
               ORDER BY entered_at LIMIT 1""",
            lot.id,
            plate,
        )
    return row


async def _exceptions(runtime: Runtime, lot: Lot, reason: str) -> list[asyncpg.Record]:
    async with runtime.pool.acquire() as conn:
        rows: list[asyncpg.Record] = await conn.fetch(
            "SELECT * FROM lane_exceptions WHERE car_park_id = $1 AND reason = $2 ORDER BY id",
            lot.id,
            reason,
        )
    return rows


# 1. A held stay never paid does not vanish.


async def _left_unpaid(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> tuple[Driver, dict[str, Any]]:
    """A driver without pay-later held at the exit for ¥12.00, whose car tailgated out and came
    back: the driver, and the gate's answer to the entry."""
    driver = await make_driver(runtime, unique_plate(), pay_later=False)
    async with runtime.pool.acquire() as conn:  # bound since long before the entry
        await conn.execute(
            "UPDATE plate_bindings SET bound_at = bound_at - interval '1 day' WHERE plate = $1",
            driver.plate,
        )
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=90))
    held = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert (held["action"], held["fee_fen"]) == ("hold", 1200)
    again = await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
    assert again["action"] == "open"
    return driver, again


async def test_a_held_stay_left_unpaid_is_a_debt_of_the_account_bound_at_its_entry(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    driver, again = await _left_unpaid(runtime, gate, lot)
    assert "欠费 ¥12.00 请在App缴纳" in again["display"], "the debt shows at once"
    stay = await _stay(runtime, lot, driver.plate)
    assert (stay["status"], stay["settlement"], stay["fee_fen"], stay["account_id"]) == (
        "superseded",
        "debt",
        1200,
        driver.account_id,
    )
    async with runtime.pool.acquire() as conn:
        debt = await conn.fetchrow(
            "SELECT amount_fen, session_id, settled_at FROM debts WHERE account_id = $1",
            driver.account_id,
        )
        blocked = await conn.fetchval(
            "SELECT blocked_for_arrears FROM accounts WHERE id = $1", driver.account_id
        )
        receivable = await ledger.balance(conn, ledger.receivable(driver.account_id))
        assert await ledger.is_balanced(conn)
    assert (debt["amount_fen"], debt["session_id"], debt["settled_at"]) == (1200, stay["id"], None)
    assert blocked and receivable == 1200
    listed = await api.get("/api/v1/me/debts", headers=bearer(driver_token(app, driver.account_id)))
    assert listed.json()["total_fen"] == 1200
    assert await _exceptions(runtime, lot, "unpaid_exit") == []


async def test_not_my_car_on_a_missed_stays_debt_holds_it_until_an_operator_decides(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    """A missed stay's debt has no charge behind it. Before, its "not my car" was a 404 (only
    charges could be disputed): a stranger's tailgating left the wrong driver owing and
    blocked, with no one able to end it. Now it is disputed like a failed charge's debt: on
    hold (no block, not asked for) until an admin decides; the driver right, it is waived and
    its accrual reversed; the debt standing, it is owed again."""
    admin = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
    for outcome, owed_after in (("driver_right", 0), ("charge_stands", 1200)):
        driver, _ = await _left_unpaid(runtime, gate, lot)
        stay = await _stay(runtime, lot, driver.plate)
        headers = bearer(driver_token(app, driver.account_id))
        shown = (await api.get(f"/api/v1/me/stays/{stay['id']}", headers=headers)).json()
        assert (shown["settlement"], shown["charge"], shown["dispute"]) == ("debt", None, None)

        opened = await api.post(f"/api/v1/me/stays/{stay['id']}/dispute", headers=headers)
        assert opened.status_code == 200, opened.text
        assert (opened.json()["status"], opened.json()["held"]) == ("open", True)
        again = await api.post(f"/api/v1/me/stays/{stay['id']}/dispute", headers=headers)
        assert again.json()["id"] == opened.json()["id"], "one dispute per stay"
        owed = (await api.get("/api/v1/me/debts", headers=headers)).json()
        assert owed["total_fen"] == 0, "on hold: not asked for"
        async with runtime.pool.acquire() as conn:
            assert not await conn.fetchval(
                "SELECT blocked_for_arrears FROM accounts WHERE id = $1", driver.account_id
            )
        listed = await api.get(f"/api/v1/operator/disputes/{opened.json()['id']}", headers=admin)
        assert (listed.json()["kind"], listed.json()["amount_fen"]) == ("missed_stay_debt", 1200)
        assert listed.json()["stay_id"] == stay["id"]

        await decide_dispute(api, admin, opened.json()["id"], outcome)
        async with runtime.pool.acquire() as conn:
            receivable = await ledger.balance(conn, ledger.receivable(driver.account_id))
            told = await conn.fetchval(
                "SELECT body FROM notifications WHERE account_id = $1 AND kind = $2",
                driver.account_id,
                f"dispute_{outcome}",
            )
            assert await ledger.is_balanced(conn)
        stands = bool(owed_after)
        assert await stay_debt(runtime, driver.account_id, stay["id"]) == (
            stands,
            not stands,
            not stands,
        )
        assert receivable == owed_after
        assert "¥12.00" in told
        owed = (await api.get("/api/v1/me/debts", headers=headers)).json()
        assert owed["total_fen"] == owed_after


async def test_the_app_offers_not_my_car_only_while_the_stays_debt_is_owed(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    """A missed stay's debt settled is nothing to dispute: the app's button goes with it (before,
    the app offered it on any stay settled as a debt, and the tap met a 409)."""
    driver, _ = await _left_unpaid(runtime, gate, lot)
    stay = await _stay(runtime, lot, driver.plate)
    headers = bearer(driver_token(app, driver.account_id))
    shown = await api.get(f"/api/v1/me/stays/{stay['id']}", headers=headers)
    assert shown.json()["disputable"] is True
    async with runtime.pool.acquire() as conn:  # settled (here by the car park's waiver)
        await conn.execute(
            "UPDATE debts SET settled_at = now(), waived = true WHERE session_id = $1", stay["id"]
        )
    shown = await api.get(f"/api/v1/me/stays/{stay['id']}", headers=headers)
    assert (shown.json()["settlement"], shown.json()["disputable"]) == ("debt", False)
    refused = await api.post(f"/api/v1/me/stays/{stay['id']}/dispute", headers=headers)
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "charge_not_disputable")


async def test_a_held_stay_left_unpaid_by_nobody_bound_goes_to_an_operator(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    plate = unique_plate()
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    held = gate.capture("out", plate)
    assert (await gate.decide(lot.code, "out1", held))["action"] == "hold"
    await gate.decide(lot.code, "in1", gate.capture("in", plate))
    stay = await _stay(runtime, lot, plate)
    assert (stay["status"], stay["settlement"], stay["fee_fen"]) == (
        "superseded",
        "unpaid_exit",
        1200,
    )
    [exception] = await _exceptions(runtime, lot, "unpaid_exit")
    assert exception["capture_id"] == held.capture_id and exception["status"] == "open"
    assert exception["candidates"][0]["fee_fen"] == 1200
    assert exception["candidates"][0]["session_id"] == stay["id"]


async def test_a_stay_superseded_with_no_fee_held_stays_as_before(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    plate = unique_plate()
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    await gate.decide(lot.code, "in1", gate.capture("in", plate))
    stay = await _stay(runtime, lot, plate)
    assert (stay["status"], stay["settlement"], stay["fee_fen"]) == ("superseded", None, None)
    assert await _exceptions(runtime, lot, "unpaid_exit") == []


# 2. Booth payments.


async def test_booth_cash_for_a_held_exit_closes_the_stay_books_it_and_opens_the_gate(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    plate = unique_plate()
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    held = gate.capture("out", plate)
    assert (await gate.decide(lot.code, "out1", held))["fee_fen"] == 1200
    headers = await _attendant(runtime, app, lot)
    path = f"/api/v1/operator/car-parks/{lot.code}/booth-payments"
    wrong = await api.post(
        path,
        json={"capture_id": str(held.capture_id), "method": "cash", "amount_fen": 1000},
        headers=headers,
    )
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (409, "amount_mismatch")
    paid = await api.post(
        path,
        json={"capture_id": str(held.capture_id), "method": "cash", "amount_fen": 1200},
        headers=headers,
    )
    assert paid.status_code == 201, paid.text
    assert (paid.json()["amount_fen"], paid.json()["method"]) == (1200, "cash")
    await gate.wait_for(held, commands=2)
    assert gate.commands[str(held.capture_id)][1]["action"] == "open"

    stay = await _stay(runtime, lot, plate)
    assert (stay["status"], stay["settlement"], stay["fee_fen"]) == (
        "closed",
        "paid_at_booth",
        1200,
    )
    async with runtime.pool.acquire() as conn:
        assert await ledger.balance(conn, f"clearing:cash:car_park:{lot.id}") == 1200
        assert await ledger.balance(conn, ledger.revenue(lot.id)) == -1200
        assert await ledger.is_balanced(conn)
        audit = await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE action = 'booth_payment.recorded' "
            "AND detail->>'session_id' = $1",
            str(stay["id"]),
        )
        today = datetime.now(ZoneInfo(runtime.settings.timezone)).date()
        revenue = await reports.revenue(
            conn, start=today, end=today, timezone=runtime.settings.timezone, car_park_ids=[lot.id]
        )
        statement = await runtime.provider.statement(today)
        async with conn.transaction():
            books = await reconcile.reconcile(
                conn, runtime.provider.name, today, statement, runtime.settings.timezone
            )
    assert audit == 1
    assert [(r["paid_at_booth_fen"], r["net_fen"]) for r in revenue] == [(1200, 1200)]
    mine = [b for b in books.booth if b.car_park_id == lot.id]
    assert [(b.method, b.payments, b.amount_fen, b.ledger_fen) for b in mine] == [
        ("cash", 1, 1200, 1200)
    ]

    # Nothing can take the same fee again: not the booth, not the QR code...
    again = await api.post(
        path,
        json={"capture_id": str(held.capture_id), "method": "card", "amount_fen": 1200},
        headers=headers,
    )
    assert again.status_code == 409
    qr = await api.post(f"/api/v1/gate-payments/{held.capture_id}")
    assert qr.status_code == 404, "the QR code is for a held exit, and this one is paid"
    # ... and not a charge: the database refuses a second booking of the stay's fee.
    driver = await make_driver(runtime, unique_plate())
    async with runtime.pool.acquire() as conn:
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await charges.queue_charge(
                    conn,
                    session_id=stay["id"],
                    account_id=driver.account_id,
                    agreement_id=driver.agreement_id or 0,
                    car_park_id=lot.id,
                    amount_fen=1200,
                )


async def test_booth_cash_for_a_car_no_longer_first_at_the_barrier_books_it_and_opens_nothing(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    """The attendant books the cash of a held car after the next car came up and was held: the
    stay is settled, but the gate is sent no open (it would lift the barrier for the next car),
    and the answer says so. The next car's own payment opens it."""
    first, second = unique_plate(), unique_plate()
    held = []
    for plate in (first, second):
        await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    for plate in (first, second):
        capture = gate.capture("out", plate)
        assert (await gate.decide(lot.code, "out1", capture))["fee_fen"] == 1200
        held.append(capture)
    answers = []
    for capture in held:
        paid = await _booth_takes_at_gate(runtime, app, api, lot, capture.capture_id)
        answers.append(paid["gate_opened"])
    assert answers == [False, True]
    # Published in order on the same topic: once the second car's open is here, the first's
    # would have been.
    await gate.wait_for(held[1], commands=2)
    assert [c["action"] for c in gate.commands[str(held[0].capture_id)]] == ["hold"]
    stay = await _stay(runtime, lot, first)
    assert (stay["status"], stay["settlement"]) == ("closed", "paid_at_booth")


async def test_a_booth_payment_is_for_staff_of_that_car_park_only(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    plate = unique_plate()
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    held = gate.capture("out", plate)
    await gate.decide(lot.code, "out1", held)
    other = await create_lot(runtime)
    stranger = await _attendant(runtime, app, other)
    body = {"capture_id": str(held.capture_id), "method": "cash", "amount_fen": 1200}
    for code in (lot.code, other.code):
        response = await api.post(
            f"/api/v1/operator/car-parks/{code}/booth-payments", json=body, headers=stranger
        )
        assert response.status_code == 404, response.text
    assert (await _stay(runtime, lot, plate))["status"] == "open"


# 3. An offline hold sent to the booth is never charged pay-later.


def _offline(gate: GateProbe, plate: str, action: str, **update: Any) -> Any:
    return gate.capture("out", plate).model_copy(
        update={"offline": True, "offline_action": action, **update}
    )


async def test_an_offline_hold_of_a_pay_later_driver_awaits_the_booth_and_is_never_charged(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=90))
    upload = _offline(gate, driver.plate, "hold")
    await gate.decide(lot.code, "out1", upload)
    stay = await _stay(runtime, lot, driver.plate)
    assert (stay["status"], stay["settlement"], stay["fee_fen"]) == (
        "closed",
        "offline_booth",
        1200,
    )
    headers = await _attendant(runtime, app, lot)
    listed = (await api.get("/api/v1/operator/exceptions", headers=headers)).json()
    [waiting] = [e for e in listed if e["reason"] == "offline_booth"]
    assert waiting["candidates"][0]["fee_fen"] == 1200

    paid = await api.post(
        f"/api/v1/operator/car-parks/{lot.code}/booth-payments",
        json={"session_id": stay["id"], "method": "card", "amount_fen": 1200},
        headers=headers,
    )
    assert paid.status_code == 201, paid.text
    stay = await _stay(runtime, lot, driver.plate)
    assert stay["settlement"] == "paid_at_booth"
    [resolved] = await _exceptions(runtime, lot, "offline_booth")
    assert resolved["status"] == "resolved"
    async with runtime.pool.acquire() as conn:
        assert await ledger.balance(conn, f"clearing:card:car_park:{lot.id}") == 1200
    assert await charges_of(runtime, lot) == []


async def test_an_offline_hold_uploaded_after_the_booth_took_the_money_is_matched_to_it(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=90))
    stay = await _stay(runtime, lot, driver.plate)
    left_at = datetime.now(UTC)
    # The gate cannot reach us, the booth can: the attendant takes cash for the open stay.
    paid = await api.post(
        f"/api/v1/operator/car-parks/{lot.code}/booth-payments",
        json={"session_id": stay["id"], "method": "cash", "amount_fen": 1200},
        headers=await _attendant(runtime, app, lot),
    )
    assert paid.status_code == 201, paid.text
    upload = _offline(gate, driver.plate, "hold", captured_at=left_at)
    await gate.decide(lot.code, "out1", upload)
    stay = await _stay(runtime, lot, driver.plate)
    assert (stay["settlement"], stay["exit_capture_id"]) == ("paid_at_booth", upload.capture_id)
    assert await charges_of(runtime, lot) == []
    assert await _exceptions(runtime, lot, "offline_booth") == []
    assert await _exceptions(runtime, lot, "no_entry") == []


async def test_a_booth_payment_while_an_operator_opens_the_held_gate_by_hand_is_no_deadlock(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    """A gate offline sent a car to the booth (its stay closed awaiting the booth, the exit
    capture held with an 'offline_booth' exception). The attendant takes the card for the
    stay just as an operator opens the gate by hand for that capture (its exception resolved).
    The booth locks the exit capture's exception, the capture, then the stay, as an operator
    deciding a capture and a gate payment being booked lock them (`billing.captures`); so does
    the open, which locked the capture, the stay, then the exception: with the booth's order
    the two waited for each other (a deadlock, one of them a 500). Paused here by holding
    sessions, which the open locks after what it locks first."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=90))
    upload = _offline(gate, driver.plate, "hold")
    await gate.decide(lot.code, "out1", upload)
    stay = await _stay(runtime, lot, driver.plate)
    assert (stay["settlement"], stay["exit_capture_id"]) == ("offline_booth", upload.capture_id)
    attendant = await _attendant(runtime, app, lot)

    async with holding(runtime, "LOCK TABLE sessions IN EXCLUSIVE MODE") as release:
        opened = asyncio.create_task(
            api.post(
                f"/api/v1/operator/car-parks/{lot.code}/gates/out1/open",
                json={"reason": "岗亭处理 人工放行", "capture_id": str(upload.capture_id)},
                headers=attendant,
            )
        )
        await eventually(lambda: waiting_on_a_lock(runtime, "SELECT id, status, plate"))
        paid = asyncio.create_task(
            api.post(
                f"/api/v1/operator/car-parks/{lot.code}/booth-payments",
                json={"session_id": stay["id"], "method": "card", "amount_fen": 1200},
                headers=attendant,
            )
        )
        # The booth waits too: for the sessions (before) or what the open locked first.
        await eventually(lambda: waiting_on_a_lock(runtime, at_least=2), timeout_s=5)
        await release()
        errors = await server_errors({"open": opened, "booth": paid})
    assert not errors, errors
    assert (opened.result().status_code, paid.result().status_code) == (200, 201), (
        opened.result().text,
        paid.result().text,
    )
    stay = await _stay(runtime, lot, driver.plate)
    assert (stay["settlement"], stay["fee_fen"]) == ("paid_at_booth", 1200)
    [exception] = await _exceptions(runtime, lot, "offline_booth")
    assert exception["status"] == "resolved"
    async with runtime.pool.acquire() as conn:
        taken = await conn.fetchval(
            "SELECT count(*) FROM booth_payments WHERE session_id = $1", stay["id"]
        )
        assert await ledger.balance(conn, f"clearing:card:car_park:{lot.id}") == 1200
        assert await ledger.is_balanced(conn)
    assert taken == 1


async def _booth_takes(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, lot: Lot, stay_id: int, fen: int
) -> None:
    """An attendant takes the stay's fee in cash at the booth."""
    paid = await api.post(
        f"/api/v1/operator/car-parks/{lot.code}/booth-payments",
        json={"session_id": stay_id, "method": "cash", "amount_fen": fen},
        headers=await _attendant(runtime, app, lot),
    )
    assert paid.status_code == 201, paid.text


async def _booth_takes_at_gate(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, lot: Lot, capture_id: UUID
) -> dict[str, Any]:
    """An attendant takes a held capture's ¥12.00 in cash: the booth's answer."""
    paid = await api.post(
        f"/api/v1/operator/car-parks/{lot.code}/booth-payments",
        json={"capture_id": str(capture_id), "method": "cash", "amount_fen": 1200},
        headers=await _attendant(runtime, app, lot),
    )
    assert paid.status_code == 201, paid.text
    answer: dict[str, Any] = paid.json()
    return answer


async def _stays_ended(runtime: Runtime, lot: Lot, plate: str) -> list[tuple[Any, ...]]:
    """The plate's stays here, oldest first: (status, settlement, exit capture)."""
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT status, settlement, exit_capture_id FROM sessions
               WHERE car_park_id = $1 AND plate = $2 ORDER BY entered_at""",
            lot.id,
            plate,
        )
    return [tuple(r) for r in rows]


async def test_an_offline_exit_of_a_later_stay_is_never_matched_to_an_earlier_booth_payment(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    """The booth took the money for a stay whose exit capture never came (the gate that let the
    car out was replaced before its upload); the car came back and left offline again. That
    upload ends the stay it left, charged as any: before, it was taken for the earlier stay's
    exit, and the later stay stayed open, never paid."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=5))
    await _booth_takes(
        runtime, app, api, lot, (await _stay(runtime, lot, driver.plate))["id"], 3000
    )
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=90))
    upload = _offline(gate, driver.plate, "open", captured_at=datetime.now(UTC))
    await gate.decide(lot.code, "out1", upload)
    assert await _stays_ended(runtime, lot, driver.plate) == [
        ("closed", "paid_at_booth", None),
        ("closed", "pay_later", upload.capture_id),
    ]
    assert [c["amount_fen"] for c in await charges_of(runtime, lot)] == [1200]


async def test_a_booth_paid_exit_a_clock_ahead_puts_just_after_a_re_entry_is_still_the_booths(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    """The exit gate could not reach us, the booth could: the attendant took the stay's fee in
    cash and the car left. It came back in a minute later (a live entry, a new stay). The exit
    gate's clock is two minutes ahead (within PARKING_GATE_CLOCK_TOLERANCE_S), so its upload
    says the car left just after the re-entry. The upload is the booth-paid stay's exit (or at
    worst a question for an operator); it must not end the stay the car is parked on now.
    Before, the upload's raw gate time put it after the re-entry: it closed the new stay while
    the car was inside (its real exit later was "no entry record")."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=90))
    await _booth_takes(
        runtime, app, api, lot, (await _stay(runtime, lot, driver.plate))["id"], 1200
    )
    # The gate stamps the exit by its own clock, two minutes ahead of the server's.
    upload = gate.capture("out", driver.plate).model_copy(
        update={
            "offline": True,
            "offline_action": "hold",
            "captured_at": datetime.now(UTC) + timedelta(minutes=2),
        }
    )
    back_in = await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
    assert back_in["action"] == "open"
    inside = await runtime.occupancy.get(lot.id)
    await gate.decide(lot.code, "out1", upload)

    assert await _stays_ended(runtime, lot, driver.plate) == [
        ("closed", "paid_at_booth", upload.capture_id),
        ("open", None, None),
    ]
    assert await runtime.occupancy.get(lot.id) == inside, "the car is still inside"
    assert await charges_of(runtime, lot) == []

    # Its real exit later is its own stay's (a moment: free), not "no entry record".
    leaves = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert (leaves["action"], leaves.get("fee_fen")) == ("open", 0), leaves
    assert await _exceptions(runtime, lot, "no_entry") == []


async def test_a_stay_carried_over_from_before_the_system_is_counted_out_when_paid_at_the_booth(
    runtime: Runtime, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    """A stay carried over from before the system started (no entry capture, no fixed fee)
    takes a place: the counters, rebuilt, count it. Paid at the booth, it is counted out. Before,
    the booth counted out only stays with an entry capture: the counter kept it for good."""
    plate = unique_plate()
    async with runtime.pool.acquire() as conn:
        stay_id = await conn.fetchval(
            """INSERT INTO sessions (car_park_id, plate, plate_color, entered_at)
               VALUES ($1, $2, 'blue', now() - interval '90 minutes') RETURNING id""",
            lot.id,
            plate,
        )
    await runtime.occupancy.rebuild_all()
    inside = await runtime.occupancy.get(lot.id)
    await _booth_takes(runtime, app, api, lot, stay_id, 1200)
    assert await runtime.occupancy.get(lot.id) == inside - 1


async def test_an_old_controllers_held_car_paid_after_the_new_one_took_a_car_lifts_nothing(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    """Car A is held at the exit by the old controller (seq 50,001, unbound, fee shown). The box
    is swapped (a new outbox: seq from 1); the attendant lets A out by hand, and the new box
    captures car B, held in its turn. Then A's fee is taken at the booth. B is first at the
    barrier, and it is B's capture the server received after A's: no open may go out. Before,
    B (seq 2) was not "newer" by the gate's seq; the open went out for A's capture, and the new
    box, which never heard of it, took it for an operator's remote open and let B out."""
    first, second = unique_plate(), unique_plate()
    for plate in (first, second):  # neither is bound: both held with a fee and a QR code
        await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    gate._seq = 50_000  # the old box, long in service
    held = gate.capture("out", first)
    assert (await gate.decide(lot.code, "out1", held))["action"] == "hold"
    gate._seq = 0  # the new box
    assert (await gate.decide(lot.code, "out1", gate.capture("out", second)))["action"] == "hold"
    paid = await _booth_takes_at_gate(runtime, app, api, lot, held.capture_id)
    assert paid["gate_opened"] is False, (
        "the old box's held car's open went to the gate after the new box captured another car"
    )


async def test_an_older_capture_uploaded_after_the_held_one_does_not_withhold_its_paid_open(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    """The agent crashed with car X's capture (seq 101) stored but undecided; X was let out by
    hand. After the restart car A is captured (seq 102) and held with its fee; the outbox
    then sends X's capture as it was (`abandon_undecided`: live, not flagged offline), so the
    server receives it after A's. A pays at the booth. A is first at the barrier and its
    capture is the newest the gate took (the gate agent itself would lift for it: seq 102 is
    its latest): the open must go out. Ordered by receipt alone, X's late upload counted as a
    car captured after A, and A waited at a closed barrier although it paid."""
    stale, held_plate = unique_plate(), unique_plate()
    for plate in (stale, held_plate):  # neither is bound: an exit holds them with a fee
        await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    gate._seq = 100
    late = gate.capture("out", stale)  # seq 101, stored before the crash
    late = late.model_copy(update={"captured_at": datetime.now(UTC) - timedelta(seconds=60)})
    held = gate.capture("out", held_plate)  # seq 102, after the restart
    assert (await gate.decide(lot.code, "out1", held))["action"] == "hold"
    await gate.decide(lot.code, "out1", late)  # the abandoned capture, sent as it was
    paid = await _booth_takes_at_gate(runtime, app, api, lot, held.capture_id)
    assert paid["gate_opened"] is True, (
        "an older capture (lower seq, taken before) that reached the server late withheld the "
        "open of the paid car that is first at the barrier"
    )


async def test_a_paid_held_car_at_a_replaced_gate_controller_gets_its_open(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    """The exit gate's controller was replaced (a stolen or broken box: a new SQLite outbox, so
    its seq starts again from 1). Its first held car pays at the booth: the car is the only one
    the new box has captured, first at the barrier, and must get its open. Before, the old
    box's captures (a higher seq, another car) counted as newer and the open was withheld:
    every paid driver at that gate stayed at a closed barrier until the new box's seq overtook
    the old one's."""
    old = unique_plate()
    await enter(runtime, gate, lot, old, parked_for=timedelta(minutes=10))
    gate._seq = 50_000  # the old box, long in service
    await gate.decide(lot.code, "out1", gate.capture("out", old))
    gate._seq = 0  # the new box
    plate = unique_plate()
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    held = gate.capture("out", plate)
    assert (await gate.decide(lot.code, "out1", held))["fee_fen"] == 1200
    paid = await _booth_takes_at_gate(runtime, app, api, lot, held.capture_id)
    assert paid["gate_opened"] is True, "the paid car is first at the barrier"


# 5. Ghost stays.


async def test_a_stay_open_past_the_car_parks_limit_is_a_ghost_once(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    plate = unique_plate()
    await enter(runtime, gate, lot, plate, parked_for=timedelta(days=8))
    fresh = unique_plate()
    await enter(runtime, gate, lot, fresh, parked_for=timedelta(days=6))
    for _ in range(2):  # idempotent: a second sweep finds nothing new
        await ghosts.sweep_ghost_stays(runtime.pool, datetime.now(UTC))
    [ghost] = await _exceptions(runtime, lot, "ghost_stay")
    stay = await _stay(runtime, lot, plate)
    assert ghost["candidates"][0]["session_id"] == stay["id"]
    assert ghost["candidates"][0]["why"] == "open_too_long"
    assert stay["ghost_at"] is not None and stay["status"] == "open"
    assert (await _stay(runtime, lot, fresh))["ghost_at"] is None


async def test_a_stay_whose_plate_entered_elsewhere_since_is_a_ghost(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    plate = unique_plate()
    await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=3))
    elsewhere = await create_lot(runtime)
    await enter(runtime, gate, elsewhere, plate, parked_for=timedelta(hours=1))
    await ghosts.sweep_ghost_stays(runtime.pool, datetime.now(UTC))
    [ghost] = await _exceptions(runtime, lot, "ghost_stay")
    assert ghost["candidates"][0]["why"] == "seen_elsewhere"
    assert await _exceptions(runtime, elsewhere, "ghost_stay") == []


@pytest.mark.parametrize("how", ["exit", "offline_exit", "re_entry"])
async def test_a_ghost_stay_that_ends_resolves_its_exception_and_nobody_acts_on_it_again(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI, how: str
) -> None:
    """The sweep filed a stay as a ghost; then its car's exit read comes (live, or uploaded by a
    gate that was offline), or the car enters again. The stay has ended: its ghost exception is
    resolved with it (audit-logged), and an operator's action on it (deciding it, opening its
    gate by hand) is a 409 that changes nothing. Before, the exception stayed open for a stay
    that had ended, and opening its gate by hand lifted a barrier nobody waited at."""
    driver = await make_driver(runtime, unique_plate(), limit_fen=10_000_000)
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(days=8))
    await ghosts.sweep_ghost_stays(runtime.pool, datetime.now(UTC))
    [ghost] = await _exceptions(runtime, lot, "ghost_stay")
    if how == "exit":
        await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    elif how == "offline_exit":
        await gate.decide(lot.code, "out1", _offline(gate, driver.plate, "open"))
    else:
        await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
    stay = await _stay(runtime, lot, driver.plate)
    assert stay["status"] == ("superseded" if how == "re_entry" else "closed")

    [ghost] = await _exceptions(runtime, lot, "ghost_stay")
    assert ghost["status"] == "resolved"
    async with runtime.pool.acquire() as conn:
        logged = await conn.fetch(
            "SELECT actor, detail FROM audit_log WHERE action = 'lane_exception.resolved' "
            "AND subject = $1",
            f"lane_exception:{ghost['id']}",
        )
    assert [(r["detail"]["reason"], r["detail"]["session_id"]) for r in logged] == [
        ("ghost_stay", stay["id"])
    ]

    attendant = await _attendant(runtime, app, lot)
    decided = await api.post(
        f"/api/v1/operator/exceptions/{ghost['id']}/resolve",
        json={"plate": driver.plate, "color": "blue"},
        headers=attendant,
    )
    opened = await api.post(
        f"/api/v1/operator/car-parks/{lot.code}/gates/in1/open",
        json={"reason": "车辆早已离场", "capture_id": str(ghost["capture_id"])},
        headers=attendant,
    )
    for answer in (decided, opened):
        assert answer.status_code == 409, answer.text
        assert answer.json()["error"]["code"] == "stay_ended"
    assert [dict(e) for e in await _exceptions(runtime, lot, "ghost_stay")] == [dict(ghost)]
    assert dict(await _stay(runtime, lot, driver.plate)) == dict(stay)
    async with runtime.pool.acquire() as conn:
        gate_opened = await conn.fetchval(
            "SELECT count(*) FROM audit_log "
            "WHERE action = 'gate.opened' AND detail->>'car_park' = $1",
            lot.code,
        )
    assert gate_opened == 0


async def test_a_ghost_stay_opened_again_by_a_rejected_charge_is_a_ghost_for_a_person_again(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    """The exit that ended a ghost stay was not its car's: an operator rejects its charge and
    the stay is open again. Its ghost exception, resolved by that exit, is open again too (the
    sweep files a stay once: without it the stay would stay open unseen)."""
    driver = await make_driver(runtime, unique_plate(), limit_fen=10_000_000)
    # A doubtful entry read: the exit's charge waits for an operator (no frames to verify it).
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(days=8), confidence=0.9)
    await ghosts.sweep_ghost_stays(runtime.pool, datetime.now(UTC))
    await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    [charge] = [c for c in await charges_of(runtime, lot) if c["account_id"] == driver.account_id]
    assert charge["status"] == "awaiting_confirmation"
    assert [e["status"] for e in await _exceptions(runtime, lot, "ghost_stay")] == ["resolved"]

    await reject_awaiting(runtime, app, api, lot, charge["id"])

    assert (await _stay(runtime, lot, driver.plate))["status"] == "open"
    [ghost] = await _exceptions(runtime, lot, "ghost_stay")
    assert (ghost["status"], ghost["resolved_by"]) == ("open", None)
    async with runtime.pool.acquire() as conn:
        reopened = await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE action = 'lane_exception.reopened' "
            "AND subject = $1",
            f"lane_exception:{ghost['id']}",
        )
    assert reopened == 1


async def test_a_booth_payment_while_an_operator_ends_the_ghost_stay_is_no_deadlock(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    """A ghost stay (open eight days) is paid at the booth just as an operator ends it. The
    booth locks the stay and closes it, whereupon migration 0055's rule resolves its ghost
    exception; ending it locked the exception first, then the stay: each waited for the other
    (a deadlock, one of them a 500). Now ending it locks nothing before the stay, and whichever
    comes second is told the stay has ended. Paused here by holding the stay's row, which the
    booth asks for first."""
    driver = await make_driver(runtime, unique_plate(), limit_fen=10_000_000)
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(days=8))
    await ghosts.sweep_ghost_stays(runtime.pool, datetime.now(UTC))
    [ghost] = await _exceptions(runtime, lot, "ghost_stay")
    stay = await _stay(runtime, lot, driver.plate)
    attendant = await _attendant(runtime, app, lot)
    booth = f"/api/v1/operator/car-parks/{lot.code}/booth-payments"
    asked = await api.post(
        booth, json={"session_id": stay["id"], "method": "cash", "amount_fen": 1}, headers=attendant
    )
    assert asked.json()["error"]["code"] == "amount_mismatch", asked.text
    due = asked.json()["error"]["details"]["fee_fen"]

    async with holding(
        runtime, "SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE", stay["id"]
    ) as release:
        paid = asyncio.create_task(
            api.post(
                booth,
                json={"session_id": stay["id"], "method": "cash", "amount_fen": due},
                headers=attendant,
            )
        )
        await eventually(lambda: waiting_on_a_lock(runtime, "SELECT id, car_park_id, plate"))
        ended = asyncio.create_task(
            api.post(
                f"/api/v1/operator/exceptions/{ghost['id']}/end-stay",
                json={"reason": "现场核实，车辆已不在场内"},
                headers=attendant,
            )
        )
        await eventually(lambda: waiting_on_a_lock(runtime, at_least=2), timeout_s=5)
        await release()
        errors = await server_errors({"booth": paid, "end": ended})
    assert not errors, errors
    assert (paid.result().status_code, ended.result().status_code) == (201, 409), (
        ended.result().text
    )
    stay = await _stay(runtime, lot, driver.plate)
    assert (stay["settlement"], stay["fee_fen"]) == ("paid_at_booth", due)
    [ghost] = await _exceptions(runtime, lot, "ghost_stay")
    assert ghost["status"] == "resolved"


@pytest.mark.parametrize("ender", ["end_stay", "booth"])
async def test_opening_a_ghost_stays_gate_while_its_stay_ends_is_no_deadlock(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI, ender: str
) -> None:
    """A ghost stay's exception names the stay's entry capture; an operator opens its gate by
    hand with that capture (the API takes it: test_a_ghost_stay_that_ends_... answers it 409
    stay_ended once the stay is over) just as another ends the stay, or the booth takes its fee.
    The open locked the ghost exception first (lock_for_decision), then the capture and the
    stay (capture_at_gate); ending the stay locks the stay, then migration 0055's rule updates
    the ghost exception: each waited for the other, a deadlock and a 500 (review 31). A ghost
    stay's exception is now left to its stay."""
    driver = await make_driver(runtime, unique_plate(), limit_fen=10_000_000)
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(days=8))
    await ghosts.sweep_ghost_stays(runtime.pool, datetime.now(UTC))
    [ghost] = await _exceptions(runtime, lot, "ghost_stay")
    stay = await _stay(runtime, lot, driver.plate)
    attendant = await _attendant(runtime, app, lot)
    booth = f"/api/v1/operator/car-parks/{lot.code}/booth-payments"
    due = 0
    if ender == "booth":
        asked = await api.post(
            booth,
            json={"session_id": stay["id"], "method": "cash", "amount_fen": 1},
            headers=attendant,
        )
        due = asked.json()["error"]["details"]["fee_fen"]

    async with holding(
        runtime, "SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE", stay["id"]
    ) as release:
        if ender == "end_stay":
            ending = asyncio.create_task(
                api.post(
                    f"/api/v1/operator/exceptions/{ghost['id']}/end-stay",
                    json={"reason": "现场核实，车辆已不在场内"},
                    headers=attendant,
                )
            )
        else:
            ending = asyncio.create_task(
                api.post(
                    booth,
                    json={"session_id": stay["id"], "method": "cash", "amount_fen": due},
                    headers=attendant,
                )
            )
        await eventually(lambda: waiting_on_a_lock(runtime))
        opened = asyncio.create_task(
            api.post(
                f"/api/v1/operator/car-parks/{lot.code}/gates/in1/open",
                json={"reason": "车辆早已离场", "capture_id": str(ghost["capture_id"])},
                headers=attendant,
            )
        )
        await eventually(lambda: waiting_on_a_lock(runtime, at_least=2), timeout_s=5)
        await release()
        errors = await server_errors({"end": ending, "open": opened})
    assert not errors, errors


async def test_an_operator_ends_a_ghost_stay_whose_car_left_unseen_charging_nobody(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    """A stay open for eight days: its car left unseen. An attendant ends it: closed as left at
    an unknown time (settlement 'operator', no fee, no exit capture), nobody charged, the car
    counted out, the ghost exception resolved and the attendant's reason audit-logged. Ending
    it again is a 409 that changes nothing; another company's staff do not find it. Before,
    nothing ended a ghost stay but its car's return: the queue offered deciding its entry
    again (refused) or lifting the entry barrier for nobody."""
    driver = await make_driver(runtime, unique_plate(), limit_fen=10_000_000)
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(days=8))
    await ghosts.sweep_ghost_stays(runtime.pool, datetime.now(UTC))
    [ghost] = await _exceptions(runtime, lot, "ghost_stay")
    assert await runtime.occupancy.get(lot.id) == 1
    path = f"/api/v1/operator/exceptions/{ghost['id']}/end-stay"
    why = {"reason": "现场核实，车辆已不在场内"}

    other = await create_lot(runtime)
    foreign = await api.post(path, json=why, headers=await _attendant(runtime, app, other))
    assert foreign.status_code == 404, foreign.text
    assert foreign.json()["error"]["code"] == "exception_not_found"
    assert (await _stay(runtime, lot, driver.plate))["status"] == "open"

    staff = await make_staff(runtime, lot.operator_id, "attendant")
    attendant = bearer(staff_token(app, staff))
    ended = await api.post(path, json=why, headers=attendant)
    assert ended.status_code == 200, ended.text
    stay = await _stay(runtime, lot, driver.plate)
    assert ended.json()["session_id"] == stay["id"]
    assert (
        stay["status"],
        stay["settlement"],
        stay["fee_fen"],
        stay["exit_capture_id"],
        stay["account_id"],
    ) == ("closed", "operator", None, None, None)
    assert stay["exited_at"] is not None
    assert [c for c in await charges_of(runtime, lot) if c["session_id"] == stay["id"]] == []
    assert await runtime.occupancy.get(lot.id) == 0
    [resolved] = await _exceptions(runtime, lot, "ghost_stay")
    assert resolved["status"] == "resolved"
    async with runtime.pool.acquire() as conn:
        logged = await conn.fetch(
            "SELECT actor, detail FROM audit_log WHERE action = 'stay.ended' AND subject = $1",
            f"session:{stay['id']}",
        )
        assert await ledger.is_balanced(conn)
    assert [(r["actor"], r["detail"]["reason"], r["detail"]["exception_id"]) for r in logged] == [
        (f"operator_user:{staff.user_id}", why["reason"], ghost["id"])
    ]

    again = await api.post(path, json=why, headers=attendant)
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "stay_ended"
    assert set(again.json()["error"]) >= {"code", "message"}
    assert dict(await _stay(runtime, lot, driver.plate)) == dict(stay)
    assert await runtime.occupancy.get(lot.id) == 0


async def test_ending_a_stay_is_only_for_a_ghost_stays_exception(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    """A held exit's exception is a car at the barrier, not a stay to end; a reason is needed."""
    capture = gate.capture("out", None)
    assert (await gate.decide(lot.code, "out1", capture))["action"] == "hold"
    [held] = await _exceptions(runtime, lot, "unreadable")
    attendant = await _attendant(runtime, app, lot)
    path = f"/api/v1/operator/exceptions/{held['id']}/end-stay"
    refused = await api.post(path, json={"reason": "车已离开"}, headers=attendant)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "not_a_ghost_stay"
    unexplained = await api.post(path, json={"reason": " "}, headers=attendant)
    assert unexplained.status_code == 422, unexplained.text
    [still] = await _exceptions(runtime, lot, "unreadable")
    assert dict(still) == dict(held)


@pytest.mark.parametrize("swept", [True, False])
@pytest.mark.parametrize("why", ["open_too_long", "seen_elsewhere"])
async def test_a_ghost_stay_is_never_matched_to_an_uncertain_exit_read(
    runtime: Runtime, gate: GateProbe, lot: Lot, why: str, swept: bool
) -> None:
    """A ghost is no candidate from the moment it is one, not from the sweep that files it for
    an operator (hourly): before, a stranger's doubtful read was bent onto a stay whose car had
    since entered another car park, and its holder named for the charge."""
    plate = f"浙K{secrets.randbelow(10_000):04d}0"
    if why == "open_too_long":
        await enter(runtime, gate, lot, plate, parked_for=timedelta(days=8))
    else:
        await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=3))
        await enter(runtime, gate, await create_lot(runtime), plate, parked_for=timedelta(hours=1))
    if swept:
        await ghosts.sweep_ghost_stays(runtime.pool, datetime.now(UTC))
    # A doubtful read one confusion away that is no plate of its own (0 read as O, no plate
    # letter): were the stay no ghost, it would be matched to it.
    doubtful = gate.capture("out", plate[:-1] + "O", confidence=0.5)
    await gate.decide(lot.code, "out1", doubtful)
    async with runtime.pool.acquire() as conn:
        decided = await conn.fetchrow(
            "SELECT outcome, session_id FROM captures WHERE capture_id = $1", doubtful.capture_id
        )
    assert decided["session_id"] is None, decided
    assert decided["outcome"] in ("held_no_entry", "held_unreadable"), decided
    assert (await _stay(runtime, lot, plate))["status"] == "open"


@pytest.mark.parametrize("swept", [False, True])
async def test_an_offline_doubtful_exit_read_before_the_car_entered_elsewhere_ends_its_stay(
    runtime: Runtime, gate: GateProbe, lot: Lot, swept: bool
) -> None:
    """The car left this car park 30 minutes ago through an exit gate that could not reach us,
    which read its plate doubtfully (0 as O), and let it out. Twenty minutes later it entered
    another car park (live). The upload arrives after that, perhaps after the hourly sweep
    filed the stay as a ghost. The stay was no ghost when the car left: the other stay began
    after the exit read, so it is the very exit that explains it. The read is matched to the
    stay and ends it. Before, a ghost was judged as of the upload (or by the sweep's mark):
    the stay was no candidate, the upload "no entry record", and the stay stayed open."""
    plate = f"浙K{secrets.randbelow(10_000):04d}0"
    await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=3))
    left_at = datetime.now(UTC) - timedelta(minutes=30)
    upload = gate.capture("out", plate[:-1] + "O", confidence=0.5).model_copy(
        update={"offline": True, "offline_action": "open", "captured_at": left_at}
    )
    await enter(runtime, gate, await create_lot(runtime), plate, parked_for=timedelta(minutes=10))
    if swept:
        await ghosts.sweep_ghost_stays(runtime.pool, datetime.now(UTC))
    await gate.decide(lot.code, "out1", upload)
    async with runtime.pool.acquire() as conn:
        decided = await conn.fetchrow(
            "SELECT outcome, session_id FROM captures WHERE capture_id = $1", upload.capture_id
        )
        stay = await conn.fetchrow(
            """SELECT id, status, exit_capture_id FROM sessions
               WHERE car_park_id = $1 AND plate = $2""",
            lot.id,
            plate,
        )
    assert decided["session_id"] == stay["id"], decided
    assert (stay["status"], stay["exit_capture_id"]) == ("closed", upload.capture_id)


# 6. Gate clocks.


async def test_a_gate_clock_far_ahead_prices_the_stay_at_the_time_the_server_received_it(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=30))
    sent = datetime.now(UTC)
    upload = _offline(gate, driver.plate, "open", captured_at=sent + timedelta(hours=26))
    command = await gate.decide(lot.code, "out1", upload)
    assert command["fee_fen"] == 600, "30 minutes, not 26 hours"
    # The car left between its entry and the upload: the 30 minutes are not proven, so the
    # charge waits for an operator (it would cost less at the earliest provable moment).
    [charge] = [c for c in await charges_of(runtime, lot) if c["account_id"] == driver.account_id]
    assert (charge["amount_fen"], charge["status"]) == (600, "awaiting_confirmation")
    stay = await _stay(runtime, lot, driver.plate)
    assert stay["exited_at"] <= datetime.now(UTC)
    listed = await api.get(
        "/api/v1/operator/clock-skews",
        params={"car_park": lot.code},
        headers=await _attendant(runtime, app, lot),
    )
    [skew] = listed.json()
    assert (skew["kind"], skew["gate"], skew["session_id"]) == ("ahead", "out1", stay["id"])
    assert skew["skew_s"] > 25 * 3600


async def test_a_gate_clock_behind_the_entry_never_makes_a_stay_free(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    driver = await make_driver(runtime, unique_plate())
    # 2 h 50 min in: three started hours when we receive the upload.
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=2, minutes=50))
    stay = await _stay(runtime, lot, driver.plate)
    upload = _offline(
        gate, driver.plate, "open", captured_at=stay["entered_at"] - timedelta(hours=2)
    )
    command = await gate.decide(lot.code, "out1", upload)
    assert command["fee_fen"] == 1800
    stay = await _stay(runtime, lot, driver.plate)
    assert stay["exited_at"] >= stay["entered_at"]
    listed = await api.get(
        "/api/v1/operator/clock-skews", headers=await _attendant(runtime, app, lot)
    )
    [skew] = [s for s in listed.json() if s["session_id"] == stay["id"]]
    assert skew["kind"] == "behind" and skew["skew_s"] < -3600

    [charge] = [c for c in await charges_of(runtime, lot) if c["account_id"] == driver.account_id]
    assert (charge["amount_fen"], charge["status"]) == (1800, "awaiting_confirmation")


async def test_a_gate_clock_proven_wrong_by_its_own_live_captures_prices_what_they_prove(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """The exit gate answered a live capture a moment ago (a lower seq): an upload whose clock
    says 2 h earlier happened after that capture, not 2 h before it. The time proven is the
    three hours parked: charged without a person, as nothing cheaper is provable."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=2, minutes=50))
    assert (await gate.decide(lot.code, "out1", gate.capture("out", unique_plate())))["action"]
    upload = _offline(
        gate, driver.plate, "open", captured_at=datetime.now(UTC) - timedelta(hours=2)
    )
    command = await gate.decide(lot.code, "out1", upload)
    assert command["fee_fen"] == 1800, "not the 50 minutes the wrong clock says"
    async with runtime.pool.acquire() as conn:
        skew = await conn.fetchrow(
            "SELECT kind, skew_s FROM gate_clock_skews WHERE capture_id = $1", upload.capture_id
        )
    assert skew is not None and skew["kind"] == "behind" and skew["skew_s"] < -3600

    async def charged() -> list[asyncpg.Record]:
        return [
            c
            for c in await charges_of(runtime, lot)
            if c["account_id"] == driver.account_id and c["status"] != "awaiting_confirmation"
        ]

    [charge] = await eventually(charged)
    assert charge["amount_fen"] == 1800


async def test_a_small_clock_error_is_clamped_without_a_flag(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=30))
    upload = _offline(
        gate, driver.plate, "open", captured_at=datetime.now(UTC) + timedelta(minutes=2)
    )
    await gate.decide(lot.code, "out1", upload)
    stay = await _stay(runtime, lot, driver.plate)
    assert stay["exited_at"] <= datetime.now(UTC)
    async with runtime.pool.acquire() as conn:
        flagged = await conn.fetchval(
            "SELECT count(*) FROM gate_clock_skews WHERE capture_id = $1", upload.capture_id
        )
    assert flagged == 0


async def test_an_exception_about_a_stay_is_not_resolved_by_deciding_its_capture_again(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    plate = unique_plate()
    await enter(runtime, gate, lot, plate, parked_for=timedelta(days=8))
    await ghosts.sweep_ghost_stays(runtime.pool, datetime.now(UTC))
    [ghost] = await _exceptions(runtime, lot, "ghost_stay")
    # Filed under the stay's entry capture: deciding that again would enter the car again.
    resolved = await api.post(
        f"/api/v1/operator/exceptions/{ghost['id']}/resolve",
        json={"plate": plate, "color": "blue"},
        headers=await _attendant(runtime, app, lot),
    )
    assert resolved.status_code == 409, resolved.text
    assert (await _stay(runtime, lot, plate))["status"] == "open"
