"""Bad gate messages become dead letters with a reason, and change nothing else."""

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from fastapi import FastAPI

from billing import ledger
from gate_controller.mqtt import IncomingMessage
from gate_controller.protocol import GateAddress, Topics, encode
from parking.errors import install_error_handlers
from parking.gates.events import GateEventRecorder
from parking.runtime import Runtime
from parking.settings import Settings
from tests.conftest import Lot, eventually, unique_plate
from tests.gates import GateProbe


async def _counts(
    runtime: Runtime, lot: Lot, plates: list[str], capture_ids: list[uuid.UUID]
) -> dict[str, int]:
    """Rows the test's messages could have made: its car park's, its plates' and its capture
    ids' stays and captures, their charges, ledger lines and outbox jobs (the plates are bound to
    no account, so no driver notification can be theirs). Other tests' rows never count."""
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow(
            """WITH stays AS (
                   SELECT id FROM sessions WHERE car_park_id = $1 OR plate = ANY($2::text[])
               ), mine AS (
                   SELECT id FROM charges WHERE session_id IN (SELECT id FROM stays)
               )
               SELECT (SELECT count(*) FROM stays) AS sessions,
                      (SELECT count(*) FROM captures
                       WHERE car_park_id = $1 OR capture_id = ANY($3::uuid[])) AS captures,
                      (SELECT count(*) FROM mine) AS charges,
                      (SELECT count(*) FROM payments
                       WHERE session_id IN (SELECT id FROM stays)
                          OR capture_id = ANY($3::uuid[])) AS payments,
                      (SELECT count(*) FROM ledger_entries
                       WHERE session_id IN (SELECT id FROM stays)
                          OR ledger_account = $4) AS ledger,
                      (SELECT count(*) FROM outbox
                       WHERE (kind = 'charge' AND ref_id IN (SELECT id FROM mine))
                          OR (kind = 'gate_command' AND ref_id IN (
                                SELECT id FROM payments
                                WHERE session_id IN (SELECT id FROM stays)
                                   OR capture_id = ANY($3::uuid[])))) AS outbox""",
            lot.id,
            plates,
            capture_ids,
            ledger.revenue(lot.id),
        )
    return dict(row)


async def test_malformed_unknown_and_oversized_captures_are_dead_lettered(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    valid = gate.capture("in", unique_plate())
    wrong_direction = gate.capture("out", unique_plate())
    missing_fields_id, naive_time_id = uuid.uuid4(), uuid.uuid4()
    missing_fields = orjson.dumps({"capture_id": str(missing_fields_id), "direction": "in"})
    bad_values = orjson.dumps(
        {
            "capture_id": "not-a-uuid",
            "seq": -1,
            "direction": "sideways",
            "captured_at": datetime.now(UTC).isoformat(),
        }
    )
    naive_time = orjson.dumps(
        {
            "capture_id": str(naive_time_id),
            "seq": 1,
            "direction": "in",
            "captured_at": "2026-01-01T08:00:00",
        }
    )
    oversized = orjson.dumps(
        {**orjson.loads(encode(valid)), "image": "A" * (runtime.settings.max_capture_bytes + 1)}
    )
    sent = [
        (lot.code, "in1", b"{this is not json", "malformed_json"),
        (lot.code, "in1", b"\xff\xfe\x00", "malformed_json"),
        (lot.code, "nosuchgate", encode(valid), "unknown_gate"),
        ("nosuchlot", "in1", encode(valid), "unknown_gate"),
        (lot.code, "in1", oversized, "oversized"),
        (lot.code, "in1", missing_fields, "invalid_message"),
        (lot.code, "in1", bad_values, "invalid_message"),
        (lot.code, "in1", naive_time, "invalid_message"),
        (lot.code, "in1", encode(wrong_direction), "direction_mismatch"),
    ]
    plates = [c.camera_read.plate for c in (valid, wrong_direction) if c.camera_read]
    capture_ids = [valid.capture_id, wrong_direction.capture_id, missing_fields_id, naive_time_id]
    before = await _counts(runtime, lot, plates, capture_ids)
    for lot_code, gate_code, payload, _ in sent:
        await gate.publish_raw(lot_code, gate_code, payload)

    prefix = runtime.lanes.topics.root

    async def dead_letters() -> list[dict]:
        async with runtime.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT * FROM dead_letters WHERE topic LIKE $1 ORDER BY id", f"{prefix}/%"
            )
        return [dict(r) for r in rows] if len(rows) >= len(sent) else []

    rows = await eventually(dead_letters)
    assert sorted(r["reason"] for r in rows) == sorted(reason for *_, reason in sent)
    assert all(r["detail"] for r in rows if r["reason"] != "malformed_json")
    big = next(r for r in rows if r["reason"] == "oversized")
    assert big["payload_size"] == len(oversized) and len(big["payload"]) <= 4096
    assert await _counts(runtime, lot, plates, capture_ids) == before
    assert str(valid.capture_id) not in gate.commands
    assert str(wrong_direction.capture_id) not in gate.commands
    # The gate is told, so that it drops them from its outbox instead of resending forever.
    await gate.wait_for(valid, commands=0, acks=2)
    await gate.wait_for(wrong_direction, commands=0, acks=1)
    assert {a["rejected"] for a in gate.acks[str(valid.capture_id)]} == {"unknown_gate"}
    assert gate.acks[str(wrong_direction.capture_id)][0]["rejected"] == "direction_mismatch"
    assert runtime.lanes.stats.dead_letters == len(sent)

    # The lane keeps working after all that.
    command = await gate.decide(lot.code, "in1", gate.capture("in", unique_plate()))
    assert command["action"] == "open"
    # And the counts above do see what a capture changes: its stay and itself.
    after = await _counts(runtime, lot, plates, capture_ids)
    assert after == before | {
        "sessions": before["sessions"] + 1,
        "captures": before["captures"] + 1,
    }


async def test_a_dead_lettered_capture_keeps_only_an_excerpt_whatever_the_reason(
    runtime: Runtime, gate: GateProbe
) -> None:
    """A gate login (or an edge's bridge) sends 400 KiB captures the lane cannot use, under the
    size limit: each is dead-lettered with its size and a bounded excerpt, not whole."""
    marker = uuid.uuid4().hex
    junk = orjson.dumps({"marker": marker, "junk": "x" * (400 * 1024)})
    await gate.publish_raw("nosuchlot", "out1", junk)

    async def stored() -> Any:
        async with runtime.pool.acquire() as conn:
            return await conn.fetchrow(
                "SELECT length(payload) AS kept, payload_size, reason FROM dead_letters "
                "WHERE position($1::bytea in payload) > 0",
                marker.encode(),
            )

    row = await eventually(stored)
    assert row["reason"] == "invalid_message" and row["payload_size"] == len(junk)
    assert row["kept"] == 4096


async def _dead_letters_of(runtime: Runtime, lot: Lot, gate_code: str) -> list[dict[str, Any]]:
    topic = f"{runtime.lanes.topics.root}/{lot.code}/{gate_code}/capture"
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM dead_letters WHERE topic = $1 ORDER BY id", topic)
    return [dict(r) for r in rows]


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"seq": 2**63}, id="seq_beyond_bigint"),
        pytest.param(
            {"captured_at": "0001-01-01T00:00:00+00:00", "offline": True, "offline_action": "open"},
            id="offline_at_year_one",
        ),
        pytest.param({"captured_at": "9999-12-31T23:00:00-05:00"}, id="beyond_year_9999"),
    ],
)
async def test_a_capture_the_store_or_the_arithmetic_cannot_take_is_dead_lettered_and_rejected(
    runtime: Runtime, gate: GateProbe, lot: Lot, changes: dict[str, Any]
) -> None:
    """Before, such a capture passed the parse and failed in the decision (a bigint out of
    range, a date overflow) on every resend: no dead letter, no ack, sent for ever."""
    capture = gate.capture("out", unique_plate())
    await gate.publish_raw(lot.code, "out1", orjson.dumps(orjson.loads(encode(capture)) | changes))
    rows = await eventually(lambda: _dead_letters_of(runtime, lot, "out1"), timeout_s=5)
    assert [r["reason"] for r in rows] == ["invalid_message"] and rows[0]["detail"], rows
    await gate.wait_for(capture, commands=0, acks=1)
    assert gate.acks[str(capture.capture_id)][0]["rejected"] == "invalid_message"
    assert (await gate.decide(lot.code, "in1", gate.capture("in", unique_plate())))[
        "action"
    ] == "open", "the lane goes on"


async def test_a_capture_from_a_gate_clock_reset_to_the_epoch_is_still_decided(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """The bounds refuse only times no clock shows: a gate whose clock battery died is still a
    gate, its live captures placed by the server's clock."""
    capture = gate.capture("in", unique_plate())
    reset = capture.model_copy(update={"captured_at": datetime(1970, 1, 1, tzinfo=UTC)})
    assert (await gate.decide(lot.code, "in1", reset))["action"] == "open"
    assert await _dead_letters_of(runtime, lot, "in1") == []


async def test_a_decision_the_payload_makes_fail_is_dead_lettered_and_a_broken_database_is_not(
    runtime: Runtime, gate: GateProbe, lot: Lot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure that a resend repeats (a value the store refuses, an overflow) is the
    payload's: dead-lettered and acknowledged as rejected, not retried for ever. A failure of
    the database itself leaves the capture unacknowledged, for the gate to send again."""
    decide = runtime.lanes.service.decide
    failure: list[Exception] = []

    async def failing(*args: Any, **kwargs: Any) -> Any:
        if failure:
            raise failure[0]
        return await decide(*args, **kwargs)

    monkeypatch.setattr(runtime.lanes.service, "decide", failing)
    failures = runtime.lanes.stats.failures

    failure[:] = [asyncpg.PostgresConnectionError("connection was closed")]
    transient = gate.capture("in", unique_plate())
    await gate.send(lot.code, "in1", transient)
    await eventually(lambda: _true(runtime.lanes.stats.failures > failures))
    failure.clear()
    await gate.send(lot.code, "in1", transient)  # the gate's resend
    await gate.wait_for(transient, commands=1, acks=1)
    assert not gate.acks[str(transient.capture_id)][0].get("rejected")

    for undecidable in (OverflowError("date value out of range"), asyncpg.DataError("bad")):
        failure[:] = [undecidable]
        capture = gate.capture("in", unique_plate())
        await gate.send(lot.code, "in1", capture)
        await gate.wait_for(capture, commands=0, acks=1)
        assert gate.acks[str(capture.capture_id)][0]["rejected"] == "undecidable"
    rows = await _dead_letters_of(runtime, lot, "in1")
    assert [r["reason"] for r in rows] == ["undecidable", "undecidable"]
    assert "OverflowError" in rows[0]["detail"]


async def _true(value: bool) -> bool:
    return value


async def test_a_gate_event_the_store_cannot_take_is_dead_lettered_with_a_reason(
    runtime: Runtime, settings: Settings, lot: Lot
) -> None:
    """A gate's `manual_open` report (a barrier lift no signed command explains) whose reason
    holds a NUL passes the model and is refused by PostgreSQL. The broker acknowledged it, so
    the gate never sends it again: before, it was logged and dropped, a lift no operator saw."""
    recorder = GateEventRecorder(settings, runtime.pool, runtime.mqtt)
    topic = Topics(settings.mqtt_topic_prefix).topic(GateAddress(lot.code, "out1"), "event")
    payload = orjson.dumps(
        {
            "type": "manual_open",
            "at": datetime.now(UTC).isoformat(),
            "reason": "按钮\u0000救护车",
            "event_id": str(uuid.uuid4()),
        }
    )
    await recorder.handle(IncomingMessage(topic, payload, 0.0, False))
    async with runtime.pool.acquire() as conn:
        letters = await conn.fetch("SELECT reason FROM dead_letters WHERE topic = $1", topic)
    assert [r["reason"] for r in letters] == ["invalid_message"]


async def test_text_the_database_cannot_store_is_a_request_error_wherever_a_schema_missed_it() -> (
    None
):
    """Schemas refuse a NUL in stored text (parking/text.py); one a route misses is still a 422
    in the one error shape, not a 500."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/stores-text")
    async def stores_text() -> None:
        raise asyncpg.CharacterNotInRepertoireError("invalid byte sequence for encoding UTF8")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as client:
        answer = await client.get("/stores-text")
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "invalid_request"
