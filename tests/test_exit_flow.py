"""The whole exit flow on real PostgreSQL, Redis and MQTT."""

from datetime import timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from billing import fees, ledger
from parking.infra import Endpoints
from parking.lanes import repository as lane_repo
from parking.runtime import ProviderEndpoint, Runtime, running
from parking.settings import Settings
from tests.conftest import (
    MQTT_URL,
    REDIS_URL,
    Lot,
    backdate_entry,
    create_lot,
    eventually,
    make_driver,
    stay_status,
    unique_plate,
)
from tests.gates import GateProbe


async def _charge_rows(runtime: Runtime, lot: Lot) -> list[dict]:
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT c.* FROM charges c JOIN sessions s ON s.id = c.session_id
               WHERE s.car_park_id = $1""",
            lot.id,
        )
    return [dict(r) for r in rows]


async def test_bound_driver_leaves_at_once_and_is_charged_once(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    driver = await make_driver(runtime, unique_plate())

    entry = await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
    assert entry["action"] == "open"
    assert entry["_topic"].endswith(f"/{lot.code}/in1/command")
    assert await runtime.occupancy.get(lot.id) == 1

    await backdate_entry(runtime, lot, driver.plate, timedelta(hours=2, minutes=10))
    exit_capture = gate.capture("out", driver.plate)
    command = await gate.decide(lot.code, "out1", exit_capture)

    # 2h10m: three started hours at ¥6.
    assert command["action"] == "open"
    assert command["fee_fen"] == 1800
    assert command["_topic"].endswith(f"/{lot.code}/out1/command")
    assert gate.acks[str(exit_capture.capture_id)][0]["duplicate"] is False
    assert await runtime.occupancy.get(lot.id) == 0

    async def charged() -> list[dict]:
        rows = await _charge_rows(runtime, lot)
        return rows if rows and rows[0]["status"] == "succeeded" else []

    (charge,) = await eventually(charged)
    assert charge["amount_fen"] == 1800
    assert charge["account_id"] == driver.account_id

    async with runtime.pool.acquire() as conn:
        assert await ledger.is_balanced(conn)
        assert await ledger.balance(conn, ledger.receivable(driver.account_id)) == 0
        assert await ledger.balance(conn, ledger.revenue(lot.id)) == -1800
        settled = await conn.fetchval(
            "SELECT sum(amount_fen) FROM ledger_entries WHERE charge_id = $1 AND amount_fen > 0",
            charge["id"],
        )
        assert settled == 2 * 1800  # accrual debit + settlement debit
        session = await conn.fetchrow(
            "SELECT * FROM sessions WHERE car_park_id = $1 AND plate = $2", lot.id, driver.plate
        )

    async def sent_notification() -> dict | None:
        async with runtime.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM notifications WHERE account_id = $1 AND status = 'sent'",
                driver.account_id,
            )
        return dict(row) if row else None

    notification = await eventually(sent_notification)
    left = session["exited_at"].astimezone(ZoneInfo("Asia/Shanghai")).strftime("%H:%M")
    # Chinese by default, with the charge's receipt link (tests/test_evidence.py opens it).
    assert notification["body"].startswith(
        f"{driver.plate} 于{left}驶离{lot.name}，停车2小时10分，费用¥18.00已扣款，凭证："
        f"{runtime.settings.public_base_url}/r/"
    )
    assert session["status"] == "closed"
    assert session["settlement"] == "pay_later"
    assert any(n.body == notification["body"] for n in runtime.notifier.sent)


async def test_same_capture_three_times_takes_effect_once(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    driver = await make_driver(runtime, unique_plate())
    entry = gate.capture("in", driver.plate)
    for _ in range(3):
        await gate.send(lot.code, "in1", entry)
    await gate.wait_for(entry, commands=3, acks=3)
    await backdate_entry(runtime, lot, driver.plate, timedelta(minutes=30))

    exit_capture = gate.capture("out", driver.plate)
    for _ in range(3):
        await gate.send(lot.code, "out1", exit_capture)
    await gate.wait_for(exit_capture, commands=3, acks=3)

    key = str(exit_capture.capture_id)
    commands = [{k: v for k, v in c.items() if k != "_topic"} for c in gate.commands[key]]
    assert all(c == commands[0] for c in commands), "a redelivery gets the same command"
    assert [a["duplicate"] for a in gate.acks[key]].count(False) == 1

    await eventually(lambda: _succeeded(runtime, lot))
    async with runtime.pool.acquire() as conn:
        sessions = await conn.fetch("SELECT * FROM sessions WHERE car_park_id = $1", lot.id)
        captures = await conn.fetchval(
            "SELECT count(*) FROM captures WHERE car_park_id = $1", lot.id
        )
        outbox = await conn.fetchval(
            "SELECT count(*) FROM outbox o JOIN charges c ON c.id = o.ref_id "
            "JOIN sessions s ON s.id = c.session_id WHERE o.kind = 'charge' AND s.car_park_id = $1",
            lot.id,
        )
    assert len(sessions) == 1 and sessions[0]["status"] == "closed"
    assert captures == 2
    assert outbox == 1
    assert len(await _charge_rows(runtime, lot)) == 1
    assert runtime.lanes.stats.duplicates == 4
    assert await runtime.occupancy.get(lot.id) == 0


async def _succeeded(runtime: Runtime, lot: Lot) -> bool:
    rows = await _charge_rows(runtime, lot)
    return bool(rows) and all(r["status"] == "succeeded" for r in rows)


async def test_same_car_read_twice_at_entry_opens_one_stay(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    plate = unique_plate()
    first = await gate.decide(lot.code, "in1", gate.capture("in", plate))
    second = await gate.decide(lot.code, "in1", gate.capture("in", plate))
    assert first["action"] == second["action"] == "open"
    async with runtime.pool.acquire() as conn:
        outcomes = await conn.fetch(
            "SELECT outcome FROM captures WHERE car_park_id = $1 ORDER BY received_at", lot.id
        )
        stays = await conn.fetchval("SELECT count(*) FROM sessions WHERE car_park_id = $1", lot.id)
    assert [r["outcome"] for r in outcomes] == ["entered", "duplicate_read"]
    assert stays == 1
    assert await runtime.occupancy.get(lot.id) == 1


async def test_unbound_plate_is_held_with_fee_and_payment_qr(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    plate = unique_plate()
    await gate.decide(lot.code, "in1", gate.capture("in", plate))
    await backdate_entry(runtime, lot, plate, timedelta(minutes=61))

    command = await gate.decide(lot.code, "out1", gate.capture("out", plate))

    assert command["action"] == "hold"
    assert command["fee_fen"] == 1200
    assert command["payment_qr_url"]
    assert "¥12.00" in " ".join(command["display"])
    status = await stay_status(runtime, lot, plate)
    async with runtime.pool.acquire() as conn:
        outcome = await conn.fetchval(
            "SELECT outcome FROM captures WHERE car_park_id = $1 AND direction = 'out'", lot.id
        )
    assert status == "open", "a held car is still inside"
    assert outcome == "held_unbound"
    assert await _charge_rows(runtime, lot) == []
    assert await runtime.occupancy.get(lot.id) == 1


async def test_pay_later_limits_and_arrears_hold_the_gate(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    over_limit = await make_driver(runtime, unique_plate(), limit_fen=1000)
    in_arrears = await make_driver(runtime, unique_plate())
    no_agreement = await make_driver(runtime, unique_plate(), pay_later=False)
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE accounts SET blocked_for_arrears = true WHERE id = $1", in_arrears.account_id
        )
    expected = {
        over_limit.plate: "held_over_limit",
        in_arrears.plate: "held_arrears",
        no_agreement.plate: "held_no_agreement",
    }
    for plate in expected:
        await gate.decide(lot.code, "in1", gate.capture("in", plate))
        await backdate_entry(runtime, lot, plate, timedelta(hours=3))
        command = await gate.decide(lot.code, "out1", gate.capture("out", plate))
        assert (command["action"], command["fee_fen"]) == ("hold", 1800)

    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT plate, outcome FROM captures WHERE car_park_id = $1 AND direction = 'out'",
            lot.id,
        )
    assert {r["plate"]: r["outcome"] for r in rows} == expected
    assert await _charge_rows(runtime, lot) == []


async def test_a_fee_equal_to_the_pay_later_limit_opens_and_one_fen_more_holds(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """DESIGN.md: open when the fee is ≤ the agreement's limit. Three hours cost 1800 fen."""
    at_limit = await make_driver(runtime, unique_plate(), limit_fen=1800)
    one_fen_over = await make_driver(runtime, unique_plate(), limit_fen=1799)
    expected = {
        at_limit.plate: ("open", "exited_pay_later"),
        one_fen_over.plate: ("hold", "held_over_limit"),
    }
    for plate, (action, _) in expected.items():
        await gate.decide(lot.code, "in1", gate.capture("in", plate))
        await backdate_entry(runtime, lot, plate, timedelta(hours=3))
        command = await gate.decide(lot.code, "out1", gate.capture("out", plate))
        assert (command["action"], command["fee_fen"]) == (action, 1800), plate

    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT plate, outcome FROM captures WHERE car_park_id = $1 AND direction = 'out'",
            lot.id,
        )
    assert {r["plate"]: r["outcome"] for r in rows} == {
        plate: outcome for plate, (_, outcome) in expected.items()
    }
    charges = await _charge_rows(runtime, lot)
    assert [(c["account_id"], c["amount_fen"]) for c in charges] == [(at_limit.account_id, 1800)]
    assert await stay_status(runtime, lot, at_limit.plate) == "closed"
    assert await stay_status(runtime, lot, one_fen_over.plate) == "open"


async def test_short_stay_within_free_minutes_opens_without_charge(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE tariffs SET rules = jsonb_set(rules, '{free_minutes}', '15') "
            "WHERE car_park_id = $1",
            lot.id,
        )
    plate = unique_plate()  # unbound: a free stay needs no agreement
    await gate.decide(lot.code, "in1", gate.capture("in", plate))
    await backdate_entry(runtime, lot, plate, timedelta(minutes=10))
    command = await gate.decide(lot.code, "out1", gate.capture("out", plate))
    assert command["action"] == "open"
    assert command["fee_fen"] == 0
    assert await _charge_rows(runtime, lot) == []


async def test_exit_without_entry_record_goes_to_a_person(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    command = await gate.decide(lot.code, "out1", gate.capture("out", unique_plate()))
    assert command["action"] == "hold"
    async with runtime.pool.acquire() as conn:
        outcome = await conn.fetchval("SELECT outcome FROM captures WHERE car_park_id = $1", lot.id)
    assert outcome == "held_no_entry"
    assert await _charge_rows(runtime, lot) == []


async def test_a_lane_starts_with_its_gates_and_tariffs_read_and_learns_new_gates(
    settings: Settings,
    database_url: str,
    provider: ProviderEndpoint,
    gate: GateProbe,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first car at a gate that existed when the lane started waits for no lookup; a car
    park opened later is looked up at its first capture."""
    gates_looked_up: list[tuple[str, str]] = []
    tariffs_read: list[int] = []
    load_gate, tariff_versions = lane_repo.load_gate, fees.tariff_versions

    async def recorded_load_gate(
        conn: asyncpg.Connection, lot: str, gate: str
    ) -> lane_repo.GateInfo | None:
        gates_looked_up.append((lot, gate))
        return await load_gate(conn, lot, gate)

    async def recorded_tariff_versions(
        conn: asyncpg.Connection, car_park_id: int
    ) -> fees.TariffVersions:
        tariffs_read.append(car_park_id)
        return await tariff_versions(conn, car_park_id)

    eps = Endpoints(database_url, REDIS_URL, MQTT_URL)
    async with running(settings, eps, provider) as runtime:
        existing = await create_lot(runtime)
    async with running(settings, eps, provider) as runtime:
        monkeypatch.setattr(lane_repo, "load_gate", recorded_load_gate)
        monkeypatch.setattr(fees, "tariff_versions", recorded_tariff_versions)
        opened_later = await create_lot(runtime)
        for lot in (existing, opened_later):
            driver = await make_driver(runtime, unique_plate())
            entry = await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
            assert entry["action"] == "open"
            await backdate_entry(runtime, lot, driver.plate, timedelta(hours=1, minutes=5))
            command = await gate.decide(lot.code, "out1", gate.capture("out", driver.plate))
            assert (command["action"], command["fee_fen"]) == ("open", 1200)

    assert gates_looked_up == [(opened_later.code, "in1"), (opened_later.code, "out1")]
    assert tariffs_read == [opened_later.id]
