"""The operator dashboard in a real browser (Debian's headless Chromium driven by Playwright):
sign in, watch a car enter live, resolve an exception from the queue; a screenshot of the page
is left in `.artifacts/dashboard.png`."""

from datetime import timedelta
from pathlib import Path
from uuid import UUID

import pytest
from playwright.async_api import ConsoleMessage, async_playwright, expect

from parking.logging import mask_plate
from parking.runtime import Runtime
from parking_dev import sandbox
from tests.conftest import (
    Lot,
    api_server,
    backdate_entry,
    make_driver,
    make_staff,
    unique_plate,
)
from tests.gates import GateProbe

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / ".artifacts" / "dashboard.png"
FRAME = (Path(__file__).parent / "fixtures" / "plate_wanAD2Y34.jpg").read_bytes()
STEP_TIMEOUT_MS = 10_000

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium"
    ),
    pytest.mark.timeout(60),
]


async def _hold_unreadable_exit(runtime: Runtime, gate: GateProbe, lot: Lot) -> int:
    """An exit the camera could not read: the gate holds and an exception waits."""
    capture = gate.capture("out", None)
    command = await gate.decide(lot.code, "out1", capture)
    assert command["action"] == "hold", command
    return await _exception_id(runtime, capture.capture_id)


async def _exception_id(runtime: Runtime, capture_id: UUID) -> int:
    async with runtime.pool.acquire() as conn:
        exception_id: int = await conn.fetchval(
            "SELECT id FROM lane_exceptions WHERE capture_id = $1", capture_id
        )
    return exception_id


async def test_operator_watches_a_car_enter_and_resolves_an_exception(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    staff = await make_staff(runtime, lot.operator_id)
    # An exception already waiting, with its frame (set directly: this test reads no images).
    waiting = await _hold_unreadable_exit(runtime, gate, lot)
    async with runtime.pool.acquire() as conn:
        await conn.execute("UPDATE lane_exceptions SET image = $2 WHERE id = $1", waiting, FRAME)
    driver = await make_driver(runtime, unique_plate())
    plate = driver.plate
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            problems.append(message.text)

    async with (
        api_server(runtime, sandbox.free_port()) as url,
        async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page(viewport={"width": 1360, "height": 1000})
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("console", on_console)
            await page.goto(f"{url}/dashboard")

            await page.fill("#email", staff.email)
            await page.fill("#password", staff.password)
            await page.click("#sign-in")
            occupancy = page.locator(f"#occupancy-{lot.code}")
            await expect(occupancy).to_have_text("0", timeout=STEP_TIMEOUT_MS)
            await expect(page.locator("#feed-status")).to_have_text("live")
            await page.wait_for_function(
                """id => {
                    const image = document.getElementById(`exception-image-${id}`);
                    return image !== null && image.complete && image.naturalWidth > 0;
                }""",
                arg=waiting,
            )

            command = await gate.decide(lot.code, "in1", gate.capture("in", plate))
            assert command["action"] == "open"
            await expect(occupancy).to_have_text("1", timeout=STEP_TIMEOUT_MS)
            newest = page.locator("#lane-feed tr").first
            await expect(newest).to_contain_text(mask_plate(plate), timeout=STEP_TIMEOUT_MS)
            await expect(newest).to_contain_text("entered")

            # An hour and a half later the car leaves, but the camera cannot read it: the
            # operator types the plate, the gate opens and the fee is charged afterwards.
            await backdate_entry(runtime, lot, plate, timedelta(minutes=90))
            held = await _hold_unreadable_exit(runtime, gate, lot)
            card = page.locator(f"#exception-{held}")
            await expect(card).to_be_visible(timeout=STEP_TIMEOUT_MS)
            await expect(card).to_contain_text("Plate unreadable")
            await page.fill(f"#resolve-plate-{held}", plate)
            await page.click(f"#resolve-{held}")
            await expect(page.locator(f"#exception-result-{held}")).to_have_text(
                f"Resolved as {plate}: exited_pay_later, gate open, fee ¥12.00",
                timeout=STEP_TIMEOUT_MS,
            )
            await expect(card).to_have_attribute("data-status", "resolved")
            await expect(occupancy).to_have_text("0", timeout=STEP_TIMEOUT_MS)
            await expect(page.locator("#open-exceptions")).to_have_text("1")
            await expect(page.locator("#revenue-today")).to_have_text("¥12.00")

            SCREENSHOT.parent.mkdir(exist_ok=True)
            await page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            await browser.close()

    assert problems == []
    async with runtime.pool.acquire() as conn:
        resolved = await conn.fetchrow(
            "SELECT status, resolved_plate FROM lane_exceptions WHERE id = $1", held
        )
    assert (resolved["status"], resolved["resolved_plate"]) == ("resolved", plate)
    assert SCREENSHOT.stat().st_size > 0
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
