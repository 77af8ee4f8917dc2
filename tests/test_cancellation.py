"""A task cancelled while it waits is cancelled, even when what it waited for finishes in the
same step of the loop.

Python 3.11's `asyncio.wait_for` returns the result in that case and drops the cancellation:
the task carries on as if nobody had asked it to stop. SIGTERM stops a command with one
cancellation of its main task, so a command publishing at that moment would run on, with
its embedded servers, instead of stopping. `ruff` bans `asyncio.wait_for` in our packages.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gate_controller.mqtt import MqttClient
from tests.conftest import MQTT_URL


async def test_a_publish_cancelled_as_its_puback_arrives_is_cancelled() -> None:
    client = MqttClient(MQTT_URL, f"cancel-{uuid.uuid4().hex[:8]}")
    await client.start()
    try:
        publishing = asyncio.create_task(client.publish("parking-test/cancel", b"{}"))
        await asyncio.sleep(0)  # one step: the publish is sent and waits for its PUBACK
        # The PUBACK and the cancellation land in the same step of the loop.
        (ack,) = client._pending.values()
        ack.set_result(None)
        publishing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await publishing
    finally:
        await client.stop()
