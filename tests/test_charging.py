"""Charges after exit through a real HTTP sandbox provider that fails like a real one."""

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from billing import ledger, sandbox
from parking.infra import Endpoints
from parking.runtime import Runtime, running
from parking.settings import Settings
from tests.conftest import (
    MQTT_URL,
    REDIS_URL,
    SANDBOX_FAULTS,
    Lot,
    create_lot,
    enter,
    eventually,
    make_driver,
    unique_plate,
)
from tests.gates import GateProbe


@pytest.fixture
async def flaky_provider() -> AsyncIterator[tuple[str, sandbox.FastAPI]]:
    faults = sandbox.FaultConfig(error_rate=0.3, lost_response_rate=0.4, seed=11)
    async with sandbox.running(faults) as served:
        yield served


@pytest.fixture
async def flaky_runtime(
    settings: Settings, database_url: str, flaky_provider: tuple[str, sandbox.FastAPI]
) -> AsyncIterator[Runtime]:
    settings.charge_max_attempts = 30
    eps = Endpoints(database_url, REDIS_URL, MQTT_URL)
    async with running(settings, eps, flaky_provider[0]) as rt:
        yield rt


async def _exit_after(
    runtime: Runtime, gate: GateProbe, lot: Lot, plate: str, stay: timedelta
) -> dict:
    await enter(runtime, gate, lot, plate, parked_for=stay)
    return await gate.decide(lot.code, "out1", gate.capture("out", plate))


@pytest.fixture
async def flaky_lot(flaky_runtime: Runtime) -> Lot:
    return await create_lot(flaky_runtime)


async def test_lost_answers_and_5xx_are_retried_with_one_charge_per_session(
    flaky_runtime: Runtime,
    flaky_provider: tuple[str, sandbox.FastAPI],
    gate: GateProbe,
    flaky_lot: Lot,
) -> None:
    runtime, lot = flaky_runtime, flaky_lot
    drivers = [await make_driver(runtime, unique_plate()) for _ in range(8)]
    for driver in drivers:
        command = await _exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=90))
        assert (command["action"], command["fee_fen"]) == ("open", 1200)

    async def all_settled() -> list:
        async with runtime.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT c.* FROM charges c JOIN sessions s ON s.id = c.session_id "
                "WHERE s.car_park_id = $1",
                lot.id,
            )
        return rows if len(rows) == 8 and all(r["status"] == "succeeded" for r in rows) else []

    rows = await eventually(all_settled, timeout_s=30)
    orders = flaky_provider[1].state.orders
    keys = {r["idempotency_key"] for r in rows}
    assert keys <= set(orders), "every recorded charge exists at the provider"
    assert len([k for k in orders if k in keys]) == 8, "one provider order per session"
    assert {r["provider_ref"] for r in rows} == {orders[k].order_id for k in keys}
    assert runtime.outbox.stats.retries > 0, "the injected faults were exercised"
    async with runtime.pool.acquire() as conn:
        assert await ledger.is_balanced(conn)
        assert await ledger.balance(conn, ledger.revenue(lot.id)) == -8 * 1200
        for driver in drivers:
            assert await ledger.balance(conn, ledger.receivable(driver.account_id)) == 0


async def test_declined_charge_becomes_arrears_and_blocks_pay_later(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    driver = await make_driver(runtime, unique_plate())
    async with runtime.pool.acquire() as conn:
        agreement_no = await conn.fetchval(
            "SELECT agreement_no FROM pay_later_agreements WHERE id = $1", driver.agreement_id
        )
    # The session-wide sandbox declines agreements listed in its fault config.
    SANDBOX_FAULTS.declined_agreements.add(agreement_no)

    first = await _exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))
    assert first["action"] == "open"

    async def failed() -> bool:
        async with runtime.pool.acquire() as conn:
            return bool(
                await conn.fetchval(
                    "SELECT blocked_for_arrears FROM accounts WHERE id = $1", driver.account_id
                )
            )

    await eventually(failed)
    async with runtime.pool.acquire() as conn:
        status = await conn.fetchval(
            "SELECT status FROM charges WHERE account_id = $1", driver.account_id
        )
        owed = await ledger.balance(conn, ledger.receivable(driver.account_id))
        assert await ledger.is_balanced(conn)
    assert status == "failed"
    assert owed == 600, "the debt stays on the driver's receivable"

    second = await _exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))
    assert second["action"] == "hold", "arrears block pay-later at the next exit"


async def test_unknown_outcome_is_asked_of_the_provider_before_any_arrears(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    # Every answer is lost after the charge is applied: only a lookup can tell.
    faults = sandbox.FaultConfig(lost_response_rate=1.0, seed=3)
    settings.charge_max_attempts = 2
    async with sandbox.running(faults) as (url, app):
        eps = Endpoints(database_url, REDIS_URL, MQTT_URL)
        async with running(settings, eps, url) as runtime:
            lot = await create_lot(runtime)
            driver = await make_driver(runtime, unique_plate())
            command = await _exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=30))
            assert command["action"] == "open"

            async def settled() -> str | None:
                async with runtime.pool.acquire() as conn:
                    status = await conn.fetchval(
                        "SELECT status FROM charges WHERE account_id = $1", driver.account_id
                    )
                return status if status != "pending" else None

            assert await eventually(settled, timeout_s=20) == "succeeded"
            async with runtime.pool.acquire() as conn:
                blocked = await conn.fetchval(
                    "SELECT blocked_for_arrears FROM accounts WHERE id = $1", driver.account_id
                )
                assert await ledger.balance(conn, ledger.receivable(driver.account_id)) == 0
            assert blocked is False
            assert len(app.state.orders) == 1
