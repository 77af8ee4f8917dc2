"""The WeChat Pay Score parking adapter (billing.wechat) against the v3 emulator
(parking_dev.wechat), end to end over HTTP: signed requests, signed answers, signed and
encrypted notifications, the emulator's faults."""

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from billing import agreements, ledger, refunds
from billing.providers import (
    InvalidNotification,
    OrderResult,
    ParkingDeduction,
    ProviderMalformed,
    ProviderRejected,
    ProviderUnavailable,
    ServiceStateChange,
)
from billing.rails import WECHAT_LOGIN_API
from billing.wechat import WeChatParkingProvider
from parking.infra import Endpoints
from parking.production import payment_stand_ins
from parking.runtime import (
    ConfigurationError,
    ProviderEndpoint,
    Runtime,
    make_provider,
    payment_provider,
    wechat_credentials,
)
from parking.runtime import running as runtime_running
from parking.settings import Settings
from parking_dev import sandbox
from parking_dev.wechat import Emulator, EmulatorConfig, running, write_keys
from tests.conftest import (
    MQTT_URL,
    REDIS_URL,
    Driver,
    Lot,
    api_server,
    backdate_entry,
    charges_of,
    create_lot,
    enter,
    entry_registered,
    eventually,
    make_driver,
    stay_status,
    unique_plate,
)
from tests.gates import GateProbe
from tests.test_payments import _settlements


@dataclasses.dataclass
class Receiver:
    """The merchant's notification endpoint: every body parsed by the adapter."""

    url: str
    accepted: list[Any]
    rejected: list[str]


@contextlib.asynccontextmanager
async def receiver(get_provider: Any) -> AsyncIterator[Receiver]:
    got = Receiver("", [], [])

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            got.accepted.append(
                get_provider().parse_notification(body, dict(request.headers), now=int(time.time()))
            )
        except InvalidNotification as exc:
            got.rejected.append(str(exc))
            return web.json_response({"code": "FAIL", "message": "bad"}, status=401)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/notify", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    got.url = f"http://127.0.0.1:{port}/notify"
    try:
        yield got
    finally:
        await runner.cleanup()


@dataclasses.dataclass
class Rails:
    provider: WeChatParkingProvider
    emulator: Emulator
    notes: Receiver


@contextlib.asynccontextmanager
async def rails(
    config: EmulatorConfig | None = None, timeout_s: float = 2.0
) -> AsyncIterator[Rails]:
    holder: list[WeChatParkingProvider] = []
    async with receiver(lambda: holder[0]) as notes, running(config) as (url, emulator):
        provider = WeChatParkingProvider(
            emulator.credentials(), notify_url=notes.url, base_url=url, timeout_s=timeout_s
        )
        holder.append(provider)
        try:
            yield Rails(provider, emulator, notes)
        finally:
            await provider.aclose()


def _faults(**kw: Any) -> EmulatorConfig:
    advance = kw.pop("advance", True)
    bad = kw.pop("bad_response_signature_rate", 0.0)
    return EmulatorConfig(
        faults=sandbox.FaultConfig(processing_delay_s=0.01, notify_retry_s=(0.05, 0.2), **kw),
        advance=advance,
        bad_response_signature_rate=bad,
    )


def _stay(plate: str, parking_id: str | None) -> ParkingDeduction:
    exited = datetime.now(UTC)
    return ParkingDeduction(
        plate=plate,
        color="blue",
        entered_at=exited - timedelta(hours=2),
        exited_at=exited,
        car_park_name="城中街停车场",
        parking_id=parking_id,
        out_parking_no=f"e{plate.encode().hex()}",
    )


async def _enter_and_charge(r: Rails, plate: str, key: str, fen: int = 1200) -> OrderResult:
    entry = await r.provider.register_entry(
        out_parking_no=f"e-{key}",
        plate=plate,
        color="blue",
        entered_at=datetime.now(UTC) - timedelta(hours=2),
        car_park_name="城中街停车场",
        free_duration_s=0,
    )
    assert entry.state == "normal" and entry.parking_id
    return await r.provider.create_charge(
        out_trade_no=key,
        agreement_no=f"o-{plate}",
        amount_fen=fen,
        description="parking 城中街停车场",
        parking=_stay(plate, entry.parking_id),
    )


def _charges(notes: Receiver) -> list[OrderResult]:
    return [n for n in notes.accepted if isinstance(n, OrderResult) and n.kind == "charge"]


async def test_entry_registered_deduction_accepted_and_the_notification_decrypted() -> None:
    async with rails(_faults()) as r:
        plate = unique_plate()
        accepted = await _enter_and_charge(r, plate, "s1-abc")
        assert (accepted.status, accepted.amount_fen) == ("processing", 1200)
        notified = await eventually(lambda: _async(_charges(r.notes)))
        assert notified[0].status == "succeeded" and not notified[0].advanced
        assert notified[0].out_trade_no == "s1-abc"
        queried = await r.provider.query(out_trade_no="s1-abc")
        assert queried is not None and queried.status == "succeeded"
        assert queried.provider_ref == notified[0].provider_ref
        # The deduction named the registered entry, its plate and its times.
        info = r.emulator.transactions["s1-abc"]["parking_info"]
        assert info["plate_number"] == plate and info["charging_duration"] >= 7200
        assert await r.provider.query(out_trade_no="s1-never") is None


async def test_a_short_balance_is_advanced_by_wechat_or_failed_when_it_may_not() -> None:
    async with rails(_faults(declined_agreements=set())) as r:
        plate = unique_plate()
        r.emulator.config.faults.declined_agreements.add(f"o-{plate}")
        await _enter_and_charge(r, plate, "s2-adv")
        notified = await eventually(lambda: _async(_charges(r.notes)))
        assert notified[0].status == "succeeded" and notified[0].advanced
    async with rails(_faults(advance=False)) as r:
        plate = unique_plate()
        r.emulator.config.faults.declined_agreements.add(f"o-{plate}")
        await _enter_and_charge(r, plate, "s2-fail")
        notified = await eventually(lambda: _async(_charges(r.notes)))
        assert notified[0].status == "declined" and not notified[0].advanced


async def test_refund_and_statement() -> None:
    async with rails(_faults()) as r:
        await _enter_and_charge(r, unique_plate(), "s3-ref", 1500)
        await eventually(lambda: _async(_charges(r.notes)))
        refund = await r.provider.refund(
            out_refund_no="r3-ref", out_trade_no="s3-ref", amount_fen=500, reason="不是我的车"
        )
        assert (refund.kind, refund.status, refund.amount_fen) == ("refund", "succeeded", 500)
        again = await r.provider.refund(
            out_refund_no="r3-ref", out_trade_no="s3-ref", amount_fen=500, reason="不是我的车"
        )
        assert again.provider_ref == refund.provider_ref
        notes = await eventually(
            lambda: _async([n for n in r.notes.accepted if getattr(n, "kind", "") == "refund"])
        )
        assert notes[0].out_trade_no == "r3-ref"
        today = datetime.now(UTC).astimezone(r.provider._tz).date()
        lines = await r.provider.statement(today)
        assert {(line.kind, line.out_trade_no, line.amount_fen) for line in lines} == {
            ("charge", "s3-ref", 1500),
            ("refund", "r3-ref", 500),
        }
        assert await r.provider.statement(date(2001, 1, 1)) == []


async def test_forged_notifications_are_rejected_and_duplicates_arrive_twice() -> None:
    async with rails(_faults(forged_notification_rate=1.0, duplicate_notification_rate=1.0)) as r:
        await _enter_and_charge(r, unique_plate(), "s4-dup")
        await eventually(lambda: _async(len(_charges(r.notes)) == 2 and r.notes.rejected))
        assert all(n.amount_fen == 1200 for n in _charges(r.notes)), "the forgery said 1 fen"
        assert "signature" in r.notes.rejected[0] or "APIv3" in r.notes.rejected[0]


async def test_a_notification_signed_by_someone_else_or_stale_is_refused() -> None:
    async with rails(_faults()) as r:
        body = b'{"event_type":"TRANSACTION.SUCCESS","resource":{}}'
        now = int(time.time())
        other = r.emulator._signed_headers(body, forged=True)
        with pytest.raises(InvalidNotification):
            r.provider.parse_notification(body, other, now=now)
        genuine = r.emulator._signed_headers(body)
        with pytest.raises(InvalidNotification, match="stale"):
            r.provider.parse_notification(body, genuine, now=now + 3600)


async def test_a_paused_plate_is_told_and_answered_paused() -> None:
    async with rails(_faults()) as r:
        plate = unique_plate()
        assert (await r.provider.service_state(agreement_no="o1", plate=plate, color="blue")).usable
        entry = await r.provider.register_entry(
            out_parking_no="e5",
            plate=plate,
            color="blue",
            entered_at=datetime.now(UTC),
            car_park_name="城中街停车场",
            free_duration_s=900,
        )
        r.emulator.set_plate_state(plate, "BLUE", "PAUSE")
        changes = await eventually(
            lambda: _async([n for n in r.notes.accepted if isinstance(n, ServiceStateChange)])
        )
        assert (changes[0].plate, changes[0].color, changes[0].state) == (plate, "blue", "paused")
        assert changes[0].parking_id == entry.parking_id
        state = await r.provider.service_state(agreement_no="o1", plate=plate, color="blue")
        assert state.state == "paused" and not state.usable
        r.emulator.set_plate_state(plate, "BLUE", "OVERDUE")
        again = await r.provider.register_entry(
            out_parking_no="e5b",
            plate=plate,
            color="blue",
            entered_at=datetime.now(UTC),
            car_park_name="城中街停车场",
            free_duration_s=0,
        )
        assert again.state == "overdue"


async def test_requests_signed_with_the_wrong_key_are_refused() -> None:
    async with rails(_faults()) as r:
        wrong = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = wrong.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        creds = dataclasses.replace(r.emulator.credentials(), private_key_pem=pem)
        impostor = WeChatParkingProvider(
            creds, notify_url=r.notes.url, base_url=r.provider._base_url
        )
        try:
            with pytest.raises(ProviderRejected) as refused:
                await impostor.service_state(agreement_no="o", plate=unique_plate(), color="blue")
        finally:
            await impostor.aclose()
        assert refused.value.code == "SIGN_ERROR" and refused.value.side == "car_park"
        assert r.emulator.rejected_requests == 1


async def test_the_sign_in_code_names_the_openid_once_and_only_with_the_apps_secret() -> None:
    async with rails(_faults()) as r:
        code = r.emulator.login_code("o-driver")
        assert await r.provider.openid_of(code) == "o-driver"
        with pytest.raises(ProviderRejected) as used:
            await r.provider.openid_of(code)
        assert (used.value.code, used.value.side) == ("login_40163", "driver")
        creds = dataclasses.replace(r.emulator.credentials(), app_secret="not-the-secret")
        impostor = WeChatParkingProvider(
            creds, notify_url=r.notes.url, base_url=r.provider._base_url
        )
        with pytest.raises(ProviderRejected) as refused:
            await impostor.openid_of(r.emulator.login_code("o-driver"))
        assert (refused.value.code, refused.value.side) == ("login_40125", "car_park")
        # WeChat's sign-in out of reach: an outage, never a refusal of the driver.
        unreachable = dataclasses.replace(creds, login_url="http://127.0.0.1:9")
        away = WeChatParkingProvider(
            unreachable, notify_url=r.notes.url, base_url=r.provider._base_url
        )
        with pytest.raises(ProviderUnavailable):
            await away.openid_of(r.emulator.login_code("o-driver"))


async def test_a_wrongly_signed_answer_is_not_believed() -> None:
    async with rails(_faults(bad_response_signature_rate=1.0)) as r:
        with pytest.raises(ProviderMalformed):
            await r.provider.service_state(agreement_no="o", plate=unique_plate(), color="blue")


async def test_errors_and_timeouts_are_outages_and_a_retry_makes_one_order() -> None:
    async with rails(_faults(error_rate=1.0)) as r:
        with pytest.raises(ProviderUnavailable):
            await r.provider.service_state(agreement_no="o", plate=unique_plate(), color="blue")
    async with rails(_faults(timeout_rate=1.0, timeout_s=5.0), timeout_s=0.3) as r:
        with pytest.raises(ProviderUnavailable):
            await r.provider.service_state(agreement_no="o", plate=unique_plate(), color="blue")
    async with rails(_faults(lost_response_rate=1.0)) as r:
        plate = unique_plate()
        with pytest.raises(ProviderUnavailable):
            await _enter_and_charge(r, plate, "s6-lost")
        r.emulator.config.faults.lost_response_rate = 0.0
        await _enter_and_charge(r, plate, "s6-lost")
        assert list(r.emulator.transactions) == ["s6-lost"]
        # The same number for another amount is the car park's mistake, never a new order.
        with pytest.raises(ProviderRejected) as refused:
            await _enter_and_charge(r, plate, "s6-lost", fen=999)
        assert refused.value.code == "OUT_TRADE_NO_USED"


async def test_an_out_trade_no_wechat_would_refuse_is_refused_before_sending() -> None:
    async with rails(_faults()) as r:
        with pytest.raises(ProviderRejected):
            await _enter_and_charge(r, unique_plate(), "s" * 33)
        assert r.emulator.transactions == {}


async def _async(value: Any) -> Any:
    await asyncio.sleep(0)
    return value


# The whole system on the WeChat rails: the lane registers entries, the worker deducts, the
# emulator's signed and encrypted notifications reach the API and are booked once.


@contextlib.asynccontextmanager
async def wechat_runtime(
    settings: Settings, database_url: str, config: EmulatorConfig, query_after_s: float = 60
) -> AsyncIterator[tuple[Runtime, Emulator]]:
    port = sandbox.free_port()
    settings.public_base_url = f"http://127.0.0.1:{port}"
    settings.payment_provider = "wechat"
    # 60 s: no order queries, the notifications must do it.
    settings.charge_query_after_s = query_after_s
    # Retries at most a second apart: these tests inject faults at 30-50 % rates and wait for
    # the outcome, not for the backoff. At the default cap (300 s) a charge faulted ten times
    # running (seen once in a full run) waited out the tests' 30 s before its next try.
    settings.job_backoff_cap_s = 1.0
    async with running(config) as (url, emulator):
        endpoint = ProviderEndpoint(url, "", kind="wechat", credentials=emulator.credentials())
        eps = Endpoints(database_url, REDIS_URL, MQTT_URL)
        async with runtime_running(settings, eps, endpoint) as runtime, api_server(runtime, port):
            yield runtime, emulator


async def _wechat_driver(runtime: Runtime, plate: str) -> Driver:
    # The emulator knows a driver by plate: its openid is "o-<plate>".
    return await make_driver(runtime, plate, provider="wechat", agreement_no=f"o-{plate}")


async def test_the_system_on_wechat_registers_entries_and_books_each_deduction_once(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    config = _faults(duplicate_notification_rate=1.0, forged_notification_rate=1.0)
    async with wechat_runtime(settings, database_url, config) as (runtime, emulator):
        lot = await create_lot(runtime)
        short = await _wechat_driver(runtime, unique_plate())
        emulator.config.faults.declined_agreements.add(f"o-{short.plate}")
        drivers = [await _wechat_driver(runtime, unique_plate()) for _ in range(2)] + [short]
        for driver in drivers:
            await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(0))
            registered = await entry_registered(runtime, lot, driver.plate)
            assert (
                registered
                == emulator.parkings[
                    next(
                        iter(
                            k
                            for k, p in emulator.parkings.items()
                            if p["plate_number"] == driver.plate
                        )
                    )
                ]["id"]
            )
            await backdate_entry(runtime, lot, driver.plate, timedelta(minutes=70))
            command = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
            assert (command["action"], command["fee_fen"]) == ("open", 1200)

        async def all_charged() -> list[Any]:
            rows = await charges_of(runtime, lot)
            return rows if [r["status"] for r in rows] == ["succeeded"] * 3 else []

        rows = await eventually(all_charged, timeout_s=20)
        # (The session's database is shared: a worker may also send other tests' leftovers.)
        plates = {d.plate for d in drivers}
        ours = [
            t for t in emulator.transactions.values() if t["parking_info"]["plate_number"] in plates
        ]
        assert len(ours) == 3, "one WeChat order per stay"
        for row in rows:
            order = emulator.transactions[row["idempotency_key"]]
            assert row["provider_ref"] == order["transaction_id"]
            assert (
                order["parking_info"]["parking_id"]
                == (await _stay_by_id(runtime, row["session_id"]))["provider_parking_id"]
            )
        advanced = {row["account_id"]: row["advanced_by_provider"] for row in rows}
        assert advanced == {
            drivers[0].account_id: False,
            drivers[1].account_id: False,
            short.account_id: True,
        }
        async with runtime.pool.acquire() as conn:
            assert await ledger.is_balanced(conn)
            assert await ledger.balance(conn, ledger.revenue(lot.id)) == -3 * 1200
            for driver in drivers:
                assert await ledger.balance(conn, ledger.receivable(driver.account_id)) == 0
            debts_open = await conn.fetchval(
                "SELECT count(*) FROM debts WHERE account_id = $1", short.account_id
            )
            forged = await conn.fetchval(
                "SELECT count(*) FROM dead_letters WHERE source = 'provider_notification' "
                "AND topic = 'wechat'"
            )
        assert debts_open == 0, "an advanced deduction is never the driver's debt"
        assert forged >= 1, "the forged notifications were refused and kept"
        delivered = [n for n in emulator.notices if n.event_type == "TRANSACTION.SUCCESS"]
        assert len([n for n in delivered if n.outcome == "delivered"]) >= 6, "duplicates came"
        for row in rows:
            assert await _settlements(runtime, row["id"]) == 1


async def test_every_fault_ends_in_one_wechat_order_per_stay(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    config = _faults(error_rate=0.3, lost_response_rate=0.3, lost_notification_rate=0.5, seed=11)
    async with wechat_runtime(settings, database_url, config, query_after_s=0.2) as (
        runtime,
        emulator,
    ):
        lot = await create_lot(runtime)
        drivers = [await _wechat_driver(runtime, unique_plate()) for _ in range(5)]
        for driver in drivers:
            await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=70))
            command = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
            assert command["action"] == "open"

        async def all_charged() -> list[Any]:
            rows = await charges_of(runtime, lot)
            return rows if [r["status"] for r in rows] == ["succeeded"] * 5 else []

        rows = await eventually(all_charged, timeout_s=30)
        ours = {d.plate for d in drivers}
        keys = [
            key
            for key, t in emulator.transactions.items()
            if t["parking_info"]["plate_number"] in ours
        ]
        assert sorted(keys) == sorted(r["idempotency_key"] for r in rows)
        plates = [
            p["plate_number"] for p in emulator.parkings.values() if p["plate_number"] in ours
        ]
        assert sorted(plates) == sorted(ours), "one entry per stay"
        for row in rows:
            assert await _settlements(runtime, row["id"]) == 1
        async with runtime.pool.acquire() as conn:
            assert await ledger.is_balanced(conn)


async def _refund_of_a_collected_charge(
    runtime: Runtime, gate: GateProbe, ends: str
) -> tuple[Lot, Any]:
    """A WeChat driver's 70-minute stay, charged ¥12 and collected, then ¥5 of it refunded:
    waits until the refund's status is `ends`; (the lot, the charge)."""
    lot = await create_lot(runtime)
    driver = await _wechat_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=70))
    await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))

    async def charged() -> list[Any]:
        rows = await charges_of(runtime, lot)
        return rows if rows and rows[0]["status"] == "succeeded" else []

    (charge,) = await eventually(charged, timeout_s=20)
    async with runtime.pool.acquire() as conn, conn.transaction():
        refund = await refunds.request_for_charge(
            conn, charge_id=charge["id"], amount_fen=500, reason="不是我的车", actor="test"
        )

    async def ended() -> bool:
        async with runtime.pool.acquire() as conn:
            now = await conn.fetchval("SELECT status FROM refunds WHERE id = $1", refund.id)
        return bool(now == ends)

    await eventually(ended, timeout_s=20)
    return lot, charge


async def test_a_refund_on_wechat_is_booked_once(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    config = _faults(duplicate_notification_rate=1.0)
    async with wechat_runtime(settings, database_url, config) as (runtime, emulator):
        lot, charge = await _refund_of_a_collected_charge(runtime, gate, "succeeded")
        (wechat_refund,) = [
            r for r in emulator.refunds.values() if r["out_trade_no"] == charge["idempotency_key"]
        ]
        assert wechat_refund["amount"] == {
            "total": 1200,
            "refund": 500,
            "payer_total": 1200,
            "payer_refund": 500,
            "currency": "CNY",
        }
        await eventually(
            lambda: _async(
                len(
                    [
                        n
                        for n in emulator.notices
                        if n.event_type == "REFUND.SUCCESS" and n.outcome == "delivered"
                    ]
                )
                == 2
            )
        )
        async with runtime.pool.acquire() as conn:
            assert await ledger.is_balanced(conn)
            assert await ledger.balance(conn, ledger.revenue(lot.id)) == -(1200 - 500)


@pytest.mark.parametrize(("outcome", "status"), [("SUCCESS", "succeeded"), ("ABNORMAL", "failed")])
async def test_a_refund_still_processing_is_asked_about_until_it_ends(
    settings: Settings, database_url: str, gate: GateProbe, outcome: str, status: str
) -> None:
    """WeChat answers a refund PROCESSING and says later, in a notification, how it ended:
    with the payer, or ABNORMAL (their card could not take it back: failed, for an operator
    to pay otherwise). Every notification lost: the worker asks again (the same refund number
    answers the same refund) until the refund has ended. Before, the job was done at
    PROCESSING and the refund stayed pending for ever."""
    config = dataclasses.replace(
        _faults(lost_notification_rate=1.0), refund_processing_s=0.3, refund_outcome=outcome
    )
    async with wechat_runtime(settings, database_url, config, query_after_s=0.2) as (
        runtime,
        emulator,
    ):
        lot, _ = await _refund_of_a_collected_charge(runtime, gate, status)
        assert [r["status"] for r in emulator.refunds.values()] == [outcome]
        assert not [n for n in emulator.notices if n.outcome == "delivered"]
        async with runtime.pool.acquire() as conn:
            assert await ledger.is_balanced(conn)
            taken_back = 500 if outcome == "SUCCESS" else 0
            assert await ledger.balance(conn, ledger.revenue(lot.id)) == -(1200 - taken_back)


async def _stay_by_id(runtime: Runtime, session_id: int) -> asyncpg.Record:
    async with runtime.pool.acquire() as conn:
        row: asyncpg.Record = await conn.fetchrow(
            "SELECT * FROM sessions WHERE id = $1", session_id
        )
    return row


async def _service_state(runtime: Runtime, plate: str, state: str) -> bool:
    async with runtime.pool.acquire() as conn:
        found = await conn.fetchval(
            "SELECT state FROM plate_services WHERE provider = 'wechat' AND plate = $1", plate
        )
    return bool(found == state)


async def test_settings_name_the_stand_ins_and_every_missing_wechat_key(tmp_path: Path) -> None:
    sandbox_rails = Settings(payment_provider="sandbox", payment_provider_url=None)
    assert "in-process sandbox" in payment_stand_ins(sandbox_rails)[0].why
    bare = Settings(payment_provider="wechat")
    named = [item.setting for item in payment_stand_ins(bare)]
    # Every key once, the emulator given as the reason, nothing named again.
    assert not bare.wechat_configured() and named == bare.wechat_missing()
    assert all("emulator" in item.why for item in payment_stand_ins(bare))
    partial = Settings(payment_provider="wechat", wechat_mchid="1900000109")
    assert len(partial.wechat_missing()) == 6, partial.wechat_missing()
    with pytest.raises(ConfigurationError) as refused:
        async with payment_provider(partial):
            pass
    assert "PARKING_WECHAT_APIV3_KEY" in str(refused.value)
    assert "PARKING_WECHAT_PLATFORM_PUBLIC_KEY_PATH" in str(refused.value)
    assert "PARKING_WECHAT_APP_SECRET" in str(refused.value)

    emulator = Emulator()
    creds = emulator.credentials()
    (tmp_path / "key.pem").write_text(creds.private_key_pem)
    (tmp_path / "platform.pem").write_text(creds.platform_public_key_pem or "")
    full = Settings(
        payment_provider="wechat",
        wechat_mchid=creds.mchid,
        wechat_appid=creds.appid,
        wechat_cert_serial_no=creds.cert_serial_no,
        wechat_private_key_path=tmp_path / "key.pem",
        wechat_apiv3_key=creds.apiv3_key,
        wechat_platform_public_key_path=tmp_path / "platform.pem",
        wechat_platform_public_key_id=creds.platform_public_key_id,
        wechat_app_secret=creds.app_secret,
    )
    assert full.wechat_missing() == [] and payment_stand_ins(full) == []
    assert wechat_credentials(full) == dataclasses.replace(creds, login_url=WECHAT_LOGIN_API)
    async with payment_provider(full) as endpoint:
        provider = make_provider(full, endpoint)
        assert (provider.name, provider.is_stand_in) == ("wechat", False)
        await provider.aclose()
    elsewhere = full.model_copy(update={"wechat_api_url": "http://127.0.0.1:9"})
    assert "not WeChat's API" in payment_stand_ins(elsewhere)[0].why
    signing_in_elsewhere = full.model_copy(update={"wechat_login_url": "http://127.0.0.1:9"})
    assert [str(item) for item in payment_stand_ins(signing_in_elsewhere)] == [
        "PARKING_WECHAT_LOGIN_URL: http://127.0.0.1:9 is not WeChat's sign-in API (an emulator"
        " would name drivers)"
    ]


async def test_the_emulators_written_settings_point_the_service_at_it(tmp_path: Path) -> None:
    async with running(_faults()) as (url, emulator):
        env = write_keys(emulator, url, tmp_path)
        settings = Settings(_env_file=env)  # type: ignore[call-arg]
        assert settings.payment_provider == "wechat" and settings.wechat_missing() == []
        assert [str(item) for item in payment_stand_ins(settings)] == [
            f"PARKING_WECHAT_API_URL: {url} is not WeChat's API (an emulator stands in)",
            f"PARKING_WECHAT_LOGIN_URL: {url} is not WeChat's sign-in API (an emulator would"
            " name drivers)",
        ]
        async with payment_provider(settings) as endpoint:
            provider = make_provider(settings, endpoint)
            try:
                plate = unique_plate()
                state = await provider.service_state(agreement_no="o", plate=plate, color="blue")
            finally:
                await provider.aclose()
        assert state.usable and provider.is_stand_in
        assert emulator.rejected_requests == 0


@pytest.mark.parametrize(
    ("when", "theirs", "ours"),
    [("during_stay", "PAUSE", "paused"), ("at_entry", "OVERDUE", "overdue")],
)
async def test_a_plate_whose_service_is_not_normal_is_held_at_the_exit(
    settings: Settings, database_url: str, gate: GateProbe, when: str, theirs: str, ours: str
) -> None:
    async with wechat_runtime(settings, database_url, _faults()) as (runtime, emulator):
        lot = await create_lot(runtime)
        driver = await _wechat_driver(runtime, unique_plate())
        if when == "at_entry":
            emulator.plates[(driver.plate, "BLUE")] = theirs  # no stay to tell yet
        await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=70))
        await entry_registered(runtime, lot, driver.plate)
        if when == "during_stay":
            emulator.set_plate_state(driver.plate, "BLUE", theirs)  # told by notification
        await eventually(lambda: _service_state(runtime, driver.plate, ours))
        command = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
        assert (command["action"], command["fee_fen"]) == ("hold", 1200)
        assert await charges_of(runtime, lot) == []
        # Resumed: the plate may leave on pay-later again.
        emulator.set_plate_state(driver.plate, "BLUE", "NORMAL")
        await eventually(lambda: _service_state(runtime, driver.plate, "normal"))


async def test_platform_certificates_verify_answers_and_a_first_notification(
    tmp_path: Path,
) -> None:
    async with running(_faults()) as (url, emulator):
        creds = emulator.use_certificate(tmp_path / "certs")
        provider = WeChatParkingProvider(creds, notify_url="https://x.example/n", base_url=url)
        try:
            # A notification before any request (the client not yet open) verifies too.
            resource = {
                "out_trade_no": "s9-cert",
                "transaction_id": "4200000",
                "trade_state": "SUCCESS",
                "trade_scene": "PARKING",
                "bank_type": "BPA",
                "success_time": "2026-12-06T18:00:00+08:00",
                "amount": {"total": 800, "currency": "CNY"},
            }
            body = emulator.event("TRANSACTION.SUCCESS", json.dumps(resource))
            parsed = provider.parse_notification(
                body, emulator._signed_headers(body), now=int(time.time())
            )
            assert isinstance(parsed, OrderResult) and parsed.advanced
            assert (parsed.out_trade_no, parsed.amount_fen) == ("s9-cert", 800)
            with pytest.raises(InvalidNotification):
                provider.parse_notification(
                    body, emulator._signed_headers(body, forged=True), now=int(time.time())
                )
            state = await provider.service_state(
                agreement_no="o", plate=unique_plate(), color="blue"
            )
            assert state.usable
        finally:
            await provider.aclose()


async def test_refusing_a_refund_is_a_rejection_not_an_unknown_outcome() -> None:
    config = _faults()
    config.faults.processing_delay_s = 60.0  # the deduction stays ACCEPTED
    async with rails(config) as r:
        await _enter_and_charge(r, unique_plate(), "s7-open")
        with pytest.raises(ProviderRejected) as refused:
            await r.provider.refund(
                out_refund_no="r7-open", out_trade_no="s7-open", amount_fen=100, reason="x"
            )
        assert refused.value.code == "RESOURCE_NOT_EXISTS"


async def test_a_held_car_pays_by_wechat_native_qr_and_the_gate_opens(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    async with wechat_runtime(settings, database_url, _faults()) as (runtime, emulator):
        lot = await create_lot(runtime)
        plate = unique_plate()  # nobody's: held with the fee and a QR code
        await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=70))
        exit_capture = gate.capture("out", plate)
        held = await gate.decide(lot.code, "out1", exit_capture)
        assert (held["action"], held["fee_fen"]) == ("hold", 1200)
        async with httpx.AsyncClient(base_url=runtime.settings.public_base_url) as phone:
            # The QR code opens the pay page; its 支付 button starts the payment here.
            page = httpx.URL(held["payment_qr_url"]).path
            started = await phone.post(page.replace("/pay/", "/api/v1/gate-payments/"))
            assert started.status_code == 200, started.text
            pay_url = started.json()["pay_url"]
            assert pay_url.startswith("weixin://wxpay/bizpayurl?pr=")
            out_trade_no = pay_url.rsplit("=", 1)[-1]
            assert emulator.payments[out_trade_no]["amount"]["total"] == 1200
            async with httpx.AsyncClient(base_url=_emulator_url(runtime)) as wallet:
                paid = await wallet.post(f"/_emulator/pay/{out_trade_no}")
                assert paid.status_code == 200
        # The signed, encrypted TRANSACTION.SUCCESS books it; the gate gets its open command.
        await gate.wait_for(exit_capture, commands=2)
        assert gate.commands[str(exit_capture.capture_id)][1]["action"] == "open"
        assert await stay_status(runtime, lot, plate) == "closed"


def _emulator_url(runtime: Runtime) -> str:
    provider = runtime.provider
    assert isinstance(provider, WeChatParkingProvider)
    return provider._base_url


async def test_only_an_entry_surely_read_is_registered_with_wechat(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    """WeChat tells a plate's user that their car came in when the stay is registered. An entry
    read with doubt (a camera's guess below its certain score) may be another vehicle of those
    characters, or a look-alike: it is not registered; a sure read of the same driver's car is."""
    async with wechat_runtime(settings, database_url, EmulatorConfig()) as (runtime, _emulator):
        lot = await create_lot(runtime)
        doubtful = await _wechat_driver(runtime, unique_plate())
        sure = await _wechat_driver(runtime, unique_plate())
        await gate.decide(lot.code, "in1", gate.capture("in", doubtful.plate, confidence=0.93))
        await gate.decide(lot.code, "in1", gate.capture("in", sure.plate))
        await entry_registered(runtime, lot, sure.plate)
        async with runtime.pool.acquire() as conn:
            queued = await conn.fetch(
                """SELECT s.plate FROM outbox o JOIN sessions s ON s.id = o.ref_id
                   WHERE o.kind = 'parking_entry' AND s.car_park_id = $1""",
                lot.id,
            )
        assert [row["plate"] for row in queued] == [sure.plate]


async def test_an_entry_answer_never_makes_a_plate_normal_for_a_driver_who_has_no_service(
    settings: Settings, database_url: str, gate: GateProbe
) -> None:
    """WeChat keeps a plate's service per WeChat user: the query under our driver's openid
    says it was never opened, while another user (say the plate's previous holder) opened it.
    The entry registration's answer names no user: it is about that other one, whom a
    deduction, naming only the plate, would charge. It may say the service is not normal,
    never that it is: before, it made the plate normal for our driver, and its next stay left
    on pay-later, paid by the other user."""
    async with wechat_runtime(settings, database_url, _faults()) as (runtime, emulator):
        lot = await create_lot(runtime)
        plate = unique_plate()
        emulator.set_plate_state(plate, "BLUE", "NORMAL", openid=f"o-{plate.encode().hex()}")
        ours = f"o-ours-{plate.encode().hex()[:10]}"
        await make_driver(runtime, plate, provider="wechat", agreement_no=ours)
        answered = await agreements.look_up_states(runtime.provider, [(ours, plate, "blue")])
        assert [s.state for s in answered] == ["not_opened"]
        async with runtime.pool.acquire() as conn:
            await agreements.record_looked_up(
                conn, "wechat", answered, datetime.now(UTC) - timedelta(hours=4)
            )
        await enter(runtime, gate, lot, plate, parked_for=timedelta(0))
        await entry_registered(runtime, lot, plate)
        async with runtime.pool.acquire() as conn:
            state = await conn.fetchval(
                "SELECT state FROM plate_services WHERE provider = 'wechat' AND plate = $1", plate
            )
        assert state == "not_opened"
        await backdate_entry(runtime, lot, plate, timedelta(minutes=70))
        command = await gate.decide(lot.code, "out1", gate.capture("out", plate))
        assert command["action"] == "hold"
        assert await charges_of(runtime, lot) == []


async def test_a_notification_about_another_merchants_or_apps_order_is_refused() -> None:
    """A shared notify URL or a misrouted delivery: a signed notification about another
    merchant's or app's order is not about ours, even under an out_trade_no we use too."""
    async with rails(_faults()) as r:
        ours = {
            "appid": r.emulator.appid,
            "mchid": r.emulator.mchid,
            "out_trade_no": "not-ours",
            "transaction_id": "4200000000000000000000000001",
            "trade_type": "PARKING",
            "trade_scene": "PARKING",
            "trade_state": "SUCCESS",
            "bank_type": "OTHERS",
            "success_time": datetime.now(UTC).replace(microsecond=0).isoformat(),
            "amount": {"total": 1200, "currency": "CNY"},
        }
        for key, other in (("appid", "wx0000000000000other"), ("mchid", "1900000999")):
            body = r.emulator.event("TRANSACTION.SUCCESS", json.dumps({**ours, key: other}))
            with pytest.raises(InvalidNotification, match=f"{key} .* is not ours"):
                r.provider.parse_notification(
                    body, r.emulator._signed_headers(body), now=int(time.time())
                )
        body = r.emulator.event("TRANSACTION.SUCCESS", json.dumps(ours))
        parsed = r.provider.parse_notification(
            body, r.emulator._signed_headers(body), now=int(time.time())
        )
        assert isinstance(parsed, OrderResult) and parsed.status == "succeeded"


async def test_an_entry_answer_never_makes_a_plate_normal_even_when_its_service_was_never_asked(
    runtime: Runtime,
) -> None:
    """As the test above, but our driver's own service was never asked (the look-up at sign-up
    met an outage: no row for the plate). A word naming only the plate does not make it normal
    either; not recorded, it makes us ask under our driver's openid (`ask_if_resumed`).
    Before, it created the row as normal: nobody asked, and the stay left on pay-later,
    deducted from the other user."""
    plate = unique_plate()
    async with runtime.pool.acquire() as conn:
        recorded = await agreements.record_service_state(
            conn, "wechat", plate, "blue", "normal", datetime.now(UTC), about_agreement=False
        )
        state = await conn.fetchval(
            "SELECT state FROM plate_services WHERE provider = 'wechat' AND plate = $1", plate
        )
    assert (recorded, state) == (False, None), "a word about the plate made it normal"


async def test_a_pause_retried_late_wins_over_a_plate_only_normal_word_that_arrived_first(
    runtime: Runtime,
) -> None:
    """Our driver's own service query made the plate normal (10:00). The driver paused it at
    10:05; that notification failed and is retried late. Meanwhile an entry's registration
    (naming only the plate, perhaps about another user's service on it) says "normal" at 10:10:
    a refresh, which says nothing new. The pause, arriving after it, must still be recorded.
    Before, the refresh moved the state's `changed_at` to 10:10, and the pause was dropped as
    older: the plate stayed normal, and our driver's exits were paid later after the pause."""
    plate = unique_plate()
    asked = datetime.now(UTC) - timedelta(minutes=10)
    async with runtime.pool.acquire() as conn:
        assert await agreements.record_service_state(
            conn, "wechat", plate, "blue", "normal", asked, about_agreement=True
        )
        refreshed = await agreements.record_service_state(
            conn,
            "wechat",
            plate,
            "blue",
            "normal",
            asked + timedelta(minutes=10),
            about_agreement=False,
        )
        paused = await agreements.record_service_state(
            conn,
            "wechat",
            plate,
            "blue",
            "paused",
            asked + timedelta(minutes=5),
            about_agreement=False,
        )
        state = await conn.fetchval(
            "SELECT state FROM plate_services WHERE provider = 'wechat' AND plate = $1", plate
        )
    assert refreshed, "a plate-only word still refreshes a normal state our driver's answer made"
    assert (paused, state) == (True, "paused"), "the late pause was dropped as older"
