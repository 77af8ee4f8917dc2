"""The embedded MQTT broker (no PARKING_MQTT_URL) runs in a process of its own, as a deployment's
broker does: every gate's traffic off the lanes' event loop (in the lane's process it took a
fifth of the lane's CPU and stalled its decisions while it broadcast the gates' whitelists).
It serves MQTT and stops with the other embedded servers."""

import asyncio
import multiprocessing
import os
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from parking.infra import endpoints
from parking.settings import Settings
from parking_dev.sandbox import free_port
from tests.conftest import REDIS_URL


def _round_trip(port: int, topic: str) -> bytes:
    """Publishes to `topic` through the broker and returns what a subscriber got."""
    got: list[bytes] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{os.getpid()}")
    client.on_message = lambda _c, _u, message: got.append(message.payload)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        result, _ = client.subscribe(topic, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        # Published until the subscription is in place and the message comes back (5 s).
        for _ in range(50):
            client.publish(topic, b"hello", qos=1).wait_for_publish(5)
            time.sleep(0.1)
            if got:
                return got[0]
        raise AssertionError("nothing came back through the broker")
    finally:
        client.loop_stop()
        client.disconnect()


async def test_the_embedded_broker_runs_in_a_process_of_its_own_and_stops_with_the_servers(
    settings: Settings, database_url: str, tmp_path: Path
) -> None:
    settings.database_url = database_url
    settings.redis_url = REDIS_URL
    settings.data_dir = tmp_path
    settings.embedded_mqtt_port = free_port()
    async with endpoints(settings) as eps:
        assert eps.mqtt_url == f"mqtt://127.0.0.1:{settings.embedded_mqtt_port}"
        brokers = [p for p in multiprocessing.active_children() if p.name == "embedded-mqtt-broker"]
        assert len(brokers) == 1 and brokers[0].pid != os.getpid(), brokers
        payload = await asyncio.to_thread(
            _round_trip, settings.embedded_mqtt_port, "test/embedded-broker"
        )
        assert payload == b"hello"
    assert not brokers[0].is_alive()
