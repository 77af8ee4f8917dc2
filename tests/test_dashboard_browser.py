"""The operator console in a real browser (Debian's headless Chromium driven by Playwright):
sign in, watch a car enter live, resolve an exception from the queue (outcomes and car parks
as people say them, in Chinese first); on a 390-px phone, confirm a charge and decide a "not
my car" dispute with both frames side by side, and read the audit log. Screenshots are left
in `.artifacts/dashboard*.png`."""

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from fastapi import FastAPI
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    async_playwright,
    expect,
)

from parking.booth import ghosts
from parking.logging import mask_plate
from parking.runtime import Runtime
from parking_dev import sandbox
from tests.conftest import (
    Lot,
    Staff,
    api_server,
    backdate_entry,
    bearer,
    driver_token,
    enter,
    make_driver,
    make_staff,
    reject_awaiting,
    staff_token,
    unique_plate,
)
from tests.gates import GateProbe
from tests.test_evidence import exit_with_frames
from tests.test_lane_certainty import _awaiting

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
PHONE_SCREENSHOT = ROOT / ".artifacts" / "dashboard-390.png"
REFUSALS_SCREENSHOT = ROOT / ".artifacts" / "dashboard-refusals.png"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1360, "height": 1000}
FRAME = (Path(__file__).parent / "fixtures" / "plate_wanAD2Y34.jpg").read_bytes()
STEP_TIMEOUT_MS = 10_000
# An axe-style check: the form controls, buttons and images on the page that have no
# accessible name (a label, aria-label, text or alt). Pages must answer [].
# Elements whose words come from the page's text table but found none there (the key shows;
# checked in Chinese, where no text equals its English key).
UNTRANSLATED = """() => [...document.querySelectorAll("[data-i18n]")]
    .filter((el) => el.textContent.trim() === el.dataset.i18n)
    .map((el) => el.dataset.i18n)"""
UNNAMED = """() => [...document.querySelectorAll("input, select, textarea, button, img")]
    .filter((el) => el.type !== "hidden")
    .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label")
        && !(el.tagName === "BUTTON" && el.textContent.trim())
        && !(el.tagName === "IMG" && el.getAttribute("alt")))
    .map((el) => el.id || el.outerHTML.slice(0, 80))"""

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium"
    ),
    pytest.mark.timeout(90),
]


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One browser for the module; each test has a context (a fresh profile) of its own."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


async def _sign_in(page: Page, staff: Staff) -> None:
    await page.fill("#email", staff.email)
    await page.fill("#password", staff.password)
    await page.click("#sign-in")
    await expect(page.locator("#feed-status")).to_have_attribute("data-state", "live")


@contextlib.asynccontextmanager
async def _console(
    browser: Browser, url: str, staff: Staff, problems: list[str], **context_options: Any
) -> AsyncIterator[Page]:
    """The console signed in as `staff` in a fresh profile; errors in the page go to
    `problems`."""
    context = await browser.new_context(**context_options)
    try:
        page = await context.new_page()
        page.set_default_timeout(STEP_TIMEOUT_MS)
        page.on("pageerror", lambda error: problems.append(str(error)))
        await page.goto(f"{url}/dashboard")
        await _sign_in(page, staff)
        yield page
    finally:
        await context.close()


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
    runtime: Runtime, gate: GateProbe, lot: Lot, browser: Browser
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

    async with api_server(runtime, sandbox.free_port()) as url:
        context = await browser.new_context(viewport=DESKTOP)
        try:
            page = await context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("console", on_console)
            await page.goto(f"{url}/dashboard")
            assert await page.evaluate(UNNAMED) == []

            await _sign_in(page, staff)
            occupancy = page.locator(f"#occupancy-{lot.code}")
            await expect(occupancy).to_have_text("0", timeout=STEP_TIMEOUT_MS)
            await expect(page.locator("#feed-status")).to_have_text("实时")
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
            # Outcomes and car parks as people say them, not internal names and codes.
            await expect(newest.locator(".outcome")).to_have_text("入场")
            await expect(newest).to_contain_text(lot.name)
            await expect(newest).not_to_contain_text(lot.code)

            # An hour and a half later the car leaves, but the camera cannot read it: the
            # operator types the plate, the gate opens and the fee is charged afterwards.
            await backdate_entry(runtime, lot, plate, timedelta(minutes=90))
            held = await _hold_unreadable_exit(runtime, gate, lot)
            card = page.locator(f"#exception-{held}")
            await expect(card).to_be_visible(timeout=STEP_TIMEOUT_MS)
            await expect(card).to_contain_text("车牌无法识别")
            await page.fill(f"#resolve-plate-{held}", plate)
            # A plate is its characters and its colour: the attendant names both.
            await page.click(f"#resolve-{held}")
            await expect(page.locator(f"#exception-result-{held}")).to_contain_text(
                "请选择车牌颜色", timeout=STEP_TIMEOUT_MS
            )
            await page.select_option(f"#resolve-color-{held}", "blue")
            await page.click(f"#resolve-{held}")
            await expect(page.locator(f"#exception-result-{held}")).to_have_text(
                f"已确认为 {plate}：离场后扣款，道闸已抬起，费用 ¥12.00",
                timeout=STEP_TIMEOUT_MS,
            )
            await expect(card).to_have_attribute("data-status", "resolved")
            await expect(occupancy).to_have_text("0", timeout=STEP_TIMEOUT_MS)
            await expect(page.locator("#open-exceptions")).to_have_text("1")
            await expect(page.locator("#revenue-today")).to_have_text("¥12.00")

            SCREENSHOT.parent.mkdir(exist_ok=True)
            await page.screenshot(path=str(SCREENSHOT), full_page=True)

            assert await page.evaluate(UNTRANSLATED) == []
            # The English switch relabels what is on the page, live.
            await page.click("#lang")
            entered = page.locator('#lane-feed tr[data-outcome="entered"] .outcome')
            await expect(entered).to_have_text("entered")
            await expect(page.locator("#sign-out")).to_have_text("Sign out")
        finally:
            await context.close()

    assert problems == []
    async with runtime.pool.acquire() as conn:
        resolved = await conn.fetchrow(
            "SELECT status, resolved_plate FROM lane_exceptions WHERE id = $1", held
        )
    assert (resolved["status"], resolved["resolved_plate"]) == ("resolved", plate)
    assert SCREENSHOT.stat().st_size > 0
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_a_refused_decision_shows_why_and_can_be_tried_again(
    runtime: Runtime, app: FastAPI, gate: GateProbe, lot: Lot, browser: Browser
) -> None:
    """The driver disputes a charge while an attendant has it on screen (a charge whose vehicle
    left again with no entry record, which the card warns of), and a gate is removed while its
    held car's card is shown. Before, both cards' own reason field shadowed the
    error's wording: the refusal threw in the page, nothing was said, and the buttons stayed
    disabled."""
    attendant = await make_staff(runtime, lot.operator_id, "attendant")
    driver, (awaiting,) = await _awaiting(runtime, gate, lot)
    stranger = gate.capture("out", unique_plate())
    assert (await gate.decide(lot.code, "out1", stranger))["action"] == "hold"
    no_entry = await _exception_id(runtime, stranger.capture_id)
    async with runtime.pool.acquire() as conn:
        # The vehicle left again later with no entry record, asked the fixed fee at the gate.
        await conn.execute(
            """INSERT INTO sessions (car_park_id, plate, plate_color, status, entered_at,
                                     fixed_fee_fen)
               VALUES ($1, $2, 'blue', 'open', now(), 2000)""",
            lot.id,
            driver.plate,
        )
    problems: list[str] = []
    async with (
        api_server(runtime, sandbox.free_port(), app=app) as url,
        _console(browser, url, attendant, problems, viewport=DESKTOP) as page,
    ):
        card = page.locator(f"#confirmations-{awaiting['id']}")
        exception = page.locator(f"#exception-{no_entry}")
        await expect(card).to_contain_text(lot.name)
        await expect(card.locator(f"#confirmations-{awaiting['id']}-left-again")).to_contain_text(
            "以无入场记录再次出场，并被要求按固定金额缴费"
        )
        await expect(exception).to_contain_text("无入场记录")

        async with httpx.AsyncClient(base_url=url) as api:
            disputed = await api.post(
                f"/api/v1/me/stays/{awaiting['session_id']}/dispute",
                headers=bearer(driver_token(app, driver.account_id)),
            )
        assert disputed.status_code == 200, disputed.text
        await card.get_by_label("核对说明").fill("入口与出口为同一车辆")
        await card.get_by_role("button", name="确认扣款").click()
        await expect(card.locator(".result")).to_contain_text("车主已申诉")
        await expect(card.get_by_role("button", name="确认扣款")).to_be_enabled()

        async with runtime.pool.acquire() as conn:
            await conn.execute(
                "UPDATE gates SET code = 'out9' WHERE car_park_id = $1 AND code = 'out1'",
                lot.id,
            )
        await exception.get_by_label("抬杆原因").fill("无入场记录，已现场核实")
        await exception.get_by_role("button", name="人工抬杆").click()
        await expect(page.locator(f"#exception-result-{no_entry}")).to_have_text(
            "操作失败：未找到（可能已被删除）"
        )
        await expect(exception.get_by_role("button", name="人工抬杆")).to_be_enabled()
        await page.screenshot(path=str(REFUSALS_SCREENSHOT), full_page=True)
    assert problems == []


async def test_on_a_phone_an_admin_confirms_a_charge_and_decides_a_dispute_with_both_frames(
    runtime: Runtime, app: FastAPI, gate: GateProbe, lot: Lot, browser: Browser
) -> None:
    admin = await make_staff(runtime, lot.operator_id, "admin")
    _, (awaiting,) = await _awaiting(runtime, gate, lot)
    # A driver says "not my car" about a charge with frames at both ends.
    disputer = await make_driver(runtime, unique_plate())
    stay_id = await exit_with_frames(runtime, gate, lot, disputer.plate, timedelta(minutes=100))
    # A car at the exit with no entry record: a person opens by hand, with a reason.
    stranger = gate.capture("out", unique_plate())
    assert (await gate.decide(lot.code, "out1", stranger))["action"] == "hold"
    no_entry = await _exception_id(runtime, stranger.capture_id)
    problems: list[str] = []
    async with api_server(runtime, sandbox.free_port(), app=app) as url:
        async with httpx.AsyncClient(base_url=url) as api:
            opened = await api.post(
                f"/api/v1/me/stays/{stay_id}/dispute",
                headers=bearer(driver_token(app, disputer.account_id)),
            )
        assert opened.status_code in (200, 201), opened.text
        async with runtime.pool.acquire() as conn:
            dispute_id = await conn.fetchval(
                "SELECT d.id FROM charge_disputes d JOIN charges c ON c.id = d.charge_id "
                "WHERE c.session_id = $1",
                stay_id,
            )
            # As the lane keeps it when the camera was doubtful and the server's reader decided
            # the exit: the camera's own read beside the decided one.
            await conn.execute(
                "UPDATE captures SET plate_source = 'ocr', camera_plate = '皖AD2Y84',"
                " camera_color = 'blue', camera_confidence = 0.93"
                " WHERE capture_id = (SELECT exit_capture_id FROM sessions WHERE id = $1)",
                stay_id,
            )
        async with _console(
            browser, url, admin, problems, viewport=PHONE, is_mobile=True, has_touch=True
        ) as page:
            # The header keeps "退出登录" on screen, and nothing runs off the phone's width.
            sign_out = await page.locator("#sign-out").bounding_box()
            assert sign_out is not None and sign_out["x"] + sign_out["width"] <= PHONE["width"]
            feed = await page.locator(".feed-scroll").first.bounding_box()
            assert feed is not None and feed["x"] + feed["width"] <= PHONE["width"]
            assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]

            card = page.locator(f"#confirmations-{awaiting['id']}")
            await expect(card).to_contain_text(lot.name)
            # Why it waits: the server's reader found another vehicle in the exit's frames.
            await expect(card.locator(f"#confirmations-{awaiting['id']}-why")).to_have_text(
                "服务器复核 · 出场 · 照片中是另一辆车"
            )
            for which in ("entry", "exit"):
                await page.wait_for_function(
                    """id => { const i = document.getElementById(id);
                               return i !== null && i.complete && i.naturalWidth > 0; }""",
                    arg=f"confirmations-{awaiting['id']}-{which}",
                )
            entry_box = await card.locator("img").nth(0).bounding_box()
            exit_box = await card.locator("img").nth(1).bounding_box()
            assert entry_box and exit_box
            assert entry_box["y"] == exit_box["y"] and entry_box["x"] < exit_box["x"], (
                "side by side"
            )
            await card.get_by_role("button", name="确认扣款").click()
            await expect(card.locator(".result")).to_contain_text("请填写核对说明")
            await card.get_by_label("核对说明").fill("入口与出口为同一车辆")
            await card.get_by_role("button", name="确认扣款").click()
            await expect(card).to_have_attribute("data-status", "confirmed")

            review = page.locator(f"#disputes-{dispute_id}")
            await expect(review).to_contain_text(disputer.plate)
            # Each end's read, and beside the exit's (the server's reader's) the camera's own.
            await expect(review.locator(f"#disputes-{dispute_id}-entry-read")).to_contain_text(
                f"入场 · {disputer.plate} · 相机"
            )
            await expect(review.locator(f"#disputes-{dispute_id}-exit-read")).to_contain_text(
                f"出场 · {disputer.plate} · 服务器识别 0.980 · 相机识别 皖AD2Y84 蓝牌 0.930"
            )
            await review.get_by_label("裁决说明").fill("出场照片不是该车")
            await review.get_by_role("button", name="申诉成立（取消或退款）").click()
            await expect(review).to_have_attribute("data-status", "driver_right")

            exception = page.locator(f"#exception-{no_entry}")
            await expect(exception).to_contain_text("无入场记录")
            await exception.get_by_label("抬杆原因").fill("无入场记录，已现场核实")
            await exception.get_by_role("button", name="人工抬杆").click()
            await expect(page.locator(f"#exception-result-{no_entry}")).to_have_text("已人工抬杆")

            audit = page.locator("#audit-log")
            await expect(audit.locator('tr[data-action="charge.confirmed"]')).to_have_count(1)
            await expect(audit.locator('tr[data-action="charge_dispute.decided"]')).to_contain_text(
                "裁决申诉"
            )
            await page.screenshot(path=str(PHONE_SCREENSHOT), full_page=True)
            assert await page.evaluate(UNNAMED) == []

    assert problems == []
    async with runtime.pool.acquire() as conn:
        confirmed = await conn.fetchval("SELECT status FROM charges WHERE id = $1", awaiting["id"])
        decided = await conn.fetchval(
            "SELECT status FROM charge_disputes WHERE id = $1", dispute_id
        )
        opened = await conn.fetchval("SELECT status FROM lane_exceptions WHERE id = $1", no_entry)
    assert opened == "resolved"
    assert confirmed != "awaiting_confirmation"
    assert decided == "driver_right"


async def _ghost_stay(runtime: Runtime, gate: GateProbe, lot: Lot) -> tuple[int, str]:
    """A car in for eight days, filed as a ghost stay: its exception's id, and its plate."""
    plate = unique_plate()
    await enter(runtime, gate, lot, plate, parked_for=timedelta(days=8))
    await ghosts.sweep_ghost_stays(runtime.pool, datetime.now(UTC))
    async with runtime.pool.acquire() as conn:
        exception_id: int = await conn.fetchval(
            "SELECT id FROM lane_exceptions WHERE car_park_id = $1 AND reason = 'ghost_stay'",
            lot.id,
        )
    return exception_id, plate


async def _actions(card: Locator) -> list[str]:
    return [await b.inner_text() for b in await card.locator("form button").all()]


@pytest.mark.parametrize("width", ["desktop", "phone"])
async def test_each_exception_says_what_to_do_and_a_ghost_stay_is_ended_not_opened(
    runtime: Runtime, app: FastAPI, gate: GateProbe, lot: Lot, browser: Browser, width: str
) -> None:
    """Every card names its reason in Chinese (English on the switch) with a line on what to
    do, and offers only what makes sense: a held exit (unreadable, blacklisted) a plate and an
    open by hand, a rejected charge's long-gone car a plate only, a ghost stay neither but
    ending it. Before, a ghost stay, a rejected charge and a blacklisted car showed their raw
    reason, and the ghost's card offered to name a plate (refused) and to lift its entry
    barrier for nobody, with no way to end the stay."""
    admin = await make_staff(runtime, lot.operator_id, "admin")
    ghost, plate = await _ghost_stay(runtime, gate, lot)
    unreadable = await _hold_unreadable_exit(runtime, gate, lot)
    listed = unique_plate()
    await enter(runtime, gate, lot, listed)
    problems: list[str] = []
    async with api_server(runtime, sandbox.free_port(), app=app) as url:
        async with httpx.AsyncClient(base_url=url) as api:
            blacklisted = await api.post(
                "/api/v1/operator/blacklist",
                json={"plate": listed, "color": "blue", "reason": "逃费三次"},
                headers=bearer(staff_token(app, admin)),
            )
            assert blacklisted.status_code == 201, blacklisted.text
        held = gate.capture("out", listed)
        assert (await gate.decide(lot.code, "out1", held))["action"] == "hold"
        on_blacklist = await _exception_id(runtime, held.capture_id)
        rejected = None
        if width == "desktop":  # a rejected charge's exit: its car left long ago
            _, (awaiting,) = await _awaiting(runtime, gate, lot)
            async with httpx.AsyncClient(base_url=url) as api:
                _, rejected = await reject_awaiting(runtime, app, api, lot, awaiting["id"])
        viewport = DESKTOP if width == "desktop" else PHONE
        phone = {"is_mobile": True, "has_touch": True} if width == "phone" else {}
        async with _console(browser, url, admin, problems, viewport=viewport, **phone) as page:
            expected = {
                ghost: ("停车记录长期未结束", "确认车辆不在场后结束该记录", ["结束停车记录"]),
                unreadable: ("车牌无法识别", "对照照片输入车牌", ["确认车牌", "人工抬杆"]),
                on_blacklist: ("黑名单车辆", "车辆在黑名单中", ["确认车牌", "人工抬杆"]),
            }
            if rejected is not None:
                expected[rejected] = ("扣款已驳回", "车辆早已离场", ["确认车牌"])
            for exception_id, (label, hint, actions) in expected.items():
                card = page.locator(f"#exception-{exception_id}")
                await expect(card.locator(".reason")).to_have_text(label)
                await expect(card.locator(".hint")).to_contain_text(hint)
                assert await _actions(card) == actions, exception_id
            card = page.locator(f"#exception-{ghost}")
            await expect(card).to_contain_text(plate)
            assert await page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
            occupancy = page.locator(f"#occupancy-{lot.code}")
            # The ghost and the blacklisted car held at the exit; the rejected charge's stay is
            # open again (it counts in until its vehicle is named).
            inside = 2 if rejected is None else 3
            await expect(occupancy).to_have_text(str(inside))
            await card.get_by_role("button", name="结束停车记录").click()
            await expect(page.locator(f"#exception-result-{ghost}")).to_have_text(
                "请填写结束原因（至少3个字）。"
            )
            await card.get_by_label("结束原因").fill("现场核实，车辆已不在场内")
            await card.get_by_role("button", name="结束停车记录").click()
            await expect(page.locator(f"#exception-result-{ghost}")).to_have_text(
                "已结束停车记录，不收费"
            )
            await expect(card).to_have_attribute("data-status", "resolved")
            await expect(occupancy).to_have_text(str(inside - 1))
            await expect(page.locator('#audit-log tr[data-action="stay.ended"]')).to_contain_text(
                "结束停车记录"
            )
            shot = ROOT / ".artifacts" / f"dashboard-exceptions-{width}.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert await page.evaluate(UNNAMED) == []

            await page.click("#lang")
            english = page.locator(f"#exception-{on_blacklist}")
            await expect(english.locator(".reason")).to_have_text("Blacklisted vehicle")
            await expect(english.locator(".hint")).to_contain_text("On the blacklist")
            if rejected is not None:
                await expect(page.locator(f"#exception-{rejected} .reason")).to_have_text(
                    "Charge rejected"
                )

    assert problems == []
    async with runtime.pool.acquire() as conn:
        stay = await conn.fetchrow(
            "SELECT status, settlement, fee_fen FROM sessions "
            "WHERE car_park_id = $1 AND plate = $2",
            lot.id,
            plate,
        )
    assert tuple(stay) == ("closed", "operator", None)
