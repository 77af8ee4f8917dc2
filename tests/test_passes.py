"""Passes bought in the app: paid through the provider, booked as deferred revenue and
recognised over the period (balanced, integer fen, once), the pass's right lets the car out
free, a renewal starts where the current pass ends, and the driver is reminded once before it
ends."""

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI

from billing import ledger, passes, payments
from parking.runtime import ProviderEndpoint, Runtime
from tests.conftest import (
    Lot,
    bearer,
    driver_token,
    enter,
    make_driver,
    make_staff,
    staff_token,
    unique_plate,
)
from tests.gates import GateProbe


async def _offer(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, lot: Lot, price_fen: int
) -> tuple[int, dict[str, str]]:
    admin = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
    spec = await api.post(
        "/api/v1/operator/right-specs",
        json={"name": f"月租-{unique_plate()}", "kind": "free_passage", "car_parks": [lot.code]},
        headers=admin,
    )
    offer = await api.post(
        "/api/v1/operator/pass-offers",
        json={
            "spec_id": spec.json()["id"],
            "car_park": lot.code,
            "name": "包月",
            "price_fen": price_fen,
            "period_days": 30,
        },
        headers=admin,
    )
    assert offer.status_code == 201, offer.text
    offer_id: int = offer.json()["id"]
    return offer_id, admin


async def _buy_and_pay(
    runtime: Runtime,
    api: httpx.AsyncClient,
    provider: ProviderEndpoint,
    me: dict[str, str],
    offer_id: int,
    plate: str,
) -> dict[str, Any]:
    bought = await api.post(
        "/api/v1/me/passes", json={"offer_id": offer_id, "plate": plate}, headers=me
    )
    assert bought.status_code == 201, bought.text
    out_trade_no = httpx.URL(bought.json()["pay_url"]).path.rsplit("/", 1)[-1]
    async with httpx.AsyncClient(base_url=provider.url) as wallet:
        assert (await wallet.post(f"/v1/payments/{out_trade_no}/pay")).status_code == 200
    # No notification reaches us here: the worker's sweep asks about the pending payment.
    runtime.settings.charge_query_after_s = 0.0
    runtime.outbox.query_after_s = 0.0
    await runtime.outbox.sweep(datetime.now(UTC))
    mine = (await api.get("/api/v1/me/passes", headers=me)).json()
    purchase: dict[str, Any] = next(p for p in mine if p["id"] == bought.json()["id"])
    assert purchase["status"] == "paid", purchase
    return purchase


async def test_a_pass_bought_in_the_app_is_deferred_revenue_recognised_over_its_period(
    runtime: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    provider: ProviderEndpoint,
    lot: Lot,
) -> None:
    offer_id, admin = await _offer(runtime, app, api, lot, price_fen=30_001)
    driver = await make_driver(runtime, unique_plate())
    me = bearer(driver_token(app, driver.account_id))
    offers = (
        await api.get("/api/v1/me/pass-offers", params={"car_park": lot.code}, headers=me)
    ).json()
    assert [o["id"] for o in offers] == [offer_id]
    # Only a vehicle of one's own.
    stranger = await api.post(
        "/api/v1/me/passes", json={"offer_id": offer_id, "plate": unique_plate()}, headers=me
    )
    assert stranger.status_code == 409
    purchase = await _buy_and_pay(runtime, api, provider, me, offer_id, driver.plate)
    starts = datetime.fromisoformat(purchase["starts_at"])
    ends = datetime.fromisoformat(purchase["ends_at"])
    assert ends - starts == timedelta(days=30)
    deferred = ledger.deferred_pass(purchase["id"])
    async with runtime.pool.acquire() as conn:
        assert await ledger.balance(conn, deferred) == -30_001
        assert await ledger.is_balanced(conn)
        # A third of the period: a third of the price, rounded down; again: nothing more.
        async with conn.transaction():
            await passes.recognise(conn, starts + timedelta(days=10))
            await passes.recognise(conn, starts + timedelta(days=10))
        assert await ledger.balance(conn, deferred) == -30_001 + 10_000
        assert await ledger.balance(conn, ledger.revenue(lot.id)) == -10_000
    report = (await api.get("/api/v1/operator/reports/pass-revenue", headers=admin)).json()
    assert [(r["sold"], r["recognised_fen"], r["deferred_fen"]) for r in report] == [
        (1, 10_000, 20_001)
    ]
    async with runtime.pool.acquire() as conn:
        async with conn.transaction():
            await passes.recognise(conn, ends + timedelta(seconds=1))
        assert await ledger.balance(conn, deferred) == 0
        assert await ledger.balance(conn, ledger.revenue(lot.id)) == -30_001
        assert await ledger.is_balanced(conn)
    # Parked since before the pass began: that time is priced, the pass's time is not.
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=5))
    command = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert command["action"] == "open" and command["fee_fen"] == 3000
    # A stay within the pass: out free (by the tariff it would be ¥6, a started hour).
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(0))
    command = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
    assert command["action"] == "open" and command["fee_fen"] == 0


async def test_a_renewal_starts_where_the_pass_ends_and_one_reminder_before_expiry(
    runtime: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    provider: ProviderEndpoint,
    lot: Lot,
) -> None:
    offer_id, _ = await _offer(runtime, app, api, lot, price_fen=20_000)
    driver = await make_driver(runtime, unique_plate())
    me = bearer(driver_token(app, driver.account_id))
    first = await _buy_and_pay(runtime, api, provider, me, offer_id, driver.plate)
    ends = datetime.fromisoformat(first["ends_at"])
    reminder_at = ends - timedelta(days=2)

    async def reminders() -> list[str]:
        async with runtime.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT body FROM notifications WHERE account_id = $1 AND kind = 'pass_expiring'",
                driver.account_id,
            )
        return [r["body"] for r in rows]

    # Other tests' passes share the database: this driver's reminders are counted.
    async with runtime.pool.acquire() as conn, conn.transaction():
        await passes.send_expiry_reminders(conn, ends - timedelta(days=5), timedelta(days=3))
    assert await reminders() == []
    for _ in range(2):
        async with runtime.pool.acquire() as conn, conn.transaction():
            await passes.send_expiry_reminders(conn, reminder_at, timedelta(days=3))
    assert len(await reminders()) == 1
    second = await _buy_and_pay(runtime, api, provider, me, offer_id, driver.plate)
    assert datetime.fromisoformat(second["starts_at"]) == ends
    assert datetime.fromisoformat(second["ends_at"]) == ends + timedelta(days=30)
    # A renewed pass: no reminder for the first one's end; the second's comes before its own.
    third = await _buy_and_pay(runtime, api, provider, me, offer_id, driver.plate)
    async with runtime.pool.acquire() as conn, conn.transaction():
        await passes.send_expiry_reminders(conn, ends + timedelta(days=28), timedelta(days=3))
    assert len(await reminders()) == 1, "the second pass was renewed by the third"
    assert datetime.fromisoformat(third["starts_at"]) == ends + timedelta(days=30)


async def test_a_deleted_account_gets_no_new_message_naming_its_plate(
    runtime: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    provider: ProviderEndpoint,
    lot: Lot,
) -> None:
    """Deleting the account erases its messages (they name plates and places). Its pass runs
    on, and its expiry reminder used to write a new message naming the plate in clear for the
    account nobody can reach any more; none is written now."""
    offer_id, _ = await _offer(runtime, app, api, lot, price_fen=20_000)
    driver = await make_driver(runtime, unique_plate())
    me = bearer(driver_token(app, driver.account_id))
    bought = await _buy_and_pay(runtime, api, provider, me, offer_id, driver.plate)
    assert (await api.delete("/api/v1/me", headers=me)).status_code == 204
    ends = datetime.fromisoformat(bought["ends_at"])
    async with runtime.pool.acquire() as conn, conn.transaction():
        await passes.send_expiry_reminders(conn, ends - timedelta(days=2), timedelta(days=3))
    async with runtime.pool.acquire() as conn:
        written = await conn.fetch(
            "SELECT kind FROM notifications WHERE account_id = $1 AND body <> ''",
            driver.account_id,
        )
    assert written == []


async def test_two_passes_of_one_offer_paid_at_once_do_not_overlap(
    runtime: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    provider: ProviderEndpoint,
    lot: Lot,
) -> None:
    """A driver taps "buy" twice and pays both (the second payment is a renewal: it starts where
    the first pass ends, `billing.passes.activate`). When the two payments are booked at the
    same time (two notifications, or a notification and the worker's order query), each
    booking reads the vehicle's current pass before the other commits: both start now, the
    driver paid twice for one period. Now the second pass starts where the first ends,
    however the bookings interleave (the offer's purchases are booked one at a time)."""
    offer_id, _ = await _offer(runtime, app, api, lot, price_fen=20_000)
    driver = await make_driver(runtime, unique_plate())
    me = bearer(driver_token(app, driver.account_id))
    trade_nos = []
    for _ in range(2):
        bought = await api.post(
            "/api/v1/me/passes", json={"offer_id": offer_id, "plate": driver.plate}, headers=me
        )
        assert bought.status_code == 201, bought.text
        trade_nos.append(httpx.URL(bought.json()["pay_url"]).path.rsplit("/", 1)[-1])

    first = await runtime.pool.acquire()
    second = await runtime.pool.acquire()
    try:
        t1 = first.transaction()
        await t1.start()
        await payments.mark_paid(first, trade_nos[0], "ref-1", datetime.now(UTC))
        t2 = second.transaction()
        await t2.start()
        booking = asyncio.create_task(
            payments.mark_paid(second, trade_nos[1], "ref-2", datetime.now(UTC))
        )
        await asyncio.sleep(0.3)  # the second booking runs (or waits for a lock) meanwhile
        await t1.commit()
        await booking
        await t2.commit()
    finally:
        await runtime.pool.release(first)
        await runtime.pool.release(second)

    async with runtime.pool.acquire() as conn:
        periods = await conn.fetch(
            """SELECT starts_at, ends_at FROM pass_purchases
               WHERE account_id = $1 AND right_id IS NOT NULL ORDER BY starts_at, id""",
            driver.account_id,
        )
    assert len(periods) == 2
    assert periods[1]["starts_at"] >= periods[0]["ends_at"], (
        "two paid passes of one offer for one vehicle cover the same days: "
        f"{[(p['starts_at'], p['ends_at']) for p in periods]}"
    )
