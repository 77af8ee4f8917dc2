"""A bound plate's pay-later service state with the provider, where the driver and the worker
use it: looked up when a plate is bound or pay-later is turned on (GET /api/v1/me shows it with
a Chinese note), refreshed by the worker's sweep when old (an outage retried at the next
sweep), read by the lane without asking the provider. On WeChat the agreement's number is the
driver's openid."""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from parking.admin import repository as admin
from parking.app import create_app
from parking.drivers.service import SERVICE_NOTES, SERVICE_UNKNOWN_NOTE
from parking.drivers.verification import DevRegistry, registry_of
from parking.infra import Endpoints
from parking.runtime import ProviderEndpoint, Runtime, running
from parking.settings import Settings
from parking_dev import sandbox
from tests.conftest import (
    MQTT_URL,
    REDIS_URL,
    backdate_entry,
    bearer,
    charges_of,
    create_lot,
    driver_token,
    enter,
    entry_registered,
    eventually,
    exit_after,
    make_driver,
    provider_and_runtime,
    unique_plate,
)
from tests.gates import GateProbe
from tests.test_wechat import _faults, wechat_runtime

Headers = dict[str, str]


@contextlib.asynccontextmanager
async def driver_app(runtime: Runtime) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    app = create_app(runtime)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as api:
        yield api, app


async def _driver(runtime: Runtime, app: FastAPI) -> Headers:
    async with runtime.pool.acquire() as conn:
        account_id = await admin.create_account(conn, f"139{uuid.uuid4().int % 10**8:08d}")
    return bearer(driver_token(app, account_id))


async def _bind(api: httpx.AsyncClient, app: FastAPI, headers: Headers, plate: str) -> Any:
    registry = registry_of(app)
    assert isinstance(registry, DevRegistry)
    licence_no = f"LIC{uuid.uuid4().hex[:10].upper()}"
    registry.register(plate, "blue", licence_no, "车主")
    claim = {"plate": plate, "color": "blue", "licence_no": licence_no, "owner_name": "车主"}
    bound = await api.post("/api/v1/me/plates", json=claim, headers=headers)
    assert bound.status_code == 201, bound.text
    return bound.json()


async def _sign(api: httpx.AsyncClient, headers: Headers, **extra: Any) -> httpx.Response:
    body = {"per_session_limit_fen": 20_000, **extra}
    return await api.put("/api/v1/me/agreement", json=body, headers=headers)


async def _plate(api: httpx.AsyncClient, headers: Headers, plate: str) -> dict[str, Any]:
    me = await api.get("/api/v1/me", headers=headers)
    assert me.status_code == 200, me.text
    (found,) = [p for p in me.json()["plates"] if p["plate"] == plate]
    return dict(found)


async def test_binding_and_turning_pay_later_on_look_the_plates_up(
    settings: Settings, database_url: str
) -> None:
    faults = sandbox.FaultConfig(processing_delay_s=0.01)
    async with (
        provider_and_runtime(settings, database_url, faults) as (runtime, _),
        driver_app(runtime) as (api, app),
    ):
        headers = await _driver(runtime, app)
        first, second = unique_plate(), unique_plate()
        # Without pay-later there is no provider to ask: no state, no note.
        bound = await _bind(api, app, headers, first)
        assert (bound["service_state"], bound["service_note"]) == (None, None)
        # Turning pay-later on asks about the bound plate.
        signed = await _sign(api, headers)
        assert signed.status_code == 201, signed.text
        shown = await _plate(api, headers, first)
        assert shown["service_state"] == "normal" and shown["service_checked_at"] is not None
        assert shown["service_note"] == SERVICE_NOTES["normal"]
        # The driver paused the service with the provider; binding another plate asks at once.
        faults.paused_agreements.add(signed.json()["agreement_no"])
        bound = await _bind(api, app, headers, second)
        assert bound["service_state"] == "paused"
        assert bound["service_note"] == SERVICE_NOTES["paused"] and "暂停" in bound["service_note"]
        assert (await _plate(api, headers, second))["service_state"] == "paused"


async def test_a_provider_outage_at_binding_binds_and_the_sweep_asks_again(
    settings: Settings, database_url: str
) -> None:
    settings.worker_sweep_interval_s = 0.2
    settings.plate_state_max_age_s = 3600
    settings.plate_state_batch = 1000
    faults = sandbox.FaultConfig(processing_delay_s=0.01)
    async with (
        provider_and_runtime(settings, database_url, faults) as (runtime, _),
        driver_app(runtime) as (api, app),
    ):
        headers = await _driver(runtime, app)
        assert (await _sign(api, headers)).status_code == 201
        faults.error_rate = 1.0
        plate = unique_plate()
        bound = await _bind(api, app, headers, plate)
        # Bound all the same; the driver is told the state is still being asked.
        assert (bound["service_state"], bound["service_note"]) == (None, SERVICE_UNKNOWN_NOTE)
        faults.error_rate = 0.0

        async def refreshed() -> bool:
            return (await _plate(api, headers, plate))["service_state"] == "normal"

        await eventually(refreshed, timeout_s=20)


async def test_a_refresh_hanging_at_the_provider_does_not_hold_up_the_charges(
    settings: Settings, database_url: str, gate: GateProbe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider that answers state look-ups slowly (each up to its timeout, a batch of them
    per sweep) must not stop the worker from charging: the sweep runs beside the jobs."""
    settings.worker_sweep_interval_s = 0.2
    settings.plate_state_max_age_s = 0  # every sweep asks
    settings.payment_provider_timeout_s = 120.0  # the look-up hangs for the whole test
    secret = uuid.uuid4().hex
    async with sandbox.running(sandbox.FaultConfig(processing_delay_s=0.01), secret=secret) as (
        url,
        provider_app,
    ):
        asked = asyncio.Event()
        answer = asyncio.Event()

        async def hang_reads() -> None:
            asked.set()
            await answer.wait()

        monkeypatch.setattr(provider_app.state.sandbox, "fail_query", hang_reads)
        eps = Endpoints(database_url, REDIS_URL, MQTT_URL)
        async with running(settings, eps, ProviderEndpoint(url, secret)) as runtime:
            try:
                lot = await create_lot(runtime)
                plate = unique_plate()
                await make_driver(runtime, plate)  # its state never learned: the sweep asks
                await asyncio.wait_for(asked.wait(), 20)
                command = await exit_after(runtime, gate, lot, plate, timedelta(minutes=90))
                assert (command["action"], command["fee_fen"]) == ("open", 1200), command

                async def charged() -> bool:
                    rows = await charges_of(runtime, lot)
                    return [r["status"] for r in rows] == ["succeeded"]

                await eventually(charged, timeout_s=20)
                assert not answer.is_set(), "charged while the look-up still hangs"
            finally:
                answer.set()


async def test_on_wechat_the_openid_is_the_agreement_and_a_silent_pause_is_refreshed_and_held(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    settings.worker_sweep_interval_s = 0.2
    settings.plate_state_batch = 1000
    settings.plate_state_max_age_s = 0  # every sweep asks again
    async with (
        wechat_runtime(settings, database_url, _faults()) as (runtime, emulator),
        driver_app(runtime) as (api, app),
    ):
        lot = await create_lot(runtime)
        headers = await _driver(runtime, app)
        plate = unique_plate()
        openid = f"o-{plate}"  # how the emulator knows the driver (its deductions' payer)
        await _bind(api, app, headers, plate)
        refused = await _sign(api, headers)
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "wechat_code_required"
        emulator.set_plate_state(plate, "BLUE", "NORMAL", openid=openid)
        signed = await _sign(api, headers, wechat_code=emulator.login_code(openid))
        assert signed.status_code == 201, signed.text
        assert (signed.json()["provider"], signed.json()["agreement_no"]) == ("wechat", openid)
        assert (await _plate(api, headers, plate))["service_state"] == "normal"
        # The car comes in while the service is normal.
        await enter(runtime, gate, lot, plate, parked_for=timedelta(0))
        await backdate_entry(runtime, lot, plate, timedelta(minutes=70))
        await entry_registered(runtime, lot, plate)  # registered: normal
        # The driver pauses it in WeChat, and the state-change notification is lost: only the
        # worker's refresh learns it.
        emulator.plates[(plate, "BLUE")] = "PAUSE"

        async def paused() -> bool:
            return (await _plate(api, headers, plate))["service_state"] == "paused"

        await eventually(paused, timeout_s=20)
        shown = await _plate(api, headers, plate)
        assert shown["service_note"] == SERVICE_NOTES["paused"]
        command = await gate.decide(lot.code, "out1", gate.capture("out", plate))
        assert (command["action"], command["fee_fen"]) == ("hold", 1200)
        assert await charges_of(runtime, lot) == []
        # Another account cannot turn pay-later on under the same WeChat user.
        other = await _driver(runtime, app)
        taken = await _sign(api, other, wechat_code=emulator.login_code(openid))
        assert taken.status_code == 409 and taken.json()["error"]["code"] == "openid_in_use"
        # Off and on again under the same openid.
        assert (await api.delete("/api/v1/me/agreement", headers=headers)).status_code == 204
        assert (
            await _sign(api, headers, wechat_code=emulator.login_code(openid))
        ).status_code == 201


async def test_a_wechat_outage_during_the_refresh_is_retried_at_a_later_sweep(
    settings: Settings, database_url: str
) -> None:
    settings.worker_sweep_interval_s = 0.2
    settings.plate_state_batch = 1000
    settings.plate_state_max_age_s = 0
    async with (
        wechat_runtime(settings, database_url, _faults()) as (runtime, emulator),
        driver_app(runtime) as (api, app),
    ):
        headers = await _driver(runtime, app)
        plate = unique_plate()
        await _bind(api, app, headers, plate)
        signed = await _sign(api, headers, wechat_code=emulator.login_code(f"o-{plate}"))
        assert signed.status_code == 201, signed.text
        assert (await _plate(api, headers, plate))["service_state"] == "normal"
        emulator.config.faults.error_rate = 1.0
        emulator.plates[(plate, "BLUE")] = "PAUSE"
        asked = len(emulator.service_queries)

        async def failed_twice() -> bool:
            return len(emulator.service_queries) >= asked + 2

        await eventually(failed_twice, timeout_s=20)
        # Every answer failed: what was known stays (the lane keeps using it).
        assert (await _plate(api, headers, plate))["service_state"] == "normal"
        emulator.config.faults.error_rate = 0.0

        async def paused() -> bool:
            return (await _plate(api, headers, plate))["service_state"] == "paused"

        await eventually(paused, timeout_s=20)


async def test_a_plate_opened_by_another_wechat_user_is_not_opened_for_this_one(
    settings: Settings, database_url: str
) -> None:
    async with (
        wechat_runtime(settings, database_url, _faults()) as (runtime, emulator),
        driver_app(runtime) as (api, app),
    ):
        headers = await _driver(runtime, app)
        plate = unique_plate()
        emulator.set_plate_state(plate, "BLUE", "NORMAL", openid=f"o-{plate}")
        signed = await _sign(api, headers, wechat_code=emulator.login_code("o-someone-else"))
        assert signed.status_code == 201, signed.text
        bound = await _bind(api, app, headers, plate)
        assert bound["service_state"] == "not_opened"
        assert bound["service_note"] == SERVICE_NOTES["not_opened"]


async def test_on_wechat_the_openid_is_wechats_answer_to_the_sign_in_never_the_apps_word(
    settings: Settings, database_url: str
) -> None:
    """Before, the app sent the openid and the server took it: anyone could sign pay-later on
    under another driver's openid, and that driver's own sign-up then met 409 `openid_in_use`
    for as long as the squatter kept it. Now only a code of WeChat's sign-in (wx.login), good
    once, names the openid; a code WeChat refuses changes nothing."""
    async with (
        wechat_runtime(settings, database_url, _faults()) as (runtime, emulator),
        driver_app(runtime) as (api, app),
    ):
        victim, squatter = await _driver(runtime, app), await _driver(runtime, app)
        victims_openid = f"o-{uuid.uuid4().hex[:12]}"
        named = await _sign(api, squatter, openid=victims_openid)
        assert named.status_code == 422
        assert named.json()["error"]["code"] == "wechat_code_required"
        made_up = await _sign(api, squatter, wechat_code=victims_openid)
        assert made_up.status_code == 422
        assert made_up.json()["error"]["code"] == "wechat_code_invalid"
        code = emulator.login_code(victims_openid)
        signed = await _sign(api, victim, wechat_code=code)
        assert signed.status_code == 201, signed.text
        assert signed.json()["agreement_no"] == victims_openid
        # The victim's code, overheard and replayed: WeChat takes a code once.
        replayed = await _sign(api, squatter, wechat_code=code)
        assert replayed.status_code == 422
        assert replayed.json()["error"]["code"] == "wechat_code_invalid"
        assert (await api.get("/api/v1/me/agreement", headers=squatter)).status_code == 404


async def test_on_wechat_a_sign_in_refused_for_the_apps_own_secret_is_no_drivers_fault(
    settings: Settings, database_url: str
) -> None:
    """The mini program's AppSecret was reset in WeChat's console: WeChat refuses every code
    with 40125. Drivers are told to try later (503), not that their sign-in expired (a 422
    every driver would meet again however often they sign in), and an error is logged."""
    async with (
        wechat_runtime(settings, database_url, _faults()) as (runtime, emulator),
        driver_app(runtime) as (api, app),
    ):
        emulator.app_secret = "reset-in-the-console"
        headers = await _driver(runtime, app)
        signed = await _sign(api, headers, wechat_code=emulator.login_code("o-anyone"))
        assert signed.status_code == 503, signed.text
        assert signed.json()["error"]["code"] == "wechat_unavailable"
        assert (await api.get("/api/v1/me/agreement", headers=headers)).status_code == 404


async def test_on_wechat_an_openid_named_before_the_sign_in_check_goes_to_its_proven_owner(
    settings: Settings, database_url: str
) -> None:
    """An agreement made when the app named the openid (migration 0049 marks those
    unverified) holds a victim's openid. The victim signing in with WeChat takes it over: their
    pay-later is on, the squatter's is off and they are told. A verified holder keeps it (409)."""
    async with (
        wechat_runtime(settings, database_url, _faults()) as (runtime, emulator),
        driver_app(runtime) as (api, app),
    ):
        victims_openid = f"o-{uuid.uuid4().hex[:12]}"
        squatter = await make_driver(
            runtime, unique_plate(), provider="wechat", agreement_no=victims_openid
        )
        async with runtime.pool.acquire() as conn:
            await conn.execute(
                "UPDATE pay_later_agreements SET identity_verified = false WHERE id = $1",
                squatter.agreement_id,
            )
        victim = await _driver(runtime, app)
        signed = await _sign(api, victim, wechat_code=emulator.login_code(victims_openid))
        assert signed.status_code == 201, signed.text
        assert signed.json()["agreement_no"] == victims_openid
        async with runtime.pool.acquire() as conn:
            displaced = await conn.fetchval(
                "SELECT cancelled_at IS NOT NULL FROM pay_later_agreements WHERE id = $1",
                squatter.agreement_id,
            )
            told = await conn.fetchval(
                "SELECT count(*) FROM notifications WHERE account_id = $1"
                " AND kind = 'agreement_displaced'",
                squatter.account_id,
            )
        assert displaced and told == 1
        # The victim's own (verified) agreement is nobody's to take.
        other = await _driver(runtime, app)
        taken = await _sign(api, other, wechat_code=emulator.login_code(victims_openid))
        assert taken.status_code == 409 and taken.json()["error"]["code"] == "openid_in_use"


async def test_on_wechat_a_driver_proving_their_own_openid_keeps_their_agreement(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    """A driver's agreement was made while the app named the openid (unverified), and it is
    theirs. Signing in with WeChat again verifies it: the same agreement, still paying for the
    stay in progress. Before, it was cancelled for a new one signed now, which does not pay
    for a stay that began before it: the parked car was held at the exit."""
    async with (
        wechat_runtime(settings, database_url, _faults()) as (runtime, emulator),
        driver_app(runtime) as (api, app),
    ):
        lot = await create_lot(runtime)
        plate = unique_plate()
        openid = f"o-{plate}"  # the emulator's name for the plate's driver: their own
        driver = await make_driver(runtime, plate, provider="wechat", agreement_no=openid)
        async with runtime.pool.acquire() as conn:
            await conn.execute(
                "UPDATE pay_later_agreements SET identity_verified = false WHERE id = $1",
                driver.agreement_id,
            )
        await enter(runtime, gate, lot, plate, parked_for=timedelta(0))
        await entry_registered(runtime, lot, plate)
        await backdate_entry(runtime, lot, plate, timedelta(minutes=70))
        headers = bearer(driver_token(app, driver.account_id))
        signed = await _sign(api, headers, wechat_code=emulator.login_code(openid))
        assert signed.status_code == 201, signed.text
        async with runtime.pool.acquire() as conn:
            agreements = await conn.fetch(
                "SELECT id, cancelled_at, identity_verified FROM pay_later_agreements"
                " WHERE account_id = $1",
                driver.account_id,
            )
        assert [(a["id"], a["cancelled_at"], a["identity_verified"]) for a in agreements] == [
            (driver.agreement_id, None, True)
        ]
        command = await gate.decide(lot.code, "out1", gate.capture("out", plate))
        assert (command["action"], command["fee_fen"]) == ("open", 1200)
        # Another openid while one agreement is active: cancel it first, as before.
        other = await _sign(api, headers, wechat_code=emulator.login_code("o-someone-else"))
        assert other.status_code == 409 and other.json()["error"]["code"] == "agreement_exists"
