"""The driver's app (`/app`) in a real browser (Debian's headless Chromium driven by
Playwright) on a 360-px phone: sign in with a phone code, bind a plate (colour + characters,
proven through the vehicle registry), see a stay with both frames and say "not my car";
another driver's claim on a bound plate shows as a dispute. Screenshots go to
`.artifacts/pages-app-*.png`."""

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from fastapi import FastAPI
from playwright.async_api import Browser, async_playwright, expect

from parking.runtime import Runtime
from parking_dev import sandbox
from tests.conftest import Lot, api_server, make_driver, unique_plate
from tests.gates import GateProbe
from tests.test_dashboard_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    ROOT,
    STEP_TIMEOUT_MS,
    UNNAMED,
)
from tests.test_evidence import exit_with_frames

ARTIFACTS = ROOT / ".artifacts"
PHONE = {"width": 360, "height": 780}

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium"
    ),
    pytest.mark.timeout(90),
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


async def test_a_driver_signs_in_binds_a_plate_and_disputes_a_stay_seen_with_both_frames(
    runtime: Runtime, app: FastAPI, gate: GateProbe, lot: Lot, browser: Browser
) -> None:
    driver = await make_driver(runtime, unique_plate())
    phone = f"139{uuid.uuid4().int % 10**8:08d}"
    async with runtime.pool.acquire() as conn:
        await conn.execute("UPDATE accounts SET phone = $2 WHERE id = $1", driver.account_id, phone)
    stay_id = await exit_with_frames(runtime, gate, lot, driver.plate, timedelta(minutes=100))
    new_plate = unique_plate()

    ARTIFACTS.mkdir(exist_ok=True)
    problems: list[str] = []
    async with api_server(runtime, sandbox.free_port(), app=app) as url:
        context = await browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
        try:
            page = await context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.on("pageerror", lambda error: problems.append(str(error)))
            await page.goto(f"{url}/app")
            await page.get_by_label("手机号").fill(phone)
            await page.get_by_role("button", name="获取验证码").click()
            await expect(page.locator("#sign-in-status")).to_have_text("验证码已发送")
            code = app.state.sms.last_code(phone)
            assert code is not None
            await page.get_by_label("验证码").fill(code)
            await page.get_by_role("button", name="登录").click()
            await expect(page.locator("#app")).to_have_attribute("data-state", "signed-in")
            await expect(page.locator(f'#plates li[data-plate="{driver.plate}"]')).to_be_visible()

            # Bind a second vehicle: colour and characters, proven by the registry.
            await page.get_by_label("车牌颜色").select_option("blue")
            await page.get_by_label("车牌号").fill(new_plate)
            await page.get_by_label("行驶证档案编号").fill(f"DEV-{new_plate}")
            await page.get_by_label("车主姓名").fill("张三")
            await page.get_by_role("button", name="绑定", exact=True).click()
            await expect(page.locator("#bind-status")).to_have_text("绑定成功")
            await expect(page.locator(f'#plates li[data-plate="{new_plate}"]')).to_contain_text(
                "蓝牌"
            )
            assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
            await page.screenshot(path=str(ARTIFACTS / "pages-app-plates-360.png"), full_page=True)

            # The stay, with both frames, and "not my car" in one tap.
            await page.get_by_role("button", name="停车记录").click()
            await page.locator(f"#stay-{stay_id}").click()
            for frame in ("#stay-entry-frame", "#stay-exit-frame"):
                await page.wait_for_function(
                    "s => { const i = document.querySelector(s);"
                    " return i.complete && i.naturalWidth > 0; }",
                    arg=frame,
                )
            await page.get_by_role("button", name="不是我的车").click()
            await expect(page.locator("#stay-dispute")).to_have_text("申诉处理中")
            await expect(page.get_by_role("button", name="不是我的车")).to_be_hidden()
            await page.screenshot(path=str(ARTIFACTS / "pages-app-stay-360.png"), full_page=True)
            assert await page.evaluate(UNNAMED) == []

            await page.get_by_role("button", name="欠费").click()
            await expect(page.locator("#debts")).to_contain_text("没有欠费")
        finally:
            await context.close()

    assert problems == []
    async with runtime.pool.acquire() as conn:
        bound = await conn.fetchval(
            "SELECT count(*) FROM plate_bindings WHERE account_id = $1 AND plate = $2 "
            "AND color = 'blue' AND unbound_at IS NULL",
            driver.account_id,
            new_plate,
        )
        disputed = await conn.fetchval(
            "SELECT d.status FROM charge_disputes d JOIN charges c ON c.id = d.charge_id "
            "WHERE c.session_id = $1",
            stay_id,
        )
    assert (bound, disputed) == (1, "open")
