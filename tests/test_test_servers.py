"""The test command on a machine whose servers are out of reach: scripts/test_servers.py starts a
throwaway PostgreSQL, Redis and Mosquitto for the run (each only where the configured one cannot
be used), hands their URLs to the command it runs, and stops them afterwards."""

import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import orjson

ROOT = Path(__file__).resolve().parent.parent
VARS = ("PARKING_TEST_DATABASE_URL", "PARKING_TEST_REDIS_URL", "PARKING_TEST_MQTT_URL")
# Reports what the run was handed, and that each server answers there: PostgreSQL lets the
# tests' user in, Redis answers PING on the database number asked for, the broker accepts.
CHILD = f"""
VARS = {VARS!r}
import asyncio, os, socket, sys
from urllib.parse import urlsplit
import asyncpg, orjson
from redis.asyncio import Redis

async def main():
    urls = {{v: os.environ[v] for v in VARS}}
    conn = await asyncpg.connect(urls["PARKING_TEST_DATABASE_URL"])
    await conn.fetchval("SELECT 1")
    await conn.close()
    redis = Redis.from_url(urls["PARKING_TEST_REDIS_URL"])
    assert await redis.ping()
    await redis.aclose()
    mqtt = urlsplit(urls["PARKING_TEST_MQTT_URL"])
    socket.create_connection((mqtt.hostname, mqtt.port), timeout=5).close()
    print(orjson.dumps(urls).decode())

asyncio.run(main())
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


def _accepts(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=1).close()
    except OSError:
        return False
    return True


def test_servers_out_of_reach_are_replaced_for_the_run_and_stopped_after() -> None:
    env = dict(os.environ)
    env["PARKING_TEST_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres"
    env["PARKING_TEST_REDIS_URL"] = f"redis://127.0.0.1:{_closed_port()}/14"
    env["PARKING_TEST_MQTT_URL"] = f"mqtt://127.0.0.1:{_closed_port()}"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "test_servers.py"), sys.executable, "-c", CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    handed = orjson.loads(result.stdout.strip().splitlines()[-1])
    for var in VARS:
        assert handed[var] != env[var], var
        assert not _accepts(handed[var]), f"{var}: {handed[var]} still running after the run"
    assert handed["PARKING_TEST_REDIS_URL"].endswith("/14"), "the database number is kept"


def test_a_postgresql_that_does_not_let_the_tests_in_is_replaced() -> None:
    env = dict(os.environ)
    # The machine's server (or the run's) listens, but this role cannot sign in: as on a fresh
    # machine where the Debian cluster wants a password.
    listening = urlsplit(
        os.environ.get("PARKING_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/")
    )
    env["PARKING_TEST_DATABASE_URL"] = (
        f"postgresql://no_such_role_for_tests@{listening.hostname}:{listening.port}/postgres"
    )
    child = "import os; print(os.environ['PARKING_TEST_DATABASE_URL'])"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "test_servers.py"), sys.executable, "-c", child],
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    handed = result.stdout.strip().splitlines()[-1]
    assert handed != env["PARKING_TEST_DATABASE_URL"]
    assert urlsplit(handed).port != listening.port
    assert "does not let the tests in" in result.stderr
