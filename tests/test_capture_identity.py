"""A capture's identity is its capture_id alone: a resend with another captured_at, other
bytes or after any time gets the stored command and a duplicate ack and is never decided again;
a resend that says something else is recorded for an operator, not decided, and gets no
command."""

from datetime import timedelta

import httpx
import orjson
import pytest
from fastapi import FastAPI

from gate_controller.protocol import CameraRead, Capture
from parking.runtime import Runtime
from parking.settings import Settings
from tests.conftest import (
    Lot,
    backdate_entry,
    bearer,
    charges_of,
    create_lot,
    eventually,
    make_driver,
    make_staff,
    staff_token,
    unique_plate,
)
from tests.gates import GateProbe


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Any resend comes after the window in which the same plate read twice is the same car:
    # only the capture's id can tell a resend from a new pass.
    settings.duplicate_read_window_s = 0
    return settings


def _resent(capture: Capture, *, later_by: timedelta, **changes: object) -> Capture:
    return capture.model_copy(update={"captured_at": capture.captured_at + later_by, **changes})


def _commands(gate: GateProbe, capture: Capture) -> list[dict[str, object]]:
    return [
        {k: v for k, v in c.items() if k != "_topic"}
        for c in gate.commands[str(capture.capture_id)]
    ]


async def _sessions(runtime: Runtime, lot: Lot) -> list[dict[str, object]]:
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT id, status, entered_at FROM sessions WHERE car_park_id = $1 ORDER BY id",
            lot.id,
        )
    return [dict(r) for r in rows]


async def test_an_entry_resent_with_another_time_is_answered_not_decided_again(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    driver = await make_driver(runtime, unique_plate())
    entry = gate.capture("in", driver.plate)
    await gate.decide(lot.code, "in1", entry)
    await backdate_entry(runtime, lot, driver.plate, timedelta(hours=3))
    [stay] = await _sessions(runtime, lot)

    # The gate's clock was corrected, and it re-stamps the capture it still holds.
    await gate.send(lot.code, "in1", _resent(entry, later_by=timedelta(hours=3, minutes=1)))
    await gate.wait_for(entry, commands=2, acks=2)

    assert [a["duplicate"] for a in gate.acks[str(entry.capture_id)]] == [False, True]
    first, second = _commands(gate, entry)
    assert second == first, "a resend gets the stored command"
    assert await _sessions(runtime, lot) == [stay], "the 3-hour stay was not superseded"

    exit_capture = gate.capture("out", driver.plate)
    await gate.decide(lot.code, "out1", exit_capture)
    charges = await eventually(lambda: charges_of(runtime, lot))
    assert [c["amount_fen"] for c in charges] == [1800], "charged for the whole 3-hour stay"


async def test_an_exit_resent_in_other_bytes_and_time_is_charged_once(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    driver = await make_driver(runtime, unique_plate())
    await gate.decide(lot.code, "in1", gate.capture("in", driver.plate))
    await backdate_entry(runtime, lot, driver.plate, timedelta(minutes=30))
    exit_capture = gate.capture("out", driver.plate)
    await gate.decide(lot.code, "out1", exit_capture)

    later = _resent(exit_capture, later_by=timedelta(days=2), offline=True, offline_action="open")
    # Other bytes for the same content: keys in another order.
    payload = orjson.loads(later.model_dump_json())
    await gate.publish_raw(lot.code, "out1", orjson.dumps(dict(reversed(payload.items()))))
    await gate.wait_for(exit_capture, commands=2, acks=2)

    assert [a["duplicate"] for a in gate.acks[str(exit_capture.capture_id)]] == [False, True]
    first, second = _commands(gate, exit_capture)
    assert second == first
    charges = await eventually(lambda: charges_of(runtime, lot))
    assert len(charges) == 1 and charges[0]["amount_fen"] == 600
    async with runtime.pool.acquire() as conn:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM captures WHERE capture_id = $1", exit_capture.capture_id
            )
            == 1
        )
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM capture_conflicts WHERE capture_id = $1",
                exit_capture.capture_id,
            )
            == 0
        ), "the same content in other bytes, time and flags is no conflict"


async def test_a_resend_that_says_something_else_goes_to_an_operator(
    runtime: Runtime, gate: GateProbe, lot: Lot, app: FastAPI, api: httpx.AsyncClient
) -> None:
    parked = await make_driver(runtime, unique_plate())
    other = await make_driver(runtime, unique_plate())
    await gate.decide(lot.code, "in1", gate.capture("in", parked.plate))
    await gate.decide(lot.code, "in1", gate.capture("in", other.plate))
    await backdate_entry(runtime, lot, other.plate, timedelta(hours=1))
    exit_capture = gate.capture("out", parked.plate)
    await gate.decide(lot.code, "out1", exit_capture)

    # Same id, another plate: whatever it is, it is not the capture already decided.
    conflicting = _resent(
        exit_capture,
        later_by=timedelta(seconds=5),
        camera_read=CameraRead(plate=other.plate, color="blue", confidence=0.99),
    )
    await gate.send(lot.code, "out1", conflicting)
    await gate.wait_for(exit_capture, commands=1, acks=2)

    acks = gate.acks[str(exit_capture.capture_id)]
    assert [a["duplicate"] for a in acks] == [False, True]
    assert "payload_sha256" not in acks[1], "acked as nothing the gate holds"
    # The stored decision answers the capture stored, not what says something else under its
    # id: it is sent again only for a resend of that very capture.
    [first] = _commands(gate, exit_capture)
    statuses = {s["status"] for s in await _sessions(runtime, lot)}
    assert statuses == {"closed", "open"}, "the other car's stay is still open"
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT car_park_id, resent FROM capture_conflicts WHERE capture_id = $1",
            exit_capture.capture_id,
        )
    assert [r["car_park_id"] for r in rows] == [lot.id]
    assert rows[0]["resent"]["camera_read"]["plate"] == other.plate
    assert "image" not in rows[0]["resent"]

    staff_x = await make_staff(runtime, lot.operator_id, "attendant")
    listed = await api.get(
        "/api/v1/operator/capture-conflicts",
        params={"car_park": lot.code},
        headers=bearer(staff_token(app, staff_x)),
    )
    assert listed.status_code == 200, listed.text
    [conflict] = listed.json()
    assert conflict["capture_id"] == str(exit_capture.capture_id)
    assert conflict["gate"] == "out1"
    # The stored decision; what the gate got is that, bound to the gate and signed.
    assert conflict["stored_command"] == {
        k: v for k, v in first.items() if k not in ("lot", "gate", "signature")
    }
    other_lot = await create_lot(runtime)
    staff_y = await make_staff(runtime, other_lot.operator_id)
    foreign = await api.get(
        "/api/v1/operator/capture-conflicts", headers=bearer(staff_token(app, staff_y))
    )
    assert foreign.status_code == 200
    assert str(exit_capture.capture_id) not in {c["capture_id"] for c in foreign.json()}
