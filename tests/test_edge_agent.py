"""The gate edge agent against the real broker and lane service: server decisions, offline
decisions from the signed whitelist, store-and-forward through restarts, status and last will."""

import asyncio
import base64
import contextlib
import hashlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from pydantic import SecretStr, ValidationError

import gate_controller.agent as agent_module
from billing import agreements
from billing.rights import RightTerms
from gate_controller.agent import AgentConfig, GateAgent
from gate_controller.barrier import SimulatedDisplay, SimulatedRelay
from gate_controller.camera import (
    CameraEvent,
    FolderCameraSource,
    HttpCameraSource,
    QueueCameraSource,
    camera_signature_headers,
)
from gate_controller.mqtt import IncomingMessage, MqttClient
from gate_controller.outbox import Outbox
from gate_controller.protocol import (
    DISPLAY_DEFAULTS,
    Ack,
    Capture,
    Command,
    GateAddress,
    GateConfig,
    Topics,
    WhitelistEntry,
    encode,
)
from gate_controller.simulator import Vehicle
from gate_controller.whitelist import OfflineWhitelist, command_refusal
from parking.gates import config as gate_config
from parking.gates import repository as gates_repo
from parking.gates.commands import sign_command
from parking.gates.config import (
    build_config,
    generate_private_key,
    load_private_key,
    private_key_pem,
    public_key_text,
    publish_configs,
    signed,
)
from parking.gates.repository import WhitelistedCar
from parking.operators.service import MANUAL_OPEN_DISPLAY
from parking.runtime import ProviderEndpoint, Runtime, running
from parking.settings import Settings
from tests.conftest import (
    MQTT_URL,
    Lot,
    backdate_entry,
    bearer,
    create_lot,
    driver_token,
    enter,
    eventually,
    make_driver,
    make_staff,
    staff_token,
    stay_status,
    unique_plate,
)
from tests.gates import GateProbe, SubAcks

SERVER_KEY = generate_private_key()
HOLD_TEXT = DISPLAY_DEFAULTS["offline_hold"]
# A tiny JPEG is enough: the camera's read is confident, the image rides along.
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64 + b"\xff\xd9"


CAMERA_KEY = "camera-key-" + "k" * 32


def _signed_post(
    body: dict[str, Any], *, key: str = CAMERA_KEY, at: float | None = None
) -> tuple[bytes, dict[str, str]]:
    """A camera report as the gate's own camera sends it: the body, and its timestamp and
    HMAC headers."""
    raw = orjson.dumps(body)
    return raw, camera_signature_headers(key.encode(), raw, time.time() if at is None else at)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The runtime signs its commands with the key the agents here trust; it publishes the
    gates' configs once at its start (`clean_configs` clears them after the test)."""
    return settings.model_copy(
        update={
            "gate_config_key": SecretStr(private_key_pem(SERVER_KEY)),
            "gate_config_interval_s": 3600.0,
        }
    )


@pytest.fixture
async def clean_configs(settings: Settings, database_url: str) -> AsyncIterator[None]:
    yield
    conn = await asyncpg.connect(database_url)
    try:
        gates = await gates_repo.gate_addresses(conn)
    finally:
        await conn.close()
    topics = Topics(settings.mqtt_topic_prefix)
    async with Listener() as cleaner:
        await cleaner.clear_retained([topics.topic(g, "config") for g in gates])


@contextlib.asynccontextmanager
async def gates_on_their_own(
    runtime: Runtime, settings: Settings
) -> AsyncIterator[tuple[Settings, Topics]]:
    """A topic prefix no lane serves yet, the gates' signed configs published there: the
    gates are on their own until a lane runs with these settings. The retained configs and
    statuses are cleared after."""
    offline = settings.model_copy(
        update={"mqtt_topic_prefix": _prefix(), "mqtt_client_id": f"lanes-{uuid.uuid4().hex[:8]}"}
    )
    assert await publish_configs(runtime.pool, runtime.mqtt, offline, SERVER_KEY) >= 2
    topics = Topics(offline.mqtt_topic_prefix)
    try:
        yield offline, topics
    finally:
        async with runtime.pool.acquire() as conn:
            gates = await gates_repo.gate_addresses(conn)
        async with Listener() as cleaner:
            await cleaner.clear_retained(
                [topics.topic(g, kind) for g in gates for kind in ("config", "status")]
            )


def _prefix() -> str:
    return f"test-agent-{uuid.uuid4().hex[:8]}"


def _config(tmp_path: Path, lot: str, gate: str, prefix: str, **overrides: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "lot": lot,
        "gate": gate,
        "direction": "in" if gate.startswith("in") else "out",
        "server_public_key": public_key_text(SERVER_KEY),
        "outbox_path": tmp_path / f"{lot}-{gate}.sqlite3",
        "mqtt_url": MQTT_URL,
        "topic_prefix": prefix,
        "client_id": f"gate-test-{uuid.uuid4().hex[:8]}",
        "offline_after_s": 0.3,
        "heartbeat_s": 0.5,
        "resend_after_s": 0.3,
        "resend_max_s": 1.0,
    }
    return AgentConfig(**(values | overrides))


@dataclass
class Lane:
    agent: GateAgent
    camera: QueueCameraSource
    relay: SimulatedRelay = field(default_factory=SimulatedRelay)
    display: SimulatedDisplay = field(default_factory=SimulatedDisplay)

    def reasons(self) -> list[str]:
        return [opening.reason for opening in self.relay.openings]


@contextlib.asynccontextmanager
async def lane(config: AgentConfig, *, reachable: bool = True) -> AsyncIterator[Lane]:
    """A gate agent on simulated hardware; when the broker is `reachable`, yields once its
    command, ack and config subscriptions are acknowledged, so that whatever a test publishes
    to the gate from then on reaches it."""
    camera = QueueCameraSource()
    relay, display = SimulatedRelay(), SimulatedDisplay()
    agent = GateAgent(config, camera, relay, display)
    subacks = SubAcks(agent.mqtt)
    async with agent:
        if reachable:
            await subacks.wait(3)
        yield Lane(agent, camera, relay, display)


def car(direction: str, plate: str, *, confidence: float = 0.98) -> CameraEvent:
    return CameraEvent(direction, datetime.now(UTC), plate, "blue", confidence)  # type: ignore[arg-type]


class Listener:
    """A broker client that collects what is published on some topics."""

    def __init__(self) -> None:
        self.mqtt = MqttClient(MQTT_URL, f"listener-{uuid.uuid4().hex[:8]}")
        self.messages: list[IncomingMessage] = []
        self._subacks = SubAcks(self.mqtt)
        self._subscriptions = 0

    async def __aenter__(self) -> "Listener":
        await self.mqtt.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.mqtt.stop()

    async def listen(self, topic_filter: str) -> None:
        self._subscriptions += 1
        await self.mqtt.subscribe(topic_filter, self.messages.append)
        await self._subacks.wait(self._subscriptions)  # the subscription is in place

    def payloads(self, topic: str) -> list[dict[str, Any]]:
        return [orjson.loads(m.payload) for m in self.messages if m.topic == topic and m.payload]

    async def clear_retained(self, topics: list[str]) -> None:
        for topic in topics:
            await self.mqtt.publish(topic, b"", retain=True)


def _open_command(
    capture_id: uuid.UUID,
    address: GateAddress,
    *,
    ttl: timedelta = timedelta(seconds=30),
    display: tuple[str, ...] = ("已缴费 一路顺风",),
    key: Ed25519PrivateKey = SERVER_KEY,
    remote: bool = False,
    age: timedelta = timedelta(0),
) -> bytes:
    """A payment's "open" for the capture, or with `remote` an operator's, as the server sends
    it (or sent it `age` ago): signed for the gate at `address`."""
    now = datetime.now(UTC) - age
    command = Command(
        capture_id=capture_id,
        action="open",
        display=list(display),
        issued_at=now,
        expires_at=now + ttl,
        remote=remote,
    )
    return encode(sign_command(command, address, key))


async def _exit_capture_of(runtime: Runtime, lot: Lot, plate: str) -> uuid.UUID:
    """The id of the plate's exit capture at the lot, as the server stored it."""
    async with runtime.pool.acquire() as conn:
        capture_id: uuid.UUID = await conn.fetchval(
            "SELECT capture_id FROM captures WHERE car_park_id = $1 AND direction = 'out' "
            "AND plate = $2",
            lot.id,
            plate,
        )
    return capture_id


async def _pay_by_qr(api: httpx.AsyncClient, provider: ProviderEndpoint, qr_url: str) -> None:
    """The driver scans the gate's QR code, whose pay page's 支付 button starts the payment
    through the API, and pays it in the wallet."""
    qr_path = httpx.URL(qr_url).path.replace("/pay/", "/api/v1/gate-payments/", 1)
    view = (await api.post(qr_path)).json()
    async with httpx.AsyncClient(base_url=provider.url) as wallet:
        out_trade_no = httpx.URL(view["pay_url"]).path.rsplit("/", 1)[-1]
        assert (await wallet.post(f"/v1/payments/{out_trade_no}/pay")).status_code == 200
    assert (await api.get(qr_path)).json()["status"] == "succeeded"


async def until(predicate: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    async def probe() -> Any:
        return predicate()

    return await eventually(probe, timeout_s)


async def _stored_captures(runtime: Runtime, capture_ids: list[uuid.UUID]) -> list[Any]:
    async with runtime.pool.acquire() as conn:
        return await conn.fetch(
            "SELECT capture_id, offline, outcome FROM captures WHERE capture_id = ANY($1::uuid[])",
            capture_ids,
        )


async def test_captures_reach_the_lane_and_the_barrier_follows_its_command(
    runtime: Runtime, settings: Settings, lot: Lot, tmp_path: Path, clean_configs: None
) -> None:
    driver = await make_driver(runtime, unique_plate())
    prefix = settings.mqtt_topic_prefix
    entry_config = _config(tmp_path, lot.code, "in1", prefix, offline_after_s=5.0)
    relay_in, display_in = SimulatedRelay(), SimulatedDisplay()
    async with (
        HttpCameraSource(
            "127.0.0.1",
            0,
            "in",
            key=CAMERA_KEY.encode(),
            allowed_addresses=["127.0.0.1"],
            outbox_path=entry_config.outbox_path,
        ) as camera,
        GateAgent(entry_config, camera, relay_in, display_in) as entry_agent,
        httpx.AsyncClient(base_url=camera.url) as http,
    ):
        # Reports that cannot be a capture are refused before anything is stored.
        for bad in (
            {"plate": driver.plate, "confidence": 1.5},
            {"direction": "in"},
            {"image": "not base64!", "direction": "in"},
            {"image": base64.b64encode(b"GIF89a").decode()},
        ):
            raw, headers = _signed_post(bad)
            response = await http.post("/events", content=raw, headers=headers)
            assert response.status_code == 422, bad
            assert response.json()["error"]["code"] == "invalid_request"
        assert entry_agent.store.length() == 0

        raw, headers = _signed_post(
            {
                "plate": driver.plate,
                "color": "blue",
                "confidence": 0.97,
                "image": base64.b64encode(JPEG).decode(),
            }
        )
        response = await http.post("/events", content=raw, headers=headers)
        assert response.status_code == 202
        await until(lambda: relay_in.openings)
        assert [o.reason for o in relay_in.openings] == ["server"]
        assert display_in.current and display_in.current[0] == driver.plate
        await until(lambda: entry_agent.store.length() == 0)
    assert await stay_status(runtime, lot, driver.plate) == "open"

    await backdate_entry(runtime, lot, driver.plate, timedelta(hours=1))
    exit_config = _config(tmp_path, lot.code, "out1", prefix, offline_after_s=5.0)
    async with lane(exit_config) as out:
        vehicle = Vehicle(driver.plate, "blue", bound=True)
        await out.camera.put(CameraEvent.of_vehicle(vehicle, "out"))
        await until(lambda: out.relay.openings)
        await until(lambda: out.agent.store.length() == 0)
        assert out.reasons() == ["server"]
    assert await stay_status(runtime, lot, driver.plate) == "closed"
    async with runtime.pool.acquire() as conn:
        offline = await conn.fetchval(
            "SELECT bool_or(offline) FROM captures WHERE car_park_id = $1", lot.id
        )
    assert offline is False


async def test_publishing_the_configs_lets_the_lane_decide_between_car_parks(
    runtime: Runtime,
    settings: Settings,
    lot: Lot,
    clean_configs: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lane service republishes every gate's config on its own event loop: building the
    whole city's signed lists in one go would keep every capture waiting behind it. Between
    two car parks' lists the loop runs other work (here: a task that counts its turns)."""
    await create_lot(runtime)
    turns = 0

    async def other_work() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    built_at_turn: list[int] = []
    publishing = asyncio.current_task()

    def counting_build(*args: Any, **kwargs: Any) -> GateConfig:
        # Only this publication's: the runtime's lane republishes every config now and then on
        # the same loop, and its builds would interleave with these.
        if asyncio.current_task() is publishing:
            built_at_turn.append(turns)
        return build_config(*args, **kwargs)

    monkeypatch.setattr(gate_config, "build_config", counting_build)
    worker = asyncio.create_task(other_work())
    try:
        assert await publish_configs(runtime.pool, runtime.mqtt, settings, SERVER_KEY) >= 4
    finally:
        worker.cancel()
    assert len(built_at_turn) >= 2
    assert len(set(built_at_turn)) == len(built_at_turn), built_at_turn


async def test_offline_decisions_from_the_signed_whitelist_are_uploaded_when_the_server_returns(
    runtime: Runtime,
    settings: Settings,
    lot: Lot,
    gate: GateProbe,
    provider: ProviderEndpoint,
    tmp_path: Path,
    clean_configs: None,
) -> None:
    bound = await make_driver(runtime, unique_plate())
    blocked = await make_driver(runtime, unique_plate())
    unbound = unique_plate()
    for plate in (bound.plate, blocked.plate, unbound):
        await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=1))
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE accounts SET blocked_for_arrears = true WHERE id = $1", blocked.account_id
        )

    newcomer = unique_plate()
    async with gates_on_their_own(runtime, settings) as (offline, topics):
        async with (
            Listener() as uplink,
            lane(_config(tmp_path, lot.code, "out1", offline.mqtt_topic_prefix)) as out,
            lane(_config(tmp_path, lot.code, "in1", offline.mqtt_topic_prefix)) as into,
        ):
            await uplink.listen(topics.all_gates("capture"))
            held = await until(lambda: out.agent.whitelist.config)
            assert [entry.plate for entry in held.whitelist] == [bound.plate]

            await out.camera.put(car("out", bound.plate))
            await until(lambda: out.relay.openings)
            await out.camera.put(car("out", unbound))
            await out.camera.put(car("out", blocked.plate))
            await into.camera.put(car("in", newcomer))
            await until(lambda: len(out.display.shown) == 3 and into.relay.openings)
            assert out.reasons() == ["offline_exit"]
            assert out.display.shown[1:] == [[HOLD_TEXT], [HOLD_TEXT]]
            assert into.reasons() == ["offline_entry"]

            exits = out.agent.store.unacked()
            entries = into.agent.store.unacked()
            assert [seq for seq, _ in exits] == [1, 2, 3]
            assert len(entries) == 1
            capture_ids = [capture_id for _, capture_id in exits + entries]
            # The gates send what they decided alone, flagged offline; nobody acks it, so it
            # stays in the outboxes.
            await until(
                lambda: (
                    {
                        orjson.loads(m.payload)["capture_id"]
                        for m in uplink.messages
                        if orjson.loads(m.payload).get("offline")
                    }
                    >= {str(capture_id) for capture_id in capture_ids}
                )
            )
            assert out.agent.store.unacked() == exits
            assert into.agent.store.unacked() == entries
            # Anybody on the broker acking them (unsigned, or signed with another key) makes
            # the gate drop nothing: before, the exits were lost, the stays never closed.
            exit_acks = topics.topic(GateAddress(lot.code, "out1"), "ack")
            for _, capture_id in exits:
                forged = Ack(capture_id=capture_id, received_at=datetime.now(UTC))
                await uplink.mqtt.publish(exit_acks, encode(forged))
                alien = sign_command(forged, out.agent.address, generate_private_key())
                await uplink.mqtt.publish(exit_acks, encode(alien))
            await until(lambda: sum(out.agent.ack_refusals.values()) == 2 * len(exits))
            assert out.agent.ack_refusals == {"unsigned": 3, "bad_signature": 3}
            assert out.agent.store.unacked() == exits

            async with running(offline, runtime.endpoints, provider, outbox_worker=False) as lanes:
                await until(lambda: out.agent.store.length() + into.agent.store.length() == 0)
                stored = await _stored_captures(runtime, capture_ids)
                # The late answers to what the gates already did change nothing at the barrier.
                # The lane publishes each command before its ack, so every answer reached its
                # gate before the outboxes emptied; a gate handles its commands in order, so
                # once an operator's open sent now has lifted both barriers, the answers have
                # been handled.
                remote = uuid.uuid4()
                for gate_name in ("out1", "in1"):
                    await uplink.mqtt.publish(
                        topics.topic(GateAddress(lot.code, gate_name), "command"),
                        _open_command(remote, GateAddress(lot.code, gate_name), remote=True),
                    )
                await until(lambda: "remote" in out.reasons() and "remote" in into.reasons())
                stats = lanes.lanes.stats
            # Each capture was decided once (resends, if any, were answered as duplicates).
            assert sum(stats.outcomes.values()) == 4 and stats.dead_letters == 0

            assert len(stored) == 4 and all(row["offline"] for row in stored)
            outcomes = {row["capture_id"]: row["outcome"] for row in stored}
            assert outcomes[exits[0][1]] == "exited_pay_later"
            assert outcomes[entries[0][1]] == "entered"
            assert out.reasons() == ["offline_exit", "remote"]
            assert into.reasons() == ["offline_entry", "remote"]
        assert await stay_status(runtime, lot, bound.plate) == "closed"


async def test_an_ack_of_another_message_under_the_captures_id_drops_nothing(
    runtime: Runtime,
    settings: Settings,
    lot: Lot,
    gate: GateProbe,
    provider: ProviderEndpoint,
    tmp_path: Path,
    clean_configs: None,
) -> None:
    """Somebody on the broker reads an offline exit's capture id and sends junk under it: the
    service dead-letters the junk and acknowledges it, signed. That ack answers the junk, not
    the exit the gate holds, which stays until the service acknowledges it. Before, the gate
    dropped its only copy: the stay stayed open and was never charged."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=1))
    address = GateAddress(lot.code, "out1")
    async with gates_on_their_own(runtime, settings) as (offline, topics):
        # The gate waits long before resending: only the junk reaches the service meanwhile.
        config = _config(
            tmp_path,
            lot.code,
            "out1",
            offline.mqtt_topic_prefix,
            resend_after_s=60,
            resend_max_s=60,
        )
        async with Listener() as forger, lane(config) as out:
            await forger.listen(topics.topic(address, "capture"))
            await until(lambda: out.agent.whitelist.config)
            await out.camera.put(car("out", driver.plate))
            await until(lambda: out.relay.openings)
            sent = await until(lambda: forger.payloads(topics.topic(address, "capture")))
            junk = orjson.dumps({"capture_id": sent[0]["capture_id"]})
            async with running(offline, runtime.endpoints, provider, outbox_worker=False) as lanes:
                for _ in range(20):  # until the service, just started, is listening
                    await forger.mqtt.publish(topics.topic(address, "capture"), junk)
                    with contextlib.suppress(AssertionError):
                        await until(lambda: out.agent.ack_refusals["other_payload"], 0.5)
                        break
                assert set(out.agent.ack_refusals) == {"other_payload"}
                assert lanes.lanes.stats.dead_letters >= 1
            assert out.agent.store.length() == 1, "the exit is still the gate's to upload"


async def test_the_offline_whitelist_is_of_the_bound_vehicle_not_of_its_plate_text(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    car = await make_driver(runtime, unique_plate())  # bound blue, with pay-later
    other_lot = await create_lot(runtime)
    await gate.decide(lot.code, "in1", gate.capture("in", car.plate, color="blue"))
    # A lorry with the same characters on a yellow plate, parked elsewhere: nobody's binding.
    await gate.decide(other_lot.code, "in1", gate.capture("in", car.plate, color="yellow"))
    async with runtime.pool.acquire() as conn:
        whitelists = await gates_repo.offline_whitelists(conn)
    assert [(c.plate, c.color) for c in whitelists.get(lot.code, [])] == [(car.plate, "blue")]
    assert car.plate not in [c.plate for c in whitelists.get(other_lot.code, [])]


async def test_the_offline_whitelist_lets_out_on_pay_later_only_what_the_lane_would(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """A gate that cannot reach us lets out on pay-later only stays the lane would charge: the
    binding and agreement covered the entry (a plate bound minutes before the exit of a long
    stay pays at the gate, online or not) and so did the plate's service with the provider: not
    paused now, nor resumed only since the car came in (its entry was never agreed to be paid
    later). Before, all three were let out, and the stay ended unpaid for a person to chase, or
    the resumed one was charged."""
    bound_late = await make_driver(runtime, unique_plate())
    paused = await make_driver(runtime, unique_plate())
    resumed = await make_driver(runtime, unique_plate())
    resumed_before = await make_driver(runtime, unique_plate())
    covered = await make_driver(runtime, unique_plate())
    async with runtime.pool.acquire() as conn:
        for car in (resumed, resumed_before):
            await agreements.record_service_state(
                conn,
                "sandbox",
                car.plate,
                "blue",
                "paused",
                datetime.now(UTC) - timedelta(days=3),
                about_agreement=True,
            )
        await agreements.record_service_state(
            conn,
            "sandbox",
            resumed_before.plate,
            "blue",
            "normal",
            datetime.now(UTC) - timedelta(days=2),
            about_agreement=True,
        )
    for car in (bound_late, paused, resumed, resumed_before, covered):
        await gate.decide(lot.code, "in1", gate.capture("in", car.plate))
    for car in (paused, resumed, resumed_before):
        await backdate_entry(runtime, lot, car.plate, timedelta(hours=3))  # with its binding
    async with runtime.pool.acquire() as conn:
        await agreements.record_service_state(
            conn,
            "sandbox",
            resumed.plate,
            "blue",
            "normal",
            datetime.now(UTC),
            about_agreement=True,
        )
        # In for two days; the plate was bound and the agreement signed just now.
        await conn.execute(
            """UPDATE sessions SET entered_at = entered_at - interval '2 days'
               WHERE car_park_id = $1 AND plate = $2""",
            lot.id,
            bound_late.plate,
        )
        # The driver paused the plate's service at the provider after its entry was registered
        # (a word newer than the registration's, whenever that is recorded).
        await agreements.record_service_state(
            conn,
            "sandbox",
            paused.plate,
            "blue",
            "paused",
            datetime.now(UTC) + timedelta(hours=1),
            about_agreement=True,
        )
        whitelists = await gates_repo.offline_whitelists(conn)
    assert sorted(c.plate for c in whitelists.get(lot.code, [])) == sorted(
        [resumed_before.plate, covered.plate]
    )
    for car in (bound_late, paused, resumed):
        online = await gate.decide(lot.code, "out1", gate.capture("out", car.plate))
        assert online["action"] == "hold", "online, the lane holds it too"
    for car in (resumed_before, covered):
        online = await gate.decide(lot.code, "out1", gate.capture("out", car.plate))
        assert online["action"] == "open", online


async def test_the_offline_whitelist_lets_a_pass_holder_out_free_only_in_its_hours(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """A free passage frees a stay only while the pass has been in force since the entry: the
    lane prices any stretch outside its hours or validity, and the car leaves on pay-later or
    is held. The whitelist carries each pass holder's `free_until` (server's time): before it the
    gate lets the car out free, after it only on pay-later. Before, every pass holder valid at
    publication was on the list with no limit for the list's 24 h: out free after its pass's
    hours, and the stay ended unpaid in the exception queue."""
    admin = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
    local = datetime.now(ZoneInfo("Asia/Shanghai"))

    async def pass_for(plates: list[str], valid_until: timedelta, window: Any = None) -> None:
        spec = {"name": f"pass-{unique_plate()}", "kind": "free_passage"}
        if window is not None:
            spec |= {
                "window_start": (local + window[0]).strftime("%H:%M"),
                "window_end": (local + window[1]).strftime("%H:%M"),
            }
        made = await api.post("/api/v1/operator/right-specs", json=spec, headers=admin)
        assert made.status_code == 201, made.text
        right = await api.post(
            "/api/v1/operator/rights",
            json={
                "spec_id": made.json()["id"],
                "vehicles": [{"plate": p, "color": "blue"} for p in plates],
                "valid_from": (local - timedelta(days=10)).isoformat(),
                "valid_until": (local + valid_until).isoformat(),
            },
            headers=admin,
        )
        assert right.status_code == 201, right.text

    in_hours, after_hours, expiring, all_day = (unique_plate() for _ in range(4))
    paying = (await make_driver(runtime, unique_plate())).plate
    month = timedelta(days=30)
    await pass_for([in_hours], month, (timedelta(hours=-3), timedelta(hours=1)))
    await pass_for([after_hours, paying], month, (timedelta(hours=-4), timedelta(hours=-1)))
    await pass_for([expiring], timedelta(hours=1))
    await pass_for([all_day], month)
    plates = [in_hours, after_hours, paying, expiring, all_day]
    for plate in plates:
        await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=2))

    now = datetime.now(UTC)
    async with runtime.pool.acquire() as conn:
        cars = (await gates_repo.offline_whitelists(conn)).get(lot.code, [])
    config = build_config(lot.code, cars, SERVER_KEY, issued_at=now)
    entries = {entry.plate: entry for entry in config.whitelist}
    assert sorted(entries) == sorted([in_hours, paying, expiring, all_day])
    assert (entries[all_day].per_session_limit_fen, entries[all_day].free_until) == (None, None)
    assert entries[paying].free_until is None, "past its hours, it leaves on pay-later"
    whitelist = OfflineWhitelist(SERVER_KEY.public_key(), lot.code)
    assert whitelist.offer(config, now) is None
    later = now + timedelta(hours=2)
    assert [p for p in plates if whitelist.allows(p, "blue", later)] == [paying, all_day]

    offline = {plate: whitelist.allows(plate, "blue", now) for plate in plates}
    online = {}
    for plate in plates:
        command = await gate.decide(lot.code, "out1", gate.capture("out", plate))
        online[plate] = command["action"] == "open"
    assert (
        online
        == offline
        == {
            in_hours: True,
            after_hours: False,
            paying: True,
            expiring: True,
            all_day: True,
        }
    )


async def test_an_offline_gate_judges_a_pass_holders_hours_by_the_servers_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate's clock is three hours fast: by it the pass (in force until an hour from now)
    is over. The gate judges `free_until` by the server's time it learnt from the signed
    command to its first car: the holder leaves free. Once the server's time it learns is past
    `free_until`, the holder is sent to the booth; one with pay-later still leaves."""
    monkeypatch.setattr(agent_module, "datetime", _fast_clock(timedelta(hours=3)))
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    address = GateAddress(lot, "out1")
    topics = Topics(prefix)
    captures = topics.topic(address, "capture")
    now = datetime.now(UTC)
    monthly = RightTerms(1, "free_passage", now - timedelta(days=29), now + timedelta(hours=1))
    holder, paying = unique_plate(), unique_plate()
    cars = [
        WhitelistedCar(holder, "blue", None, now - timedelta(hours=2), (monthly,)),
        WhitelistedCar(paying, "blue", 20_000, now - timedelta(hours=2), (monthly,)),
    ]
    listed = build_config(lot, cars, SERVER_KEY, issued_at=now)
    assert [entry.free_until for entry in listed.whitelist] == [monthly.valid_until] * 2
    config = _config(tmp_path, lot, "out1", prefix, offline_after_s=2.0)
    async with Listener() as server, lane(config) as out:
        try:
            await server.mqtt.publish(topics.topic(address, "config"), encode(listed), retain=True)
            await until(lambda: out.agent.whitelist.config)
            await server.listen(captures)
            first = await out.agent.capture(car("out", unique_plate()))
            await server.mqtt.publish(
                topics.topic(address, "command"), _open_command(first.capture_id, address)
            )
            await until(lambda: out.relay.openings)
            assert out.agent.clock_offset_s == pytest.approx(-3 * 3600, abs=5)

            leaving = await out.agent.capture(car("out", holder))
            await until(lambda: len(out.relay.openings) == 2)
            assert out.reasons() == ["server", "offline_exit"]

            # The server's time as the gate learns it is now past the pass's end.
            flagged = await until(
                lambda: [
                    m.payload
                    for m in server.messages
                    if orjson.loads(m.payload)["capture_id"] == str(leaving.capture_id)
                    and orjson.loads(m.payload).get("offline")
                ]
            )
            await server.mqtt.publish(
                topics.topic(address, "ack"),
                _signed_ack(flagged[-1], address, now + timedelta(hours=2)),
            )
            await until(lambda: out.agent.clock_offset_s < -3000)
            await out.agent.capture(car("out", holder))
            await until(lambda: out.display.current == [HOLD_TEXT])
            await out.agent.capture(car("out", paying))
            await until(lambda: len(out.relay.openings) == 3)
            assert out.reasons() == ["server", "offline_exit", "offline_exit"]
        finally:
            await server.clear_retained([topics.topic(address, "config")])


def _listed(out: Lane) -> set[str]:
    """The plates on the whitelist a lane's gate agent holds now."""
    held = out.agent.whitelist.config
    return {entry.plate for entry in held.whitelist} if held else set()


async def test_a_gate_online_drops_an_unbound_plate_and_a_deleted_accounts_at_once(
    runtime: Runtime,
    settings: Settings,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    tmp_path: Path,
    clean_configs: None,
) -> None:
    """A plate unbound, or its account deleted, is off the whitelist of the gates of the car
    park where it is parked as soon as that commits: the lane service republishes that car
    park's lists when told (migration 0054), not only at its next round (an hour here; 60 s by
    default). Before, a gate kept letting the car out on pay-later offline until then, and the
    exit ended unpaid in the exception queue."""
    unbinding, deleting, staying = [await make_driver(runtime, unique_plate()) for _ in range(3)]
    for driver in (unbinding, deleting, staying):
        await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=1))
    assert await publish_configs(runtime.pool, runtime.mqtt, settings, SERVER_KEY) >= 2
    config = _config(tmp_path, lot.code, "out1", settings.mqtt_topic_prefix)
    async with lane(config) as out:
        everyone = {unbinding.plate, deleting.plate, staying.plate}
        await until(lambda: _listed(out) == everyone)
        unbinder = bearer(driver_token(app, unbinding.account_id))
        (binding,) = (await api.get("/api/v1/me/plates", headers=unbinder)).json()
        gone = await api.delete(f"/api/v1/me/plates/{binding['id']}", headers=unbinder)
        assert gone.status_code == 204, gone.text
        await until(lambda: _listed(out) == everyone - {unbinding.plate})
        deleted = await api.delete(
            "/api/v1/me", headers=bearer(driver_token(app, deleting.account_id))
        )
        assert deleted.status_code == 204, deleted.text
        await until(lambda: _listed(out) == {staying.plate})
        assert not out.agent.whitelist.allows(deleting.plate, "blue", datetime.now(UTC))


async def test_a_gate_online_drops_a_car_at_once_whatever_ends_its_pay_later(
    runtime: Runtime,
    settings: Settings,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    tmp_path: Path,
    clean_configs: None,
) -> None:
    """Not only a binding's end takes a parked car off its car park's whitelist at once
    (migration 0057): its driver cancelling pay-later, the company blacklisting the vehicle,
    the provider pausing the plate's service, the account blocked for arrears, the company
    cancelling a pass holder's pass. Before, each stayed on the gate's list up to the next round
    (an hour here; 60 s by default), and a gate whose link dropped meanwhile let the car out on
    pay-later, or free."""
    cancelling, blacklisted, paused, in_arrears, staying = [
        await make_driver(runtime, unique_plate()) for _ in range(5)
    ]
    admin = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
    pass_holder = unique_plate()
    spec = await api.post(
        "/api/v1/operator/right-specs",
        json={"name": f"pass-{pass_holder}", "kind": "free_passage"},
        headers=admin,
    )
    assert spec.status_code == 201, spec.text
    now = datetime.now(UTC)
    right = await api.post(
        "/api/v1/operator/rights",
        json={
            "spec_id": spec.json()["id"],
            "vehicles": [{"plate": pass_holder, "color": "blue"}],
            "valid_from": (now - timedelta(days=10)).isoformat(),
            "valid_until": (now + timedelta(days=20)).isoformat(),
        },
        headers=admin,
    )
    assert right.status_code == 201, right.text
    drivers = {d.plate for d in (cancelling, blacklisted, paused, in_arrears, staying)}
    everyone = drivers | {pass_holder}
    for plate in everyone:
        await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=1))
    assert await publish_configs(runtime.pool, runtime.mqtt, settings, SERVER_KEY) >= 2
    config = _config(tmp_path, lot.code, "out1", settings.mqtt_topic_prefix)
    async with lane(config) as out:
        await until(lambda: _listed(out) == everyone)
        revoked = await api.post(
            f"/api/v1/operator/rights/{right.json()['id']}/cancel", headers=admin
        )
        assert revoked.status_code == 200, revoked.text
        await until(lambda: _listed(out) == drivers)
        cancelled = await api.delete(
            "/api/v1/me/agreement", headers=bearer(driver_token(app, cancelling.account_id))
        )
        assert cancelled.status_code == 204, cancelled.text
        await until(lambda: _listed(out) == drivers - {cancelling.plate})
        added = await api.post(
            "/api/v1/operator/blacklist",
            json={"plate": blacklisted.plate, "color": "blue", "reason": "逃费"},
            headers=admin,
        )
        assert added.status_code == 201, added.text
        await until(lambda: _listed(out) == drivers - {cancelling.plate, blacklisted.plate})
        async with runtime.pool.acquire() as conn:
            assert await agreements.record_service_state(
                conn,
                "sandbox",
                paused.plate,
                "blue",
                "paused",
                datetime.now(UTC),
                about_agreement=False,
            )
            # As `billing.debts` blocks an account with an open debt.
            await conn.execute(
                "UPDATE accounts SET blocked_for_arrears = true WHERE id = $1",
                in_arrears.account_id,
            )
        await until(lambda: _listed(out) == {staying.plate})


async def test_a_plate_service_confirmed_paused_again_is_not_announced_again(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """Migration 0057 announces a parked car's car park when its plate's service stops being
    normal: the car leaves the offline whitelist. A word that it is still paused (the worker's
    daily sweep, an entry's registration, a retried notification) changes nobody's list; the
    first version announced it whenever the upsert set the state, changed or not, and each such
    word republished the whole car park's lists (review 31)."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate)
    heard: list[str] = []
    async with runtime.pool.acquire() as listener:
        await listener.add_listener("gate_whitelists", lambda *a: heard.append(a[3]))
        try:
            async with runtime.pool.acquire() as conn:
                at = datetime.now(UTC) - timedelta(minutes=10)
                await agreements.record_service_state(
                    conn, "sandbox", driver.plate, "blue", "paused", at, about_agreement=True
                )

                # Other car parks of this module's database may be announced meanwhile.
                async def announced() -> bool:
                    return str(lot.id) in heard

                await eventually(announced, timeout_s=5)
                heard.clear()
                await agreements.record_service_state(
                    conn,
                    "sandbox",
                    driver.plate,
                    "blue",
                    "paused",
                    at + timedelta(minutes=5),
                    about_agreement=True,
                )
            await asyncio.sleep(0.5)
        finally:
            await listener.reset()
    assert str(lot.id) not in heard, "a plate said paused again republished its car park's lists"


def test_the_gate_matches_a_whitelisted_plate_on_its_colour_too() -> None:
    lot, now = f"lot-{uuid.uuid4().hex[:8]}", datetime.now(UTC)
    both, lorry = unique_plate(), unique_plate()
    cars = [
        WhitelistedCar(both, "blue", 20_000),
        WhitelistedCar(both, "yellow", 5_000),
        WhitelistedCar(lorry, "yellow", 5_000),
    ]
    whitelist = OfflineWhitelist(SERVER_KEY.public_key(), lot)
    assert whitelist.offer(build_config(lot, cars, SERVER_KEY, issued_at=now), now) is None
    assert whitelist.allows(both, "blue", now) and whitelist.allows(both, "yellow", now)
    assert not whitelist.allows(both, "green", now)
    assert whitelist.allows(lorry, "yellow", now)
    assert not whitelist.allows(lorry, "blue", now), "another vehicle of the same characters"
    # A camera that reports no colour is matched on the characters alone.
    assert whitelist.allows(lorry, None, now)


async def test_forged_tampered_foreign_and_expired_whitelists_are_ignored(tmp_path: Path) -> None:
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    trusted, forged_plate = unique_plate(), unique_plate()
    address = GateAddress(lot, "out1")
    config_topic = Topics(prefix).topic(address, "config")
    now = datetime.now(UTC)

    def whitelist(*plates: str) -> list[WhitelistedCar]:
        return [WhitelistedCar(plate, "blue", 20_000) for plate in plates]

    valid = build_config(lot, whitelist(trusted), SERVER_KEY, issued_at=now)
    forged = build_config(
        lot, whitelist(trusted, forged_plate), generate_private_key(), issued_at=now
    )
    tampered = valid.model_copy(
        update={"whitelist": [*valid.whitelist, WhitelistEntry(plate=forged_plate, color="blue")]}
    )
    foreign = build_config("another-lot", whitelist(forged_plate), SERVER_KEY, issued_at=now)
    expired = build_config(
        lot,
        whitelist(forged_plate),
        SERVER_KEY,
        issued_at=now - timedelta(hours=25),
        valid_for=timedelta(hours=24),
    )
    unsigned = valid.model_copy(update={"signature": None})
    async with Listener() as server, lane(_config(tmp_path, lot, "out1", prefix)) as out:
        try:
            await server.mqtt.publish(config_topic, encode(valid), retain=True)
            await until(lambda: out.agent.whitelist.config)
            for config in (forged, tampered, foreign, expired, unsigned):
                await server.mqtt.publish(config_topic, encode(config), retain=True)
            await until(lambda: out.agent.config_refusals.total() == 5)
            assert out.agent.config_refusals == {
                "bad_signature": 2,
                "other_car_park": 1,
                "expired": 1,
                "unsigned": 1,
            }

            await out.camera.put(car("out", forged_plate))
            await until(lambda: out.display.shown)
            assert out.display.current == [HOLD_TEXT] and not out.relay.openings
            # A read the gate is not sure of does not open for a whitelisted plate.
            await out.camera.put(car("out", trusted, confidence=0.6))
            await out.camera.put(car("out", trusted))
            await until(lambda: len(out.display.shown) == 3)
            assert out.display.shown[1] == [HOLD_TEXT]
            assert out.reasons() == ["offline_exit"]
            # Once its time is up the list is as good as empty.
            assert not out.agent.whitelist.allows(
                trusted, "blue", now + timedelta(hours=24, seconds=1)
            )
        finally:
            await server.clear_retained([config_topic])


async def test_a_late_server_command_never_lifts_the_barrier_twice(tmp_path: Path) -> None:
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    address = GateAddress(lot, "out1")
    command_topic = Topics(prefix).topic(address, "command")

    def open_command(capture_id: uuid.UUID, **options: Any) -> bytes:
        return _open_command(capture_id, address, **options)

    async def handled(mark: str) -> None:
        """Until the gate has handled every command published before now: it handles them in
        order, and an operator's open of no capture shows its text when handled."""
        await server.mqtt.publish(
            command_topic, open_command(uuid.uuid4(), display=(mark,), remote=True)
        )
        await until(lambda: out.display.current == [mark])

    async with Listener() as server, lane(_config(tmp_path, lot, "out1", prefix)) as out:
        await out.camera.put(car("out", unique_plate()))
        await until(lambda: out.display.shown)
        ((_, first),) = out.agent.store.unacked()
        # The server was just slow: the car is still at the barrier, so its "open" lifts it,
        # once, however often it comes.
        for _ in range(2):
            await server.mqtt.publish(command_topic, open_command(first))
        await handled("标记一")
        assert out.reasons() == ["server_late", "remote"]

        # Two more cars held offline: an "open" for the first of them comes after the next car
        # was captured (the first went through the booth) and is ignored, as is an expired one.
        await out.camera.put(car("out", unique_plate()))
        await out.camera.put(car("out", unique_plate()))
        # Shown so far: the first hold, the late open's text, the mark, and now two holds.
        await until(lambda: len(out.display.shown) == 5)
        (_, second), (_, third) = out.agent.store.unacked()[1:]
        await server.mqtt.publish(command_topic, open_command(second))
        await server.mqtt.publish(command_topic, open_command(third, ttl=timedelta(seconds=-1)))
        # An operator's open of no capture of ours lifts it once, even when delivered twice.
        remote = uuid.uuid4()
        await server.mqtt.publish(command_topic, open_command(remote, remote=True))
        await server.mqtt.publish(command_topic, open_command(remote, remote=True))
        # An answer to a capture this gate never took (another broker client's, in its name)
        # lifts nothing, though the server signed it.
        await server.mqtt.publish(command_topic, open_command(uuid.uuid4()))
        await handled("标记二")
        # The slow server's, the first mark's, the operator's (once), the second mark's.
        assert out.reasons() == ["server_late", "remote", "remote", "remote"]


async def test_a_payment_booked_after_the_booths_button_let_the_held_car_out_lifts_nothing(
    runtime: Runtime,
    settings: Settings,
    gate: GateProbe,
    lot: Lot,
    api: httpx.AsyncClient,
    provider: ProviderEndpoint,
    tmp_path: Path,
) -> None:
    """Review 20. A held car is let out with the booth's button ("will pay by phone"); the
    driver pays by QR before the next car is captured. The server sends the open for the held
    capture, which is still the gate's newest: the barrier lifted a second time, for nobody or
    for the car pulling up. A lift by hand lets out the car first in the lane: its capture
    counts as opened."""
    plate = unique_plate()
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    config = _config(tmp_path, lot.code, "out1", settings.mqtt_topic_prefix, offline_after_s=5.0)
    async with lane(config) as out:
        await out.camera.put(car("out", plate))
        await until(lambda: out.display.current and out.display.current[0] == plate)
        await out.agent.manual_open("driver left, paying by phone")
        held = await _exit_capture_of(runtime, lot, plate)
        qr_url = gate.commands[str(held)][0]["payment_qr_url"]
        await _pay_by_qr(api, provider, qr_url)
        await until(lambda: len(gate.commands[str(held)]) >= 2)  # the paid open went out
        address = GateAddress(lot.code, "out1")
        marker = _open_command(uuid.uuid4(), address, display=("marker",), remote=True)
        await gate.mqtt.publish(runtime.lanes.topics.topic(address, "command"), marker)
        await until(lambda: out.display.current == ["marker"])  # handled in order
        assert out.reasons() == ["manual", "remote"], out.reasons()


async def test_an_open_the_server_signed_for_a_capture_published_in_the_gates_name_lifts_nothing(
    runtime: Runtime,
    settings: Settings,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    tmp_path: Path,
) -> None:
    """Review 20. A car is held at the exit (unbound, a fee to pay). Another client of the broker
    (a shared login, no ACLs) publishes a capture in the exit's name: a fresh id, the plate of a
    pay-later driver parked inside. The lane answers it with an "open" signed for this gate. The
    agent took any signed open for an id it had no record of as an operator's, and the held car
    drove out. Now only an open the server marks as an operator's (`remote`) lifts without a
    capture of the gate's own."""
    victim = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, victim.plate, parked_for=timedelta(hours=1))
    held = unique_plate()
    await enter(runtime, gate, lot, held, parked_for=timedelta(hours=1))
    config = _config(tmp_path, lot.code, "out1", settings.mqtt_topic_prefix, offline_after_s=5.0)
    async with lane(config) as out:
        await out.camera.put(car("out", held))
        await until(lambda: out.display.current and out.display.current[0] == held)
        assert out.reasons() == []

        forged = gate.capture("out", victim.plate)
        await gate.send(lot.code, "out1", forged)
        await gate.wait_for(forged, commands=0, acks=1)  # the lane signed an "open" for it
        # An operator's open, for nobody in particular, after it: handled in order.
        staff = await make_staff(runtime, lot.operator_id)
        opened = await api.post(
            f"/api/v1/operator/car-parks/{lot.code}/gates/out1/open",
            headers=bearer(staff_token(app, staff)),
            json={"reason": "driver at the intercom"},
        )
        assert opened.status_code == 200, opened.text
        await until(lambda: out.display.current == [MANUAL_OPEN_DISPLAY])
        assert out.reasons() == ["remote"], out.reasons()


async def test_a_late_open_for_a_server_held_car_does_not_lift_the_barrier_for_the_next_car(
    runtime: Runtime, settings: Settings, gate: GateProbe, lot: Lot, tmp_path: Path
) -> None:
    """Car A is held by the server (unbound, QR shown). The attendant lets it out by hand, car B
    comes up and is held in its turn; then A's payment is booked and its open comes. A is no
    longer first at the barrier: the open, though the server decided A's hold, lifts nothing."""
    first, second = unique_plate(), unique_plate()
    for plate in (first, second):  # neither is bound: both are held with a fee and a QR code
        await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=1))
    config = _config(tmp_path, lot.code, "out1", settings.mqtt_topic_prefix, offline_after_s=5.0)
    async with lane(config) as out:
        await out.camera.put(car("out", first))
        await until(lambda: out.display.current and out.display.current[0] == first)
        await out.agent.manual_open("driver left, paying by phone")
        await out.camera.put(car("out", second))
        await until(lambda: out.display.current and out.display.current[0] == second)
        assert out.reasons() == ["manual"]
        first_capture = await _exit_capture_of(runtime, lot, first)
        # A's payment is booked now: its open, signed for this gate, as the server sends it.
        address = GateAddress(lot.code, "out1")
        topic = runtime.lanes.topics.topic(address, "command")
        await gate.mqtt.publish(topic, _open_command(first_capture, address))
        marker = _open_command(uuid.uuid4(), address, display=("marker",), remote=True)
        await gate.mqtt.publish(topic, marker)
        await until(lambda: out.display.current == ["marker"])
        assert out.reasons() == ["manual", "remote"], (
            "the first car's late open lifted the barrier for the second, held, car: "
            f"{out.reasons()}"
        )


async def test_a_restarted_agent_resends_its_unacked_captures_in_seq_order(tmp_path: Path) -> None:
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    address = GateAddress(lot, "out1")
    config = _config(tmp_path, lot, "out1", prefix)
    trusted = unique_plate()
    async with Listener() as server:
        try:
            whitelist = [WhitelistedCar(trusted, "blue", 20_000)]
            valid = build_config(lot, whitelist, SERVER_KEY, issued_at=datetime.now(UTC))
            await server.mqtt.publish(topics.topic(address, "config"), encode(valid), retain=True)
            async with lane(config) as first:
                await until(lambda: first.agent.whitelist.config)
                for _ in range(3):
                    await first.camera.put(car("out", unique_plate()))
                await until(lambda: len(first.display.shown) == 3)
                sent = first.agent.store.unacked()

            await server.listen(topics.topic(address, "capture"))
            async with lane(config) as second:
                capture_topic = topics.topic(address, "capture")
                await until(lambda: len(server.payloads(capture_topic)) >= 3)
                resent = server.payloads(capture_topic)[:3]
                assert [(c["seq"], c["capture_id"]) for c in resent] == [
                    (seq, str(capture_id)) for seq, capture_id in sent
                ]
                assert all(c["offline"] and c["offline_action"] == "hold" for c in resent)
                later = await second.agent.capture(car("out", unique_plate()))
                assert later.seq == 4
                assert second.agent.store.length() == 4

            # Restarted where the broker cannot be reached: the whitelist kept on disk still
            # lets the bound car out, at once.
            unreachable = config.model_copy(update={"mqtt_url": "mqtt://127.0.0.1:9"})
            async with lane(unreachable, reachable=False) as third:
                await third.camera.put(car("out", trusted))
                await until(lambda: third.relay.openings)
                assert third.reasons() == ["offline_exit"]
                assert third.agent.store.length() == 5
        finally:
            await server.clear_retained(
                [topics.topic(address, "config"), topics.topic(address, "status")]
            )


async def test_status_is_online_and_the_last_will_says_offline_when_the_agent_dies(
    tmp_path: Path,
) -> None:
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    status_topic = Topics(prefix).topic(GateAddress(lot, "in1"), "status")
    folder = tmp_path / "camera"
    folder.mkdir()
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        f"""
lot = "{lot}"
gate = "in1"
direction = "in"
server_public_key = "{public_key_text(SERVER_KEY)}"
outbox_path = "{tmp_path / "outbox.sqlite3"}"
mqtt_url = "{MQTT_URL}"
topic_prefix = "{prefix}"
heartbeat_s = 0.3
firmware = "relay-sim 1.0"

[camera]
kind = "folder"
path = "{folder}"
""",
        encoding="utf-8",
    )
    async with Listener() as watcher:
        await watcher.listen(status_topic)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gate_controller.agent",
            "--config",
            str(config_file),
            cwd=Path(__file__).parent.parent,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            online = await until(lambda: watcher.payloads(status_topic), timeout_s=15.0)
            assert online[-1]["state"] == "online"
            assert online[-1]["firmware"] == "relay-sim 1.0"
            assert online[-1]["outbox_length"] == 0

            # A camera drops a read into the folder: it is captured, and kept (no server).
            (folder / "0001.jpg").write_bytes(JPEG)
            (folder / "0001.json").write_text(
                orjson.dumps({"plate": unique_plate(), "confidence": 0.95}).decode()
            )
            await until(lambda: (folder / "done" / "0001.json").exists())
            assert (folder / "done" / "0001.jpg").exists()
            await until(lambda: watcher.payloads(status_topic)[-1]["outbox_length"] == 1)

            os.kill(process.pid, signal.SIGKILL)
            await process.wait()
            last = await until(
                lambda: [s for s in watcher.payloads(status_topic) if s["state"] == "offline"]
            )
            assert last[-1]["state"] == "offline"
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await watcher.clear_retained([status_topic])


async def test_folder_camera_rejects_what_is_not_a_report(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"plate": "浙A12345", "color": "blue", "confidence": 0.9}')
    (tmp_path / "a.jpg").write_bytes(JPEG)
    (tmp_path / "b.json").write_text('{"color": "blue"}')
    (tmp_path / "c.json").write_text('{"plate": "浙A12346", "direction": "in"}')
    camera = FolderCameraSource(tmp_path, "in", settle_s=0.0)
    events = camera.events()
    first = await anext(events)
    second = await anext(events)
    assert (first.plate, first.direction, first.image_jpeg) == ("浙A12345", "in", JPEG)
    assert (second.plate, second.direction, second.image_jpeg) == ("浙A12346", "in", None)
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["a.jpg", "a.json"]
    assert [p.name for p in (tmp_path / "rejected").iterdir()] == ["b.json"]
    await events.aclose()


def test_config_keys_round_trip_and_signatures_cover_the_expiry() -> None:
    key = load_private_key(private_key_pem(SERVER_KEY))
    assert public_key_text(key) == public_key_text(SERVER_KEY)
    now = datetime.now(UTC)
    config = build_config("lot-a", [WhitelistedCar("浙A12345", "blue", 100)], key, issued_at=now)
    parsed = GateConfig.model_validate_json(encode(config))
    assert parsed.signed_bytes() == config.signed_bytes()
    prolonged = parsed.model_copy(update={"whitelist_expires_at": now + timedelta(days=30)})
    assert prolonged.signed_bytes() != parsed.signed_bytes()
    assert signed(prolonged, key).signature != parsed.signature
    with pytest.raises(ValueError):
        load_private_key("not a key")


async def test_an_exit_gate_never_takes_a_reports_word_that_a_car_is_coming_in(
    tmp_path: Path,
) -> None:
    """Offline, an entry always opens: a report at an exit-only gate saying `direction: in`
    must not turn the gate into an entry (the server would later dead-letter the upload, so
    nothing would record the opening)."""
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    config = _config(tmp_path, lot, "out1", prefix, mqtt_url="mqtt://127.0.0.1:9")
    async with lane(config, reachable=False) as out:
        await out.camera.put(car("in", unique_plate()))
        await until(lambda: out.display.shown)
        assert out.display.current == [HOLD_TEXT] and not out.relay.openings
        ((_, capture_id),) = out.agent.store.unacked()
        assert out.agent.store.record(capture_id) is not None

    # The camera inputs refuse such a report outright: it is not this gate's kind of pass.
    folder = tmp_path / "camera"
    folder.mkdir()
    (folder / "a.json").write_text('{"plate": "浙A12345", "direction": "in", "confidence": 0.9}')
    camera = FolderCameraSource(folder, "out", settle_s=0.0, poll_s=0.01)
    events = camera.events()
    reading = asyncio.ensure_future(anext(events))
    await until(lambda: (folder / "rejected" / "a.json").exists())
    assert not reading.done()
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    await events.aclose()
    async with (
        HttpCameraSource(
            "127.0.0.1",
            0,
            "out",
            key=CAMERA_KEY.encode(),
            allowed_addresses=["127.0.0.1"],
            outbox_path=tmp_path / "camera.sqlite3",
        ) as http_camera,
        httpx.AsyncClient(base_url=http_camera.url) as http,
    ):
        for direction in ("in", "IN", "both"):
            raw, headers = _signed_post(
                {"plate": "浙A12345", "confidence": 0.99, "direction": direction}
            )
            answer = await http.post("/events", content=raw, headers=headers)
            assert answer.status_code == 422, (direction, answer.text)


async def test_only_the_gates_own_camera_can_report_a_car(tmp_path: Path) -> None:
    """Anyone who could reach `POST /events` could report a parked driver's plate at the exit:
    their stay closed and charged, the barrier lifted for whoever stood there. Only a report
    signed with the camera's key, fresh, never seen before, from an allowed address counts."""
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    trusted = unique_plate()
    config = _config(tmp_path, lot, "out1", prefix, mqtt_url="mqtt://127.0.0.1:9")
    whitelist = [WhitelistedCar(trusted, "blue", 20_000)]
    relay, display = SimulatedRelay(), SimulatedDisplay()
    report = {"plate": trusted, "color": "blue", "confidence": 0.99}
    async with (
        HttpCameraSource(
            "127.0.0.1",
            0,
            "out",
            key=CAMERA_KEY.encode(),
            allowed_addresses=["127.0.0.1/32"],
            outbox_path=config.outbox_path,
        ) as camera,
        GateAgent(config, camera, relay, display) as agent,
        httpx.AsyncClient(base_url=camera.url) as http,
    ):
        agent.whitelist.offer(
            build_config(lot, whitelist, SERVER_KEY, issued_at=datetime.now(UTC)),
            datetime.now(UTC),
        )
        raw, headers = _signed_post(report)
        forged_key = _signed_post(report, key="another-key-" + "x" * 32)
        stale = _signed_post(report, at=time.time() - 600)
        future = _signed_post(report, at=time.time() + 600)
        tampered = (orjson.dumps(report | {"confidence": 1.0}), headers)
        for body, sent_headers in (
            (raw, {}),
            (raw, {"X-Camera-Timestamp": headers["X-Camera-Timestamp"]}),
            forged_key,
            stale,
            future,
            tampered,
        ):
            response = await http.post("/events", content=body, headers=sent_headers)
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "unauthenticated"
        assert agent.store.length() == 0 and not relay.openings

        # The genuine report is taken once; the same bytes again are a replay.
        assert (await http.post("/events", content=raw, headers=headers)).status_code == 202
        replayed = await http.post("/events", content=raw, headers=headers)
        assert replayed.status_code == 401 and agent.store.length() == 1
        await until(lambda: relay.openings)
        assert [o.reason for o in relay.openings] == ["offline_exit"]

        # A camera's clock cannot date a pass in the future (or far in the past): the agent's
        # own clock bounds it.
        before = datetime.now(UTC)
        late = report | {"captured_at": (before + timedelta(days=1)).isoformat()}
        raw, headers = _signed_post(late)
        assert (await http.post("/events", content=raw, headers=headers)).status_code == 202
        old = report | {"captured_at": (before - timedelta(days=2)).isoformat()}
        raw, headers = _signed_post(old)
        assert (await http.post("/events", content=raw, headers=headers)).status_code == 202
        await until(lambda: agent.store.length() == 3)
        payloads = [
            Capture.model_validate_json(payload) for _, payload in agent.store.due(time.time() + 60)
        ]
        assert payloads and all(
            before - timedelta(minutes=2) <= c.captured_at <= datetime.now(UTC) for c in payloads
        )

    # An agent configured for an HTTP camera without its key and addresses does not start.
    for camera_section in (
        {"kind": "http"},
        {"kind": "http", "key": CAMERA_KEY},
        {"kind": "http", "key": "short", "allowed_addresses": ["127.0.0.1"]},
    ):
        with pytest.raises(ValidationError):
            _config(tmp_path, lot, "out1", prefix, camera=camera_section)

    # From an address not on the list, even a signed report is refused.
    async with (
        HttpCameraSource(
            "127.0.0.1",
            0,
            "out",
            key=CAMERA_KEY.encode(),
            allowed_addresses=["10.1.2.3"],
            outbox_path=tmp_path / "camera.sqlite3",
        ) as camera,
        httpx.AsyncClient(base_url=camera.url) as http,
    ):
        raw, headers = _signed_post(report)
        response = await http.post("/events", content=raw, headers=headers)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "forbidden"


async def test_a_forwarded_for_header_does_not_pass_the_camera_address_list(
    tmp_path: Path,
) -> None:
    """Only 10.1.2.3 (the camera) may report; a client on the agent's own host claims to be it
    with X-Forwarded-For. Without the camera's key it still learns whether the address check
    passed (401 instead of 403)."""
    report = {"plate": "浙A12345", "color": "blue", "confidence": 0.99}
    async with (
        HttpCameraSource(
            "127.0.0.1",
            0,
            "out",
            key=CAMERA_KEY.encode(),
            allowed_addresses=["10.1.2.3"],
            outbox_path=tmp_path / "camera.sqlite3",
        ) as camera,
        httpx.AsyncClient(base_url=camera.url) as http,
    ):
        direct = await http.post("/events", json=report)
        spoofed = await http.post("/events", json=report, headers={"X-Forwarded-For": "10.1.2.3"})
    assert direct.status_code == 403
    assert spoofed.status_code == 403, spoofed.text


async def test_a_camera_report_replayed_to_a_restarted_agent_is_refused(tmp_path: Path) -> None:
    """The agent restarts (an update, a power cut) within a signed report's 30 s: the same
    bytes again must still be a replay, so the signatures taken are kept in its outbox."""
    raw, headers = _signed_post({"plate": "浙A12345", "color": "blue", "confidence": 0.99})
    taken: list[CameraEvent] = []
    answers = []
    for _run in range(2):
        async with HttpCameraSource(
            "127.0.0.1",
            0,
            "out",
            key=CAMERA_KEY.encode(),
            allowed_addresses=["127.0.0.1"],
            outbox_path=tmp_path / "outbox.sqlite3",
        ) as camera:

            async def consume(source: HttpCameraSource = camera) -> None:
                async for event in source.events():
                    taken.append(event)

            consuming = asyncio.create_task(consume())
            async with httpx.AsyncClient(base_url=camera.url) as http:
                answers.append((await http.post("/events", content=raw, headers=headers)).text)
            consuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consuming
    assert '"accepted"' in answers[0] and "replayed" in answers[1], answers
    assert len(taken) == 1


def test_the_outbox_keeps_a_used_signature_until_it_expires(tmp_path: Path) -> None:
    """Within its time a key is used once, also through a reopened store; past it the row goes
    (the message's own time check refuses it then), so the table stays small. Each kind's keys
    go by its own clock: a camera report's `now` forgets no remote open's key."""
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    assert outbox.use_once("camera_signature", "abc", expires_at=100.0, now=50.0)
    assert outbox.use_once("remote_open", "abc", expires_at=100.0, now=50.0)
    outbox.close()
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    assert not outbox.use_once("camera_signature", "abc", expires_at=100.0, now=99.0)
    assert outbox.use_once("camera_signature", "def", expires_at=300.0, now=101.0)
    assert not outbox.use_once("remote_open", "abc", expires_at=100.0, now=99.0)
    assert outbox.use_once("remote_open", "ghi", expires_at=300.0, now=101.0)
    kept = outbox._db.execute("SELECT kind, key FROM used_once ORDER BY kind, key").fetchall()
    outbox.close()
    assert kept == [("camera_signature", "def"), ("remote_open", "ghi")]


async def test_an_unsigned_oversized_camera_body_is_refused_before_it_is_read(
    tmp_path: Path,
) -> None:
    """From an allowed address but without the key: 64 MiB, declared or chunked. No report
    with an allowed image is over ~350 KiB, so the input stops reading long before the end
    (before it could check a signature over the whole body)."""
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while pulled < 64 * 1024 * 1024:
            pulled += 64 * 1024
            yield b"x" * (64 * 1024)

    async with HttpCameraSource(
        "127.0.0.1",
        0,
        "out",
        key=CAMERA_KEY.encode(),
        allowed_addresses=["127.0.0.1"],
        outbox_path=tmp_path / "camera.sqlite3",
    ) as camera:
        transport = httpx.ASGITransport(app=camera.app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as http:
            chunked = await http.post("/events", content=endless())
            assert chunked.status_code == 413 and pulled <= 1024 * 1024, pulled
            pulled = 0
            declared = await http.post(
                "/events",
                content=endless(),
                headers={"Content-Length": str(64 * 1024 * 1024)},
            )
            assert declared.status_code == 413 and pulled <= 64 * 1024, pulled


async def test_a_gate_acts_only_on_commands_the_server_signed_for_it(tmp_path: Path) -> None:
    """Whoever can publish on a gate's command topic (the shared lane login, a broker without
    ACLs) could lift its barrier. The gate now lifts only for a command the server signed for
    this gate and this capture, before it expires."""
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    address = GateAddress(lot, "out1")
    topic = Topics(prefix).topic(address, "command")
    now = datetime.now(UTC)

    def command(action: str = "open", display: str = "开") -> Command:
        return Command(
            capture_id=uuid.uuid4(),
            action=action,  # type: ignore[arg-type]
            display=[display],
            issued_at=now,
            expires_at=now + timedelta(seconds=30),
        )

    held = sign_command(command("hold"), address, SERVER_KEY)
    refused = [
        encode(command()),  # unsigned, as every command was before
        encode(sign_command(command(), address, generate_private_key())),
        encode(held.model_copy(update={"action": "open"})),  # a signed hold made an open
        encode(sign_command(command(), GateAddress(lot, "out2"), SERVER_KEY)),
        encode(sign_command(command(), GateAddress("another-lot", "out1"), SERVER_KEY)),
        _open_command(uuid.uuid4(), address, ttl=timedelta(seconds=-1), remote=True),
    ]
    async with Listener() as anyone, lane(_config(tmp_path, lot, "out1", prefix)) as out:
        for payload in refused:
            await anyone.mqtt.publish(topic, payload)
        # Handled in order: once the genuine one has lifted the barrier, all were seen.
        await anyone.mqtt.publish(
            topic, _open_command(uuid.uuid4(), address, display=("真",), remote=True)
        )
        await until(lambda: out.display.current == ["真"])
        assert out.reasons() == ["remote"]
        assert out.agent.command_refusals == {
            "unsigned": 1,
            "bad_signature": 2,
            "other_gate": 2,
            "expired": 1,
        }


async def test_a_signed_remote_open_replayed_after_a_restart_lifts_nothing(
    tmp_path: Path,
) -> None:
    """An operator's remote open (no capture of the gate's) captured off the wire and published
    again within its 30 s: once to the running gate, once after the gate restarted. The opens
    acted on are kept in the outbox until they expire."""
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    address = GateAddress(lot, "out1")
    topic = Topics(prefix).topic(address, "command")
    captured = _open_command(uuid.uuid4(), address, display=("一",), remote=True)
    marker = _open_command(uuid.uuid4(), address, display=("二",), remote=True)
    config = _config(tmp_path, lot, "out1", prefix)
    async with Listener() as anyone:
        async with lane(config) as out:
            await anyone.mqtt.publish(topic, captured)
            await anyone.mqtt.publish(topic, captured)
            await anyone.mqtt.publish(topic, marker)
            await until(lambda: out.display.current == ["二"])
            assert out.reasons() == ["remote", "remote"]
        marker = _open_command(uuid.uuid4(), address, display=("三",), remote=True)
        async with lane(config) as restarted:
            await anyone.mqtt.publish(topic, captured)
            await anyone.mqtt.publish(topic, marker)
            await until(lambda: restarted.display.current == ["三"])
            assert restarted.reasons() == ["remote"], "the replayed open lifted the barrier again"


def _signed_ack(
    payload: bytes,
    address: GateAddress,
    received_at: datetime,
    *,
    key: Ed25519PrivateKey = SERVER_KEY,
) -> bytes:
    """The server's ack of the capture the gate published as `payload`, as the lane sends it:
    signed for the gate, bound to that very message, stamped with the server's time."""
    capture_id = uuid.UUID(orjson.loads(payload)["capture_id"])
    ack = Ack(
        capture_id=capture_id,
        received_at=received_at,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
    )
    return encode(sign_command(ack, address, key))


def _fast_clock(by: timedelta) -> type[datetime]:
    """The agent's `datetime` with the gate's wall clock `by` fast."""

    class Fast(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> "datetime":  # type: ignore[override]
            return datetime.now(tz) + by

    return Fast


async def test_a_gate_clock_a_minute_fast_follows_the_servers_fresh_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 16 #3. The server takes gate clocks up to `gate_clock_tolerance_s` (300 s)
    wrong; the gate took its own clock as exact against a command's 30 s `expires_at`, so a
    gate clock 60 s fast refused every command the server signed the moment it was sent
    ("expired"): every car waited `offline_after_s` and was decided offline, and a driver who
    paid by QR at the barrier stayed at a closed barrier. The gate now judges expiry by the
    server's time, learned from its signed answers to a capture it has just sent: the very
    first car's command (its `issued_at`), then each ack. The replay guards still hold."""
    monkeypatch.setattr(agent_module, "datetime", _fast_clock(timedelta(minutes=1)))
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    address = GateAddress(lot, "out1")
    topics = Topics(prefix)
    captures, commands = topics.topic(address, "capture"), topics.topic(address, "command")
    config = _config(tmp_path, lot, "out1", prefix, offline_after_s=5.0)
    async with Listener() as server, lane(config) as out:
        await server.listen(captures)
        first = await out.agent.capture(car("out", unique_plate()))
        await server.mqtt.publish(commands, _open_command(first.capture_id, address))
        await until(lambda: out.relay.openings)
        assert out.reasons() == ["server"], dict(out.agent.command_refusals)
        assert out.agent.clock_offset_s == pytest.approx(-60, abs=2)
        (sent,) = await until(lambda: [m.payload for m in server.messages])
        await server.mqtt.publish(
            topics.topic(address, "ack"), _signed_ack(sent, address, datetime.now(UTC))
        )
        await until(lambda: out.agent.store.length() == 0)
        assert out.agent.clock_offset_s == pytest.approx(-60, abs=2)

        second = await out.agent.capture(car("out", unique_plate()))
        await server.mqtt.publish(commands, _open_command(second.capture_id, address))
        await until(lambda: len(out.relay.openings) == 2)
        assert out.reasons() == ["server", "server"], dict(out.agent.command_refusals)
        # An operator's open of no capture of ours, delivered twice, lifts once; a command
        # expired by the server's clock (still "fresh" by the fast gate's) lifts nothing.
        remote = _open_command(uuid.uuid4(), address, display=("远程",), remote=True)
        await server.mqtt.publish(commands, remote)
        await server.mqtt.publish(commands, remote)
        stale = _open_command(uuid.uuid4(), address, ttl=timedelta(seconds=-1), remote=True)
        await server.mqtt.publish(commands, stale)
        await server.mqtt.publish(
            commands, _open_command(uuid.uuid4(), address, display=("标",), remote=True)
        )
        await until(lambda: out.display.current == ["标"])
        assert out.reasons() == ["server", "server", "remote", "remote"]
        assert out.agent.command_refusals == {"expired": 1}


class _SteppedClock:
    """The agent's `time` module after its wall clock was stepped an hour forward (a bad NTP
    answer, an RTC reset): time.time() jumps, the monotonic clock does not."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def time() -> float:
        return time.time() + 3600


async def test_a_remote_open_replayed_after_the_gate_clock_stepped_forward_lifts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate learnt the server's time from a signed ack (offset 0) and follows an operator's
    remote open. Its wall clock is then stepped an hour forward. The open, captured off the wire
    and published again within its 30 s, is still fresh by the server's time as reckoned (the
    monotonic clock); its replay key is too, forgotten only once both clocks say it expired.
    Before, the key was forgotten by the stepped wall clock, and the replay lifted again."""
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    address = GateAddress(lot, "out1")
    topics = Topics(prefix)
    commands = topics.topic(address, "command")
    config = _config(tmp_path, lot, "out1", prefix, offline_after_s=5.0)
    async with Listener() as server, lane(config) as out:
        await server.listen(topics.topic(address, "capture"))
        await out.agent.capture(car("out", unique_plate()))
        (sent,) = await until(lambda: [m.payload for m in server.messages])
        await server.mqtt.publish(
            topics.topic(address, "ack"), _signed_ack(sent, address, datetime.now(UTC))
        )
        await until(lambda: out.agent.store.length() == 0)
        assert out.agent.clock_offset_s == pytest.approx(0, abs=2)

        remote = _open_command(uuid.uuid4(), address, display=("远程",), remote=True)
        await server.mqtt.publish(commands, remote)
        await until(lambda: out.relay.openings)
        assert out.reasons() == ["remote"]

        monkeypatch.setattr(agent_module, "time", _SteppedClock())
        monkeypatch.setattr(agent_module, "datetime", _fast_clock(timedelta(hours=1)))
        await server.mqtt.publish(commands, remote)  # the replay
        await server.mqtt.publish(
            commands, _open_command(uuid.uuid4(), address, display=("标",), remote=True)
        )
        await until(lambda: out.display.current == ["标"])
        assert out.reasons() == ["remote", "remote"], (
            "the replayed remote open lifted the barrier again after the gate's clock stepped"
        )


async def test_only_a_signed_ack_that_came_back_at_once_tells_the_gate_the_servers_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forged ack is refused before its time is looked at; a signed one that came back long
    after the capture it answers was written (a resend answered late, a backlog, a message held
    up on the way: its `received_at` is old on arrival) still acks the capture but teaches
    nothing, since a time taken from it would make expired commands look fresh. Only an ack
    that came back at once moves the gate's reckoning of the server's time."""
    monkeypatch.setattr(agent_module, "_CLOCK_ACK_MAX_ROUND_TRIP_S", 1.0)
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    address = GateAddress(lot, "out1")
    topics = Topics(prefix)
    acks = topics.topic(address, "ack")
    config = _config(tmp_path, lot, "out1", prefix, offline_after_s=10.0)
    async with Listener() as server, lane(config) as out:
        await server.listen(topics.topic(address, "capture"))
        await out.agent.capture(car("out", unique_plate()))
        (sent,) = await until(lambda: [m.payload for m in server.messages])
        an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
        forger = generate_private_key()
        await server.mqtt.publish(acks, _signed_ack(sent, address, an_hour_ago, key=forger))
        await until(lambda: out.agent.ack_refusals)
        assert out.agent.ack_refusals == {"bad_signature": 1}
        assert (out.agent.clock_offset_s, out.agent.store.length()) == (0.0, 1)

        await asyncio.sleep(1.2)  # the server's answer comes back late
        await server.mqtt.publish(acks, _signed_ack(sent, address, an_hour_ago))
        await until(lambda: out.agent.store.length() == 0)
        assert out.agent.clock_offset_s == 0.0, "a late ack's old time was taken as the server's"

        server.messages.clear()
        await out.agent.capture(car("out", unique_plate()))
        (sent,) = await until(lambda: [m.payload for m in server.messages])
        ahead = datetime.now(UTC) + timedelta(minutes=2)
        await server.mqtt.publish(acks, _signed_ack(sent, address, ahead))
        await until(lambda: out.agent.store.length() == 0)
        assert out.agent.clock_offset_s == pytest.approx(120, abs=2)


async def test_a_paid_held_car_gets_out_after_the_agent_restarted_at_a_gate_a_minute_fast(
    runtime: Runtime,
    settings: Settings,
    gate: GateProbe,
    lot: Lot,
    api: httpx.AsyncClient,
    app: FastAPI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review 20 #2. The gate's clock is 60 s fast (within the 300 s the server tolerates). A
    car is held by the server at the exit; while it waits the agent restarts. The driver pays
    the attendant in cash and the booth's open comes at once. The restarted agent had learnt no
    server time in this run (only answers to captures written in it teach), judged the open
    by its own fast clock and refused it as expired: the driver who paid stayed behind a closed
    barrier. The offset learnt before the restart is carried over (a fast clock's only)."""
    monkeypatch.setattr(agent_module, "datetime", _fast_clock(timedelta(minutes=1)))
    plate = unique_plate()
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    config = _config(tmp_path, lot.code, "out1", settings.mqtt_topic_prefix, offline_after_s=5.0)
    async with lane(config) as out:
        await out.camera.put(car("out", plate))
        await until(lambda: out.display.current and out.display.current[0] == plate)
        await until(lambda: out.agent.store.length() == 0)
        assert out.reasons() == [], "held by the server"
        assert out.agent.clock_offset_s == pytest.approx(-60, abs=2)
    held = await _exit_capture_of(runtime, lot, plate)
    fee = gate.commands[str(held)][0]["fee_fen"]

    async with lane(config) as restarted:  # the car is still first at the barrier
        assert restarted.agent.clock_offset_s == pytest.approx(-60, abs=2)
        headers = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))
        paid = await api.post(
            f"/api/v1/operator/car-parks/{lot.code}/booth-payments",
            json={"capture_id": str(held), "method": "cash", "amount_fen": fee},
            headers=headers,
        )
        assert paid.status_code == 201, paid.text
        assert paid.json()["gate_opened"] is True
        await until(
            lambda: restarted.relay.openings or restarted.agent.command_refusals, timeout_s=10
        )
        assert restarted.reasons() == ["server_late"], (
            "the booth's open for the paid car was refused by the restarted agent: "
            f"{dict(restarted.agent.command_refusals)}"
        )


async def test_an_old_signed_open_lifts_nothing_at_a_gate_started_with_its_clock_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 20 #3. An operator's remote open, signed while the gate's agent was down, kept by
    an attacker. The agent starts with its clock 10 minutes behind: the open, expired 90 s ago
    by the server's clock, was fresh by the gate's, and lifted the barrier. Yet the gate held
    the server's signed config, issued just now: a signed server time the gate has verified
    is a floor for the server's time, and the expiry is judged against it."""
    monkeypatch.setattr(agent_module, "datetime", _fast_clock(-timedelta(minutes=10)))
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    address = GateAddress(lot, "out1")
    topics = Topics(prefix)
    recorded = _open_command(
        uuid.uuid4(), address, age=timedelta(seconds=120), display=("远程开闸",), remote=True
    )
    config_topic = topics.topic(address, "config")
    async with Listener() as anyone:
        # The server's periodic config for the car park, signed and retained just now.
        config = build_config(lot, [], SERVER_KEY, issued_at=datetime.now(UTC))
        await anyone.mqtt.publish(config_topic, encode(config), retain=True)
        try:
            async with lane(_config(tmp_path, lot, "out1", prefix)) as out:
                await until(lambda: out.agent.whitelist.config is not None)
                await anyone.mqtt.publish(topics.topic(address, "command"), recorded)
                await until(lambda: out.relay.openings or out.agent.command_refusals)
                assert out.reasons() == [], (
                    "an open that expired 90 s before the server signed the config the gate "
                    "holds lifted the barrier"
                )
                assert out.agent.command_refusals == {"expired": 1}
        finally:
            await anyone.clear_retained([config_topic])


async def test_an_old_signed_open_lifts_nothing_after_a_reboot_with_the_gate_clock_at_the_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate followed an operator's open, so it had verified the server's time then. It
    reboots with its clock reset to the epoch, and no config reaches it yet. An open that
    expired 90 s ago is published to it: the floor of the server's time, kept on disk, is
    still a time the server has passed, and the open is refused (by the epoch clock every old
    signed open would be fresh)."""
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    address = GateAddress(lot, "out1")
    commands = Topics(prefix).topic(address, "command")
    config = _config(tmp_path, lot, "out1", prefix)
    async with Listener() as anyone:
        async with lane(config) as out:
            await anyone.mqtt.publish(commands, _open_command(uuid.uuid4(), address, remote=True))
            await until(lambda: out.relay.openings)

        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        monkeypatch.setattr(agent_module, "datetime", _fast_clock(epoch - datetime.now(UTC)))
        old = _open_command(uuid.uuid4(), address, age=timedelta(seconds=120), remote=True)
        marker = _open_command(uuid.uuid4(), address, display=("标",), remote=True)
        async with lane(config) as rebooted:
            await anyone.mqtt.publish(commands, old)
            await anyone.mqtt.publish(commands, marker)
            await until(lambda: rebooted.display.current == ["标"])
            assert rebooted.reasons() == ["remote"], "the expired open lifted the barrier"
            assert rebooted.agent.command_refusals == {"expired": 1}


async def test_an_offset_learnt_before_the_gate_clock_was_put_back_makes_no_expired_open_fresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent learnt its clock was 60 s fast; the gate is then down an hour, and its clock
    is put right meanwhile. After the restart the carried offset would reckon the server's time
    a minute behind the truth. The server's config, signed 40 s ago, proves it: the offset is
    dropped, and an open that expired 20 s ago is refused (by the floor alone it would be
    fresh)."""
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    address = GateAddress(lot, "out1")
    topics = Topics(prefix)
    commands, config_topic = topics.topic(address, "command"), topics.topic(address, "config")
    config = _config(tmp_path, lot, "out1", prefix, offline_after_s=5.0)
    with monkeypatch.context() as fast:
        fast.setattr(agent_module, "datetime", _fast_clock(timedelta(minutes=1)))
        async with Listener() as server, lane(config) as out:
            first = await out.agent.capture(car("out", unique_plate()))
            await server.mqtt.publish(commands, _open_command(first.capture_id, address))
            await until(lambda: out.relay.openings)
            assert out.agent.clock_offset_s == pytest.approx(-60, abs=2)
    store = Outbox(config.outbox_path)  # down an hour: its floor is an hour behind on restart
    store.save_clock_floor(time.time() - 3600)
    store.close()

    stale = _open_command(uuid.uuid4(), address, age=timedelta(seconds=50), remote=True)
    marker = _open_command(uuid.uuid4(), address, display=("标",), remote=True)
    async with Listener() as anyone:
        signed = build_config(
            lot, [], SERVER_KEY, issued_at=datetime.now(UTC) - timedelta(seconds=40)
        )
        await anyone.mqtt.publish(config_topic, encode(signed), retain=True)
        try:
            async with lane(config) as restarted:
                await until(lambda: restarted.agent.whitelist.config is not None)
                await anyone.mqtt.publish(commands, stale)
                await anyone.mqtt.publish(commands, marker)
                await until(lambda: restarted.display.current == ["标"])
                assert restarted.reasons() == ["remote"], "the expired open lifted the barrier"
                assert restarted.agent.command_refusals == {"expired": 1}
        finally:
            await anyone.clear_retained([config_topic])


async def test_an_offset_learnt_while_the_gate_clock_was_slow_is_not_carried_into_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent learnt its clock was 10 minutes slow; the clock is put right before it
    restarts. Nothing the gate holds could show that (every signed time is a lower bound of
    the server's), so an offset carried over would reckon the server's time 10 minutes ahead
    and refuse every fresh command until a car came: a slow clock's offset is not carried (the
    floor keeps such a gate from taking old opens for fresh ones)."""
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    address = GateAddress(lot, "out1")
    commands = Topics(prefix).topic(address, "command")
    config = _config(tmp_path, lot, "out1", prefix, offline_after_s=5.0)
    with monkeypatch.context() as slow:
        slow.setattr(agent_module, "datetime", _fast_clock(-timedelta(minutes=10)))
        async with Listener() as server, lane(config) as out:
            first = await out.agent.capture(car("out", unique_plate()))
            await server.mqtt.publish(commands, _open_command(first.capture_id, address))
            await until(lambda: out.relay.openings)
            assert out.agent.clock_offset_s == pytest.approx(600, abs=2)

    async with Listener() as operator, lane(config) as restarted:
        await operator.mqtt.publish(commands, _open_command(uuid.uuid4(), address, remote=True))
        await until(lambda: restarted.relay.openings or restarted.agent.command_refusals)
        assert restarted.reasons() == ["remote"], dict(restarted.agent.command_refusals)


async def test_a_floor_signed_by_a_server_clock_once_ahead_gives_way_to_the_servers_answer(
    tmp_path: Path,
) -> None:
    """A config signed while the server's clock was an hour ahead raises the gate's floor an
    hour ahead, and fresh commands are refused as expired. The next car's answer, the server's
    clock as it is now, shows the floor was never a time the server passed: the gate follows
    the server again (the floor, kept on disk, would otherwise refuse every command for an
    hour)."""
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    address = GateAddress(lot, "out1")
    topics = Topics(prefix)
    commands, config_topic = topics.topic(address, "command"), topics.topic(address, "config")
    async with Listener() as server:
        ahead = build_config(lot, [], SERVER_KEY, issued_at=datetime.now(UTC) + timedelta(hours=1))
        await server.mqtt.publish(config_topic, encode(ahead), retain=True)
        try:
            config = _config(tmp_path, lot, "out1", prefix, offline_after_s=5.0)
            async with lane(config) as out:
                await until(lambda: out.agent.whitelist.config is not None)
                await server.mqtt.publish(
                    commands, _open_command(uuid.uuid4(), address, remote=True)
                )
                await until(lambda: out.agent.command_refusals)
                assert out.agent.command_refusals == {"expired": 1}

                first = await out.agent.capture(car("out", unique_plate()))
                await server.mqtt.publish(commands, _open_command(first.capture_id, address))
                await until(lambda: out.relay.openings)
                assert out.reasons() == ["server"], dict(out.agent.command_refusals)
                await server.mqtt.publish(
                    commands, _open_command(uuid.uuid4(), address, remote=True)
                )
                await until(lambda: len(out.relay.openings) == 2)
                assert out.reasons() == ["server", "remote"]
        finally:
            await server.clear_retained([config_topic])


async def test_every_publisher_signs_its_commands_for_the_gate_they_are_for(
    runtime: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    provider: ProviderEndpoint,
    gate: GateProbe,
    lot: Lot,
    clean_configs: None,
) -> None:
    """The lane's decisions, the gate opened after a payment at the gate, an operator's manual
    open and the booth's cash payment are all signed the same way. One car after the other,
    each the newest at the exit when its hold is lifted (an older one's open is not sent)."""
    public_key = SERVER_KEY.public_key()
    paying, by_hand, at_booth = unique_plate(), unique_plate(), unique_plate()
    for plate in (paying, by_hand, at_booth):
        await enter(runtime, gate, lot, plate, parked_for=timedelta(hours=1))
    staff = await make_staff(runtime, lot.operator_id)

    held_by_hand = gate.capture("out", by_hand)
    assert (await gate.decide(lot.code, "out1", held_by_hand))["action"] == "hold"
    opened = await api.post(
        f"/api/v1/operator/car-parks/{lot.code}/gates/out1/open",
        headers=bearer(staff_token(app, staff)),
        json={"reason": "driver at the booth", "capture_id": str(held_by_hand.capture_id)},
    )
    assert opened.status_code == 200, opened.text
    await gate.wait_for(held_by_hand, commands=2, acks=1)

    held_paying = gate.capture("out", paying)
    qr_url = (await gate.decide(lot.code, "out1", held_paying))["payment_qr_url"]
    await _pay_by_qr(api, provider, qr_url)
    await gate.wait_for(held_paying, commands=2)

    held_at_booth = gate.capture("out", at_booth)
    hold = await gate.decide(lot.code, "out1", held_at_booth)
    attendant = await make_staff(runtime, lot.operator_id, "attendant")
    paid = await api.post(
        f"/api/v1/operator/car-parks/{lot.code}/booth-payments",
        headers=bearer(staff_token(app, attendant)),
        json={
            "capture_id": str(held_at_booth.capture_id),
            "method": "cash",
            "amount_fen": hold["fee_fen"],
        },
    )
    assert paid.status_code == 201, paid.text
    await gate.wait_for(held_at_booth, commands=2)

    published = [c for commands in gate.commands.values() for c in commands]
    assert {(c["capture_id"], c["action"]) for c in published} >= {
        (str(held_paying.capture_id), "open"),  # the payment's
        (str(held_by_hand.capture_id), "open"),  # the operator's
        (str(held_by_hand.capture_id), "hold"),  # the lane's
        (str(held_at_booth.capture_id), "open"),  # the booth's
    }
    for data in published:
        topic = data.pop("_topic")
        command = Command.model_validate(data)
        assert command.signature is not None, data
        public_key.verify(base64.b64decode(command.signature), command.signed_bytes())
        assert topic.endswith(f"/{command.lot}/{command.gate}/command")


async def test_a_capture_id_resent_on_another_gate_gets_no_command_there(
    runtime: Runtime, settings: Settings, gate: GateProbe, lot: Lot, tmp_path: Path
) -> None:
    """Whoever can publish a capture on a gate's topic (its own login, a shared one) and has
    seen a capture id opened at another gate sends that capture again there. Before, the lane
    answered with the stored open, signed for the gate the resend came from, and its barrier
    lifted for a car that was not there. Now the stored command goes to no gate but the
    capture's own; the other gate gets the conflict's ack, which names nothing it holds."""
    driver = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(hours=1))
    exit_capture = gate.capture("out", driver.plate)
    assert (await gate.decide(lot.code, "out1", exit_capture))["action"] == "open"

    other = await create_lot(runtime)
    async with lane(_config(tmp_path, other.code, "out1", settings.mqtt_topic_prefix)) as far:
        await gate.send(other.code, "out1", exit_capture)
        await gate.wait_for(exit_capture, commands=1, acks=2)
        # A marker the far gate acts on, published after: once it shows, anything the lane
        # sent that gate for the resend was handled too.
        marker = _open_command(uuid.uuid4(), far.agent.address, display=("marker",), remote=True)
        await gate.mqtt.publish(runtime.lanes.topics.topic(far.agent.address, "command"), marker)
        await until(lambda: far.display.current == ["marker"])
        assert far.reasons() == ["remote"], "lifted for another gate's capture"
    [command] = gate.commands[str(exit_capture.capture_id)]
    assert command["_topic"].endswith(f"/{lot.code}/out1/command")
    _, far_ack = gate.acks[str(exit_capture.capture_id)]
    assert far_ack["_topic"].endswith(f"/{other.code}/out1/ack")
    assert far_ack["duplicate"] is True and "payload_sha256" not in far_ack
    assert await stay_status(runtime, lot, driver.plate) == "closed"


async def test_the_booths_cash_payment_opens_the_held_gate_with_a_command_its_agent_accepts(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    """The attendant takes the cash for a held exit: the open it sends is signed for that gate
    and capture, so the agent acts on it (an unsigned one is refused and the driver who paid
    stays behind a closed barrier)."""
    plate = unique_plate()
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    held = gate.capture("out", plate)
    assert (await gate.decide(lot.code, "out1", held))["action"] == "hold"
    headers = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "attendant")))
    paid = await api.post(
        f"/api/v1/operator/car-parks/{lot.code}/booth-payments",
        json={"capture_id": str(held.capture_id), "method": "cash", "amount_fen": 1200},
        headers=headers,
    )
    assert paid.status_code == 201, paid.text
    assert paid.json()["gate_opened"] is True
    await gate.wait_for(held, commands=2)
    data = dict(gate.commands[str(held.capture_id)][1])
    data.pop("_topic")
    command = Command.model_validate(data)
    assert (command.capture_id, command.action) == (held.capture_id, "open")
    refusal = command_refusal(
        command, SERVER_KEY.public_key(), GateAddress(lot.code, "out1"), datetime.now(UTC)
    )
    assert refusal is None, f"the gate agent refuses the booth's open: {refusal}"


async def test_a_manual_open_at_the_booth_reaches_the_operators(
    runtime: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    settings: Settings,
    lot: Lot,
    tmp_path: Path,
    clean_configs: None,
) -> None:
    """An opening no signed command explains is reported, even when it happened while the
    gate could not reach the broker, and operators of the car park see it once."""
    config = _config(tmp_path, lot.code, "out1", settings.mqtt_topic_prefix)
    unreachable = config.model_copy(update={"mqtt_url": "mqtt://127.0.0.1:9"})
    async with lane(unreachable, reachable=False) as offline:
        await offline.agent.manual_open("按钮: 救护车")
        assert offline.reasons() == ["manual"]
    async with lane(config) as online:
        await until(lambda: not online.agent.store.pending_events())

    staff = await make_staff(runtime, lot.operator_id)

    async def listed() -> list[dict[str, Any]]:
        response = await api.get(
            "/api/v1/operator/gate-events",
            headers=bearer(staff_token(app, staff)),
            params={"car_park": lot.code},
        )
        assert response.status_code == 200, response.text
        events: list[dict[str, Any]] = response.json()
        return events

    (event,) = await eventually(listed)
    assert (event["gate"], event["type"], event["reason"]) == (
        "out1",
        "manual_open",
        "按钮: 救护车",
    )
    other = await make_staff(runtime, (await create_lot(runtime)).operator_id)
    assert (
        await api.get("/api/v1/operator/gate-events", headers=bearer(staff_token(app, other)))
    ).json() == []


async def test_a_gate_known_slow_restarted_offline_holds_a_pass_holder_after_hours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent learnt its clock is 5 minutes slow (offset +300 s on disk). The link goes
    down; ten minutes later the gate box is power-cycled (the link still down) and the clock is
    still 5 minutes slow. A pass holder whose pass ended 2 minutes ago (the list's `free_until`)
    comes to the exit: by the server's time it is past `free_until` and has no pay-later, so the
    gate must hold it. Review 22: the agent reckoned the server's time as its own slow clock (a
    slow offset is not carried for commands; the floor is 10 minutes stale) and let the car out
    free. A free exit is judged by the later estimate (`server_now_at_the_latest`)."""
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    holder = unique_plate()
    monthly = RightTerms(1, "free_passage", now - timedelta(days=29), now - timedelta(minutes=2))
    listed = build_config(
        lot,
        [WhitelistedCar(holder, "blue", None, now - timedelta(hours=3), (monthly,))],
        SERVER_KEY,
        issued_at=now - timedelta(minutes=10),
    )
    assert [entry.free_until for entry in listed.whitelist] == [monthly.valid_until]
    config = _config(tmp_path, lot, "out1", prefix, mqtt_url="mqtt://127.0.0.1:9")
    store = Outbox(config.outbox_path)  # what the earlier run left on disk
    store.save_config(encode(listed))
    store.save_clock_floor((now - timedelta(minutes=10)).timestamp())
    store.save_clock_offset(300.0)
    store.close()
    monkeypatch.setattr(agent_module, "datetime", _fast_clock(-timedelta(minutes=5)))
    async with lane(config, reachable=False) as out:
        await until(lambda: out.agent.whitelist.config is not None)
        await out.camera.put(car("out", holder))
        await until(lambda: out.relay.openings or out.display.current == [HOLD_TEXT])
        assert out.reasons() == [], "a pass holder 2 minutes past its pass's end left free"


def _hold_command(capture_id: uuid.UUID, address: GateAddress) -> bytes:
    now = datetime.now(UTC)
    command = Command(
        capture_id=capture_id,
        action="hold",
        display=["请扫码缴费"],
        issued_at=now,
        expires_at=now + timedelta(seconds=30),
    )
    return encode(sign_command(command, address, SERVER_KEY))


@pytest.mark.parametrize("replayed", ["config", "ack"])
async def test_a_replayed_message_signed_while_the_server_clock_ran_ahead_holds_no_paid_car(
    tmp_path: Path, replayed: Literal["config", "ack"]
) -> None:
    """The server's clock was an hour ahead for a while (the case the agent's own test
    `test_a_floor_signed_by_a_server_clock_once_ahead_gives_way_to_the_servers_answer` covers)
    and signed a config and acks then. The gate followed the server's answer again after. A
    broker client (the shared login) that kept one of those messages publishes it again: the
    floor goes an hour ahead once more, and the paid open of the held car at the barrier, fresh
    by the server's clock, was refused as expired: the driver paid and stayed behind the barrier
    (review 22). A signed time beyond what this run learnt from a fresh answer is not taken."""
    prefix, lot = _prefix(), f"lot-{uuid.uuid4().hex[:8]}"
    address = GateAddress(lot, "out1")
    topics = Topics(prefix)
    commands, config_topic = topics.topic(address, "command"), topics.topic(address, "config")
    ahead_at = datetime.now(UTC) + timedelta(hours=1)
    ahead = encode(build_config(lot, [], SERVER_KEY, issued_at=ahead_at))
    async with Listener() as server:
        await server.mqtt.publish(config_topic, ahead, retain=True)
        try:
            config = _config(tmp_path, lot, "out1", prefix, offline_after_s=5.0)
            async with lane(config) as out:
                await until(lambda: out.agent.whitelist.config is not None)
                await server.listen(topics.topic(address, "capture"))
                first = await out.agent.capture(car("out", unique_plate()))
                await server.mqtt.publish(commands, _open_command(first.capture_id, address))
                await until(lambda: out.relay.openings)
                # The gate follows the server's clock again.
                assert abs(out.agent.clock_offset_s) < 5

                held = await out.agent.capture(car("out", unique_plate()))
                await server.mqtt.publish(commands, _hold_command(held.capture_id, address))
                await until(lambda: (r := out.agent.store.record(held.capture_id)) and r.action)

                # The replay (anyone on the broker).
                if replayed == "config":
                    old = ahead
                else:
                    # The ack of a capture of that time (not one this run sent: its answers
                    # came from the server as it is now).
                    earlier = encode(
                        Capture(
                            capture_id=uuid.uuid4(),
                            seq=1,
                            direction="out",
                            captured_at=ahead_at,
                        )
                    )
                    old = _signed_ack(earlier, address, ahead_at)
                async with Listener() as anyone:
                    await anyone.mqtt.publish(topics.topic(address, replayed), old)
                # Handled: ignored, or (before) taken as the floor.
                await until(lambda: out.agent.clock_offset_s > 60 or out.agent.signed_times_ignored)

                # The driver pays by phone: the server's open, fresh.
                await server.mqtt.publish(commands, _open_command(held.capture_id, address))
                await until(lambda: len(out.relay.openings) == 2 or out.agent.command_refusals)
                assert out.reasons() == ["server", "server_late"], dict(out.agent.command_refusals)
        finally:
            await server.clear_retained([config_topic])
