"""The console's admin screens in a real browser (Debian's headless Chromium driven by
Playwright), Chinese first, each action checked in the database: refund a stay's charge with a
reason and publish a tariff version (on a 390-px phone); add and disable staff, blacklist a
vehicle, import rights from a CSV with its per-row report and suspend a right (on a desktop).
The city platform's staff decide a plate ownership claim with both sides' evidence (on a phone).
Screenshots at both widths in `.artifacts/console-*.png`."""

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from playwright.async_api import Browser, Page, async_playwright, expect

from parking.admin import repository as admin_repo
from parking.runtime import Runtime
from parking_dev import sandbox
from tests.conftest import (
    Lot,
    api_server,
    charges_of,
    eventually,
    exit_after,
    make_driver,
    make_staff,
    unique_plate,
)
from tests.gates import GateProbe
from tests.test_dashboard_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    PHONE,
    ROOT,
    STEP_TIMEOUT_MS,
    UNNAMED,
    _sign_in,
)
from tests.test_ownership import _bindings, _insert_stay, _open_dispute

DESKTOP = {"width": 1280, "height": 900}
ARTIFACTS = ROOT / ".artifacts"

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


async def _screenshots(page: Page, name: str, section: str) -> None:
    """The section at the phone's and the desktop's width (the page must not run off a phone)."""
    ARTIFACTS.mkdir(exist_ok=True)
    for label, size in (("390", PHONE), ("1280", DESKTOP)):
        await page.set_viewport_size(size)
        if size is PHONE:
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], f"the page is {width}px wide on a phone"
        shot = ARTIFACTS / f"console-{name}-{label}.png"
        await page.locator(section).screenshot(path=str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_on_a_phone_an_admin_refunds_a_charge_and_publishes_a_tariff(
    runtime: Runtime, app: FastAPI, gate: GateProbe, lot: Lot, browser: Browser
) -> None:
    admin = await make_staff(runtime, lot.operator_id, "admin")
    plate = (await make_driver(runtime, unique_plate())).plate
    await exit_after(runtime, gate, lot, plate, timedelta(minutes=90))

    async def collected() -> int | None:
        rows = await charges_of(runtime, lot)
        return rows[0]["id"] if rows and rows[0]["status"] == "succeeded" else None

    charge_id = await eventually(collected)
    problems: list[str] = []
    async with api_server(runtime, sandbox.free_port(), app=app) as url:
        context = await browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
        try:
            page = await context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.on("pageerror", lambda error: problems.append(str(error)))
            await page.goto(f"{url}/dashboard")
            await _sign_in(page, admin)

            # Refunds: find the car's stays by plate, refund part of the charge with a reason.
            await page.locator("#refund-search").get_by_label("车牌").fill(plate)
            await page.locator("#refund-search").get_by_role("button", name="查找").click()
            card = page.locator(f"#refund-{charge_id}")
            await expect(card).to_contain_text("¥12.00")
            await card.get_by_label("退款金额（元）").fill("5")
            await card.get_by_role("button", name="退款").click()
            await expect(card.locator(".result")).to_have_text("请填写金额和原因（至少3个字）。")
            await card.get_by_label("退款原因（至少3个字）").fill("道闸故障多停了半小时")
            await card.get_by_role("button", name="退款").click()
            await expect(card.locator(".result")).to_have_text("已提交退款")
            row = page.locator("#refunds tr").first
            await expect(row).to_contain_text("¥5.00")
            await expect(row).to_contain_text("道闸故障多停了半小时")
            await expect(row).to_contain_text(lot.name)

            # Tariffs: the versions of the car park, and a new one from the newest's rules.
            await expect(page.locator("#tariffs tr")).to_have_count(1)
            rules = json.loads(await page.locator("#tariff-rules").input_value())
            rules["free_minutes"] = 45
            await page.locator("#tariff-rules").fill("{not json")
            await page.get_by_role("button", name="发布新版本").click()
            await expect(page.locator("#tariff-result")).to_have_text("规则不是有效的 JSON。")
            await page.locator("#tariff-rules").fill(json.dumps(rules))
            await page.get_by_role("button", name="发布新版本").click()
            await expect(page.locator("#tariff-result")).to_have_text("已发布新版本")
            await expect(page.locator("#tariffs tr")).to_have_count(2)
            await expect(page.locator("#tariffs tr").first).to_contain_text("免费 45 分钟")
            # The quick set-up writes the rules an operator would otherwise type as JSON, and
            # each version reads in words.
            await page.get_by_role("button", name="生成规则").click()
            await expect(page.locator("#tariff-result")).to_have_text("请填写每小时费用。")
            await page.get_by_label("免费时长（分钟）").fill("30")
            await page.get_by_label("每小时（元）").fill("5")
            await page.get_by_label("每日封顶（元，可空）").fill("40")
            await page.get_by_label("绿牌优惠（%，可空）").fill("50")
            await page.get_by_role("button", name="生成规则").click()
            await page.get_by_role("button", name="发布新版本").click()
            await expect(page.locator("#tariff-result")).to_have_text(
                "操作失败：该生效时间已有收费版本，请换一个时间"
            )
            later = await page.locator("#tariff-from").input_value()
            await page.locator("#tariff-from").fill(f"{int(later[:4]) + 1}{later[4:]}")
            await page.get_by_role("button", name="发布新版本").click()
            await expect(page.locator("#tariff-result")).to_have_text("已发布新版本")
            await expect(page.locator("#tariffs tr")).to_have_count(3)
            newest = page.locator("#tariffs tr").first
            for words in (
                "免费 30 分钟",
                "日封顶 ¥40.00",
                "绿牌 优惠 50%",
                "全天：每60 分钟 ¥5.00",
            ):
                await expect(newest).to_contain_text(words)

            assert await page.evaluate(UNNAMED) == []
            await _screenshots(page, "refunds", "#refunds-heading >> xpath=..")
            await _screenshots(page, "tariffs", "#tariffs-heading >> xpath=..")
        finally:
            await context.close()

    assert problems == []
    async with runtime.pool.acquire() as conn:
        refund = await conn.fetchrow(
            "SELECT amount_fen, reason, kind FROM refunds WHERE charge_id = $1", charge_id
        )
        versions = [
            json.loads(rules)
            for (rules,) in await conn.fetch(
                "SELECT rules::text FROM tariffs WHERE car_park_id = $1 ORDER BY id", lot.id
            )
        ]
    assert dict(refund) == {"amount_fen": 500, "reason": "道闸故障多停了半小时", "kind": "operator"}
    assert versions[1]["free_minutes"] == 45
    quick = versions[2]
    assert (quick["free_minutes"], quick["daily_cap_fen"]) == (30, 4000)
    assert quick["colour_discount_percent"] == {"green": 50}
    assert [line["amount_fen"] for line in quick["bands"][0]["lines"]] == [500]


async def test_an_admin_manages_staff_blacklist_and_rights(
    runtime: Runtime, app: FastAPI, lot: Lot, browser: Browser
) -> None:
    admin = await make_staff(runtime, lot.operator_id, "admin")
    leaving = await make_staff(runtime, lot.operator_id, "attendant")
    attendant = await make_staff(runtime, lot.operator_id, "attendant")
    pass_plate, bad_plate, banned = unique_plate(), unique_plate(), unique_plate()
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO right_specs (operator_id, name, kind, created_by) "
            "VALUES ($1, '月租', 'free_passage', 'test')",
            lot.operator_id,
        )
    csv_text = "\n".join(
        [
            "spec,plates,valid_from,valid_until,max_inside,label",
            f"月租,{pass_plate}/blue,2026-12-01,2027-12-31,,301室",
            f"季租,{bad_plate},2026-12-01,2027-12-31,,unknown spec",
        ]
    )
    new_email = f"new-{unique_plate()[-5:].lower()}@operator.test"
    problems: list[str] = []
    async with api_server(runtime, sandbox.free_port(), app=app) as url:
        context = await browser.new_context(viewport=DESKTOP)
        try:
            page = await context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.on("pageerror", lambda error: problems.append(str(error)))
            await page.goto(f"{url}/dashboard")
            await _sign_in(page, admin)

            # Staff: add an attendant, disable another.
            await expect(page.locator(f"#staff-{leaving.user_id}")).to_contain_text("在用")
            staff = page.locator("#staff-form")
            await staff.get_by_label("姓名").fill("新收费员")
            await staff.get_by_label("邮箱").fill(new_email)
            await staff.get_by_label("初始密码（至少12位）").fill("a long first password")
            await staff.get_by_role("button", name="添加").click()
            await expect(page.locator("#staff-result")).to_have_text("已添加")
            await expect(page.locator("#staff")).to_contain_text("新收费员")
            await page.click(f"#staff-disable-{leaving.user_id}")
            await expect(page.locator(f"#staff-{leaving.user_id}")).to_have_attribute(
                "data-disabled", "true"
            )
            # No button on one's own row (the server would refuse it too).
            await expect(page.locator(f"#staff-disable-{admin.user_id}")).to_have_count(0)

            # The blacklist, with a reason.
            form = page.locator("#blacklist-form")
            await form.get_by_label("车牌", exact=True).fill(banned)
            await form.get_by_label("原因").fill("多次逃费")
            await form.get_by_role("button", name="添加").click()
            await expect(page.locator("#blacklist")).to_contain_text("多次逃费")
            await expect(page.locator("#blacklist")).to_contain_text(banned)
            # The API's refusal in the console's language, not its English message.
            await form.get_by_label("车牌", exact=True).fill(banned)
            await form.get_by_label("原因").fill("再次逃费")
            await form.get_by_role("button", name="添加").click()
            await expect(page.locator("#blacklist-result")).to_have_text(
                "操作失败：该车辆已在黑名单中"
            )

            # A CSV import: the good row imported, the bad one reported by line.
            await page.locator("#rights-csv").fill(csv_text)
            await page.get_by_role("button", name="导入", exact=True).click()
            await expect(page.locator("#import-summary")).to_have_text("已导入 1 行，失败 1")
            await expect(page.locator('#import-failures li[data-line="3"]')).to_have_text(
                "第3行：未知的权益类型 “季租”"
            )
            right = page.locator("#rights tr", has_text=pass_plate)
            await expect(right).to_have_attribute("data-status", "active")
            await expect(right).to_contain_text("2027/12/31")
            await right.get_by_role("button", name="暂停").click()
            await expect(page.locator("#rights tr", has_text=pass_plate)).to_have_attribute(
                "data-status", "suspended"
            )
            await expect(page.locator("#rights-result")).to_contain_text("已暂停")
            # Found by its plate, too.
            await page.locator("#rights-search").get_by_label("车牌").fill(pass_plate)
            await page.locator("#rights-search").get_by_role("button", name="查找").click()
            await expect(page.locator("#rights tr")).to_have_count(1)

            # The English switch relabels the admin screens.
            await page.click("#lang")
            await expect(page.locator(f"#staff-{leaving.user_id}")).to_contain_text("disabled")
            await expect(page.locator("#rights tr").first).to_contain_text("suspended")
            await expect(page.locator("#staff-heading")).to_contain_text("Staff")
            await page.click("#lang")

            assert await page.evaluate(UNNAMED) == []
            await _screenshots(page, "staff", "#staff-heading >> xpath=..")
            await _screenshots(page, "rights", "#rights-heading >> xpath=..")
        finally:
            await context.close()

        # An attendant sees the lists, not the admins' forms and buttons.
        context = await browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
        try:
            page = await context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.on("pageerror", lambda error: problems.append(str(error)))
            await page.goto(f"{url}/dashboard")
            await _sign_in(page, attendant)
            await expect(page.locator("#blacklist")).to_contain_text("多次逃费")
            await expect(page.locator("#rights tr")).to_have_count(1)
            for hidden in ("#tariff-form", "#staff-heading", "#rights-import", "#blacklist-form"):
                await expect(page.locator(hidden)).to_be_hidden()
            await expect(page.locator("#rights button")).to_have_count(2)
            await expect(page.locator("#rights button").first).to_be_hidden()
        finally:
            await context.close()

    assert problems == []
    async with runtime.pool.acquire() as conn:
        disabled = await conn.fetchval(
            "SELECT disabled_at IS NOT NULL FROM operator_users WHERE id = $1", leaving.user_id
        )
        admin_enabled = await conn.fetchval(
            "SELECT disabled_at IS NULL FROM operator_users WHERE id = $1", admin.user_id
        )
        added = await conn.fetchval(
            "SELECT role FROM operator_users WHERE email = $1 AND operator_id = $2",
            new_email,
            lot.operator_id,
        )
        reason = await conn.fetchval(
            "SELECT reason FROM plate_blacklist WHERE plate = $1 AND operator_id = $2",
            banned,
            lot.operator_id,
        )
        status = await conn.fetchval(
            "SELECT r.status FROM assigned_rights r JOIN assigned_right_plates p "
            "ON p.right_id = r.id WHERE p.plate = $1",
            pass_plate,
        )
    assert (disabled, admin_enabled, added) == (True, True, "attendant")
    assert reason == "多次逃费"
    assert status == "suspended"


async def test_the_city_platform_decides_an_ownership_claim_with_the_stays_in_front_of_it(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, lot: Lot, browser: Browser
) -> None:
    plate, holder_id, _, claimant_id, _, claim_id = await _open_dispute(api, runtime, app)
    async with runtime.pool.acquire() as conn:
        claimed_at = await conn.fetchval(
            "SELECT created_at FROM plate_disputes WHERE id = $1", claim_id
        )
        company = await admin_repo.create_operator(conn, f"城市平台-{uuid.uuid4().hex[:8]}")
    stay_id = await _insert_stay(runtime, lot, plate, max(claimed_at, datetime.now(UTC)), holder_id)
    platform = await make_staff(runtime, company, "platform")
    problems: list[str] = []
    async with api_server(runtime, sandbox.free_port(), app=app) as url:
        context = await browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
        try:
            page = await context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.on("pageerror", lambda error: problems.append(str(error)))
            await page.goto(f"{url}/dashboard")
            await page.fill("#email", platform.email)
            await page.fill("#password", platform.password)
            await page.click("#sign-in")
            # The platform's view, not a car park company's dashboard.
            await expect(page.locator("#platform-view")).to_be_visible()
            await expect(page.locator("#dashboard-view")).to_be_hidden()
            card = page.locator(f"#claims-{claim_id}")
            await expect(card).to_contain_text(plate)
            await expect(card).to_contain_text(f"申请人：账户 #{claimant_id}")
            await expect(card).to_contain_text(f"现绑定人：账户 #{holder_id}")
            await card.get_by_role("button", name="查看停车记录").click()
            await expect(card.locator(f'tr[data-stay="{stay_id}"]')).to_contain_text("扣现绑定人")
            # A decision needs its grounds.
            await card.get_by_role("button", name="归申请人").click()
            await expect(card.locator(".result")).to_have_text("请填写裁决依据。")
            await card.get_by_label("裁决依据（必填）").fill("购车合同与新行驶证已核实")
            await card.get_by_role("button", name="归申请人").click()
            await expect(card.locator(".result")).to_have_text("已裁决：车辆归申请人，绑定已转移")
            await expect(card).to_have_attribute("data-status", "upheld")
            assert await page.evaluate(UNNAMED) == []
            await _screenshots(page, "claims", "#claims-heading >> xpath=..")
        finally:
            await context.close()

    assert problems == []
    old, new = await _bindings(runtime, plate)
    assert (old["account_id"], new["account_id"]) == (holder_id, claimant_id)
    assert old["unbound_at"] == new["bound_at"]
