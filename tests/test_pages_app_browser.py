"""The driver's app (`/app`) in a real browser (Debian's headless Chromium driven by
Playwright) on a 360-px phone: sign in with a phone code, bind a plate (colour + characters,
proven through the vehicle registry), see a stay with both frames and say "not my car"; pay
what is owed through the provider's payer page, export the account's data and delete the
account. Screenshots go to `.artifacts/pages-app-*.png`."""

import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from fastapi import FastAPI
from playwright.async_api import Browser, Page, async_playwright, expect

from parking.runtime import Runtime
from parking.settings import Settings
from parking_dev import sandbox
from tests.conftest import Lot, api_server, driver_in_debt, make_driver, unique_plate
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


@pytest.fixture
def port() -> int:
    return sandbox.free_port()


@pytest.fixture
def settings(settings: Settings, port: int) -> Settings:
    """The provider's notifications reach this test's API server (a paid debt is booked)."""
    settings.public_base_url = f"http://127.0.0.1:{port}"
    return settings


async def _phone_of(runtime: Runtime, account_id: int) -> str:
    phone = f"139{uuid.uuid4().int % 10**8:08d}"
    async with runtime.pool.acquire() as conn:
        await conn.execute("UPDATE accounts SET phone = $2 WHERE id = $1", account_id, phone)
    return phone


async def _sign_in(page: Page, app: FastAPI, url: str, phone: str) -> None:
    await page.goto(f"{url}/app")
    await page.get_by_label("手机号").fill(phone)
    await page.get_by_role("button", name="获取验证码").click()
    await expect(page.locator("#sign-in-status")).to_have_text("验证码已发送")
    code = app.state.sms.last_code(phone)
    assert code is not None
    # A wrong code is refused in the page's language, not the API's English message.
    await page.get_by_label("验证码").fill("000000" if code != "000000" else "111111")
    await page.get_by_role("button", name="登录").click()
    await expect(page.locator("#sign-in-status")).to_contain_text("验证码不正确")
    await page.get_by_label("验证码").fill(code)
    await page.get_by_role("button", name="登录").click()
    await expect(page.locator("#app")).to_have_attribute("data-state", "signed-in")


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
    runtime: Runtime, app: FastAPI, gate: GateProbe, lot: Lot, browser: Browser, port: int
) -> None:
    driver = await make_driver(runtime, unique_plate())
    phone = await _phone_of(runtime, driver.account_id)
    stay_id = await exit_with_frames(runtime, gate, lot, driver.plate, timedelta(minutes=100))
    new_plate = unique_plate()

    ARTIFACTS.mkdir(exist_ok=True)
    problems: list[str] = []
    async with api_server(runtime, port, app=app) as url:
        context = await browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
        try:
            page = await context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.on("pageerror", lambda error: problems.append(str(error)))
            await _sign_in(page, app, url, phone)
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
            # Chinese units, as the pay page and the charge message write a stay's length.
            await expect(page.locator("#stay-facts")).to_contain_text("1小时40分")
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


async def test_a_driver_pays_what_is_owed_exports_their_data_and_deletes_the_account(
    runtime: Runtime, app: FastAPI, gate: GateProbe, lot: Lot, browser: Browser, port: int
) -> None:
    driver = await driver_in_debt(runtime, gate, lot)  # ¥6.00 owed
    phone = await _phone_of(runtime, driver.account_id)
    problems: list[str] = []
    async with api_server(runtime, port, app=app) as url:
        context = await browser.new_context(
            viewport=PHONE, is_mobile=True, has_touch=True, accept_downloads=True
        )
        try:
            page = await context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.on("pageerror", lambda error: problems.append(str(error)))
            await _sign_in(page, app, url, phone)

            await page.get_by_role("button", name="欠费").click()
            await expect(page.locator("#debt-total")).to_have_text("欠费合计 ¥6.00")
            async with page.expect_popup() as opened:
                await page.get_by_role("button", name="缴纳欠费").click()
            wallet = await opened.value
            await wallet.get_by_role("button", name="Pay").click()
            # The provider's notification books it; the app sees the debt gone by itself.
            await expect(page.locator("#debt-status")).to_have_text("欠费已缴清", timeout=20_000)

            await page.get_by_role("button", name="账户").click()
            facts = page.locator("#account-facts")
            await expect(facts).to_contain_text("已开通，每次最高 ¥200.00")
            await page.get_by_role("button", name="暂停无感支付").click()
            await expect(facts).to_contain_text("未开通")
            await page.get_by_label("每次最高扣款（元）").fill("150")
            await page.get_by_role("button", name="开通无感支付").click()
            await expect(facts).to_contain_text("已开通，每次最高 ¥150.00")
            async with page.expect_download() as downloading:
                await page.get_by_role("button", name="导出我的数据").click()
            exported = json.loads((await (await downloading.value).path()).read_text())
            assert exported["account"]["phone"] == phone

            page.once("dialog", lambda dialog: dialog.accept())
            await page.get_by_role("button", name="注销账户").click()
            await expect(page.locator("#sign-in-status")).to_have_text("账户已注销")
            await expect(page.locator("#app")).to_have_attribute("data-state", "signed-out")
        finally:
            await context.close()

    assert problems == []
    async with runtime.pool.acquire() as conn:
        account = await conn.fetchrow(
            "SELECT deleted_at, blocked_for_arrears FROM accounts WHERE id = $1",
            driver.account_id,
        )
        owed = await conn.fetchval(
            "SELECT count(*) FROM debts WHERE account_id = $1 AND settled_at IS NULL",
            driver.account_id,
        )
    assert account["deleted_at"] is not None and owed == 0
