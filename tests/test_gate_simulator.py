"""The gate simulator (demo, benches, fault tests) checks commands as a real gate agent does.

It used to count any message on a command topic as the server's answer, so a run with unsigned
commands (a lane without PARKING_GATE_CONFIG_KEY) or forged ones looked healthy while every
real gate would have refused them. Real MQTT broker, the server's own signing code.
"""

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from gate_controller.mqtt import MqttClient
from gate_controller.protocol import Command, GateAddress, Topics, encode
from gate_controller.simulator import GateSimulator, SimGate, Vehicle
from parking.gates.commands import sign_command
from parking.gates.config import generate_private_key
from tests.conftest import MQTT_URL

SERVER_KEY = generate_private_key()
TIMEOUT_S = 10.0
GATE = SimGate("lot-sim", "out1", "out")
OTHER = GateAddress("lot-sim", "out2")


def _command(capture_id: uuid.UUID, *, expires_in_s: float = 30.0) -> Command:
    now = datetime.now(UTC)
    return Command(
        capture_id=capture_id,
        action="open",
        display=["一路顺风"],
        issued_at=now,
        expires_at=now + timedelta(seconds=expires_in_s),
    )


async def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)  # polling the simulator's report, bounded by the deadline


async def test_the_simulator_counts_only_commands_the_server_signed_for_that_gate() -> None:
    prefix = f"sim-{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    address = GateAddress(GATE.lot, GATE.gate)
    vehicle = Vehicle("浙A12345", "blue", bound=True)
    server = MqttClient(MQTT_URL, f"sim-server-{uuid.uuid4().hex[:8]}")
    await server.start()
    try:
        async with GateSimulator(
            MQTT_URL,
            [GATE],
            {GATE.lot: []},
            [],
            server_key=SERVER_KEY.public_key(),
            topic_prefix=prefix,
            duplicate_rate=0.0,
            double_read_rate=0.0,
        ) as sim:
            capture_id = await sim.capture(GATE, vehicle)
            topic = topics.topic(address, "command")
            forgeries = [
                encode(_command(capture_id)),  # unsigned
                encode(sign_command(_command(capture_id), address, generate_private_key())),
                encode(sign_command(_command(capture_id), OTHER, SERVER_KEY)),  # another gate's
                encode(sign_command(_command(capture_id, expires_in_s=-1), address, SERVER_KEY)),
                b'{"capture_id": "not json at all',
            ]
            for payload in forgeries:
                await server.publish(topic, payload)
            await _wait(lambda: sum(sim.report.command_refusals.values()) == 5, "refusals")
            assert sim.report.command_refusals == {
                "unsigned": 1,
                "bad_signature": 1,
                "other_gate": 1,
                "expired": 1,
                "malformed": 1,
            }
            assert not sim.report.commands, "no forged command counted as an answer"
            assert sim.outstanding() == 1

            genuine = sign_command(_command(capture_id), address, SERVER_KEY)
            await server.publish(topic, encode(genuine))
            await _wait(lambda: sim.report.commands["open"] == 1, "the signed command")
            assert len(sim.report.round_trip_ms) == 1
    finally:
        await server.stop()
