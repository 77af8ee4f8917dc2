"""The pay page a held gate's QR code opens, in a real browser (Debian's headless Chromium
driven by Playwright) on a 360-px phone: a held driver sees the fee with its breakdown and
the debt it includes, pays through the provider's payer page and sees "请通行" once the
barrier opens, without reloading; an expired QR code says so. Screenshots go to
`.artifacts/pages-pay-*.png`."""

from collections.abc import AsyncIterator
from datetime import timedelta
from uuid import uuid4

import httpx
import pytest
from fastapi import FastAPI
from playwright.async_api import Browser, async_playwright, expect

from parking.logging import mask_plate
from parking.runtime import Runtime
from parking_dev import sandbox
from tests.conftest import (
    Lot,
    api_server,
    bearer,
    driver_in_debt,
    enter,
    make_staff,
    staff_token,
    unique_plate,
)
from tests.gates import GateProbe
from tests.test_dashboard_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    ROOT,
    STEP_TIMEOUT_MS,
    UNNAMED,
)

ARTIFACTS = ROOT / ".artifacts"
PHONE = {"width": 360, "height": 780}
DESKTOP = {"width": 1280, "height": 900}

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium"
    ),
    pytest.mark.timeout(60),
]


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


async def _held(gate: GateProbe, lot: Lot, plate: str) -> dict:
    command = await gate.decide(lot.code, "out1", gate.capture("out", plate))
    assert command["action"] == "hold", command
    return command


async def test_a_held_driver_pays_on_the_page_and_is_told_to_drive_on(
    runtime: Runtime, gate: GateProbe, lot: Lot, browser: Browser
) -> None:
    driver = await driver_in_debt(runtime, gate, lot)  # ¥6.00 owed, pay-later blocked
    await enter(runtime, gate, lot, driver.plate, parked_for=timedelta(minutes=90))
    held = await _held(gate, lot, driver.plate)
    assert held["fee_fen"] == 1200 + 600
    path = httpx.URL(held["payment_qr_url"]).path
    assert path == f"/pay/{held['capture_id']}"

    ARTIFACTS.mkdir(exist_ok=True)
    problems: list[str] = []
    async with api_server(runtime, sandbox.free_port()) as url:
        context = await browser.new_context(viewport=PHONE)
        try:
            page = await context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.on("pageerror", lambda error: problems.append(str(error)))
            await page.goto(url + path)
            await expect(page.locator("#car-park")).to_have_text(lot.name)
            await expect(page.locator("#plate")).to_have_text(mask_plate(driver.plate))
            await expect(page.locator("#stay-fee")).to_have_text("¥12.00")
            await expect(page.locator("#breakdown .debt")).to_contain_text("¥6.00")
            await expect(page.locator("#total")).to_have_text("¥18.00")
            await expect(page.locator("#status")).to_have_text("请支付后离场")
            # Nothing wider than the phone.
            assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
            await page.screenshot(path=str(ARTIFACTS / "pages-pay-due-360.png"), full_page=True)
            assert await page.evaluate(UNNAMED) == []

            async with page.expect_popup() as opened:
                await page.get_by_role("button", name="支付 ¥18.00").click()
            wallet = await opened.value
            await wallet.get_by_role("button", name="Pay").click()

            # The page follows the payment and the barrier by itself: no reload.
            await expect(page.locator("#status")).to_have_text("请通行", timeout=20_000)
            await expect(page.locator("#pay")).to_be_hidden()
            await page.screenshot(path=str(ARTIFACTS / "pages-pay-open-360.png"), full_page=True)

            # Scanned again later, the page says the stay is settled.
            await page.reload()
            await expect(page.locator("#status")).to_have_text("请通行")
        finally:
            await context.close()

    assert problems == []
    async with runtime.pool.acquire() as conn:
        paid = await conn.fetchrow(
            "SELECT status, amount_fen FROM payments WHERE capture_id = $1", held["capture_id"]
        )
        outcome = await conn.fetchval(
            "SELECT outcome FROM captures WHERE capture_id = $1", held["capture_id"]
        )
    assert (paid["status"], paid["amount_fen"], outcome) == ("succeeded", 1800, "paid_at_gate")


async def test_the_page_showing_the_fee_says_drive_on_when_staff_open_by_hand(
    runtime: Runtime, app: FastAPI, gate: GateProbe, lot: Lot, browser: Browser
) -> None:
    plate = unique_plate()  # bound to nobody: held with the fee to pay
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    held = await _held(gate, lot, plate)
    attendant = await make_staff(runtime, lot.operator_id, "attendant")
    problems: list[str] = []
    async with api_server(runtime, sandbox.free_port(), app=app) as url:
        context = await browser.new_context(viewport=PHONE)
        try:
            page = await context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.on("pageerror", lambda error: problems.append(str(error)))
            await page.goto(url + httpx.URL(held["payment_qr_url"]).path)
            await expect(page.locator("#status")).to_have_text("请支付后离场")

            # Before the driver starts paying, the attendant opens the barrier by hand.
            async with httpx.AsyncClient(base_url=url) as api:
                opened = await api.post(
                    f"/api/v1/operator/car-parks/{lot.code}/gates/out1/open",
                    json={"reason": "扫码失败，现场收现金", "capture_id": held["capture_id"]},
                    headers=bearer(staff_token(app, attendant)),
                )
                assert opened.status_code == 200, opened.text
                status = await api.get(f"/api/v1/gate-payments/{held['capture_id']}")
            assert status.status_code == 409
            assert status.json()["error"]["code"] == "hold_lifted"

            # The page learns it by itself, without a reload, and offers no payment any more.
            await expect(page.locator("#status")).to_have_text(
                "工作人员已抬杆，请通行", timeout=STEP_TIMEOUT_MS
            )
            await expect(page.locator("#pay")).to_be_hidden()
            await page.screenshot(path=str(ARTIFACTS / "pages-pay-opened-360.png"), full_page=True)
            await page.reload()
            await expect(page.locator("#status")).to_have_text("工作人员已抬杆，请通行")
        finally:
            await context.close()

    assert problems == []
    async with runtime.pool.acquire() as conn:
        outcome = await conn.fetchval(
            "SELECT outcome FROM captures WHERE capture_id = $1", held["capture_id"]
        )
        payments = await conn.fetchval(
            "SELECT count(*) FROM payments WHERE capture_id = $1", held["capture_id"]
        )
    assert (outcome, payments) == ("opened_by_operator", 0)


async def test_an_expired_or_unknown_qr_code_says_so(
    runtime: Runtime, gate: GateProbe, lot: Lot, browser: Browser
) -> None:
    plate = unique_plate()  # not bound: held for the fee
    await enter(runtime, gate, lot, plate, parked_for=timedelta(minutes=90))
    held = await _held(gate, lot, plate)
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE captures SET received_at = received_at - $2::interval WHERE capture_id = $1",
            held["capture_id"],
            timedelta(seconds=runtime.settings.gate_qr_ttl_s + 60),
        )
    async with api_server(runtime, sandbox.free_port()) as url:
        context = await browser.new_context(viewport=DESKTOP)
        try:
            page = await context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            answer = await page.goto(f"{url}/pay/{held['capture_id']}")
            assert answer is not None and answer.status == 200
            await expect(page.locator("#status")).to_contain_text("二维码已过期")
            await expect(page.locator("#pay")).to_have_count(0)
            await page.screenshot(path=str(ARTIFACTS / "pages-pay-expired-1280.png"))
            await page.get_by_role("link", name="Switch to English").click()
            await expect(page.locator("#status")).to_contain_text("This QR code has expired")
            await expect(page.locator("html")).to_have_attribute("lang", "en")

            answer = await page.goto(f"{url}/pay/{uuid4()}")
            assert answer is not None and answer.status == 404
            await expect(page.locator("#status")).to_contain_text("二维码无效")
        finally:
            await context.close()
        async with httpx.AsyncClient(base_url=url) as api:
            refused = await api.post(f"/api/v1/gate-payments/{held['capture_id']}")
    assert refused.status_code == 410
    assert refused.json()["error"]["code"] == "qr_expired"
    async with runtime.pool.acquire() as conn:
        assert not await conn.fetchval(
            "SELECT count(*) FROM payments WHERE capture_id = $1", held["capture_id"]
        )
