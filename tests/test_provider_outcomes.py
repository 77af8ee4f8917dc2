"""Exactly once at the edges (issue #16): whose side a provider's refusal is on, late news that
reconciles, exact money parsing, and bad provider payloads that change nothing."""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from billing import agreements, charges, dead_letters, ledger, refunds, signing
from billing.money import InvalidAmount, fen_from_json, fen_from_text
from billing.providers import (
    DESCRIPTION_MAX_CHARS,
    InvalidNotification,
    MalformedNotification,
    ProviderAnswer,
    ProviderMalformed,
    ProviderRejected,
    SandboxProvider,
)
from billing.tariff import format_fen
from parking.app import create_app
from parking.payments import service as payments_service
from parking.runtime import ProviderEndpoint, Runtime
from parking.settings import Settings
from parking_dev import sandbox
from tests.conftest import (
    SANDBOX_FAULTS,
    SANDBOX_SECRET,
    Driver,
    Lot,
    bearer,
    charges_of,
    create_lot,
    decide_dispute,
    driver_in_debt,
    driver_token,
    enter,
    eventually,
    exit_after,
    make_driver,
    make_staff,
    provider_and_runtime,
    staff_token,
    unique_plate,
)
from tests.gates import GateProbe
from tests.test_evidence import manual_worker, run_worker

OPERATOR = "/api/v1/operator"
NOTIFY = "/api/v1/payments/notifications/sandbox"


def _signed(payload: Any, secret: str = SANDBOX_SECRET) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(payload)
    header = signing.sign(secret, body, int(datetime.now(UTC).timestamp()))
    return body, {signing.SIGNATURE_HEADER: header, "content-type": "application/json"}


def _charge_event(key: str, status: str, amount_fen: Any, order_id: str) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "type": "charge",
        "out_trade_no": key,
        "order_id": order_id,
        "status": status,
        "amount_fen": amount_fen,
        "reason": None,
        "finished_at": datetime.now(UTC).isoformat(),
    }


async def _agreement_no(runtime: Runtime, agreement_id: int | None) -> str:
    async with runtime.pool.acquire() as conn:
        number: str = await conn.fetchval(
            "SELECT agreement_no FROM pay_later_agreements WHERE id = $1", agreement_id
        )
    return number


async def _account(runtime: Runtime, account_id: int) -> tuple[bool, int, int]:
    """(blocked for arrears, open debts, receivable balance)."""
    async with runtime.pool.acquire() as conn:
        blocked = await conn.fetchval(
            "SELECT blocked_for_arrears FROM accounts WHERE id = $1", account_id
        )
        open_debts = await conn.fetchval(
            "SELECT count(*) FROM debts WHERE account_id = $1 AND settled_at IS NULL", account_id
        )
        owed = await ledger.balance(conn, ledger.receivable(account_id))
    return blocked, open_debts, owed


# 3. Exact money


def test_negative_amounts_format_with_the_sign_before_the_currency() -> None:
    assert format_fen(-5) == "-¥0.05"
    assert format_fen(-1200) == "-¥12.00"
    assert format_fen(-101) == "-¥1.01"
    assert (format_fen(0), format_fen(5), format_fen(1200)) == ("¥0.00", "¥0.05", "¥12.00")


@pytest.mark.parametrize("value", [600.9, 600.0, "600", "600.9", True, False, None, -5, [600]])
def test_json_amounts_must_be_integer_fen(value: Any) -> None:
    with pytest.raises(InvalidAmount):
        fen_from_json(value)
    assert fen_from_json(600) == 600
    assert fen_from_json(-5, negative_ok=True) == -5


@pytest.mark.parametrize("text", ["600.9", "600.0", "6e2", " 600", "600 ", "1_000", "", "-5", "+5"])
def test_text_amounts_must_be_integer_fen(text: str) -> None:
    with pytest.raises(InvalidAmount):
        fen_from_text(text)
    assert fen_from_text("600") == 600


@pytest.mark.parametrize("amount", [600.9, 600.0, "600", True, -600])
def test_a_signed_notification_with_an_inexact_amount_is_refused(amount: Any) -> None:
    provider = SandboxProvider("http://127.0.0.1:9", secret="k" * 32, notify_url=None)
    body, headers = _signed(_charge_event("s1-key", "succeeded", amount, "sbx_1"), "k" * 32)
    with pytest.raises(MalformedNotification):
        provider.parse_notification(body, headers, now=int(datetime.now(UTC).timestamp()))


@pytest.mark.parametrize(
    "content",
    [b"[]", b'{"kind": "charge"}', b'{"kind":"charge","out_trade_no":"k","order_id":"o",'
     b'"status":"succeeded","amount_fen":600.9}', b"not json"],
)  # fmt: skip
def test_a_malformed_provider_answer_is_an_unknown_outcome_not_a_crash(content: bytes) -> None:
    with pytest.raises(ProviderMalformed):
        SandboxProvider._order_of(ProviderAnswer(200, content))


# 1. Whose side a refusal is on


@pytest.mark.parametrize(
    ("status", "body", "side"),
    [
        (400, b'{"error":"invalid_request","message":"description too long"}', "car_park"),
        (401, b'{"error":"unauthorized"}', "car_park"),
        (404, b'{"error":"agreement_not_found"}', "car_park"),
        (409, b'{"error":"idempotency_key_reused"}', "car_park"),
        (422, b"<html>gateway</html>", "car_park"),
        (403, b'{"error":"agreement_paused"}', "driver"),
        (402, b'{"error":"insufficient_funds"}', "driver"),
    ],
)
def test_refusals_are_classified_by_whose_reason_they_are(
    status: int, body: bytes, side: str
) -> None:
    with pytest.raises(ProviderRejected) as refused:
        SandboxProvider._order_of(ProviderAnswer(status, body))
    assert refused.value.side == side
    assert refused.value.status_code == status


def test_a_charge_description_never_exceeds_the_providers_limit() -> None:
    for name in ["停" * 195, "a" * 500, "e\u0301" * 150, "👨\u200d👩\u200d👧" * 80, "x\ny\x00z"]:
        text = charges.description(name)
        assert len(text) <= DESCRIPTION_MAX_CHARS
        assert text.replace("\u200d", "").isprintable(), text
    assert charges.description("城中街停车场") == "parking 城中街停车场"
    # A cut never leaves half of a combined character or a dangling joiner behind.
    cut = charges.description("e\u0301" * 150)
    assert cut.endswith("e\u0301…"), cut[-3:]
    joined = charges.description("👨\u200d👩\u200d👧" * 80)
    assert joined.endswith("👧…"), joined[-3:]


async def test_names_that_would_break_charges_cannot_be_configured(
    runtime: Runtime, lot: Lot, app: FastAPI, api: httpx.AsyncClient
) -> None:
    headers = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
    for name in ["停" * 195, "a" * 65, "line\nbreak", "nul\x00", "rtl\u202eoverride"]:
        answer = await api.patch(
            f"{OPERATOR}/car-parks/{lot.code}", json={"name": name}, headers=headers
        )
        assert answer.status_code == 422, (name, answer.text)
        assert answer.json()["error"]["code"] == "invalid_request"
    ok = await api.patch(
        f"{OPERATOR}/car-parks/{lot.code}", json={"name": "停" * 64}, headers=headers
    )
    assert ok.status_code == 200, ok.text
    # Money in API requests is integer fen too: 600.0, "600" and true are refused.
    for amount in [600.0, "600", True, 600.5]:
        refund = await api.post(
            f"{OPERATOR}/charges/1/refunds",
            json={"amount_fen": amount, "reason": "a test"},
            headers=headers,
        )
        assert refund.status_code == 422, (amount, refund.text)


async def test_a_long_car_park_name_still_charges_the_driver(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    # A name from before the limit (or set behind the API's back): the description is cut.
    async with runtime.pool.acquire() as conn:
        await conn.execute("UPDATE car_parks SET name = $2 WHERE id = $1", lot.id, "停" * 195)
    driver = await make_driver(runtime, unique_plate())
    await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))

    async def settled() -> list[Any]:
        rows = await charges_of(runtime, lot)
        return rows if rows and rows[0]["status"] != "pending" else []

    [charge] = await eventually(settled)
    assert charge["status"] == "succeeded", charge["last_error"]
    assert await _account(runtime, driver.account_id) == (False, 0, 0)


async def _exit_refused_at_the_charge(
    runtime: Runtime,
    gate: GateProbe,
    lot: Lot,
    driver: Driver,
    refusals: set[str],
    agreement_no: str,
) -> None:
    """The car stays while the provider's last word on its plate's service is normal (recorded
    before the entry; the sandbox's rails register no entry to wait for), and leaves; only then
    does the sandbox refuse the agreement (`refusals`, one of its fault sets), so the refusal
    reaches us at the charge with no notification or state refresh before it (which would
    rightly hold the car)."""
    async with runtime.pool.acquire() as conn:
        await agreements.record_service_state(
            conn,
            runtime.provider.name,
            driver.plate,
            "blue",
            "normal",
            datetime.now(UTC),
            about_agreement=True,
        )
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=30))
    refusals.add(agreement_no)
    await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))


async def test_the_car_parks_refusals_go_to_an_operator_never_to_the_driver(
    runtime: Runtime, gate: GateProbe, lot: Lot, app: FastAPI, api: httpx.AsyncClient
) -> None:
    driver = await make_driver(runtime, unique_plate())
    agreement_no = await _agreement_no(runtime, driver.agreement_id)
    try:
        await _exit_refused_at_the_charge(
            runtime, gate, lot, driver, SANDBOX_FAULTS.unknown_agreements, agreement_no
        )  # 404 agreement_not_found
        admin = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))

        async def listed() -> list[Any]:
            answer = await api.get(f"{OPERATOR}/charge-exceptions?status=open", headers=admin)
            assert answer.status_code == 200, answer.text
            return [e for e in answer.json() if e["car_park"] == lot.code]

        [exception] = await eventually(listed)
    finally:
        SANDBOX_FAULTS.unknown_agreements.discard(agreement_no)
    assert (exception["http_status"], exception["code"]) == (404, "agreement_not_found")
    assert (exception["amount_fen"], exception["charge_status"]) == (600, "pending")
    [charge] = await charges_of(runtime, lot)
    assert charge["status"] == "pending"
    assert await _account(runtime, driver.account_id) == (False, 0, 600), (
        "no debt, pay-later kept; the fee stays receivable"
    )
    # Another company sees none of it.
    other = await create_lot(runtime)
    stranger = bearer(staff_token(app, await make_staff(runtime, other.operator_id, "admin")))
    theirs = await api.get(f"{OPERATOR}/charge-exceptions", headers=stranger)
    assert [e["id"] for e in theirs.json() if e["id"] == exception["id"]] == []
    refused = await api.post(
        f"{OPERATOR}/charge-exceptions/{exception['id']}/retry", headers=stranger
    )
    assert refused.status_code == 404
    attendant = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))
    forbidden = await api.post(
        f"{OPERATOR}/charge-exceptions/{exception['id']}/retry", headers=attendant
    )
    assert forbidden.status_code == 403

    # The cause fixed, an admin retries: the same charge is collected, once.
    retried = await api.post(f"{OPERATOR}/charge-exceptions/{exception['id']}/retry", headers=admin)
    assert retried.status_code == 200, retried.text
    assert retried.json()["status"] == "retried"
    again = await api.post(f"{OPERATOR}/charge-exceptions/{exception['id']}/retry", headers=admin)
    assert again.status_code == 409

    async def collected() -> bool:
        return [r["status"] for r in await charges_of(runtime, lot)] == ["succeeded"]

    await eventually(collected)
    assert await _account(runtime, driver.account_id) == (False, 0, 0)
    async with runtime.pool.acquire() as conn:
        audited = await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE action = 'charge_exception.retried' "
            "AND subject = $1",
            f"charge:{charge['id']}",
        )
    assert audited == 1


@pytest.mark.parametrize(
    ("outcome", "disputed_in_flight", "settled"),
    [("driver_right", False, "cancelled"), ("charge_stands", True, "succeeded")],
)
async def test_not_my_car_on_a_charge_the_provider_refused_for_the_car_park_is_held(
    runtime: Runtime,
    gate: GateProbe,
    lot: Lot,
    app: FastAPI,
    api: httpx.AsyncClient,
    outcome: str,
    disputed_in_flight: bool,
    settled: str,
) -> None:
    """A charge the provider refused for the car park's own reason was sent once, yet no money
    can move for it. Before, its "not my car" did not hold it: an operator's retry of the
    refusal collected it from the disputing driver, and agreeing with the driver was refused
    for ever as "in flight". Now the dispute holds it whatever the charge queue asks (also one
    opened while the charge was still with the provider, before it refused); the driver right
    cancels it and closes the refusal, the charge standing sends it again (before, a dispute
    opened in flight left it pending for ever, the retry it skipped never made again)."""
    driver = await make_driver(runtime, unique_plate())
    agreement_no = await _agreement_no(runtime, driver.agreement_id)
    admin = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
    try:
        await _exit_refused_at_the_charge(
            runtime, gate, lot, driver, SANDBOX_FAULTS.unknown_agreements, agreement_no
        )

        async def listed() -> list[Any]:
            answer = await api.get(f"{OPERATOR}/charge-exceptions?status=open", headers=admin)
            return [e for e in answer.json() if e["car_park"] == lot.code]

        [exception] = await eventually(listed)
    finally:
        SANDBOX_FAULTS.unknown_agreements.discard(agreement_no)
    [charge] = await charges_of(runtime, lot)
    async with runtime.pool.acquire() as conn:
        # As between `begin_sending` and the provider's refusal: sent, not yet answered.
        await conn.execute(
            "UPDATE charges SET refused_at = CASE WHEN $2 THEN NULL ELSE refused_at END"
            " WHERE id = $1",
            charge["id"],
            disputed_in_flight,
        )
    opened = await api.post(
        f"/api/v1/me/stays/{charge['session_id']}/dispute",
        headers=bearer(driver_token(app, driver.account_id)),
    )
    assert (opened.json()["status"], opened.json()["held"]) == ("open", not disputed_in_flight)
    async with runtime.pool.acquire() as conn:  # the refusal, after the dispute
        await conn.execute("UPDATE charges SET refused_at = now() WHERE id = $1", charge["id"])

    # The provider would take it now; an operator retries the refusal from the charge queue.
    retried = await api.post(f"{OPERATOR}/charge-exceptions/{exception['id']}/retry", headers=admin)
    assert retried.status_code == 200, retried.text

    async def job_done() -> bool:
        async with runtime.pool.acquire() as conn:
            return bool(
                await conn.fetchval(
                    "SELECT done_at IS NOT NULL FROM outbox WHERE kind = 'charge' AND ref_id = $1",
                    charge["id"],
                )
            )

    await eventually(job_done)
    assert [c["status"] for c in await charges_of(runtime, lot)] == ["pending"], "not sent"

    await decide_dispute(api, admin, opened.json()["id"], outcome)

    async def final() -> bool:
        return [c["status"] for c in await charges_of(runtime, lot)] == [settled]

    await eventually(final)
    assert await _account(runtime, driver.account_id) == (False, 0, 0), "nothing left owed"


async def test_the_drivers_refusal_still_becomes_a_debt(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    driver = await make_driver(runtime, unique_plate())
    agreement_no = await _agreement_no(runtime, driver.agreement_id)
    try:
        await _exit_refused_at_the_charge(
            runtime, gate, lot, driver, SANDBOX_FAULTS.paused_agreements, agreement_no
        )  # 403 agreement_paused

        async def failed() -> bool:
            return [r["status"] for r in await charges_of(runtime, lot)] == ["failed"]

        await eventually(failed)
    finally:
        SANDBOX_FAULTS.paused_agreements.discard(agreement_no)
    assert await _account(runtime, driver.account_id) == (True, 1, 600)


# 2. Late news


async def _failed_charge(runtime: Runtime, driver_account: int) -> Any:
    async with runtime.pool.acquire() as conn:
        return await conn.fetchrow(
            "SELECT * FROM charges WHERE account_id = $1 AND status = 'failed'", driver_account
        )


async def test_a_success_after_failed_settles_the_debt_once_and_lifts_the_block(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient
) -> None:
    driver = await driver_in_debt(runtime, gate, lot)
    charge = await _failed_charge(runtime, driver.account_id)
    assert await _account(runtime, driver.account_id) == (True, 1, 600)
    event = _charge_event(charge["idempotency_key"], "succeeded", 600, "sbx_late")
    answers = []
    for _ in range(3):  # the late news, then replays of it
        body, headers = _signed(event)
        answers.append(await api.post(NOTIFY, content=body, headers=headers))
    assert [a.json() for a in answers] == [
        {"effect": "charged"},
        {"effect": "no_change"},
        {"effect": "no_change"},
    ]
    assert await _account(runtime, driver.account_id) == (False, 0, 0)
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM charges WHERE id = $1", charge["id"])
        settlements = await conn.fetchval(
            "SELECT count(DISTINCT transaction_id) FROM ledger_entries "
            "WHERE charge_id = $1 AND kind = 'charge_settled'",
            charge["id"],
        )
        audit = await conn.fetch(
            "SELECT detail FROM audit_log WHERE action = 'charge.late_success' AND subject = $1",
            f"charge:{charge['id']}",
        )
        refunds = await conn.fetchval(
            "SELECT count(*) FROM refunds WHERE charge_id = $1", charge["id"]
        )
        assert await ledger.is_balanced(conn)
    assert (row["status"], row["provider_ref"]) == ("succeeded", "sbx_late")
    assert settlements == 1 and len(audit) == 1 and refunds == 0
    assert audit[0]["detail"]["refunded_fen"] == 0


async def _paid_twice(
    runtime: Runtime, provider: ProviderEndpoint, gate: GateProbe, lot: Lot, api: httpx.AsyncClient
) -> tuple[Driver, Any, list[str]]:
    """The charge is declined (a debt), the driver pays the debt in the app, then the provider
    collects the charge after all and says so twice: (driver, charge, the notifications'
    effects)."""
    driver = await driver_in_debt(runtime, gate, lot)
    charge = await _failed_charge(runtime, driver.account_id)
    payment = await payments_service.start_debt_payment(runtime, driver.account_id)
    async with httpx.AsyncClient(base_url=provider.url) as wallet:
        paid = await wallet.post(f"/v1/payments/{payment.out_trade_no}/pay")
    assert paid.status_code == 200, paid.text
    runtime.outbox.query_after_s = 0.0
    await runtime.outbox.sweep(datetime.now(UTC))
    assert await _account(runtime, driver.account_id) == (False, 0, 0)
    async with httpx.AsyncClient(base_url=provider.url) as admin:
        late = await admin.post(f"/_sandbox/orders/{charge['idempotency_key']}/succeed")
    assert late.status_code == 200, late.text
    event = _charge_event(charge["idempotency_key"], "succeeded", 600, late.json()["order_id"])
    effects = []
    for _ in range(2):
        body, headers = _signed(event)
        effects.append((await api.post(NOTIFY, content=body, headers=headers)).json()["effect"])
    return driver, charge, effects


async def _refunds_of(runtime: Runtime, account_id: int) -> list[tuple[int, str, str]]:
    """The account's refunds (amount, kind, of a charge or a payment) once none is pending."""

    async def settled() -> list[tuple[int, str, str]]:
        async with runtime.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT amount_fen, status, kind, charge_id FROM refunds WHERE account_id = $1"
                " ORDER BY id",
                account_id,
            )
        if not rows or any(r["status"] != "succeeded" for r in rows):
            return []
        return [
            (r["amount_fen"], r["kind"], "charge" if r["charge_id"] else "payment") for r in rows
        ]

    rows: list[tuple[int, str, str]] = await eventually(settled)
    return rows


async def test_a_success_after_the_debt_was_paid_refunds_what_was_taken_twice_once(
    runtime: Runtime,
    provider: ProviderEndpoint,
    gate: GateProbe,
    lot: Lot,
    api: httpx.AsyncClient,
) -> None:
    driver, _, effects = await _paid_twice(runtime, provider, gate, lot, api)
    assert effects == ["charged", "no_change"]
    assert await _refunds_of(runtime, driver.account_id) == [(600, "overpayment", "charge")]
    assert await _account(runtime, driver.account_id) == (False, 0, 0)
    async with runtime.pool.acquire() as conn:
        assert await ledger.is_balanced(conn)
        assert await ledger.balance(conn, ledger.overpaid(driver.account_id)) == 0
        assert await ledger.balance(conn, ledger.revenue(lot.id)) == -600


async def test_not_my_car_on_a_fee_paid_as_a_debt_and_collected_late_gives_back_what_was_kept(
    runtime: Runtime,
    provider: ProviderEndpoint,
    gate: GateProbe,
    lot: Lot,
    api: httpx.AsyncClient,
    app: FastAPI,
) -> None:
    """The charge's own money went back as an overpayment; the app payment that settled its
    debt stayed. The operator agreeing with the driver refunds that payment. Before, only what
    was left of the charge counted (nothing): the driver was told the fee is refunded in full
    and kept paying ¥6 for a car that was not theirs."""
    driver, charge, _ = await _paid_twice(runtime, provider, gate, lot, api)
    await _refunds_of(runtime, driver.account_id)
    opened = await api.post(
        f"/api/v1/me/stays/{charge['session_id']}/dispute",
        headers=bearer(driver_token(app, driver.account_id)),
    )
    assert opened.status_code == 200, opened.text
    admin = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
    await decide_dispute(api, admin, opened.json()["id"], "driver_right")
    assert await _refunds_of(runtime, driver.account_id) == [
        (600, "overpayment", "charge"),
        (600, "operator", "payment"),
    ]
    async with runtime.pool.acquire() as conn:
        assert await ledger.is_balanced(conn)


async def test_a_refund_the_provider_reports_for_another_amount_is_never_booked(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    """We asked ¥3.00 back; the provider's signed word says it gave ¥1.00. As for a charge or a
    payment of another amount, nothing is booked and the refund stays pending for
    reconciliation and a person. Before, ¥3.00 was booked as given back (revenue debited, the
    driver told ¥3.00) though ¥1.00 moved."""
    # The provider's requests all fail: its notifications alone decide.
    faults = sandbox.FaultConfig(error_rate=1.0)
    async with provider_and_runtime(settings, database_url, faults, secret=SANDBOX_SECRET) as (
        runtime,
        _,
    ):
        lot = await create_lot(runtime)
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as api:
            driver = await make_driver(runtime, unique_plate())
            await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))
            [charge] = await charges_of(runtime, lot)
            key = charge["idempotency_key"]
            body, headers = _signed(_charge_event(key, "succeeded", 600, "sbx_c1"))
            assert (await api.post(NOTIFY, content=body, headers=headers)).json() == {
                "effect": "charged"
            }
            async with runtime.pool.acquire() as conn, conn.transaction():
                refund = await refunds.request_for_charge(
                    conn, charge_id=charge["id"], amount_fen=300, reason="goodwill", actor="test"
                )
            effects = []
            for amount in (100, 300):
                event = _charge_event(key, "succeeded", amount, "")
                event.update(type="refund", out_refund_no=refund.out_refund_no, refund_id="r1")
                body, headers = _signed(event)
                effects.append((await api.post(NOTIFY, content=body, headers=headers)).json())
                async with runtime.pool.acquire() as conn:
                    status = await conn.fetchval(
                        "SELECT status FROM refunds WHERE id = $1", refund.id
                    )
                    booked = await conn.fetchval(
                        "SELECT COALESCE(sum(amount_fen), 0) FROM ledger_entries "
                        "WHERE refund_id = $1 AND amount_fen > 0",
                        refund.id,
                    )
                if amount == 100:
                    assert (status, booked) == ("pending", 0)
    assert effects == [{"effect": "amount_mismatch"}, {"effect": "refunded"}]
    assert (status, booked) == ("succeeded", 300)


async def _collected_late_then_not_my_car(
    runtime: Runtime,
    provider: ProviderEndpoint,
    api: httpx.AsyncClient,
    app: FastAPI,
    driver: Driver,
    charge: Any,
    lot: Lot,
) -> None:
    """The declined `charge`, whose debt a payment settled, is collected late after all (its
    own money goes back as an overpayment); then the car park's admin agrees its stay was not
    the driver's car, which refunds the payment's part for that debt."""
    async with httpx.AsyncClient(base_url=provider.url) as admin:
        late = await admin.post(f"/_sandbox/orders/{charge['idempotency_key']}/succeed")
    assert late.status_code == 200, late.text
    body, headers = _signed(
        _charge_event(charge["idempotency_key"], "succeeded", 600, late.json()["order_id"])
    )
    assert (await api.post(NOTIFY, content=body, headers=headers)).json() == {"effect": "charged"}
    opened = await api.post(
        f"/api/v1/me/stays/{charge['session_id']}/dispute",
        headers=bearer(driver_token(app, driver.account_id)),
    )
    assert opened.status_code == 200, opened.text
    admin_staff = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
    await decide_dispute(api, admin_staff, opened.json()["id"], "driver_right")
    assert await _refunds_of(runtime, driver.account_id) == [
        (600, "overpayment", "charge"),
        (600, "operator", "payment"),
    ]


async def _revenues(runtime: Runtime, *lots: Lot) -> tuple[int, ...]:
    async with runtime.pool.acquire() as conn:
        assert await ledger.is_balanced(conn)
        return tuple([await ledger.balance(conn, ledger.revenue(lot.id)) for lot in lots])


async def test_not_my_car_refund_of_an_app_debt_payment_comes_out_of_the_disputed_stays_car_park(
    runtime: Runtime,
    provider: ProviderEndpoint,
    gate: GateProbe,
    api: httpx.AsyncClient,
    app: FastAPI,
) -> None:
    """One app payment settled declined charges at car park A and at car park B (another
    company). B's stay turns out not to be the driver's car: the payment's ¥6.00 for B's debt
    comes out of B's revenue, where that fee was booked. Taken from the car park of the
    payment's first debt, A showed ¥0.00 for a stay it was paid for and B kept the disputed
    fee (review 12, #4)."""
    lot_a, lot_b = await create_lot(runtime), await create_lot(runtime)
    driver = await make_driver(runtime, unique_plate())
    async with runtime.pool.acquire() as conn:
        agreement_no = await conn.fetchval(
            "SELECT agreement_no FROM pay_later_agreements WHERE id = $1", driver.agreement_id
        )
    SANDBOX_FAULTS.declined_agreements.add(agreement_no)
    try:
        for lot in (lot_a, lot_b):
            async with runtime.pool.acquire() as conn:
                # The second exit came before the first decline was known.
                await conn.execute(
                    "UPDATE accounts SET blocked_for_arrears = false WHERE id = $1",
                    driver.account_id,
                )
            command = await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))
            assert command["action"] == "open", command

            async def failed(lot: Lot = lot) -> bool:
                rows = await charges_of(runtime, lot)
                return bool(rows) and rows[0]["status"] == "failed"

            await eventually(failed)
    finally:
        SANDBOX_FAULTS.declined_agreements.discard(agreement_no)
    [charge_b] = await charges_of(runtime, lot_b)

    payment = await payments_service.start_debt_payment(runtime, driver.account_id)
    assert payment.amount_fen == 1200
    async with httpx.AsyncClient(base_url=provider.url) as wallet:
        paid = await wallet.post(f"/v1/payments/{payment.out_trade_no}/pay")
    assert paid.status_code == 200, paid.text
    runtime.outbox.query_after_s = 0.0
    await runtime.outbox.sweep(datetime.now(UTC))
    await _collected_late_then_not_my_car(runtime, provider, api, app, driver, charge_b, lot_b)
    assert await _revenues(runtime, lot_a, lot_b) == (-600, 0), (
        "A earned its ¥6.00, B nothing for a car that was not the driver's"
    )


async def test_not_my_car_refund_of_a_debt_paid_at_another_car_parks_gate_comes_out_of_its_own(
    runtime: Runtime,
    provider: ProviderEndpoint,
    gate: GateProbe,
    api: httpx.AsyncClient,
    app: FastAPI,
) -> None:
    """A declined charge at car park A is paid with the next stay's fee at car park G's gate,
    one QR payment. A's stay turns out not to be the driver's car: the payment's ¥6.00 for
    A's debt comes out of A's revenue, not out of G's, which earned its ¥12.00 in full."""
    lot_a, lot_g = await create_lot(runtime), await create_lot(runtime)
    driver = await driver_in_debt(runtime, gate, lot_a)
    [charge_a] = await charges_of(runtime, lot_a)
    await enter(runtime, gate, lot_g, driver.plate, parked_for=timedelta(minutes=90))
    exit_capture = gate.capture("out", driver.plate)
    held = await gate.decide(lot_g.code, "out1", exit_capture)
    assert (held["action"], held["fee_fen"]) == ("hold", 1200 + 600)
    qr = (await api.post(f"/api/v1/gate-payments/{exit_capture.capture_id}")).json()
    async with httpx.AsyncClient(base_url=provider.url) as wallet:
        out_trade_no = httpx.URL(qr["pay_url"]).path.rsplit("/", 1)[-1]
        paid = await wallet.post(f"/v1/payments/{out_trade_no}/pay")
    assert paid.status_code == 200, paid.text
    status = (await api.get(f"/api/v1/gate-payments/{exit_capture.capture_id}")).json()
    assert status["status"] == "succeeded"
    await _collected_late_then_not_my_car(runtime, provider, api, app, driver, charge_a, lot_a)
    assert await _revenues(runtime, lot_a, lot_g) == (0, -1200), (
        "A gives back the disputed fee it was paid, G keeps the fee of the driver's own stay"
    )


# 4. Bad provider payloads


@pytest.mark.parametrize(
    "payload",
    [
        ["not", "an", "object"],
        {"type": "charge", "out_trade_no": "k", "status": "succeeded", "amount_fen": 600},
        None,
        12,
        {"type": ["charge"]},
        {"type": "charge", "out_trade_no": {"$ne": 1}, "status": "succeeded"},
        "float",
    ],
)
async def test_signed_malformed_notifications_are_dead_lettered_and_change_nothing(
    payload: Any, runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient
) -> None:
    driver = await driver_in_debt(runtime, gate, lot)
    charge = await _failed_charge(runtime, driver.account_id)
    if payload == "float":
        payload = _charge_event(charge["idempotency_key"], "succeeded", 600.0, "sbx_f")
    body, headers = _signed(payload)
    answer = await api.post(NOTIFY, content=body, headers=headers)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "malformed_notification"
    async with runtime.pool.acquire() as conn:
        kept = await conn.fetchval(
            "SELECT count(*) FROM dead_letters WHERE source = 'provider_notification' "
            "AND reason = 'malformed_notification' AND payload = $1",
            body,
        )
        status = await conn.fetchval("SELECT status FROM charges WHERE id = $1", charge["id"])
    assert kept == 1
    assert status == "failed"
    assert await _account(runtime, driver.account_id) == (True, 1, 600)
    assert issubclass(MalformedNotification, InvalidNotification)


@contextlib.asynccontextmanager
async def _answering(body: bytes) -> AsyncIterator[str]:
    """A provider that answers every request 200 with `body`; yields its URL."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


async def test_an_unreadable_provider_answer_is_dead_lettered_as_an_excerpt_like_any_other(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    # A provider answers a charge with 100 KiB that is not JSON. The outbox worker keeps it as a
    # dead letter: the same bounded excerpt as a junk gate message or notification (before, 64
    # KiB of it), with its full size.
    marker = uuid.uuid4().hex.encode()
    junk = marker + b"<html>" + b"x" * (100 * 1024)
    async with (
        _answering(junk) as url,
        manual_worker(settings, database_url, ProviderEndpoint(url, SANDBOX_SECRET)) as runtime,
    ):
        lot = await create_lot(runtime)
        driver = await make_driver(runtime, unique_plate())
        command = await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=70))
        assert command["fee_fen"] == 1200, command
        await run_worker(runtime)
        async with runtime.pool.acquire() as conn:
            kept = await conn.fetch(
                "SELECT source, reason, payload, payload_size FROM dead_letters"
                " WHERE position($1::bytea in payload) = 1",
                marker,
            )
            (charge,) = await charges_of(runtime, lot)
    assert [(r["source"], r["reason"]) for r in kept] == [("provider_answer", "malformed_answer")]
    assert (len(kept[0]["payload"]), kept[0]["payload_size"]) == (4096, len(junk))
    assert kept[0]["payload"] == junk[: dead_letters.EXCERPT_BYTES]
    assert charge["status"] == "pending", "an unreadable answer is an unknown outcome"
    assert dead_letters.excerpt(junk) == junk[:4096]
