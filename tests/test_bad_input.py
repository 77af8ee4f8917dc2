"""Bad gate messages become dead letters with a reason, and change nothing else."""

import uuid
from datetime import UTC, datetime

import orjson

from gate_controller.protocol import encode
from parking.runtime import Runtime
from tests.conftest import Lot, eventually, unique_plate
from tests.gates import GateProbe


async def _counts(runtime: Runtime, lot: Lot) -> dict[str, int]:
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT (SELECT count(*) FROM sessions WHERE car_park_id = $1) AS sessions,
                      (SELECT count(*) FROM captures WHERE car_park_id = $1) AS captures,
                      (SELECT count(*) FROM charges) AS charges,
                      (SELECT count(*) FROM ledger_entries) AS ledger,
                      (SELECT count(*) FROM outbox) AS outbox""",
            lot.id,
        )
    return dict(row)


async def test_malformed_unknown_and_oversized_captures_are_dead_lettered(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    before = await _counts(runtime, lot)
    valid = gate.capture("in", unique_plate())
    wrong_direction = gate.capture("out", unique_plate())
    missing_fields = orjson.dumps({"capture_id": str(uuid.uuid4()), "direction": "in"})
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
            "capture_id": str(uuid.uuid4()),
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
    assert await _counts(runtime, lot) == before
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
