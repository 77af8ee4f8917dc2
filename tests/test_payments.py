"""Money that comes in other ways than a pay-later charge: the provider's signed notifications
(duplicated, late, out of order, forged), a held car paying its fee and debts through the
gate's QR code, and debts settled in the app."""

import asyncio
import ipaddress
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from fastapi import FastAPI

from billing import agreements, debts, ledger, notifications, payments, signing
from gate_controller.protocol import Capture
from parking.app import create_app
from parking.disputes import service as disputes
from parking.errors import AppError
from parking.payments import service as payments_service
from parking.runtime import ProviderEndpoint, Runtime
from parking.settings import Settings
from parking_dev import sandbox
from tests.conftest import (
    Driver,
    Lot,
    api_server,
    backdate_entry,
    bearer,
    charges_of,
    create_lot,
    driver_in_debt,
    enter,
    eventually,
    exit_after,
    holding,
    make_driver,
    make_staff,
    provider_and_runtime,
    provider_order,
    server_errors,
    set_car_park,
    staff_token,
    unique_plate,
    waiting_on_a_lock,
)
from tests.gates import GateProbe


def _signed(secret: str, payload: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(payload)
    header = signing.sign(secret, body, int(datetime.now(UTC).timestamp()))
    return body, {signing.SIGNATURE_HEADER: header, "content-type": "application/json"}


def _charge_event(key: str, status: str, amount_fen: int, order_id: str) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "type": "charge",
        "out_trade_no": key,
        "order_id": order_id,
        "status": status,
        "amount_fen": amount_fen,
        "reason": "insufficient_funds" if status == "declined" else None,
        "finished_at": datetime.now(UTC).isoformat(),
    }


async def _settlements(runtime: Runtime, charge_id: int) -> int:
    async with runtime.pool.acquire() as conn:
        count: int = await conn.fetchval(
            "SELECT count(DISTINCT transaction_id) FROM ledger_entries "
            "WHERE charge_id = $1 AND kind = 'charge_settled'",
            charge_id,
        )
    return count


async def test_notifications_duplicated_late_out_of_order_or_forged_book_once(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    # The provider is unreachable for requests, so only the notifications we post decide.
    secret = uuid.uuid4().hex
    faults = sandbox.FaultConfig(error_rate=1.0)
    async with provider_and_runtime(settings, database_url, faults, secret=secret) as (runtime, _):
        lot = await create_lot(runtime)
        driver = await make_driver(runtime, unique_plate())
        await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))
        [charge] = await charges_of(runtime, lot)
        key, amount = charge["idempotency_key"], charge["amount_fen"]
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as api:

            async def notify(payload: dict[str, Any], key_used: str = secret) -> httpx.Response:
                body, headers = _signed(key_used, payload)
                return await api.post(
                    "/api/v1/payments/notifications/sandbox", content=body, headers=headers
                )

            early = await notify(_charge_event(key, "processing", amount, "sbx_1"))
            assert early.json() == {"effect": "no_change"}
            forged = await notify(_charge_event(key, "succeeded", amount * 2, "sbx_1"), "forger")
            assert forged.status_code == 401
            assert forged.json()["error"]["code"] == "invalid_notification"
            assert (await charges_of(runtime, lot))[0]["status"] == "pending"

            first = await notify(_charge_event(key, "succeeded", amount, "sbx_1"))
            again = await notify(_charge_event(key, "succeeded", amount, "sbx_1"))
            late_decline = await notify(_charge_event(key, "declined", amount, "sbx_1"))
            stranger = await notify(_charge_event("s0-unknown-order", "succeeded", 100, "sbx_2"))
            unsigned = await api.post(
                "/api/v1/payments/notifications/sandbox",
                content=orjson.dumps(_charge_event(key, "declined", amount, "sbx_1")),
            )
        assert [r.json()["effect"] for r in (first, again, late_decline, stranger)] == [
            "charged",
            "no_change",
            "no_change",
            "unknown_order",
        ]
        assert unsigned.status_code == 401
        [charge] = await charges_of(runtime, lot)
        assert (charge["status"], charge["provider_ref"]) == ("succeeded", "sbx_1")
        assert await _settlements(runtime, charge["id"]) == 1
        async with runtime.pool.acquire() as conn:
            assert await ledger.is_balanced(conn)
            assert await ledger.balance(conn, ledger.receivable(driver.account_id)) == 0
            assert (
                await conn.fetchval("SELECT count(*) FROM debts WHERE charge_id = $1", charge["id"])
                == 0
            )
            rejected = await conn.fetchval(
                "SELECT count(*) FROM dead_letters WHERE source = 'provider_notification' "
                "AND received_at > now() - interval '1 minute'"
            )
        assert rejected >= 2, "forged and unsigned notifications are dead-lettered"


async def test_real_notifications_with_duplicates_and_forgeries_charge_each_exit_once(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    port = sandbox.free_port()
    settings.public_base_url = f"http://127.0.0.1:{port}"
    settings.charge_query_after_s = 60  # no order queries: the notifications must do it
    faults = sandbox.FaultConfig(
        duplicate_notification_rate=1.0,
        forged_notification_rate=1.0,
        late_notification_rate=0.5,
        late_notification_s=0.3,
        processing_delay_s=0.01,
        seed=5,
    )
    async with provider_and_runtime(settings, database_url, faults) as (runtime, _):
        async with api_server(runtime, port):
            lot = await create_lot(runtime)
            drivers = [await make_driver(runtime, unique_plate()) for _ in range(4)]
            for driver in drivers:
                await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=70))

            async def all_charged() -> list[Any]:
                rows = await charges_of(runtime, lot)
                return rows if [r["status"] for r in rows] == ["succeeded"] * 4 else []

            rows = await eventually(all_charged, timeout_s=20)
        for row in rows:
            assert await _settlements(runtime, row["id"]) == 1
        async with runtime.pool.acquire() as conn:
            assert await ledger.is_balanced(conn)
            assert await ledger.balance(conn, ledger.revenue(lot.id)) == -4 * 1200
            told = await conn.fetchval(
                "SELECT count(*) FROM notifications WHERE kind = 'exit_charged' "
                "AND account_id = ANY($1)",
                [d.account_id for d in drivers],
            )
        assert told == 4


async def test_held_car_pays_fee_and_debt_by_qr_and_pay_later_comes_back(
    runtime: Runtime,
    provider: ProviderEndpoint,
    gate: GateProbe,
    lot: Lot,
    api: httpx.AsyncClient,
) -> None:
    driver = await driver_in_debt(runtime, gate, lot)

    # Next visit: the entry shows the debt, the exit holds for fee + debt with a QR code.
    entry = gate.capture("in", driver.plate)
    entered = await gate.decide(lot.code, "in1", entry)
    assert any("欠费 ¥6.00" in line for line in entered["display"])
    # With the binding: a stay is charged pay-later only to a binding older than it.
    await backdate_entry(runtime, lot, driver.plate, timedelta(minutes=90))
    exit_capture = gate.capture("out", driver.plate)
    held = await gate.decide(lot.code, "out1", exit_capture)
    assert (held["action"], held["fee_fen"]) == ("hold", 1200 + 600)
    # The QR code opens the pay page, which starts the payment through the API.
    assert httpx.URL(held["payment_qr_url"]).path == f"/pay/{exit_capture.capture_id}"
    qr_path = f"/api/v1/gate-payments/{exit_capture.capture_id}"

    started = await api.post(qr_path)
    assert started.status_code == 200, started.text
    view = started.json()
    assert (view["stay_fee_fen"], view["debt_fen"], view["amount_fen"]) == (1200, 600, 1800)
    assert view["status"] == "pending" and view["pay_url"]
    assert (await api.post(qr_path)).json()["pay_url"] == view["pay_url"], "a rescan reuses it"

    # The driver pays in their wallet; the notification is lost (nobody listens at the
    # notify URL in this test), so the phone's status poll asks the provider.
    async with httpx.AsyncClient(base_url=provider.url) as wallet:
        out_trade_no = httpx.URL(view["pay_url"]).path.rsplit("/", 1)[-1]
        paid = await wallet.post(f"/v1/payments/{out_trade_no}/pay")
        assert paid.status_code == 200, paid.text
    status = (await api.get(qr_path)).json()
    assert status["status"] == "succeeded"

    await gate.wait_for(exit_capture, commands=2)
    opened = gate.commands[str(exit_capture.capture_id)][1]
    assert opened["action"] == "open"
    async with runtime.pool.acquire() as conn:
        stay = await conn.fetchrow(
            "SELECT status, settlement, fee_fen FROM sessions WHERE exit_capture_id = $1",
            exit_capture.capture_id,
        )
        debt = await conn.fetchrow("SELECT * FROM debts WHERE account_id = $1", driver.account_id)
        blocked = await conn.fetchval(
            "SELECT blocked_for_arrears FROM accounts WHERE id = $1", driver.account_id
        )
        assert await ledger.is_balanced(conn)
        assert await ledger.balance(conn, ledger.receivable(driver.account_id)) == 0
        stored = await conn.fetchval(
            "SELECT command->>'action' FROM captures WHERE capture_id = $1",
            exit_capture.capture_id,
        )
    assert (stay["status"], stay["settlement"], stay["fee_fen"]) == ("closed", "paid_at_gate", 1200)
    assert debt["settled_at"] is not None and blocked is False
    assert stored == "open", "a redelivered capture gets the open command"

    async with runtime.pool.acquire() as conn:
        thanks = await conn.fetchval(
            "SELECT body FROM notifications WHERE account_id = $1 AND kind = 'payment_received'",
            driver.account_id,
        )
    assert thanks == "已收到您支付的¥18.00，谢谢"

    # Pay-later is back: the next exit opens without stopping.
    again = await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))
    assert again["action"] == "open"


async def test_a_doubtful_read_of_a_plate_in_arrears_is_never_shown_or_asked_its_debts(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient
) -> None:
    """A car read with doubt as the plate of a driver in arrears may be a stranger's: the gate
    and the QR page showed the holder's debts to whoever was at the barrier and asked them to
    pay them. Now the debts are shown and collected only when both ends surely read the
    vehicle; the car pays its stay's fee."""
    driver = await driver_in_debt(runtime, gate, lot)
    entered = await gate.decide(lot.code, "in1", gate.capture("in", driver.plate, confidence=0.93))
    assert not any("欠费" in line for line in entered["display"]), entered["display"]
    await backdate_entry(runtime, lot, driver.plate, timedelta(minutes=90))
    exit_capture = gate.capture("out", driver.plate, confidence=0.93)
    held = await gate.decide(lot.code, "out1", exit_capture)
    assert (held["action"], held["fee_fen"]) == ("hold", 1200), held
    assert not any("欠费" in line for line in held["display"]), held["display"]
    page = await payments_service.gate_payment_page(runtime, exit_capture.capture_id)
    assert page is not None and (page.debts, page.amount_fen) == ([], 1200), page
    started = await api.post(f"/api/v1/gate-payments/{exit_capture.capture_id}")
    assert started.status_code == 200, started.text
    view = started.json()
    assert (view["stay_fee_fen"], view["debt_fen"], view["amount_fen"]) == (1200, 0, 1200)


async def test_debts_settled_in_the_app_restore_pay_later(
    runtime: Runtime, provider: ProviderEndpoint, gate: GateProbe, lot: Lot
) -> None:
    settings = runtime.settings
    driver = await driver_in_debt(runtime, gate, lot)

    payment = await payments_service.start_debt_payment(runtime, driver.account_id)
    assert (payment.amount_fen, payment.purpose) == (600, "debts")
    async with httpx.AsyncClient(base_url=provider.url) as wallet:
        assert (await wallet.post(f"/v1/payments/{payment.out_trade_no}/pay")).status_code == 200
    # No notification reaches us here; the worker's sweep asks about pending payments.
    settings.charge_query_after_s = 0.0
    runtime.outbox.query_after_s = 0.0
    await runtime.outbox.sweep(datetime.now(UTC))
    assert await _debt_total(runtime, driver.account_id) == 0
    async with runtime.pool.acquire() as conn:
        assert not await conn.fetchval(
            "SELECT blocked_for_arrears FROM accounts WHERE id = $1", driver.account_id
        )
        assert await ledger.is_balanced(conn)
        assert await ledger.balance(conn, ledger.receivable(driver.account_id)) == 0
    with pytest.raises(Exception, match="nothing to pay"):
        await payments_service.start_debt_payment(runtime, driver.account_id)


async def _debt_total(runtime: Runtime, account_id: int) -> int:
    async with runtime.pool.acquire() as conn:
        total: int = await conn.fetchval(
            "SELECT COALESCE(sum(amount_fen), 0)::bigint FROM debts "
            "WHERE account_id = $1 AND settled_at IS NULL",
            account_id,
        )
    return total


async def test_cancelled_agreement_holds_the_next_exit(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    driver = await make_driver(runtime, unique_plate())
    async with runtime.pool.acquire() as conn, conn.transaction():
        with pytest.raises(agreements.AgreementError):
            await agreements.sign(
                conn,
                driver.account_id,
                provider="sandbox",
                agreement_no=f"AGR-{uuid.uuid4().hex[:8]}",
                per_session_limit_fen=1000,
            )
    async with runtime.pool.acquire() as conn:
        assert await agreements.cancel(conn, driver.account_id)
        assert not await agreements.cancel(conn, driver.account_id)
    command = await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))
    assert command["action"] == "hold"


async def test_quote_gives_the_fee_the_exit_would_charge(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient
) -> None:
    plate = unique_plate()
    driver = await make_driver(runtime, plate)
    entry = gate.capture("in", plate)
    await gate.decide(lot.code, "in1", entry)
    # With the binding: a stay is charged pay-later only to a binding older than it.
    await backdate_entry(runtime, lot, plate, timedelta(minutes=90))
    quote = await api.get(f"/api/v1/car-parks/{lot.code}/quote", params={"plate": plate})
    assert quote.status_code == 200, quote.text
    body = quote.json()
    assert (body["fee_fen"], body["parked_minutes"]) == (1200, 90)
    assert sum(s["fee_fen"] for s in body["segments"]) == body["gross_fen"]
    command = await gate.decide(lot.code, "out1", gate.capture("out", plate))
    assert command["fee_fen"] == body["fee_fen"]
    assert driver.account_id

    missing = await api.get(f"/api/v1/car-parks/{lot.code}/quote", params={"plate": plate})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "stay_not_found"
    bad = await api.get(f"/api/v1/car-parks/{lot.code}/quote", params={"plate": "x"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"


async def test_quote_is_for_the_plate_of_the_colour_asked(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient
) -> None:
    plate = unique_plate()
    await gate.decide(lot.code, "in1", gate.capture("in", plate, color="yellow"))
    path = f"/api/v1/car-parks/{lot.code}/quote"

    lorry = await api.get(path, params={"plate": plate, "color": "yellow"})
    assert lorry.status_code == 200, lorry.text
    assert (lorry.json()["plate"], lorry.json()["color"]) == (plate, "yellow")
    assert (await api.get(path, params={"plate": plate})).json()["color"] == "yellow"
    car = await api.get(path, params={"plate": plate, "color": "blue"})
    assert car.status_code == 404 and car.json()["error"]["code"] == "stay_not_found"
    red = await api.get(path, params={"plate": plate, "color": "red"})
    assert red.status_code == 422 and red.json()["error"]["code"] == "invalid_request"
    assert red.json()["error"]["details"][0]["loc"] == ["query", "color"]


def test_the_quoted_stay_is_of_one_vehicle_never_a_guess() -> None:
    """The rule alone, until the lane keeps open stays per (plate, colour) (the test below)."""
    blue, yellow, unread = {"plate_color": "blue"}, {"plate_color": "yellow"}, {"plate_color": None}
    pick = payments_service._stay_of_vehicle
    with pytest.raises(AppError) as asked:
        pick([blue, yellow], None)  # type: ignore[list-item]
    assert (asked.value.status_code, asked.value.code) == (409, "plate_color_required")
    assert asked.value.details == {"colors": ["blue", "yellow"]}
    assert pick([blue, yellow], "yellow") is yellow  # type: ignore[list-item]
    assert pick([blue, unread], "blue") is blue  # type: ignore[list-item]
    assert pick([unread], "green") is unread, "a stay with no colour read answers for any"  # type: ignore[list-item]
    with pytest.raises(AppError) as missing:
        pick([blue], "yellow")  # type: ignore[list-item]
    assert missing.value.code == "stay_not_found"


async def test_quote_without_a_colour_asks_for_it_when_two_vehicles_share_the_text(
    runtime: Runtime, lot: Lot, api: httpx.AsyncClient
) -> None:
    plate = unique_plate()
    entered = datetime.now(UTC) - timedelta(minutes=90)
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            """INSERT INTO sessions (car_park_id, plate, plate_color, entered_at)
               VALUES ($1, $2, 'blue', $3)""",
            lot.id,
            plate,
            entered,
        )
        # Another vehicle with the same characters: a stay of its own (open stays are one
        # per car park and vehicle, migration 0017).
        await conn.execute(
            """INSERT INTO sessions (car_park_id, plate, plate_color, entered_at)
               VALUES ($1, $2, 'yellow', $3)""",
            lot.id,
            plate,
            entered - timedelta(minutes=30),
        )
    path = f"/api/v1/car-parks/{lot.code}/quote"
    ambiguous = await api.get(path, params={"plate": plate})
    assert ambiguous.status_code == 409, ambiguous.text
    error = ambiguous.json()["error"]
    assert error["code"] == "plate_color_required"
    assert sorted(error["details"]["colors"]) == ["blue", "yellow"]
    blue = (await api.get(path, params={"plate": plate, "color": "blue"})).json()
    yellow = (await api.get(path, params={"plate": plate, "color": "yellow"})).json()
    assert (blue["color"], blue["parked_minutes"]) == ("blue", 90)
    assert (yellow["color"], yellow["parked_minutes"]) == ("yellow", 120)


async def _pay(provider: ProviderEndpoint, out_trade_no: str) -> None:
    async with httpx.AsyncClient(base_url=provider.url) as wallet:
        paid = await wallet.post(f"/v1/payments/{out_trade_no}/pay")
    assert paid.status_code == 200, paid.text


async def _book_by_sweep(runtime: Runtime) -> None:
    runtime.outbox.query_after_s = 0.0
    await runtime.outbox.sweep(datetime.now(UTC))


async def test_a_debt_paid_in_the_app_and_again_at_the_gate_is_refunded_once(
    runtime: Runtime,
    provider: ProviderEndpoint,
    gate: GateProbe,
    lot: Lot,
    api: httpx.AsyncClient,
) -> None:
    driver = await driver_in_debt(runtime, gate, lot)
    first = await payments_service.start_debt_payment(runtime, driver.account_id)
    again = await payments_service.start_debt_payment(runtime, driver.account_id)
    assert again.out_trade_no == first.out_trade_no, "asking twice gives the same order"
    # Next visit: held for fee + debt, paid by QR code; then the app payment started before
    # is paid too. It is all overpaid (the debt is settled) and goes back by itself.
    await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
    # With the binding: a stay is charged pay-later only to a binding older than it.
    await backdate_entry(runtime, lot, driver.plate, timedelta(minutes=90))
    exit_capture = gate.capture("out", driver.plate)
    held = await gate.decide(lot.code, "out1", exit_capture)
    assert held["fee_fen"] == 1200 + 600
    qr = (await api.post(f"/api/v1/gate-payments/{exit_capture.capture_id}")).json()
    await _pay(provider, httpx.URL(qr["pay_url"]).path.rsplit("/", 1)[-1])
    assert (await api.get(f"/api/v1/gate-payments/{exit_capture.capture_id}")).json()[
        "status"
    ] == "succeeded"
    await gate.wait_for(exit_capture, commands=2)
    await _pay(provider, first.out_trade_no)
    await _book_by_sweep(runtime)

    async def refunded() -> list[Any]:
        async with runtime.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT amount_fen, status FROM refunds WHERE account_id = $1 "
                "AND kind = 'overpayment'",
                driver.account_id,
            )
        return rows if rows and all(r["status"] == "succeeded" for r in rows) else []

    assert [r["amount_fen"] for r in await eventually(refunded)] == [600]
    async with runtime.pool.acquire() as conn:
        assert await ledger.is_balanced(conn)
        assert await ledger.balance(conn, ledger.overpaid(driver.account_id)) == 0
        assert await ledger.balance(conn, ledger.receivable(driver.account_id)) == 0
        blocked = await conn.fetchval(
            "SELECT blocked_for_arrears FROM accounts WHERE id = $1", driver.account_id
        )
    assert blocked is False


async def test_a_qr_payment_booked_after_its_stay_became_a_debt_settles_that_debt(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    """A driver without pay-later is held for ¥12.00 and starts paying by the gate's QR code;
    the notification is late, the car tailgates out and comes back, so the stay's fee becomes
    a debt (`lanes.edges.end_missed_stay`). The payment, booked then, paid exactly that fee:
    it settles the stay's debt. Refunding it as paid twice instead left the driver, who had
    paid, blocked for arrears, reminded and asked for the same ¥12.00 again (review 12, #3)."""
    secret = uuid.uuid4().hex
    # The provider is unreachable for requests: only the notification posted here decides.
    faults = sandbox.FaultConfig(error_rate=1.0)
    async with provider_and_runtime(settings, database_url, faults, secret=secret) as (runtime, _):
        lot = await create_lot(runtime)
        driver = await make_driver(runtime, unique_plate(), pay_later=False)
        async with runtime.pool.acquire() as conn:  # bound since long before the entry
            await conn.execute(
                "UPDATE plate_bindings SET bound_at = bound_at - interval '1 day' WHERE plate = $1",
                driver.plate,
            )
        await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=90))
        out = gate.capture("out", driver.plate)
        held = await gate.decide(lot.code, "out1", out)
        assert (held["action"], held["fee_fen"]) == ("hold", 1200)
        async with runtime.pool.acquire() as conn, conn.transaction():
            stay_id, captured_at = await conn.fetchrow(
                "SELECT session_id, captured_at FROM captures WHERE capture_id = $1",
                out.capture_id,
            )
            # The payment the QR page started (its provider call is beside the point here).
            payment = await payments.create(
                conn,
                provider=runtime.provider.name,
                purpose="gate",
                account_id=driver.account_id,
                session_id=stay_id,
                capture=(out.capture_id, captured_at),
                stay_fee_fen=1200,
                owed=[],
            )
        again = await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
        assert again["action"] == "open"
        async with runtime.pool.acquire() as conn:
            debt = await conn.fetchrow("SELECT * FROM debts WHERE session_id = $1", stay_id)
        assert debt is not None and debt["amount_fen"] == 1200, "the stay became a debt"

        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as api:
            body, headers = _signed(
                secret,
                {
                    "event_id": str(uuid.uuid4()),
                    "type": "payment",
                    "out_trade_no": payment.out_trade_no,
                    "order_id": "sbx_p1",
                    "status": "succeeded",
                    "amount_fen": 1200,
                    "reason": None,
                    "finished_at": datetime.now(UTC).isoformat(),
                },
            )
            answer = await api.post(
                "/api/v1/payments/notifications/sandbox", content=body, headers=headers
            )
            assert answer.status_code == 200, answer.text
        async with runtime.pool.acquire() as conn:
            debt = await conn.fetchrow("SELECT * FROM debts WHERE session_id = $1", stay_id)
            blocked = await conn.fetchval(
                "SELECT blocked_for_arrears FROM accounts WHERE id = $1", driver.account_id
            )
            refunded = await conn.fetchval(
                "SELECT COALESCE(sum(amount_fen), 0) FROM refunds WHERE payment_id = $1",
                payment.id,
            )
            owed = await ledger.balance(conn, ledger.receivable(driver.account_id))
            overpaid = await ledger.balance(conn, ledger.overpaid(driver.account_id))
            revenue = await ledger.balance(conn, ledger.revenue(lot.id))
            assert await ledger.is_balanced(conn)
    assert debt["payment_id"] == payment.id, "the payment of the stay's fee settles its debt"
    assert (blocked, owed, overpaid, refunded) == (False, 0, 0, 0), (
        f"blocked={blocked}, still owed {owed} fen, {refunded} fen refunded as paid twice"
    )
    assert revenue == -1200, "the fee was earned once, at the debt's accrual"


async def _held_unbound_exits(
    runtime: Runtime, gate: GateProbe, lot: Lot, count: int
) -> list[Capture]:
    """An unbound car parked 90 minutes, read `count` times at the exit: each read holds."""
    plate = unique_plate()
    await gate.decide(lot.code, "in1", gate.capture("in", plate))
    # With the binding: a stay is charged pay-later only to a binding older than it.
    await backdate_entry(runtime, lot, plate, timedelta(minutes=90))
    captures = [gate.capture("out", plate) for _ in range(count)]
    for capture in captures:
        held = await gate.decide(lot.code, "out1", capture)
        assert (held["action"], held["fee_fen"]) == ("hold", 1200)
    return captures


async def test_two_qr_codes_of_one_stay_both_paid_close_it_once_and_refund_the_other(
    runtime: Runtime,
    provider: ProviderEndpoint,
    gate: GateProbe,
    lot: Lot,
    api: httpx.AsyncClient,
) -> None:
    first, second = await _held_unbound_exits(runtime, gate, lot, 2)
    scans = await asyncio.gather(
        *(api.post(f"/api/v1/gate-payments/{first.capture_id}") for _ in range(4))
    )
    assert [s.status_code for s in scans] == [200] * 4, [s.text for s in scans]
    assert len({s.json()["pay_url"] for s in scans}) == 1, "simultaneous scans: one payment"
    other = await api.post(f"/api/v1/gate-payments/{second.capture_id}")
    assert other.status_code == 200, other.text
    for view in (scans[0].json(), other.json()):
        await _pay(provider, httpx.URL(view["pay_url"]).path.rsplit("/", 1)[-1])
    for capture in (first, second):
        assert (await api.get(f"/api/v1/gate-payments/{capture.capture_id}")).status_code == 200
    async with runtime.pool.acquire() as conn:
        stay = await conn.fetchrow(
            "SELECT status, fee_fen, exit_capture_id FROM sessions WHERE id = "
            "(SELECT session_id FROM captures WHERE capture_id = $1)",
            first.capture_id,
        )
        paid = await conn.fetch(
            "SELECT id, status FROM payments WHERE capture_id = ANY($1) ORDER BY id",
            [first.capture_id, second.capture_id],
        )
        overpaid = await conn.fetchval(
            "SELECT count(*) FROM refunds WHERE payment_id = ANY($1) AND kind = 'overpayment'",
            [p["id"] for p in paid],
        )
        assert await ledger.is_balanced(conn)
        assert await ledger.balance(conn, ledger.revenue(lot.id)) == -1200
    assert (stay["status"], stay["fee_fen"]) == ("closed", 1200)
    assert [p["status"] for p in paid] == ["succeeded", "succeeded"]
    assert overpaid == 1, "the second payment goes back"


async def _pay_at_gate(
    runtime: Runtime, provider: ProviderEndpoint, api: httpx.AsyncClient, capture: Capture
) -> None:
    """The held car's driver pays by the QR code; waits until the gate's job is done."""
    view = (await api.post(f"/api/v1/gate-payments/{capture.capture_id}")).json()
    await _pay(provider, httpx.URL(view["pay_url"]).path.rsplit("/", 1)[-1])
    path = f"/api/v1/gate-payments/{capture.capture_id}"
    assert (await api.get(path)).json()["status"] == "succeeded"

    async def released() -> bool:
        async with runtime.pool.acquire() as conn:
            done: bool = await conn.fetchval(
                """SELECT j.done_at IS NOT NULL FROM outbox j JOIN payments p ON p.id = j.ref_id
                   WHERE j.kind = 'gate_command' AND p.capture_id = $1""",
                capture.capture_id,
            )
        return done

    await eventually(released)


async def test_a_payment_booked_after_the_next_car_was_captured_sends_the_gate_no_open(
    runtime: Runtime,
    provider: ProviderEndpoint,
    gate: GateProbe,
    lot: Lot,
    api: httpx.AsyncClient,
) -> None:
    """Car A is held; before its payment is booked (a slow provider, a lost notification the
    sweep finds) it was let out by hand and car B came up and is held. A's payment is booked and
    its stay settled, but no open is sent: the barrier would lift for B. B's own payment opens
    it as usual."""
    (first,) = await _held_unbound_exits(runtime, gate, lot, 1)
    (second,) = await _held_unbound_exits(runtime, gate, lot, 1)
    await _pay_at_gate(runtime, provider, api, first)
    await _pay_at_gate(runtime, provider, api, second)
    # Published in order on the same topic: once B's open is here, A's would have been.
    await gate.wait_for(second, commands=2)
    assert gate.commands[str(second.capture_id)][1]["action"] == "open"
    assert [c["action"] for c in gate.commands[str(first.capture_id)]] == ["hold"], (
        "the first car's late payment lifted the barrier for the car behind it"
    )
    async with runtime.pool.acquire() as conn:
        stay = await conn.fetchrow(
            "SELECT status, settlement FROM sessions WHERE exit_capture_id = $1",
            first.capture_id,
        )
        outcome = await conn.fetchval(
            "SELECT outcome FROM captures WHERE capture_id = $1", first.capture_id
        )
    assert (stay["status"], stay["settlement"], outcome) == (
        "closed",
        "paid_at_gate",
        "paid_at_gate",
    )


async def test_a_payment_for_a_car_read_again_at_the_barrier_opens_for_its_newest_read(
    runtime: Runtime,
    provider: ProviderEndpoint,
    gate: GateProbe,
    lot: Lot,
    api: httpx.AsyncClient,
) -> None:
    """The camera read the waiting car twice, each read held with a QR code; the driver pays by
    the first. The car is still first in the lane: the open is for its newest read, the one
    the gate acts on."""
    first, second = await _held_unbound_exits(runtime, gate, lot, 2)
    await _pay_at_gate(runtime, provider, api, first)
    await gate.wait_for(second, commands=2)
    assert gate.commands[str(second.capture_id)][1]["action"] == "open"
    assert [c["action"] for c in gate.commands[str(first.capture_id)]] == ["hold"]


async def test_an_unpaid_qr_payment_is_closed_at_the_provider_after_its_lifetime(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient
) -> None:
    [held] = await _held_unbound_exits(runtime, gate, lot, 1)
    started = await api.post(f"/api/v1/gate-payments/{held.capture_id}")
    assert started.status_code == 200, started.text
    runtime.outbox.payment_lifetime_s = 0.0
    await _book_by_sweep(runtime)
    async with runtime.pool.acquire() as conn:
        status = await conn.fetchval(
            "SELECT status FROM payments WHERE capture_id = $1", held.capture_id
        )
    assert status == "closed"
    # The driver asks again: a new payment replaces the closed one.
    again = await api.post(f"/api/v1/gate-payments/{held.capture_id}")
    assert again.status_code == 200 and again.json()["pay_url"] != started.json()["pay_url"]


async def test_oversized_notifications_and_quote_floods_are_refused(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient
) -> None:
    huge = await api.post(
        "/api/v1/payments/notifications/sandbox", content=b"{" + b" " * 20_000 + b"}"
    )
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "payload_too_large"
    nul = await api.get("/api/v1/car-parks/a%00b/quote", params={"plate": unique_plate()})
    assert nul.status_code == 422 and nul.json()["error"]["code"] == "invalid_request"

    runtime.settings.quotes_per_minute_per_client = 3
    plate = unique_plate()
    answers = [
        await api.get(f"/api/v1/car-parks/{lot.code}/quote", params={"plate": plate})
        for _ in range(4)
    ]
    assert [a.status_code for a in answers] == [404, 404, 404, 429]


async def test_a_debt_settled_at_the_gate_is_no_longer_offered_in_the_app(
    runtime: Runtime,
    provider: ProviderEndpoint,
    gate: GateProbe,
    lot: Lot,
    api: httpx.AsyncClient,
) -> None:
    driver = await driver_in_debt(runtime, gate, lot)
    started = await payments_service.start_debt_payment(runtime, driver.account_id)
    # Next visit: held for fee + debt, paid by QR code at the gate; the debt is settled.
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=90))
    exit_capture = gate.capture("out", driver.plate)
    held = await gate.decide(lot.code, "out1", exit_capture)
    assert held["fee_fen"] == 1200 + 600
    qr = (await api.post(f"/api/v1/gate-payments/{exit_capture.capture_id}")).json()
    await _pay(provider, httpx.URL(qr["pay_url"]).path.rsplit("/", 1)[-1])
    paid = await api.get(f"/api/v1/gate-payments/{exit_capture.capture_id}")
    assert paid.json()["status"] == "succeeded"
    await gate.wait_for(exit_capture, commands=2)

    with pytest.raises(AppError) as asked:
        await payments_service.start_debt_payment(runtime, driver.account_id)
    assert asked.value.code == "no_debts"
    # The order priced with the settled debt was withdrawn: it can no longer be paid.
    order = await provider_order(provider.url, started.out_trade_no)
    assert order is not None and order["status"] == "closed"
    async with runtime.pool.acquire() as conn:
        status = await conn.fetchval(
            "SELECT status FROM payments WHERE out_trade_no = $1", started.out_trade_no
        )
        refunds = await conn.fetchval(
            "SELECT count(*) FROM refunds WHERE account_id = $1", driver.account_id
        )
    assert (status, refunds) == ("closed", 0)


async def test_the_quote_limit_is_not_escaped_by_walking_ones_own_ipv6_prefix(
    runtime: Runtime, app: FastAPI, gate: GateProbe, lot: Lot
) -> None:
    """The quote says whether and for how long a plate is parked here, so it is rate-limited
    per client "so that it must not serve as a way to find cars". The client is the peer's
    full address: any IPv6 host holds a /64 (2^64 addresses) and sends each request from a
    new one, so the limit never applied. An IPv6 client is now counted by its /64 prefix,
    for every per-client limit."""
    plate = unique_plate()
    await make_driver(runtime, plate)
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=30))
    limit = runtime.settings.quotes_per_minute_per_client
    prefix = ipaddress.IPv6Network("2001:db8:18:18::/64")
    statuses = []
    for n in range(1, limit + 6):
        transport = httpx.ASGITransport(app=app, client=(str(prefix[n]), 40000 + n))
        async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as c:
            answer = await c.get(f"/api/v1/car-parks/{lot.code}/quote", params={"plate": plate})
        statuses.append(answer.status_code)
    assert statuses[0] == 200, statuses
    assert 429 in statuses, (
        f"{len(statuses)} quotes of one plate from one /64 network, none refused"
    )


async def _held_as_a_while_b_is_parked(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> tuple[Driver, Driver, Capture]:
    """Two pay-later drivers parked at a car park that holds doubtful exits; an exit read with
    doubt as A's plate, held for A's stay's ¥12.00: the drivers and that capture."""
    await set_car_park(runtime, lot, uncertain_exit_policy="hold")
    owner_a = await make_driver(runtime, unique_plate())
    owner_b = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, owner_a.plate, confidence=0.85)
    await enter(runtime, gate, lot, owner_b.plate)
    capture = gate.capture("out", owner_a.plate, confidence=0.85)
    held = await gate.decide(lot.code, "out1", capture)
    assert (held["action"], held["fee_fen"]) == ("hold", 1200), held
    return owner_a, owner_b, capture


async def _stay_of(conn: asyncpg.Connection, lot: Lot, plate: str) -> asyncpg.Record:
    """The status and settlement of the plate's (only) stay in the car park."""
    row: asyncpg.Record = await conn.fetchrow(
        "SELECT status, settlement FROM sessions WHERE plate = $1 AND car_park_id = $2",
        plate,
        lot.id,
    )
    return row


async def _refunded_for(conn: asyncpg.Connection, capture: Capture) -> int:
    """Fen refunded of the payments made at the gate for `capture`."""
    refunded: int = await conn.fetchval(
        """SELECT COALESCE(sum(amount_fen), 0) FROM refunds
           WHERE payment_id IN (SELECT id FROM payments WHERE capture_id = $1)""",
        capture.capture_id,
    )
    return refunded


async def _a_stays_open_and_bs_payment_went_back(
    runtime: Runtime, lot: Lot, owner_a: Driver, owner_b: Driver, capture: Capture
) -> None:
    """The car at the barrier was B's: B's stay is charged pay-later, A's (its car inside)
    stays open, and the ¥12.00 paid at the gate for A's stay goes back; the ledger balances."""
    async with runtime.pool.acquire() as conn:
        stay_a = await _stay_of(conn, lot, owner_a.plate)
        charged_b = await conn.fetchval(
            "SELECT count(*) FROM charges c JOIN sessions s ON s.id = c.session_id "
            "WHERE s.plate = $1 AND s.car_park_id = $2",
            owner_b.plate,
            lot.id,
        )
        refunded = await _refunded_for(conn, capture)
        assert await ledger.is_balanced(conn)
    assert charged_b == 1, "B's own stay is charged pay-later"
    assert (stay_a["status"], refunded) == ("open", 1200), (
        f"A's stay (car inside) is {stay_a['status']}/{stay_a['settlement']}; "
        f"of the ¥12.00 B paid for it, {refunded} fen went back"
    )


async def test_a_qr_payment_booked_after_an_attendant_named_another_car_goes_back(
    runtime: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    provider: ProviderEndpoint,
) -> None:
    """An exit read with doubt as A's plate holds for A's stay ('uncertain': the driver may pay
    while an attendant decides). The driver at the barrier opens the QR page (the payment is
    priced with A's stay) just as the attendant, looking at the frame, names the car: it is
    B's, whose stay is charged pay-later and the gate opens. The driver's payment is booked a
    moment later: it closed A's stay, A's car still inside, as paid at the gate with B's money,
    and nothing went back: B paid twice (review 26). Now the payment books only the stay its
    capture is still decided for, and the rest goes back."""
    owner_a, owner_b, capture = await _held_as_a_while_b_is_parked(runtime, gate, lot)
    qr_path = f"/api/v1/gate-payments/{capture.capture_id}"
    started = await api.post(qr_path)
    assert started.status_code == 200, started.text
    assert started.json()["amount_fen"] == 1200

    async with runtime.pool.acquire() as conn:
        exception_id = await conn.fetchval(
            "SELECT id FROM lane_exceptions WHERE capture_id = $1", capture.capture_id
        )
    attendant = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))
    named = await api.post(
        f"/api/v1/operator/exceptions/{exception_id}/resolve",
        json={"plate": owner_b.plate, "color": "blue"},
        headers=attendant,
    )
    assert named.status_code == 200, named.text
    assert named.json()["action"] == "open", named.json()

    await _pay(provider, httpx.URL(started.json()["pay_url"]).path.rsplit("/", 1)[-1])
    assert (await api.get(qr_path)).json()["status"] == "succeeded"
    await _a_stays_open_and_bs_payment_went_back(runtime, lot, owner_a, owner_b, capture)


async def test_an_app_payment_withdrawn_while_its_order_is_being_made_is_still_booked_when_paid(
    runtime: Runtime, provider: ProviderEndpoint, gate: GateProbe, lot: Lot
) -> None:
    """Two "pay my debts" taps in the app, as the debt they price changes (disputed here; a
    gate's QR payment settling it does the same). The first tap's payment row is committed
    and its provider order being made (`open_at_provider`, a side effect after commit). The
    second tap finds that payment priced with debts no longer owed and withdraws it: with no
    pay_url stored yet it takes it for one the provider never had and closes it in our books
    only. The first tap's order is then made at the provider and its pay URL handed to the
    driver, who paid it. Its notification lost, the sweep that books lost notifications asks
    only about pending payments: the money the provider took was never booked nor refunded
    (review 26). Now an order made for a payment withdrawn meanwhile is closed, not offered."""
    driver = await driver_in_debt(runtime, gate, lot)
    # The first tap, up to its commit (start_debt_payment's first unit of work).
    async with runtime.pool.acquire() as conn, conn.transaction():
        owed = await debts.open_debts(conn, driver.account_id, lock=True)
        assert [d.amount_fen for d in owed] == [600]
        first = await payments.create(
            conn,
            provider=runtime.provider.name,
            purpose="debts",
            account_id=driver.account_id,
            session_id=None,
            capture=None,
            stay_fee_fen=0,
            owed=owed,
        )
    # Meanwhile the debt changes: the driver disputes its charge.
    assert owed[0].charge_id is not None
    async with runtime.pool.acquire() as conn, conn.transaction():
        await disputes.open_dispute(
            conn,
            charge_id=owed[0].charge_id,
            account_id=driver.account_id,
            via="app",
            style=notifications.MessageStyle(),
        )
    # The second tap withdraws the first tap's payment (nothing else is owed now).
    with pytest.raises(AppError, match="nothing to pay"):
        await payments_service.start_debt_payment(runtime, driver.account_id)
    # The first tap goes on: its order is made at the provider, and closed there, not shown.
    with pytest.raises(AppError, match="withdrawn"):
        await payments_service.open_at_provider(runtime, first, "parking fees owed")
    async with httpx.AsyncClient(base_url=provider.url) as wallet:
        paid = await wallet.post(f"/v1/payments/{first.out_trade_no}/pay")
    assert paid.status_code != 200, "the order of a withdrawn payment can still be paid"


async def _doubtful_exit_paid_by_qr(
    runtime: Runtime,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    provider: ProviderEndpoint,
    plate: str,
) -> Capture:
    """`plate` came in and is leaving read with doubt (0.85) where such exits are held: its
    driver scanned the QR code and paid the ¥12.00, not yet booked. The held exit capture."""
    await set_car_park(runtime, lot, uncertain_exit_policy="hold")
    await enter(runtime, gate, lot, plate, confidence=0.85)
    capture = gate.capture("out", plate, confidence=0.85)
    held = await gate.decide(lot.code, "out1", capture)
    assert (held["action"], held["fee_fen"]) == ("hold", 1200), held
    started = await api.post(f"/api/v1/gate-payments/{capture.capture_id}")
    assert started.status_code == 200, started.text
    out_trade_no = httpx.URL(started.json()["pay_url"]).path.rsplit("/", 1)[-1]
    async with httpx.AsyncClient(base_url=provider.url) as wallet:
        paid = await wallet.post(f"/v1/payments/{out_trade_no}/pay")
    assert paid.status_code == 200, paid.text
    return capture


async def _waiting_on(runtime: Runtime, query_start: str, timeout_s: float = 10.0) -> bool:
    """Whether a backend running a statement beginning `query_start` comes to wait on a lock
    within `timeout_s`."""
    try:
        return bool(
            await eventually(lambda: waiting_on_a_lock(runtime, query_start), timeout_s=timeout_s)
        )
    except AssertionError:
        return False


async def test_a_qr_payment_booked_while_an_attendant_names_another_car_leaves_the_misread_stay(
    runtime: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    provider: ProviderEndpoint,
) -> None:
    """As test_a_qr_payment_booked_after_an_attendant_named_another_car_goes_back, but the
    booking runs while the attendant's resolve is in flight (its capture row updated, not yet
    committed: paused here by holding audit_log, the resolve's last write). `_close_stay`'s
    EXISTS read the capture without locking it, saw the old decision (A's stay) and closed
    A's stay with B's money; the resolve then committed B's charge: B paid twice (review 28).
    The booking now locks the capture's exception and the capture first, as the resolve does,
    and reads the decision committed."""
    owner_a, owner_b, capture = await _held_as_a_while_b_is_parked(runtime, gate, lot)
    started = await api.post(f"/api/v1/gate-payments/{capture.capture_id}")
    assert started.status_code == 200, started.text
    async with runtime.pool.acquire() as conn:
        exception_id = await conn.fetchval(
            "SELECT id FROM lane_exceptions WHERE capture_id = $1", capture.capture_id
        )
    attendant = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))

    async with holding(runtime, "LOCK TABLE audit_log IN EXCLUSIVE MODE") as release:
        resolve = asyncio.create_task(
            api.post(
                f"/api/v1/operator/exceptions/{exception_id}/resolve",
                json={"plate": owner_b.plate, "color": "blue"},
                headers=attendant,
            )
        )
        assert await _waiting_on(runtime, "INSERT INTO audit_log"), "resolve never paused"
        out_trade_no = httpx.URL(started.json()["pay_url"]).path.rsplit("/", 1)[-1]
        async with httpx.AsyncClient(base_url=provider.url) as wallet:
            paid = await wallet.post(f"/v1/payments/{out_trade_no}/pay")
        assert paid.status_code == 200, paid.text
        booking = asyncio.create_task(
            payments_service.gate_payment_status(runtime, capture.capture_id)
        )
        # The booking has closed a stay and waits for the exception the resolve holds.
        await _waiting_on(runtime, "UPDATE lane_exceptions", timeout_s=5)
        await release()
        named = await resolve
        await booking
    assert named.status_code == 200, named.text
    assert named.json()["action"] == "open", named.json()

    await _a_stays_open_and_bs_payment_went_back(runtime, lot, owner_a, owner_b, capture)


async def test_a_qr_payment_booked_while_an_attendant_names_the_same_car_is_no_deadlock(
    runtime: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    provider: ProviderEndpoint,
) -> None:
    """The booking locks the stay, then the held capture's exception
    (`_resolve_held_exception`); an attendant's resolve locks the exception and the capture,
    then the stay (`lanes.decide`). Run together on a doubtful exit the attendant confirms as the
    same car, they waited for each other and PostgreSQL aborted one (a 500 for the attendant, or
    a booking that failed; review 28). Paused here by holding ledger_entries, the booking's
    write between the two. Both now lock the exception, the capture, then the stay."""
    owner_a = await make_driver(runtime, unique_plate())
    capture = await _doubtful_exit_paid_by_qr(runtime, api, gate, lot, provider, owner_a.plate)
    async with runtime.pool.acquire() as conn:
        exception_id = await conn.fetchval(
            "SELECT id FROM lane_exceptions WHERE capture_id = $1", capture.capture_id
        )
    attendant = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))

    async with holding(runtime, "LOCK TABLE ledger_entries IN EXCLUSIVE MODE") as release:
        booking = asyncio.create_task(
            payments_service.gate_payment_status(runtime, capture.capture_id)
        )
        if not await _waiting_on(runtime, "INSERT INTO ledger_entries", timeout_s=3):
            async with runtime.pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT wait_event_type, state, left(query, 120) q FROM pg_stat_activity"
                    " WHERE datname = current_database()"
                )
            raise AssertionError(f"booking never paused: {booking.done()} {rows}")
        resolve = asyncio.create_task(
            api.post(
                f"/api/v1/operator/exceptions/{exception_id}/resolve",
                json={"plate": owner_a.plate, "color": "blue"},
                headers=attendant,
            )
        )
        await _waiting_on(runtime, "SELECT", timeout_s=2)  # the resolve waits for the stay
        await release()
        errors = await server_errors({"booking": booking, "resolve": resolve})
    assert not errors, errors


async def test_a_qr_payment_booked_while_an_operator_opens_the_same_held_gate_is_no_deadlock(
    runtime: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    provider: ProviderEndpoint,
) -> None:
    """An operator opens the gate by hand for a held doubtful exit (its stay closes as the
    operator's, its exception resolved) just as the driver's QR payment is booked. The open
    locked the capture, then the stay, then the exception; the booking locks the exception,
    then the capture: each waited for what the other held and PostgreSQL aborted one (a 500 or
    a booking that failed). Paused here by holding sessions, which the open locks after the
    capture. All of them now lock the exception, the capture, then the stay
    (`billing.captures`): the open goes first and the payment, its stay closed, goes back."""
    owner = await make_driver(runtime, unique_plate())
    capture = await _doubtful_exit_paid_by_qr(runtime, api, gate, lot, provider, owner.plate)
    attendant = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))

    async with holding(runtime, "LOCK TABLE sessions IN EXCLUSIVE MODE") as release:
        opened = asyncio.create_task(
            api.post(
                f"/api/v1/operator/car-parks/{lot.code}/gates/out1/open",
                json={"reason": "司机已扫码 人工放行", "capture_id": str(capture.capture_id)},
                headers=attendant,
            )
        )
        # The open holds what it locked before the stay, and waits for the stay.
        assert await _waiting_on(runtime, "SELECT id, status, plate", timeout_s=5), "no pause"
        booking = asyncio.create_task(
            payments_service.gate_payment_status(runtime, capture.capture_id)
        )
        assert await _waiting_on(runtime, "SELECT 1 FROM", timeout_s=5), "booking never waited"
        await release()
        errors = await server_errors({"open": opened, "booking": booking})
    assert not errors, errors
    assert opened.result().status_code == 200, opened.result().text
    async with runtime.pool.acquire() as conn:
        stay = await _stay_of(conn, lot, owner.plate)
        booked = await conn.fetch(
            "SELECT status FROM payments WHERE capture_id = $1", capture.capture_id
        )
        refunded = await _refunded_for(conn, capture)
        exception = await conn.fetchval(
            "SELECT status FROM lane_exceptions WHERE capture_id = $1", capture.capture_id
        )
        assert await ledger.is_balanced(conn)
    # The operator let the car out (nobody charged): the ¥12.00 paid for it goes back.
    assert (stay["status"], stay["settlement"]) == ("closed", "operator"), dict(stay)
    assert [r["status"] for r in booked] == ["succeeded"]
    assert (refunded, exception) == (1200, "resolved")
