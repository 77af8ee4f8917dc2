"""The gate broker's accounts and ACL (`parking gates provision`) on a real Mosquitto 2.

This module starts its own mosquitto on a free loopback port with the generated files; the
machine's broker is not involved. Mosquitto drops an unauthorised MQTT 3.1.1 publish silently and
may grant a subscription it will deliver nothing to, so each negative check first proves the path
with an allowed message sent after the forbidden one, then still waits a bounded time.
"""

import argparse
import contextlib
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from gate_controller.protocol import GateAddress, TopicKind, Topics
from parking.admin import repository as admin
from parking.gates import provision

PREFIX = f"sec-{uuid.uuid4().hex[:6]}"
GATE_A = GateAddress("lot-1", "out1")
GATE_B = GateAddress("lot-1", "in1")  # same car park: isolation holds between gates, not lots
LANES_1 = provision.instance_username("lanes", 1)
NEGATIVE_WAIT_S = 1.0
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class Broker:
    port: int
    passwords: dict[str, str]
    topics: Topics

    def topic(self, address: GateAddress, kind: TopicKind) -> str:
        return self.topics.topic(address, kind)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_for_listener(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mosquitto exited: {log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)  # polling for the listener
    pytest.fail(f"mosquitto did not listen on {port}: {log.read_text(errors='replace')}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stops a server a test started: SIGTERM, then SIGKILL if it has not exited in time."""
    process.terminate()
    try:
        process.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    mosquitto = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if mosquitto is None:
        pytest.skip("mosquitto is not installed")
    root = Path(tempfile.mkdtemp(prefix="broker-security-"))
    # Started as root, mosquitto reads its files as the mosquitto user: the files go to its
    # group (as docs/broker-security.md tells operators) in a folder that user may enter.
    root.chmod(0o711)
    port = _free_port()
    result = provision.provision(
        [GATE_A, GATE_B],
        root / "broker",
        instances={"lanes": 2, "worker": 1, "api": 1},
        prefix=PREFIX,
        port=port,
        bind_address="127.0.0.1",
        broker_group="mosquitto" if os.geteuid() == 0 else None,
    )
    log = root / "mosquitto.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [mosquitto, "-c", str(result.files["conf"])], stdout=log_file, stderr=log_file
        )
    try:
        _wait_for_listener(port, process, log)
        passwords = {account.username: account.password for account in result.accounts}
        yield Broker(port, passwords, Topics(PREFIX))
    finally:
        stop_process(process)
        shutil.rmtree(root)


class Client:
    """A threaded paho client speaking MQTT 3.1.1, as the gates do; records what it receives."""

    def __init__(
        self,
        broker: Broker,
        username: str | None,
        password: str | None,
        client_id: str | None = None,
    ) -> None:
        self._broker = broker
        self._paho = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"sec-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv311,
        )
        self.disconnects = 0
        self._paho.on_disconnect = self._on_disconnect
        if username is not None:
            self._paho.username_pw_set(username, password)
        self._paho.on_connect = self._on_connect
        self._paho.on_subscribe = self._on_subscribe
        self._paho.on_message = self._on_message
        self._changed = threading.Condition()
        self.connect_result: ReasonCode | None = None
        self._subscribed: set[int] = set()
        self.received: list[Message] = []

    def _on_connect(
        self, _c: paho.Client, _u: object, _f: object, code: ReasonCode, _p: object
    ) -> None:
        with self._changed:
            self.connect_result = code
            self._changed.notify_all()

    def _on_disconnect(self, *_: object) -> None:
        with self._changed:
            self.disconnects += 1
            self._changed.notify_all()

    def _on_subscribe(
        self, _c: paho.Client, _u: object, mid: int, _codes: object, _p: object
    ) -> None:
        with self._changed:
            self._subscribed.add(mid)
            self._changed.notify_all()

    def _on_message(self, _c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        with self._changed:
            self.received.append(Message(message.topic, message.payload, bool(message.retain)))
            self._changed.notify_all()

    def _wait(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(condition, timeout_s)

    def connect(self) -> ReasonCode:
        self._paho.connect("127.0.0.1", self._broker.port)
        self._paho.loop_start()
        assert self._wait(lambda: self.connect_result is not None, TIMEOUT_S), "no CONNACK"
        assert self.connect_result is not None
        return self.connect_result

    def close(self) -> None:
        self._paho.disconnect()
        self._paho.loop_stop()

    def subscribe(self, topic_filter: str) -> None:
        _, mid = self._paho.subscribe(topic_filter, qos=1)
        assert self._wait(lambda: mid in self._subscribed, TIMEOUT_S), f"no SUBACK {topic_filter}"

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        # Mosquitto acknowledges a refused QoS 1 publish too, so this returns either way.
        self._paho.publish(topic, payload, qos=1, retain=retain).wait_for_publish(TIMEOUT_S)

    def gets(self, topic: str, payload: bytes, timeout_s: float = TIMEOUT_S) -> bool:
        return self.gets_any(lambda m: m.topic == topic and m.payload == payload, timeout_s)

    def gets_any(self, matches: Callable[[Message], bool], timeout_s: float) -> bool:
        return self._wait(lambda: any(matches(message) for message in self.received), timeout_s)


@contextlib.contextmanager
def logged_in(broker: Broker, username: str, client_id: str | None = None) -> Iterator[Client]:
    client = Client(broker, username, broker.passwords[username], client_id)
    code = client.connect()
    try:
        assert not code.is_failure, f"{username} refused: {code}"
        yield client
    finally:
        client.close()


def forged(message: Message) -> bool:
    return message.payload == b"forged"


def test_gates_use_their_own_topics_and_the_lane_service_those_of_every_gate(
    broker: Broker,
) -> None:
    with (
        logged_in(broker, LANES_1) as lanes,
        logged_in(broker, provision.gate_username(GATE_A)) as gate,
    ):
        # The lane service subscribes as the scaled-out lane workers do.
        lanes.subscribe(f"$share/lanes/{broker.topics.all_gates('capture')}")
        lanes.subscribe(broker.topics.all_gates("event"))
        lanes.subscribe(broker.topics.all_gates("status"))
        for kind in provision.SERVER_PUBLISHES:
            gate.subscribe(broker.topic(GATE_A, kind))

        for kind in provision.GATE_PUBLISHES:
            gate.publish(broker.topic(GATE_A, kind), kind.encode(), retain=kind == "status")
        for kind in provision.SERVER_PUBLISHES:
            lanes.publish(broker.topic(GATE_A, kind), kind.encode(), retain=kind == "config")

        for kind in provision.GATE_PUBLISHES:
            assert lanes.gets(broker.topic(GATE_A, kind), kind.encode()), kind
        for kind in provision.SERVER_PUBLISHES:
            assert gate.gets(broker.topic(GATE_A, kind), kind.encode()), kind


def test_a_gate_cannot_publish_as_another_gate_or_as_the_server(broker: Broker) -> None:
    with (
        logged_in(broker, LANES_1) as lanes,
        logged_in(broker, provision.gate_username(GATE_A)) as gate_a,
        logged_in(broker, provision.gate_username(GATE_B)) as gate_b,
    ):
        lanes.subscribe(broker.topics.all_gates("capture"))
        lanes.subscribe(broker.topics.all_gates("status"))
        gate_a.subscribe(broker.topic(GATE_A, "command"))
        gate_b.subscribe(broker.topic(GATE_B, "command"))
        gate_b.subscribe(broker.topic(GATE_B, "config"))

        gate_a.publish(broker.topic(GATE_B, "capture"), b"forged")
        gate_a.publish(broker.topic(GATE_B, "status"), b"forged", retain=True)
        gate_a.publish(broker.topic(GATE_B, "command"), b"forged")
        gate_a.publish(broker.topic(GATE_B, "config"), b"forged", retain=True)
        gate_a.publish(broker.topic(GATE_A, "command"), b"forged")  # opening its own barrier

        # The same paths carry what is allowed, sent after the forgeries.
        gate_a.publish(broker.topic(GATE_A, "capture"), b"genuine")
        lanes.publish(broker.topic(GATE_B, "command"), b"genuine")
        lanes.publish(broker.topic(GATE_A, "command"), b"genuine")
        assert lanes.gets(broker.topic(GATE_A, "capture"), b"genuine")
        assert gate_b.gets(broker.topic(GATE_B, "command"), b"genuine")
        assert gate_a.gets(broker.topic(GATE_A, "command"), b"genuine")

        assert not lanes.gets_any(forged, NEGATIVE_WAIT_S)
        assert not gate_b.gets_any(forged, 0)
        assert not gate_a.gets_any(forged, 0)


def test_a_gate_subscribing_to_everything_receives_only_its_own_messages(broker: Broker) -> None:
    with (
        logged_in(broker, LANES_1) as lanes,
        logged_in(broker, provision.gate_username(GATE_A)) as gate_a,
        logged_in(broker, provision.gate_username(GATE_B)) as gate_b,
    ):
        lanes.publish(broker.topic(GATE_B, "config"), b"for-b", retain=True)
        lanes.publish(broker.topic(GATE_A, "config"), b"for-a", retain=True)
        gate_b.subscribe(broker.topic(GATE_B, "command"))
        # Granted under MQTT 3.1.1, but mosquitto checks every delivery against the ACL.
        gate_a.subscribe("#")
        gate_a.subscribe(broker.topics.all_gates("command"))
        gate_a.subscribe(broker.topic(GATE_B, "command"))
        gate_a.subscribe(broker.topic(GATE_B, "capture"))

        gate_b.publish(broker.topic(GATE_B, "capture"), b"from-b")
        gate_b.publish(broker.topic(GATE_B, "status"), b"from-b", retain=True)
        lanes.publish(broker.topic(GATE_B, "command"), b"for-b")
        lanes.publish(broker.topic(GATE_A, "command"), b"for-a")

        assert gate_b.gets(broker.topic(GATE_B, "command"), b"for-b")
        assert gate_a.gets(broker.topic(GATE_A, "command"), b"for-a")
        assert gate_a.gets(broker.topic(GATE_A, "config"), b"for-a")  # retained, through '#'
        own = f"{broker.topics.root}/{GATE_A.lot}/{GATE_A.gate}/"
        assert not gate_a.gets_any(lambda m: not m.topic.startswith(own), NEGATIVE_WAIT_S)
        assert not gate_a.gets_any(lambda m: m.payload in (b"for-b", b"from-b"), 0)


def test_the_lane_service_cannot_forge_a_capture(broker: Broker) -> None:
    with (
        logged_in(broker, LANES_1) as lanes,
        logged_in(broker, provision.gate_username(GATE_A)) as gate,
    ):
        lanes.subscribe(broker.topics.all_gates("capture"))
        lanes.publish(broker.topic(GATE_A, "capture"), b"forged")
        lanes.publish(broker.topic(GATE_A, "status"), b"forged", retain=True)
        gate.publish(broker.topic(GATE_A, "capture"), b"genuine")
        assert lanes.gets(broker.topic(GATE_A, "capture"), b"genuine")
        assert not lanes.gets_any(forged, NEGATIVE_WAIT_S)


@pytest.mark.parametrize(
    ("username", "password"),
    [
        (None, None),
        (provision.gate_username(GATE_A), "wrong"),
        (provision.gate_username(GATE_A), ""),
        ("gate-lot-1-unknown", "whatever"),
    ],
    ids=["anonymous", "wrong-password", "empty-password", "unknown-user"],
)
def test_clients_without_valid_credentials_are_refused_at_connect(
    broker: Broker, username: str | None, password: str | None
) -> None:
    client = Client(broker, username, password)
    try:
        assert client.connect().is_failure
    finally:
        client.close()


def test_a_gate_cannot_log_in_with_another_gates_password(broker: Broker) -> None:
    password_b = broker.passwords[provision.gate_username(GATE_B)]
    impostor = Client(broker, provision.gate_username(GATE_A), password_b)
    genuine = Client(broker, provision.gate_username(GATE_B), password_b)
    try:
        assert impostor.connect().is_failure
        assert not genuine.connect().is_failure
    finally:
        impostor.close()
        genuine.close()


def _provision_command(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    provision.add_arguments(parser)
    return provision.run(parser.parse_args(["provision", *argv]))


@pytest.mark.parametrize(
    "gate",
    ["lot-1/a+b", "lot-1/x#", "lot-1/a/b", "a+b/in1", "x#/in1", "#/+", "lot-1/", "lot-1"],
)
def test_provisioning_refuses_names_that_are_not_gate_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], gate: str
) -> None:
    out = tmp_path / "broker"
    assert _provision_command("--gate", "lot-1/in1", "--gate", gate, "--out", str(out)) == 2
    assert repr(gate) in capsys.readouterr().err
    assert not out.exists()


def test_provisioning_refuses_bad_names_from_a_file_and_from_the_database(tmp_path: Path) -> None:
    gates_file = tmp_path / "gates.txt"
    # A '#' inside a line is part of a name, not a comment that would cut it to "lot-1/x".
    gates_file.write_text("# car park lot-1\nlot-1/in1\nlot-1/x#y\n", encoding="utf-8")
    assert _provision_command("--gates-file", str(gates_file), "--out", str(tmp_path / "f")) == 2
    with pytest.raises(provision.ProvisionError):
        provision.provision([GateAddress("lot-1", "a/b")], tmp_path / "api")
    assert not (tmp_path / "f").exists()
    assert not (tmp_path / "api").exists()


def test_gates_whose_usernames_would_coincide_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    assert _provision_command("--gate", "a-b/c", "--gate", "a/b-c", "--out", str(out)) == 2
    assert not out.exists()


def _passwords(out: Path) -> dict[str, str]:
    document = orjson.loads((out / provision.CREDENTIALS_FILE).read_bytes())
    return {user["username"]: user["password"] for user in document["users"]}


def test_reprovisioning_keeps_passwords_until_rotated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "broker"
    a, b = provision.gate_username(GATE_A), provision.gate_username(GATE_B)
    common = ["--out", str(out), "--prefix", ""]
    assert _provision_command("--gate", "lot-1/out1", *common) == 0
    first = _passwords(out)
    capsys.readouterr()

    assert _provision_command("--gate", "lot-1/out1", "--gate", "lot-1/in1", *common) == 0
    assert orjson.loads(capsys.readouterr().out)["new_passwords"] == 1
    second = _passwords(out)
    assert second[a] == first[a]
    assert second[LANES_1] == first[LANES_1]
    roles = {provision.instance_username(role, 1) for role in provision.ROLES}
    assert set(second) == roles | {a, b}

    acl = (out / provision.ACL_FILE).read_text()
    assert f"user {b}\ntopic write parking/v1/lot-1/in1/capture\n" in acl
    for name in (provision.CREDENTIALS_FILE, provision.PASSWORD_FILE, provision.ACL_FILE):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name

    assert _provision_command("--gate", "lot-1/in1", "--rotate", *common) == 0
    third = _passwords(out)
    assert set(third) == roles | {b}  # lot-1/out1 removed: its login is gone
    assert third[b] != second[b]
    assert third[LANES_1] != second[LANES_1]
    assert f"\n{a}:" not in (out / provision.PASSWORD_FILE).read_text()


def test_reprovisioning_keeps_every_server_login_already_given_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three lane pods log in as lanes-1..3; adding a gate later (a run without --lanes, or
    `parking admin gate create --broker-dir`) used to write lanes-1 only, and the broker's
    reload then locked lanes-2 and lanes-3 out."""
    out = tmp_path / "broker"
    common = ["--gate", "lot-1/out1", "--out", str(out), "--prefix", ""]
    assert _provision_command(*common, "--lanes", "3", "--apis", "2") == 0
    first = _passwords(out)
    assert _provision_command(*common, "--gate", "lot-1/in1") == 0
    second = _passwords(out)
    for user in ("lanes-1", "lanes-2", "lanes-3", "api-1", "api-2", "worker-1"):
        assert second[user] == first[user], user
    assert "lanes-4" not in second and "worker-2" not in second
    acl = (out / provision.ACL_FILE).read_text()
    assert "user lanes-3\ntopic read parking/v1/+/+/capture\n" in acl
    assert _provision_command(*common, "--rotate") == 0
    assert "lanes-3" not in _passwords(out)  # --rotate starts over at the asked number
    capsys.readouterr()


async def test_gates_are_read_from_the_database(database_url: str) -> None:
    code = f"lot-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(database_url)
    try:
        operator_id = await admin.create_operator(conn, f"operator-{code}")
        car_park_id = await admin.create_car_park(
            conn, operator_id=operator_id, code=code, name=code, capacity=10
        )
        await admin.create_gate(conn, car_park_id, "in1", "in")
        await admin.create_gate(conn, car_park_id, "out1", "out")
    finally:
        await conn.close()
    gates = await provision.gates_from_database(database_url)
    assert {GateAddress(code, "in1"), GateAddress(code, "out1")} <= set(gates)


def test_a_gate_cannot_disconnect_another_gate_by_taking_its_client_id(broker: Broker) -> None:
    """A gate's client id is predictable (`gate-<lot>-<gate>`); any gate login used to knock
    that gate off the broker by connecting under it. The broker now takes the client id from
    the username, so the impostor only ever replaces its own session."""
    victim_id = provision.gate_username(GATE_B)
    with (
        logged_in(broker, LANES_1) as lanes,
        logged_in(broker, provision.gate_username(GATE_B), client_id=victim_id) as victim,
    ):
        victim.subscribe(broker.topic(GATE_B, "command"))
        with logged_in(broker, provision.gate_username(GATE_A), client_id=victim_id):
            lanes.publish(broker.topic(GATE_B, "command"), b"still-there")
            assert victim.gets(broker.topic(GATE_B, "command"), b"still-there")
        assert victim.disconnects == 0


def test_each_server_process_has_its_own_login_and_only_its_roles_topics(broker: Broker) -> None:
    """Lane processes, charge workers and API processes each log in as themselves (two lane
    processes at once included); workers and the API may only send commands."""
    lanes_2 = provision.instance_username("lanes", 2)
    worker, api = (provision.instance_username(r, 1) for r in ("worker", "api"))
    assert {LANES_1, lanes_2, worker, api} <= broker.passwords.keys()
    with (
        logged_in(broker, LANES_1) as first,
        logged_in(broker, lanes_2) as second,
        logged_in(broker, worker) as charge_worker,
        logged_in(broker, api) as api_process,
        logged_in(broker, provision.gate_username(GATE_A)) as gate,
    ):
        for lanes in (first, second):
            lanes.subscribe(f"$share/lanes/{broker.topics.all_gates('capture')}")
        charge_worker.subscribe(broker.topics.all_gates("capture"))
        gate.subscribe(broker.topic(GATE_A, "command"))
        gate.subscribe(broker.topic(GATE_A, "config"))
        charge_worker.publish(broker.topic(GATE_A, "command"), b"from-worker")
        api_process.publish(broker.topic(GATE_A, "command"), b"from-api")
        api_process.publish(broker.topic(GATE_A, "config"), b"forged", retain=True)
        gate.publish(broker.topic(GATE_A, "capture"), b"genuine")
        assert gate.gets(broker.topic(GATE_A, "command"), b"from-worker")
        assert gate.gets(broker.topic(GATE_A, "command"), b"from-api")
        capture = broker.topic(GATE_A, "capture")
        # A shared subscription: one of the two lane processes gets it.
        assert first.gets(capture, b"genuine") or second.gets(capture, b"genuine", 0)
        assert not charge_worker.gets_any(lambda m: True, NEGATIVE_WAIT_S)
        assert not gate.gets_any(forged, 0)
        assert first.disconnects == second.disconnects == 0


def test_an_oversized_message_never_reaches_the_lane_service(broker: Broker) -> None:
    """A 100 MiB capture took a lane process from 187 to 447 MB: the broker now drops any
    packet over 1 MiB and disconnects its sender."""
    assert provision.MAX_PACKET_BYTES == 1024 * 1024
    with (
        logged_in(broker, LANES_1) as lanes,
        logged_in(broker, provision.gate_username(GATE_A)) as big,
        logged_in(broker, provision.gate_username(GATE_B)) as small,
    ):
        lanes.subscribe(broker.topics.all_gates("capture"))
        big._paho.publish(broker.topic(GATE_A, "capture"), b"x" * (2 * 1024 * 1024), qos=1)
        assert big._wait(lambda: big.disconnects > 0, TIMEOUT_S)
        small.publish(broker.topic(GATE_B, "capture"), b"small")
        assert lanes.gets(broker.topic(GATE_B, "capture"), b"small")
        assert not lanes.gets_any(lambda m: len(m.payload) > 1024 * 1024, 0)
