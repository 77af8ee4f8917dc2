"""schemathesis, run against the OpenAPI schema of the live API, finds no server error: not as
an anonymous caller, not as a driver, not as an operator admin (a real server on loopback,
real PostgreSQL, Redis and broker behind it)."""

import asyncio
import os
import sys
from pathlib import Path
from typing import Literal

import pytest
from fastapi import FastAPI

from parking.runtime import Runtime
from parking_dev import sandbox
from tests.conftest import (
    Lot,
    api_server,
    driver_token,
    make_driver,
    make_staff,
    staff_token,
    unique_plate,
)

ST = Path(sys.executable).with_name("st")
# Long-lived streams are not request/response operations.
EXCLUDED = r"/events$"


@pytest.mark.parametrize("caller", ["anonymous", "driver", "operator_admin"])
async def test_schemathesis_finds_no_server_error(
    caller: Literal["anonymous", "driver", "operator_admin"],
    runtime: Runtime,
    app: FastAPI,
    lot: Lot,
    tmp_path: Path,
) -> None:
    headers: list[str] = []
    if caller == "driver":
        driver = await make_driver(runtime, unique_plate())
        headers = ["-H", f"Authorization: Bearer {driver_token(app, driver.account_id)}"]
    elif caller == "operator_admin":
        staff = await make_staff(runtime, lot.operator_id, "admin")
        headers = ["-H", f"Authorization: Bearer {staff_token(app, staff)}"]
    port = sandbox.free_port()
    async with api_server(runtime, port, app=app) as base_url:
        process = await asyncio.create_subprocess_exec(
            str(ST),
            "run",
            f"{base_url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "15",
            "--seed",
            "20261122",
            "--workers",
            "1",
            "--request-timeout",
            "10",
            "--exclude-path-regex",
            EXCLUDED,
            "--phases",
            "examples,coverage,fuzzing",
            *headers,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"},
        )
        output, _ = await asyncio.wait_for(process.communicate(), timeout=110)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]
    assert "passed" in text.lower(), text[-2000:]
