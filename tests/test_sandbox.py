"""The sandbox pay-later provider behaves like a real one, failures included.

Each test serves the provider over real HTTP, and a small merchant endpoint that records the
webhook notifications it receives. Nothing asserts timings: asynchronous outcomes are polled.
"""

import argparse
import asyncio
import contextlib
import csv
import io
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response

from billing import signing
from parking_dev.sandbox import FaultConfig, add_arguments, faults_from_args, running
from tests.conftest import eventually

SECRET = "merchant-shared-secret"


@dataclass
class Notification:
    body: bytes
    signature: str | None

    @property
    def payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = json.loads(self.body)
        return payload

    def verifies(self) -> bool:
        return signing.verify(SECRET, self.body, self.signature, now=int(time.time()))


@dataclass
class Merchant:
    """The merchant's notification endpoint: records every call, can fail the first ones."""

    url: str = ""
    calls: list[Notification] = field(default_factory=list)
    failures_left: int = 0


@contextlib.asynccontextmanager
async def merchant_endpoint(fail_first: int = 0) -> AsyncIterator[Merchant]:
    merchant = Merchant(failures_left=fail_first)
    app = FastAPI()

    @app.post("/notify")
    async def notify(request: Request) -> Response:
        merchant.calls.append(
            Notification(await request.body(), request.headers.get(signing.SIGNATURE_HEADER))
        )
        if merchant.failures_left > 0:
            merchant.failures_left -= 1
            return Response(status_code=500)
        return Response(status_code=204)

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the merchant endpoint did not start"
        await asyncio.sleep(0.01)
    merchant.url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/notify"
    try:
        yield merchant
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def merchant() -> AsyncIterator[Merchant]:
    async with merchant_endpoint() as endpoint:
        yield endpoint


@contextlib.asynccontextmanager
async def provider(
    merchant: Merchant | None = None, *, db_path: str = ":memory:", **faults: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    config = FaultConfig(**{"notify_url": merchant.url if merchant else None, "seed": 7, **faults})
    async with (
        running(config, secret=SECRET, db_path=db_path) as (url, app),
        httpx.AsyncClient(base_url=url, timeout=5) as client,
    ):
        yield client, app


def new_key() -> str:
    return f"k-{uuid.uuid4().hex[:20]}"


async def charge(
    client: httpx.AsyncClient, key: str, agreement_no: str = "AGR-1", amount_fen: int = 1000
) -> httpx.Response:
    return await client.post(
        "/v1/charges",
        json={"agreement_no": agreement_no, "amount_fen": amount_fen, "description": "停车费"},
        headers={"Idempotency-Key": key},
    )


async def final_order(client: httpx.AsyncClient, key: str) -> dict[str, Any]:
    async def finished() -> dict[str, Any] | None:
        response = await client.get(f"/v1/orders/{key}")
        body: dict[str, Any] = response.json()
        return body if response.status_code == 200 and body["status"] != "processing" else None

    order: dict[str, Any] = await eventually(finished)
    return order


async def received(merchant: Merchant, count: int) -> list[Notification]:
    async def arrived() -> list[Notification] | None:
        return merchant.calls if len(merchant.calls) >= count else None

    calls: list[Notification] = await eventually(arrived)
    return calls


async def refund(
    client: httpx.AsyncClient, out_refund_no: str, out_trade_no: str, amount_fen: int
) -> httpx.Response:
    return await client.post(
        "/v1/refunds",
        json={"out_trade_no": out_trade_no, "amount_fen": amount_fen, "reason": "多收"},
        headers={"Idempotency-Key": out_refund_no},
    )


def test_signature_verifies_only_the_signed_body_with_the_secret_while_fresh() -> None:
    body, now = b'{"amount_fen":1000}', int(time.time())
    header = signing.sign(SECRET, body, now)
    assert header.startswith(f"t={now},v1=")
    assert signing.verify(SECRET, body, header, now=now)
    assert signing.verify(SECRET, body, header, now=now + 299)
    assert not signing.verify(SECRET, b'{"amount_fen":1}', header, now=now), "tampered body"
    assert not signing.verify("another-secret", body, header, now=now), "wrong secret"
    assert not signing.verify(SECRET, body, header, now=now + 301), "too old"
    old = signing.sign(SECRET, body, now - 3600)
    assert not signing.verify(SECRET, body, old, now=now), "replayed an hour later"
    for malformed in (None, "", "garbage", f"t={now}", header.split(",")[1], "t=x,v1=00"):
        assert not signing.verify(SECRET, body, malformed, now=now), malformed
    assert not signing.verify(SECRET, body, f"t={now},v1=é", now=now)
    assert not signing.verify(SECRET, body, f"{header},v1=00", now=now), "repeated field"


async def test_charge_is_accepted_processing_then_notified_with_a_valid_signature(
    merchant: Merchant,
) -> None:
    async with provider(merchant) as (client, _):
        key = new_key()
        accepted = await charge(client, key)
        assert accepted.status_code == 202
        assert accepted.json()["status"] == "processing"
        assert accepted.json()["order_id"].startswith("sbx_")

        order = await final_order(client, key)
        assert order["status"] == "succeeded"
        assert order["finished_at"] and order["reason"] is None
        (notification,) = await received(merchant, 1)
        assert notification.verifies()
        payload = notification.payload
        assert uuid.UUID(payload.pop("event_id"))
        assert payload == {
            "type": "charge",
            "out_trade_no": key,
            "order_id": order["order_id"],
            "status": "succeeded",
            "amount_fen": 1000,
            "reason": None,
            "finished_at": order["finished_at"],
        }


async def test_one_order_per_key_and_a_reused_key_is_refused() -> None:
    # Charges stay processing for the whole test: the delay outlasts it.
    async with provider(processing_delay_s=60) as (client, app):
        key = new_key()
        first = await charge(client, key)
        again = await charge(client, key)
        assert (first.status_code, again.status_code) == (202, 202)
        assert again.json()["order_id"] == first.json()["order_id"]
        assert again.json()["status"] == "processing"

        reused = await charge(client, key, amount_fen=999)
        assert reused.status_code == 409
        assert reused.json()["error"] == "idempotency_key_reused"
        assert (await charge(client, key, agreement_no="AGR-2")).status_code == 409
        assert len(app.state.sandbox.book.orders()) == 1

        missing = await client.get(f"/v1/orders/{new_key()}")
        assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
        short_key = await charge(client, "short")
        assert (short_key.status_code, short_key.json()["error"]) == (400, "invalid_request")
        no_amount = await client.post(
            "/v1/charges", json={"agreement_no": "A"}, headers={"Idempotency-Key": new_key()}
        )
        assert no_amount.status_code == 400


async def test_a_finished_charge_is_answered_as_it_is_now() -> None:
    async with provider() as (client, _):
        key = new_key()
        await charge(client, key)
        order = await final_order(client, key)
        again = await charge(client, key)
        assert again.status_code == 200
        assert again.json() == order


async def test_declined_agreements_and_decline_rate(merchant: Merchant) -> None:
    async with provider(merchant, declined_agreements={"AGR-BROKE"}) as (client, app):
        key = new_key()
        await charge(client, key, agreement_no="AGR-BROKE")
        order = await final_order(client, key)
        assert (order["status"], order["reason"]) == ("declined", "insufficient_funds")
        (notification,) = await received(merchant, 1)
        assert notification.verifies()
        assert notification.payload["status"] == "declined"

        app.state.sandbox.replace_faults(FaultConfig(decline_rate=1.0))
        key = new_key()
        await charge(client, key, agreement_no="AGR-FINE")
        assert (await final_order(client, key))["status"] == "declined"


async def test_payment_is_paid_by_the_driver_or_closed_by_the_merchant(
    merchant: Merchant,
) -> None:
    async with provider(merchant) as (client, app):
        key = new_key()
        created = await client.post(
            "/v1/payments",
            json={"amount_fen": 600, "description": "临停缴费"},
            headers={"Idempotency-Key": key},
        )
        assert created.status_code == 201
        payment = created.json()
        assert (payment["kind"], payment["status"]) == ("payment", "pending_payment")
        assert payment["pay_url"] == f"{str(client.base_url).rstrip('/')}/pay/{key}"
        page = await client.get(payment["pay_url"])
        assert page.status_code == 200 and "¥6.00" in page.text

        again = await client.post(
            "/v1/payments", json={"amount_fen": 600}, headers={"Idempotency-Key": key}
        )
        assert (again.status_code, again.json()["order_id"]) == (200, payment["order_id"])
        other_amount = await client.post(
            "/v1/payments", json={"amount_fen": 700}, headers={"Idempotency-Key": key}
        )
        assert other_amount.status_code == 409

        paid = await client.post(f"/v1/payments/{key}/pay")
        assert (paid.status_code, paid.json()["status"]) == (200, "succeeded")
        paid_twice = await client.post(f"/v1/payments/{key}/pay")
        assert paid_twice.json() == paid.json()
        close_paid = await client.post(f"/v1/payments/{key}/close")
        assert (close_paid.status_code, close_paid.json()["error"]) == (409, "order_paid")
        (notification,) = await received(merchant, 1)
        assert notification.verifies()
        assert notification.payload["type"] == "payment"
        assert notification.payload["status"] == "succeeded"
        notifications = await client.get("/_sandbox/notifications", params={"out_trade_no": key})
        assert len(notifications.json()) == 1, "paying twice notifies once"

        unpaid = new_key()
        await client.post(
            "/v1/payments", json={"amount_fen": 300}, headers={"Idempotency-Key": unpaid}
        )
        closed = await client.post(f"/v1/payments/{unpaid}/close")
        assert (closed.status_code, closed.json()["status"]) == (200, "closed")
        assert (await client.post(f"/v1/payments/{unpaid}/close")).status_code == 200
        pay_closed = await client.post(f"/v1/payments/{unpaid}/pay")
        assert (pay_closed.status_code, pay_closed.json()["error"]) == (409, "order_closed")

        assert (await client.post(f"/v1/payments/{new_key()}/pay")).status_code == 404
        charge_key = new_key()
        await charge(client, charge_key)
        assert (await client.post(f"/v1/payments/{charge_key}/pay")).status_code == 404
        as_payment = await client.post(
            "/v1/payments", json={"amount_fen": 1000}, headers={"Idempotency-Key": charge_key}
        )
        assert as_payment.status_code == 409, "one namespace for charges and payments"
        assert len(app.state.sandbox.book.orders()) == 3


async def test_refunds_are_partial_idempotent_and_never_exceed_the_order(
    merchant: Merchant,
) -> None:
    async with provider(merchant, declined_agreements={"AGR-BROKE"}) as (client, app):
        key = new_key()
        await charge(client, key, amount_fen=1000)
        order = await final_order(client, key)

        first = await refund(client, "refund-0001", key, 300)
        assert first.status_code == 200
        body = first.json()
        assert body["refund_id"].startswith("sbx_")
        assert (body["out_refund_no"], body["out_trade_no"]) == ("refund-0001", key)
        assert (body["amount_fen"], body["status"]) == (300, "succeeded")
        again = await refund(client, "refund-0001", key, 300)
        assert again.json() == body, "the same key returns the same refund"
        reused = await refund(client, "refund-0001", key, 200)
        assert (reused.status_code, reused.json()["error"]) == (409, "idempotency_key_reused")

        too_much = await refund(client, "refund-0002", key, 701)
        assert (too_much.status_code, too_much.json()["error"]) == (409, "refund_exceeds_order")
        assert (await refund(client, "refund-0003", key, 700)).status_code == 200
        assert (await client.get(f"/v1/orders/{key}")).json()["refunded_fen"] == 1000
        assert (await refund(client, "refund-0004", key, 1)).status_code == 409

        assert (await refund(client, "refund-0005", new_key(), 1)).status_code == 404
        declined = new_key()
        await charge(client, declined, agreement_no="AGR-BROKE")
        await final_order(client, declined)
        not_paid = await refund(client, "refund-0006", declined, 1)
        assert (not_paid.status_code, not_paid.json()["error"]) == (409, "order_not_refundable")

        calls = await received(merchant, 4)  # the charge, two refunds, the declined charge
        refunds = [c.payload for c in calls if c.payload["type"] == "refund"]
        assert sorted(r["amount_fen"] for r in refunds) == [300, 700]
        assert all(c.verifies() for c in calls)
        first_refund = next(r for r in refunds if r["out_refund_no"] == "refund-0001")
        assert first_refund["refund_id"] == body["refund_id"]
        assert first_refund["out_trade_no"] == key
        assert first_refund["order_id"] == order["order_id"]
        assert len(app.state.sandbox.book.orders()) == 2


def _csv_rows(response: httpx.Response) -> list[list[str]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows[0] == ["out_trade_no", "order_id", "type", "amount_fen", "finished_at"]
    return rows[1:]


async def test_statement_lists_money_moved_that_day_in_the_provider_time_zone() -> None:
    async with provider(declined_agreements={"AGR-BROKE"}) as (client, _):

        async def extra(out_trade_no: str, finished_at: str, amount_fen: int = 500) -> str:
            response = await client.post(
                "/_sandbox/orders",
                json={
                    "out_trade_no": out_trade_no,
                    "amount_fen": amount_fen,
                    "finished_at": finished_at,
                },
            )
            assert response.status_code == 201, response.text
            order_id: str = response.json()["order_id"]
            return order_id

        # 23:59:59 and 00:00:00 in Shanghai, eight hours ahead of UTC.
        late_evening = await extra("extra-late", "2024-03-01T15:59:59+00:00")
        midnight = await extra("extra-midnight", "2024-03-01T16:00:00Z")
        same_moment = await extra("extra-also-late", "2024-03-01T23:59:59+08:00", 700)
        first_day = _csv_rows(await client.get("/v1/statements/2024-03-01"))
        assert first_day == [
            ["extra-also-late", same_moment, "charge", "700", "2024-03-01T15:59:59.000+00:00"],
            ["extra-late", late_evening, "charge", "500", "2024-03-01T15:59:59.000+00:00"],
        ]
        second_day = _csv_rows(await client.get("/v1/statements/2024-03-02"))
        assert second_day == [
            ["extra-midnight", midnight, "charge", "500", "2024-03-01T16:00:00.000+00:00"]
        ]

        changed = await client.post("/_sandbox/orders/extra-late/amount", json={"amount_fen": 1})
        assert changed.json()["amount_fen"] == 1
        voided = await client.post("/_sandbox/orders/extra-also-late/void")
        assert voided.status_code == 200
        assert (await client.get("/v1/orders/extra-also-late")).status_code == 200
        assert _csv_rows(await client.get("/v1/statements/2024-03-01")) == [
            ["extra-late", late_evening, "charge", "1", "2024-03-01T15:59:59.000+00:00"]
        ]

        faults = await client.post("/_sandbox/faults", json={"statement_timezone": "UTC"})
        assert faults.status_code == 200
        utc_day = _csv_rows(await client.get("/v1/statements/2024-03-01"))
        assert [row[0] for row in utc_day] == ["extra-late", "extra-midnight"]

        for bad in ("2024-13-01", "20240301", "yesterday", "2024-1-01"):
            invalid = await client.get(f"/v1/statements/{bad}")
            assert (invalid.status_code, invalid.json()["error"]) == (400, "invalid_date")


async def test_statement_leaves_out_what_is_not_money() -> None:
    async with provider(declined_agreements={"AGR-BROKE"}) as (client, _):
        charged, declined, processing = new_key(), new_key(), new_key()
        paid, unpaid = new_key(), new_key()
        await charge(client, charged, amount_fen=1200)
        await charge(client, declined, agreement_no="AGR-BROKE")
        for key in (paid, unpaid):
            await client.post(
                "/v1/payments", json={"amount_fen": 600}, headers={"Idempotency-Key": key}
            )
        await client.post(f"/v1/payments/{paid}/pay")
        charge_order = await final_order(client, charged)
        await final_order(client, declined)
        refunded = (await refund(client, "refund-statement", charged, 200)).json()
        await client.post("/_sandbox/faults", json={"processing_delay_s": 60})
        await charge(client, processing)
        payment_order = (await client.get(f"/v1/orders/{paid}")).json()

        zone = ZoneInfo("Asia/Shanghai")
        lines = [
            [charged, charge_order["order_id"], "charge", "1200", charge_order["finished_at"]],
            [paid, payment_order["order_id"], "payment", "600", payment_order["finished_at"]],
            [
                "refund-statement",
                refunded["refund_id"],
                "refund",
                "200",
                refunded["finished_at"],
            ],
        ]
        day = datetime.fromisoformat(charge_order["finished_at"]).astimezone(zone).date()
        # Only lines of the charge's day: the run might straddle midnight in Shanghai.
        expected = sorted(
            (
                line
                for line in lines
                if datetime.fromisoformat(line[4]).astimezone(zone).date() == day
            ),
            key=lambda line: (line[4], line[0]),
        )
        assert _csv_rows(await client.get(f"/v1/statements/{day.isoformat()}")) == expected


async def test_lost_notification_never_arrives_and_the_order_query_has_the_outcome(
    merchant: Merchant,
) -> None:
    async with provider(merchant, lost_notification_rate=1.0) as (client, _):
        key = new_key()
        await charge(client, key)
        assert (await final_order(client, key))["status"] == "succeeded"
        # The loss is decided when the charge finishes, so nothing can be on its way now.
        (event,) = (await client.get("/_sandbox/notifications")).json()
        assert (event["outcome"], event["faults"], event["attempts"]) == ("dropped", ["lost"], 0)
        assert merchant.calls == []


async def test_duplicated_notification_arrives_twice_with_one_event_id(
    merchant: Merchant,
) -> None:
    async with provider(merchant, duplicate_notification_rate=1.0) as (client, _):
        await charge(client, new_key())
        first, second = await received(merchant, 2)
        assert first.payload == second.payload
        assert first.verifies() and second.verifies()


async def test_late_notification_still_arrives(merchant: Merchant) -> None:
    faults = {"late_notification_rate": 1.0, "late_notification_s": 0.2}
    async with provider(merchant, **faults) as (client, _):
        key = new_key()
        await charge(client, key)
        assert (await final_order(client, key))["status"] == "succeeded"
        (notification,) = await received(merchant, 1)
        assert notification.verifies()
        (event,) = (await client.get("/_sandbox/notifications")).json()
        assert (event["faults"], event["outcome"]) == (["late"], "delivered")


async def test_forged_notification_fails_verification_and_the_genuine_one_passes(
    merchant: Merchant,
) -> None:
    async with provider(
        merchant, forged_notification_rate=1.0, declined_agreements={"AGR-BROKE"}
    ) as (client, _):
        paid, declined = new_key(), new_key()
        await charge(client, paid, amount_fen=1000)
        await charge(client, declined, agreement_no="AGR-BROKE")
        calls = await received(merchant, 4)
        genuine = {c.payload["out_trade_no"]: c.payload for c in calls if c.verifies()}
        forged = {c.payload["out_trade_no"]: c.payload for c in calls if not c.verifies()}
        assert set(genuine) == set(forged) == {paid, declined}
        assert (genuine[paid]["status"], genuine[paid]["amount_fen"]) == ("succeeded", 1000)
        assert forged[paid]["amount_fen"] != 1000
        assert genuine[declined]["status"] == "declined"
        assert forged[declined]["status"] == "succeeded"
        assert forged[paid]["event_id"] == genuine[paid]["event_id"]


async def test_failed_delivery_is_retried_then_given_up() -> None:
    async with (
        merchant_endpoint(fail_first=1) as flaky,
        provider(flaky, notify_retry_s=(0.05, 0.05)) as (client, _),
    ):
        key = new_key()
        await charge(client, key)
        first, second = await received(flaky, 2)
        assert first.body == second.body
        assert second.verifies()

        async def delivered() -> list[dict[str, Any]] | None:
            events: list[dict[str, Any]] = (await client.get("/_sandbox/notifications")).json()
            return events if events[0]["outcome"] == "delivered" else None

        (event,) = await eventually(delivered)
        assert (event["attempts"], event["last_error"]) == (2, "HTTP 500")

        flaky.failures_left = 100
        await client.post(
            "/_sandbox/faults", json={"notify_url": flaky.url, "notify_retry_s": [0.01]}
        )
        await charge(client, new_key())

        async def given_up() -> list[dict[str, Any]] | None:
            events: list[dict[str, Any]] = (await client.get("/_sandbox/notifications")).json()
            return events if events[-1]["outcome"] == "failed" else None

        assert (await eventually(given_up))[-1]["attempts"] == 2


async def test_unreachable_merchant_is_retried_then_given_up() -> None:
    async with merchant_endpoint() as gone:
        url = gone.url
    async with provider(notify_url=url, notify_retry_s=(0.01, 0.01)) as (client, _):
        await charge(client, new_key())

        async def given_up() -> dict[str, Any] | None:
            events: list[dict[str, Any]] = (await client.get("/_sandbox/notifications")).json()
            return events[0] if events and events[0]["outcome"] == "failed" else None

        event = await eventually(given_up)
        assert event["attempts"] == 3
        assert event["last_error"].startswith("ConnectError")


async def test_errors_before_and_after_taking_effect() -> None:
    async with provider(error_rate=1.0) as (client, app):
        key = new_key()
        failed = await charge(client, key)
        assert (failed.status_code, failed.json()["error"]) == (503, "service_unavailable")
        assert (await client.get(f"/v1/orders/{key}")).status_code == 503
        assert app.state.sandbox.book.orders() == [], "nothing happened"

        assert (await client.post("/_sandbox/faults", json={"lost_response_rate": 1.0})).is_success
        lost = await charge(client, key)
        assert lost.status_code == 503
        order = await final_order(client, key)
        assert order["status"] == "succeeded", "the charge happened despite the 503"
        assert (await refund(client, "refund-lost", key, 100)).status_code == 503
        assert (await client.get(f"/v1/orders/{key}")).json()["refunded_fen"] == 100

        await client.post("/_sandbox/faults", json={})
        retried = await charge(client, key)
        assert (retried.status_code, retried.json()["order_id"]) == (200, order["order_id"])
        assert len(app.state.sandbox.book.orders()) == 1


async def test_hangs_before_and_after_taking_effect() -> None:
    async with provider(timeout_rate=1.0, timeout_s=30) as (client, app):
        before = new_key()
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                "/v1/charges",
                json={"agreement_no": "AGR-1", "amount_fen": 100},
                headers={"Idempotency-Key": before},
                timeout=0.3,
            )
        assert (await client.get(f"/v1/orders/{before}")).status_code == 404

        await client.post("/_sandbox/faults", json={"slow_after_apply_rate": 1.0, "timeout_s": 30})
        after = new_key()
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                "/v1/charges",
                json={"agreement_no": "AGR-1", "amount_fen": 100},
                headers={"Idempotency-Key": after},
                timeout=0.3,
            )
        assert (await final_order(client, after))["status"] == "succeeded"
        assert [o.out_trade_no for o in app.state.sandbox.book.orders()] == [after]


async def test_fault_config_is_replaced_at_runtime_and_validated() -> None:
    async with provider() as (client, app):
        replaced = await client.post(
            "/_sandbox/faults",
            json={"error_rate": 0.5, "declined_agreements": ["AGR-X"], "notify_retry_s": [1]},
        )
        assert replaced.status_code == 200
        assert replaced.json()["declined_agreements"] == ["AGR-X"]
        assert app.state.sandbox.faults == FaultConfig(
            error_rate=0.5, declined_agreements={"AGR-X"}, notify_retry_s=(1.0,)
        )
        for bad in ({"error_rate": 2}, {"no_such_fault": 1}, {"statement_timezone": "Mars/Base"}):
            response = await client.post("/_sandbox/faults", json=bad)
            assert (response.status_code, response.json()["error"]) == (400, "invalid_request")


def test_every_fault_has_a_command_line_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert faults_from_args(parser.parse_args([])) == FaultConfig()
    args = parser.parse_args(
        [
            "--error-rate=0.1",
            "--lost-response-rate=0.2",
            "--timeout-rate=0.3",
            "--slow-after-apply-rate=0.4",
            "--timeout=2",
            "--processing-delay=0.5",
            "--decline-rate=0.05",
            "--declined-agreement=A",
            "--declined-agreement=B",
            "--notify-url=http://127.0.0.1:9/notify",
            "--notify-retry=0.1,2",
            "--lost-notification-rate=0.6",
            "--duplicate-notification-rate=0.7",
            "--late-notification-rate=0.8",
            "--late-notification-delay=3",
            "--forged-notification-rate=0.9",
            "--statement-timezone=UTC",
            "--seed=5",
        ]
    )
    assert faults_from_args(args) == FaultConfig(
        error_rate=0.1,
        lost_response_rate=0.2,
        timeout_rate=0.3,
        slow_after_apply_rate=0.4,
        timeout_s=2,
        processing_delay_s=0.5,
        decline_rate=0.05,
        declined_agreements={"A", "B"},
        notify_url="http://127.0.0.1:9/notify",
        notify_retry_s=(0.1, 2.0),
        lost_notification_rate=0.6,
        duplicate_notification_rate=0.7,
        late_notification_rate=0.8,
        late_notification_s=3,
        forged_notification_rate=0.9,
        statement_timezone="UTC",
        seed=5,
    )
    assert parser.parse_args(["--notify-retry="]).notify_retry_s == ()
    for bad in (["--error-rate=1.5"], ["--timeout=-1"], ["--statement-timezone=Mars/Base"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


async def test_orders_survive_a_restart_and_processing_charges_finish_after_it(
    tmp_path: Path, merchant: Merchant
) -> None:
    db_path = str(tmp_path / "sandbox.sqlite3")
    paid, processing = new_key(), new_key()
    async with provider(merchant, db_path=db_path, processing_delay_s=60) as (client, _):
        await client.post(
            "/v1/payments", json={"amount_fen": 800}, headers={"Idempotency-Key": paid}
        )
        payment = (await client.post(f"/v1/payments/{paid}/pay")).json()
        made = (await refund(client, "refund-restart", paid, 300)).json()
        assert (await charge(client, processing)).json()["status"] == "processing"

    async with provider(merchant, db_path=db_path) as (client, _):
        after = (await client.get(f"/v1/orders/{paid}")).json()
        del after["pay_url"], payment["pay_url"]  # the provider now listens on another port
        assert after == {**payment, "refunded_fen": 300}
        assert (await refund(client, "refund-restart", paid, 300)).json() == made
        assert (await final_order(client, processing))["status"] == "succeeded"

        async def charge_notified() -> list[Notification] | None:
            calls = [c for c in merchant.calls if c.payload["out_trade_no"] == processing]
            return calls or None

        (notification,) = await eventually(charge_notified)
        assert notification.verifies()
        assert notification.payload["status"] == "succeeded"
