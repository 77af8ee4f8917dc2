"""Personal data: plates and phone numbers never reach the logs in clear, and capture images
are erased after the retention period by a job."""

import base64
import io
import json
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from parking.admin import repository as admin
from parking.logging import configure_logging, get_logger
from parking.retention import service as retention
from parking.runtime import Runtime
from tests.conftest import (
    Lot,
    api_server,
    bearer,
    driver_token,
    eventually,
    exit_after,
    make_driver,
    reject_awaiting,
    unique_plate,
)
from tests.faults import free_port
from tests.gates import GateProbe
from tests.test_lane_certainty import FRAME, _awaiting
from tests.test_lane_reading import FIXTURES


@pytest.fixture
def service_logs() -> Iterator[io.StringIO]:
    """The service's own log configuration (masking included), written to a buffer."""
    buffer = io.StringIO()
    configure_logging("DEBUG", json=True, stream=buffer)
    yield buffer
    configure_logging("INFO")  # as tests/conftest.py has it for the run


def logged_text(buffer: io.StringIO) -> str:
    """The JSON lines as read: JSON escapes 浙 as \\u6d59, so a plate in clear would never
    match the raw buffer."""
    return "\n".join(
        json.dumps(json.loads(line), ensure_ascii=False) for line in buffer.getvalue().splitlines()
    )


async def test_plates_and_phones_stay_out_of_the_logs(
    service_logs: io.StringIO,
    runtime: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
) -> None:
    phone = f"137{uuid.uuid4().int % 10**8:08d}"
    sent = await api.post("/api/v1/auth/sign-in-codes", json={"phone": phone})
    code = app.state.sms.last_code(phone)
    grant = {
        "grant_type": "sign_in_code",
        "phone": phone,
        "challenge_id": sent.json()["challenge_id"],
    }
    await api.post("/api/v1/auth/token", json={**grant, "code": "000000"})
    signed_in = await api.post("/api/v1/auth/token", json={**grant, "code": code})
    assert signed_in.status_code == 200

    charged = await make_driver(runtime, unique_plate())
    await exit_after(runtime, gate, lot, charged.plate, timedelta(minutes=70))
    stranger = unique_plate()  # no entry record: an exception for a person, logged as such
    await gate.decide(lot.code, "out1", gate.capture("out", stranger))
    unbound = unique_plate()
    await exit_after(runtime, gate, lot, unbound, timedelta(minutes=70))

    async def charged_done() -> bool:
        async with runtime.pool.acquire() as conn:
            return (
                await conn.fetchval(
                    "SELECT status FROM charges WHERE account_id = $1", charged.account_id
                )
                == "succeeded"
            )

    await eventually(charged_done)
    # What a careless call or a database error would put in a line: fields named plate or
    # phone, and an error text quoting the plate (a unique violation on a binding).
    log = get_logger("tests.privacy")
    log.info("driver.bound", plate=charged.plate, phone=phone)
    try:
        async with runtime.pool.acquire() as conn:
            await admin.bind_plate(conn, charged.account_id, charged.plate, "blue")
    except asyncpg.UniqueViolationError:
        log.exception("driver.bind_failed")
    text = logged_text(service_logs)
    assert "driver.bind_failed" in text and "UniqueViolationError" in text
    assert "lane.decided" in text and "billing.charged" in text, "the flows were logged"
    for secret in (phone, charged.plate, stranger, unbound, code):
        assert secret not in text, f"{secret!r} appears in the logs"


def test_error_texts_quoting_a_plate_or_phone_are_masked(service_logs: io.StringIO) -> None:
    """A provider's or a validation's error message repeats what it was given: a WeChat answer
    with its plate_number, a phone in a refused request (logged as error, reason or why)."""
    plate, phone = unique_plate(), f"137{uuid.uuid4().int % 10**8:08d}"
    quoted = f"not a parking entry: input_value={{'plate_number': '{plate}', 'phone': '{phone}'}}"
    log = get_logger("tests.privacy")
    log.warning("outbox.job_failed", error=quoted)
    log.warning("payments.notification_rejected", reason=quoted)
    log.warning("gate.command_refused", why=quoted)
    text = logged_text(service_logs)
    assert text.count("not a parking entry") == 3, text
    assert plate not in text and phone not in text, text


async def test_capture_images_are_erased_after_the_retention_period(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    # A photo of a car with no entry record here: held for a person, its frame kept for them.
    photo = base64.b64encode((FIXTURES / "plate_wanM04698.jpg").read_bytes()).decode()
    fresh, old = (gate.capture("out", None).model_copy(update={"image": photo}) for _ in range(2))
    for capture in (fresh, old):
        await gate.send(lot.code, "out1", capture)
        await gate.wait_for(capture, timeout_s=60)  # the first OCR loads the model
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE lane_exceptions SET created_at = now() - interval '31 days' "
            "WHERE capture_id = $1",
            old.capture_id,
        )
    erased = await retention.expire_images(
        runtime.pool, runtime.settings.image_retention_days, datetime.now(UTC)
    )
    assert erased >= 1
    async with runtime.pool.acquire() as conn:
        kept = {
            r["capture_id"]: r["image"] is not None
            for r in await conn.fetch(
                "SELECT capture_id, image FROM lane_exceptions WHERE capture_id = ANY($1)",
                [fresh.capture_id, old.capture_id],
            )
        }
    assert kept == {fresh.capture_id: True, old.capture_id: False}


async def test_a_rejected_charges_exit_frame_is_erased_with_its_capture(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """Review 24. A charge waits for an operator's confirmation; its exit was captured 29 days
    ago (within the retention, its frame rightly kept). The operator rejects it: the exit goes
    to the exception queue with a copy of its frame. Two days later the capture is 31 days old
    and the sweep erased its frame, but the exception's copy, aged from the rejection, was still
    served."""
    retention_days = runtime.settings.image_retention_days
    _, (charge,) = await _awaiting(runtime, gate, lot)
    async with runtime.pool.acquire() as conn:
        exit_capture = await conn.fetchval(
            "SELECT exit_capture_id FROM sessions WHERE id = $1", charge["session_id"]
        )
        await conn.execute(
            "UPDATE capture_frames SET created_at = now() - make_interval(days => $2) "
            "WHERE capture_id = $1",
            exit_capture,
            retention_days - 1,
        )
    attendant, exception_id = await reject_awaiting(runtime, app, api, lot, charge["id"])
    url = f"/api/v1/operator/exceptions/{exception_id}/image"
    shown = await api.get(url, headers=attendant)
    assert (shown.status_code, shown.content) == (200, FRAME)  # within the retention: fine

    two_days_on = datetime.now(UTC) + timedelta(days=2)
    await retention.expire_images(runtime.pool, retention_days, two_days_on)
    async with runtime.pool.acquire() as conn:
        evidence = await conn.fetchval(
            "SELECT image FROM capture_frames WHERE capture_id = $1", exit_capture
        )
    assert evidence is None, "the capture's own frame is past the retention and erased"
    later = await api.get(url, headers=attendant)
    assert later.status_code == 404, (
        f"the frame of a capture {retention_days + 1} days old is still served "
        f"({later.status_code}, {len(later.content)} bytes)"
    )


class _Lines(logging.Handler):
    """What the server's stdlib loggers (uvicorn's) write, formatted as their handler would."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def test_an_unexpected_error_quoting_a_plate_is_not_logged_in_clear(
    runtime: Runtime, app: FastAPI
) -> None:
    """Review 24. A request that ends in a 500 is logged by uvicorn's own logger ("Exception in
    ASGI application" with the traceback), which bypassed structlog's masking; a database
    error's text quotes the row (DETAIL: Failing row contains (..., 浙A..., ...)). Here a
    constraint the binding's insert does not expect stands in for any unforeseen database
    error."""
    driver = await make_driver(runtime, unique_plate())
    plate = unique_plate()
    constraint = f"review24_{uuid.uuid4().hex[:8]}"
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            f"ALTER TABLE plate_bindings ADD CONSTRAINT {constraint} "
            f"CHECK (plate <> '{plate}') NOT VALID"
        )
    lines = _Lines()
    server_log = logging.getLogger("uvicorn.error")
    try:
        async with (
            api_server(runtime, free_port(), app=app) as base,
            httpx.AsyncClient(base_url=base) as client,
        ):
            # Once the server has configured its loggers (that replaces their handlers).
            server_log.addHandler(lines)
            headers = bearer(driver_token(app, driver.account_id))
            answer = await client.post(
                "/api/v1/me/plates",
                json={
                    "plate": plate,
                    "color": "blue",
                    "licence_no": f"DEV-{plate}",
                    "owner_name": "X",
                },
                headers=headers,
            )
    finally:
        server_log.removeHandler(lines)
        async with runtime.pool.acquire() as conn:
            await conn.execute(f"ALTER TABLE plate_bindings DROP CONSTRAINT {constraint}")
    assert answer.status_code == 500, answer.text
    text = "\n".join(lines.lines)
    assert "Exception in ASGI application" in text, text  # the 500 was logged
    assert plate not in text, f"the plate is in the server's log in clear:\n{text[-600:]}"
