"""Runs a command (the test suite) with PostgreSQL, Redis and an MQTT broker to talk to.

    python scripts/test_servers.py COMMAND [ARG...]

Each server is decided on its own: where something listens on the address the tests would use
(PARKING_TEST_DATABASE_URL / PARKING_TEST_REDIS_URL / PARKING_TEST_MQTT_URL, by default
127.0.0.1:5432 / 6379 / 1883) it is used as it is. Where nothing does, a throwaway server is
started in a temporary folder on a free loopback port and its URL exported in that variable
for the command. The throwaway servers are stopped and the folder removed when the command
ends, fails or is interrupted (Ctrl-C reaches the command, as in a shell; SIGTERM and SIGHUP
are passed on to it). With nothing to start the command simply replaces this process.

Only the standard library: it runs before (and without) the virtualenv's packages. The
binaries are Debian's: PostgreSQL from /usr/lib/postgresql/<version>/bin (package
postgresql), redis-server (package redis-server), mosquitto (package mosquitto).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

DEFAULT_URLS = {
    "PARKING_TEST_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
    "PARKING_TEST_REDIS_URL": "redis://127.0.0.1:6379/14",
    "PARKING_TEST_MQTT_URL": "mqtt://127.0.0.1:1883",
}
DEFAULT_PORTS = {"postgresql": 5432, "redis": 6379, "mqtt": 1883}
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
PROG = "scripts/test_servers.py"


class ServerError(Exception):
    """A server could not be started; the message says why (and shows its log)."""


def say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def listening(url: str) -> bool:
    """Whether something accepts TCP connections at the URL's host and port."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or DEFAULT_PORTS.get(parts.scheme.split("+")[0], 0)
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def postgres_signs_in(url: str) -> bool:
    """Whether the PostgreSQL at `url` lets the tests in (a Debian cluster just installed on
    a fresh machine listens on 5432 but wants a password): psql, when there is one, tries."""
    psql = shutil.which("psql") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"))), None
    )
    if psql is None:
        return True
    env = {**os.environ, "PGCONNECT_TIMEOUT": "5"}
    try:
        result = subprocess.run(
            [psql, "-w", "-X", "-q", "-d", url, "-c", "SELECT 1"],
            capture_output=True,
            env=env,
            timeout=15,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    if result.returncode != 0:
        reason = result.stderr.decode(errors="replace").strip().splitlines()[-1:]
        say(f"{url} listens but does not let the tests in ({' '.join(reason)})")
    return result.returncode == 0


def usable(var: str, url: str) -> bool:
    if not listening(url):
        return False
    return var != "PARKING_TEST_DATABASE_URL" or postgres_signs_in(url)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def log_tail(path: Path, limit: int = 4000) -> str:
    if not path.exists():
        return "(no log)"
    return path.read_text(errors="replace")[-limit:] or "(empty log)"


def _die_with_parent(sig: int) -> Callable[[], None]:
    """For Popen's preexec_fn: the server gets `sig` if this process dies without stopping
    it (SIGKILL), so no server outlives the run. Linux only; elsewhere a no-op."""

    def preexec() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG

    return preexec


@dataclass
class Server:
    name: str
    env_var: str
    url: str
    log: Path
    process: subprocess.Popen[bytes]
    stop_signal: signal.Signals

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            say(f"{self.name} did not stop in {STOP_TIMEOUT_S:.0f}s; killing it")
            self.process.kill()
            self.process.wait()


class Servers:
    """The throwaway servers of one run, all in one temporary folder."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="parking-test-servers-"))
        # Unprivileged server users (postgres, mosquitto) must reach their subfolders.
        self.folder.chmod(0o711)
        self.started: list[Server] = []

    def _spawn(
        self,
        name: str,
        argv: list[str],
        log: Path,
        stop_signal: signal.Signals,
        user: str | None = None,
    ) -> subprocess.Popen[bytes]:
        uid = gid = None
        groups: list[int] | None = None
        if user is not None:
            entry = pwd.getpwnam(user)
            uid, gid, groups = entry.pw_uid, entry.pw_gid, []
        with log.open("ab") as log_file:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=log.parent,
                # Out of the terminal's process group: Ctrl-C reaches the tests, which still
                # need the servers for their teardown; the servers are stopped after them.
                start_new_session=True,
                preexec_fn=_die_with_parent(stop_signal),
                user=uid,
                group=gid,
                extra_groups=groups,
            )

    def _wait(self, server: Server, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if server.process.poll() is not None:
                raise ServerError(
                    f"{server.name} exited with {server.process.returncode} before accepting "
                    f"connections; its log ({server.log}):\n{log_tail(server.log)}"
                )
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{server.name} did not accept connections within {START_TIMEOUT_S:.0f}s; "
                    f"its log ({server.log}):\n{log_tail(server.log)}"
                )
            time.sleep(0.1)

    # PostgreSQL

    def postgres(self) -> Server:
        bin_dir = postgres_bin()
        folder = self.folder / "postgresql"
        folder.mkdir(mode=0o700)
        user = None
        if os.geteuid() == 0:
            # initdb and postgres refuse to run as root.
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise ServerError(
                    "running as root and there is no `postgres` user to run PostgreSQL as "
                    "(Debian's package postgresql creates it)"
                ) from None
            user = "postgres"
            shutil.chown(folder, user="postgres", group="postgres")
        data, log = folder / "data", folder / "postgres.log"
        initdb = self._spawn(
            "initdb",
            [
                str(bin_dir / "initdb"),
                *("-D", str(data), "-A", "trust", "-U", "postgres"),
                *("-E", "UTF8", "--locale=C.UTF-8", "--no-sync"),
            ],
            folder / "initdb.log",
            signal.SIGTERM,
            user,
        )
        try:
            code = initdb.wait()
        except BaseException:
            initdb.kill()
            initdb.wait()
            raise
        if code != 0:
            raise ServerError(
                f"initdb failed ({initdb.returncode}):\n{log_tail(folder / 'initdb.log')}"
            )
        port = free_port()
        argv = [
            str(bin_dir / "postgres"),
            *("-D", str(data), "-p", str(port), "-k", str(folder)),
            *("-c", "listen_addresses=127.0.0.1", "-c", "timezone=Etc/UTC"),
            # As the CI machine's conf.d/90-ci.conf: no autovacuum; nothing to keep: no fsync.
            *("-c", "autovacuum=off", "-c", "fsync=off", "-c", "full_page_writes=off"),
        ]
        # SIGINT: fast shutdown (clients cut, then a clean stop).
        process = self._spawn("postgres", argv, log, signal.SIGINT, user)
        server = Server(
            "PostgreSQL",
            "PARKING_TEST_DATABASE_URL",
            f"postgresql://postgres@127.0.0.1:{port}/postgres",
            log,
            process,
            signal.SIGINT,
        )
        self.started.append(server)
        isready = [str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
        self._wait(server, lambda: subprocess.run(isready, check=False).returncode == 0)
        return server

    # Redis

    def redis(self, wanted_url: str) -> Server:
        executable = find_binary("redis-server", "redis-server")
        folder = self.folder / "redis"
        folder.mkdir(mode=0o700)
        # The same database number as the URL the tests were given (14 by default).
        database = urlsplit(wanted_url).path.strip("/") or "0"
        if not database.isdigit():
            database = "0"
        port = free_port()
        argv = [
            executable,
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)),
            *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            *("--databases", str(max(16, int(database) + 1))),
        ]
        log = folder / "redis.log"
        server = Server(
            "Redis",
            "PARKING_TEST_REDIS_URL",
            f"redis://127.0.0.1:{port}/{database}",
            log,
            self._spawn("redis-server", argv, log, signal.SIGTERM),
            signal.SIGTERM,
        )
        self.started.append(server)
        self._wait(server, lambda: redis_pong(port))
        return server

    # Mosquitto

    def mosquitto(self) -> Server:
        executable = find_binary("mosquitto", "mosquitto")
        folder = self.folder / "mosquitto"
        # As root: run as the mosquitto user from the start (mosquitto would drop to it itself,
        # which would clear _die_with_parent's signal); its files stay readable to it.
        folder.mkdir(mode=0o755)
        user = None
        if os.geteuid() == 0:
            with contextlib.suppress(KeyError):
                user = pwd.getpwnam("mosquitto").pw_name
        port = free_port()
        config = folder / "mosquitto.conf"
        config.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n",
            encoding="utf-8",
        )
        config.chmod(0o644)
        log = folder / "mosquitto.log"
        server = Server(
            "Mosquitto",
            "PARKING_TEST_MQTT_URL",
            f"mqtt://127.0.0.1:{port}",
            log,
            self._spawn("mosquitto", [executable, "-c", str(config)], log, signal.SIGTERM, user),
            signal.SIGTERM,
        )
        self.started.append(server)
        self._wait(server, lambda: listening(server.url))
        return server

    def close(self) -> None:
        for server in reversed(self.started):
            try:
                server.stop()
            except OSError as exc:
                say(f"stopping {server.name}: {exc}")
        self.started.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


def find_binary(name: str, package: str) -> str:
    found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if found is None:
        raise ServerError(
            f"{name} is not installed (Debian package {package}: apt-get install {package})"
        )
    return found


def postgres_bin() -> Path:
    """The newest PostgreSQL in /usr/lib/postgresql/<version>/bin."""
    candidates = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]

    def version(bin_dir: Path) -> tuple[int, str]:
        name = bin_dir.parent.name
        return (int(name) if name.isdigit() else 0, name)

    for bin_dir in sorted(candidates, key=version, reverse=True):
        if all((bin_dir / tool).exists() for tool in ("postgres", "pg_isready")):
            return bin_dir
    raise ServerError(
        "PostgreSQL's initdb/postgres/pg_isready are not in /usr/lib/postgresql/*/bin "
        "(Debian package postgresql: apt-get install postgresql)"
    )


def redis_pong(port: int) -> bool:
    """PING answered with PONG (not LOADING or an error)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def forwarded_signals(child: Callable[[], subprocess.Popen[bytes] | None]) -> Iterator[None]:
    """While the command runs: Ctrl-C (SIGINT) is the terminal's to deliver to the command
    (this process ignores it, as a shell does); SIGTERM and SIGHUP are passed on to it."""

    def forward(signum: int, _frame: FrameType | None) -> None:
        process = child()
        if process is not None and process.poll() is None:
            process.send_signal(signum)

    def ignore(_signum: int, _frame: FrameType | None) -> None:
        """Not SIG_IGN: the command would inherit that, and Ctrl-C would not stop it."""

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, ignore),
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
        signal.SIGHUP: signal.signal(signal.SIGHUP, forward),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    wanted = {var: os.environ.get(var) or url for var, url in DEFAULT_URLS.items()}
    missing = [var for var, url in wanted.items() if not usable(var, url)]
    if not missing:
        os.execvp(argv[0], argv)

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    # SIGTERM/SIGHUP while the servers start: unwind (and stop what has started).
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    servers = Servers()
    process: subprocess.Popen[bytes] | None = None
    try:
        starters: dict[str, Callable[[], Server]] = {
            "PARKING_TEST_DATABASE_URL": servers.postgres,
            "PARKING_TEST_REDIS_URL": lambda: servers.redis(wanted["PARKING_TEST_REDIS_URL"]),
            "PARKING_TEST_MQTT_URL": servers.mosquitto,
        }
        env = dict(os.environ)
        for var in missing:
            server = starters[var]()
            env[var] = server.url
            say(f"cannot use {wanted[var]}: started {server.name} at {server.url}")
        with forwarded_signals(lambda: process):
            process = subprocess.Popen(argv, env=env)
            code = process.wait()
        return code if code >= 0 else 128 - code
    except ServerError as exc:
        say(str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait()
        servers.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
