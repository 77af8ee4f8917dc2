"""Evidence to the driver and "not my car" (issue #15): Chinese charge messages with a receipt
link, the receipt page with its signed, expiring frame URLs, a one-step dispute that holds a
charge not yet sent (or is refunded in full once an operator agrees), and the operator's
review with both frames."""

import base64
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest
from fastapi import FastAPI

from billing import ledger, signing
from billing.notifications import exit_charged_text, format_duration
from parking.app import create_app
from parking.infra import Endpoints
from parking.logging import mask_plate
from parking.receipts.signing import FrameSigner
from parking.retention import repository as retention_repo
from parking.runtime import ProviderEndpoint, Runtime, running
from parking.settings import Settings
from tests.conftest import (
    MQTT_URL,
    REDIS_URL,
    SANDBOX_FAULTS,
    SANDBOX_SECRET,
    Driver,
    Lot,
    backdate_entry,
    bearer,
    charges_of,
    create_lot,
    decide_dispute,
    driver_token,
    eventually,
    make_driver,
    make_staff,
    provider_order,
    staff_token,
    unique_plate,
)
from tests.gates import GateProbe

FIXTURES = Path(__file__).parent / "fixtures"
ENTRY_JPEG = (FIXTURES / "plate_wanAD2Y34.jpg").read_bytes()
EXIT_JPEG = (FIXTURES / "plate_wanM04698.jpg").read_bytes()
TOKEN_IN_TEXT = re.compile(r"/r/([A-Za-z0-9_-]{20,})")


# --- helpers ---------------------------------------------------------------------------------


async def exit_with_frames(
    runtime: Runtime, gate: GateProbe, lot: Lot, plate: str, stay: timedelta
) -> int:
    """The car enters and leaves with a frame at each gate; returns the stay's id."""
    entry = gate.capture("in", plate).model_copy(
        update={"image": base64.b64encode(ENTRY_JPEG).decode()}
    )
    assert (await gate.decide(lot.code, "in1", entry))["action"] == "open"
    await backdate_entry(runtime, lot, plate, stay)
    exit_ = gate.capture("out", plate).model_copy(
        update={"image": base64.b64encode(EXIT_JPEG).decode()}
    )
    await gate.decide(lot.code, "out1", exit_)
    async with runtime.pool.acquire() as conn:
        stay_id: int = await conn.fetchval(
            "SELECT id FROM sessions WHERE car_park_id = $1 AND plate = $2", lot.id, plate
        )
    return stay_id


async def charge_of(runtime: Runtime, stay_id: int) -> dict[str, Any]:
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM charges WHERE session_id = $1", stay_id)
    assert row is not None
    return dict(row)


async def receipt_token_of(runtime: Runtime, driver: Driver) -> str:
    """The token in the driver's exit message (once the charge was collected)."""

    async def body() -> str | None:
        async with runtime.pool.acquire() as conn:
            text: str | None = await conn.fetchval(
                "SELECT body FROM notifications WHERE account_id = $1 AND kind = 'exit_charged'",
                driver.account_id,
            )
        return text

    text = await eventually(body)
    match = TOKEN_IN_TEXT.search(text)
    assert match, text
    return match.group(1)


@contextlib.asynccontextmanager
async def manual_worker(
    settings: Settings, database_url: str, provider: ProviderEndpoint
) -> AsyncIterator[Runtime]:
    """A runtime whose outbox worker runs only when the test says (`run_once`)."""
    eps = Endpoints(database_url, REDIS_URL, MQTT_URL)
    async with running(settings, eps, provider, outbox_worker=False) as runtime:
        yield runtime


async def run_worker(runtime: Runtime) -> None:
    while await runtime.outbox.run_once():
        pass


@pytest.fixture
async def quiet(
    settings: Settings, database_url: str, provider: ProviderEndpoint
) -> AsyncIterator[Runtime]:
    async with manual_worker(settings, database_url, provider) as runtime:
        yield runtime


@pytest.fixture
async def quiet_api(quiet: Runtime) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(quiet)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as client:
        yield app, client


def error_code(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    code: str = response.json()["error"]["code"]
    return code


# --- 1. messages -----------------------------------------------------------------------------


def test_charge_messages_are_chinese_by_default_and_english_on_request() -> None:
    tz = ZoneInfo("Asia/Shanghai")
    left = datetime(2026, 12, 6, 10, 2, tzinfo=UTC)  # 18:02 in Shanghai
    entered = left - timedelta(hours=2, minutes=10)
    url = "https://p.example/r/abc"
    zh = exit_charged_text("浙A12345", "城中街停车场", entered, left, 1200, tz, receipt_url=url)
    assert zh == "浙A12345 于18:02驶离城中街停车场，停车2小时10分，费用¥12.00已扣款，凭证：" + url
    en = exit_charged_text(
        "浙A12345", "城中街停车场", entered, left, 1200, tz, language="en", receipt_url=url
    )
    assert en == f"浙A12345 left 城中街停车场 at 18:02, 2h10m, ¥12.00 charged. Receipt: {url}"
    assert format_duration(25 * 60, "zh") == "25分钟"


async def test_an_english_deployment_writes_english_messages(
    settings: Settings, database_url: str, provider: ProviderEndpoint, gate: GateProbe
) -> None:
    english = settings.model_copy(update={"message_language": "en"})
    async with manual_worker(english, database_url, provider) as runtime:
        lot = await create_lot(runtime)
        driver = await make_driver(runtime, unique_plate())
        await exit_with_frames(runtime, gate, lot, driver.plate, timedelta(minutes=50))

        async def message() -> str | None:
            await run_worker(runtime)
            async with runtime.pool.acquire() as conn:
                body: str | None = await conn.fetchval(
                    "SELECT body FROM notifications WHERE account_id = $1", driver.account_id
                )
            return body

        body = await eventually(message)
    assert body.startswith(f"{driver.plate} left {lot.name} at ")
    assert "¥6.00 charged. Receipt: http://127.0.0.1:9/r/" in body


# --- 2. the receipt page and its frames ------------------------------------------------------


async def test_the_receipt_page_shows_the_stay_fee_and_both_frames(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient
) -> None:
    driver = await make_driver(runtime, unique_plate())
    stay_id = await exit_with_frames(
        runtime, gate, lot, driver.plate, timedelta(hours=2, minutes=10)
    )
    token = await receipt_token_of(runtime, driver)

    page = await api.get(f"/r/{token}")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    assert '<html lang="zh-CN">' in html
    assert 'name="viewport" content="width=device-width' in html
    for text in ("停车凭证", lot.name, "入场时间", "离场时间", "2小时10分", "¥18.00", "已扣款"):
        assert text in html, text
    assert mask_plate(driver.plate) in html and driver.plate not in html
    assert "不是我的车" in html and f'action="/r/{token}/dispute?lang=zh"' in html
    # Nothing from elsewhere: no CDN, no absolute or protocol-relative URL, no script.
    for outside in ("http://", "https://", '="//', "<script", "@import", "url("):
        assert outside not in html, outside
    frame_urls = re.findall(r'src="(/r/[^"]+/frames/(?:entry|exit)\?[^"]+)"', html)
    assert len(frame_urls) == 2, html
    frames = [await api.get(url.replace("&amp;", "&")) for url in frame_urls]
    assert [f.status_code for f in frames] == [200, 200]
    assert [f.headers["content-type"] for f in frames] == ["image/jpeg"] * 2
    assert [f.content for f in frames] == [ENTRY_JPEG, EXIT_JPEG]

    english = await api.get(f"/r/{token}", params={"lang": "en"})
    assert '<html lang="en">' in english.text and "Parking receipt" in english.text
    assert "Not my car" in english.text

    twin = await api.get(f"/api/v1/receipts/{token}")
    assert twin.status_code == 200
    data = twin.json()
    assert data["car_park"] == lot.name
    assert data["plate"] == mask_plate(driver.plate)
    assert data["stay_id"] == stay_id
    assert data["duration_minutes"] == 130
    assert data["charge"] == {"amount_fen": 1800, "status": "succeeded"}
    assert sum(s["fen"] for s in data["fee"]["segments"]) >= data["fee"]["total_fen"] == 1800
    assert data["dispute"] is None
    for which in ("entry", "exit"):
        got = await api.get(data["frames"][which])
        assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"


async def test_frame_urls_refuse_forged_and_expired_links_and_erased_frames(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    driver = await make_driver(runtime, unique_plate())
    await exit_with_frames(runtime, gate, lot, driver.plate, timedelta(minutes=40))
    token = await receipt_token_of(runtime, driver)
    url = (await api.get(f"/api/v1/receipts/{token}")).json()["frames"]["entry"]
    exp = re.search(r"exp=(\d+)", url).group(1)  # type: ignore[union-attr]
    sig = re.search(r"sig=([A-Za-z0-9_-]+)", url).group(1)  # type: ignore[union-attr]

    forged = await api.get(f"/r/{token}/frames/entry", params={"exp": exp, "sig": "A" * 43})
    assert forged.status_code == 403 and error_code(forged) == "bad_signature"
    moved = await api.get(f"/r/{token}/frames/exit", params={"exp": exp, "sig": sig})
    assert moved.status_code == 403 and error_code(moved) == "bad_signature"
    later = await api.get(f"/r/{token}/frames/entry", params={"exp": int(exp) + 1, "sig": sig})
    assert later.status_code == 403 and error_code(later) == "bad_signature"

    odd = await api.get(f"/r/{token}/frames/entry", params={"exp": exp, "sig": "²"})
    assert odd.status_code == 422 and error_code(odd) == "invalid_request"
    signer: FrameSigner = app.state.frame_signer
    assert not signer.valid(token, "entry", int(exp), "²")
    past = int(time.time()) - 1
    expired = await api.get(
        f"/r/{token}/frames/entry",
        params={"exp": past, "sig": signer.sign(token, "entry", past)},
    )
    assert expired.status_code == 410 and error_code(expired) == "link_expired"

    unknown = "x" * 32
    future = int(time.time()) + 60
    missing = await api.get(
        f"/r/{unknown}/frames/entry",
        params={"exp": future, "sig": signer.sign(unknown, "entry", future)},
    )
    assert missing.status_code == 404 and error_code(missing) == "receipt_not_found"
    assert error_code(await api.get(f"/r/{unknown}")) == "receipt_not_found"
    assert error_code(await api.get(f"/api/v1/receipts/{unknown}")) == "receipt_not_found"
    side = await api.get(f"/r/{token}/frames/side", params={"exp": future, "sig": "x"})
    assert side.status_code == 422 and error_code(side) == "invalid_request"

    async with runtime.pool.acquire() as conn:
        await retention_repo.erase_images_before(conn, datetime.now(UTC) + timedelta(days=1))
    erased = await api.get(url)
    assert erased.status_code == 404 and error_code(erased) == "frame_not_found"
    # The page still renders, without frames.
    page = await api.get(f"/r/{token}")
    assert page.status_code == 200 and "/frames/" not in page.text


def test_frame_signing_has_no_key_in_production_but_a_dev_key_with_dev_adapters() -> None:
    assert FrameSigner.from_settings(Settings(dev_adapters=False)) is None
    assert FrameSigner.from_settings(Settings(dev_adapters=True)) is not None
    with pytest.raises(ValueError, match="32"):
        FrameSigner.from_settings(Settings(receipt_key="short"))  # type: ignore[arg-type]
    signer = FrameSigner.from_settings(Settings(receipt_key="k" * 32))  # type: ignore[arg-type]
    assert signer is not None and signer.valid("t", "entry", 10, signer.sign("t", "entry", 10))


# --- 3. "not my car" -------------------------------------------------------------------------


async def test_not_my_car_holds_a_charge_not_yet_sent_until_the_operator_releases_it(
    quiet: Runtime,
    quiet_api: tuple[FastAPI, httpx.AsyncClient],
    gate: GateProbe,
    provider: ProviderEndpoint,
) -> None:
    app, api = quiet_api
    lot = await create_lot(quiet)
    driver = await make_driver(quiet, unique_plate())
    stay_id = await exit_with_frames(quiet, gate, lot, driver.plate, timedelta(minutes=70))
    charge = await charge_of(quiet, stay_id)
    assert charge["status"] == "pending" and charge["sent_at"] is None
    as_driver = bearer(driver_token(app, driver.account_id))

    first = await api.post(f"/api/v1/me/stays/{stay_id}/dispute", headers=as_driver)
    again = await api.post(f"/api/v1/me/stays/{stay_id}/dispute", headers=as_driver)
    assert first.status_code == 200, first.text
    assert first.json()["held"] is True and first.json()["status"] == "open"
    assert again.json()["id"] == first.json()["id"]
    async with quiet.pool.acquire() as conn:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM charge_disputes WHERE charge_id = $1", charge["id"]
            )
            == 1
        )

    await run_worker(quiet)  # the charge's job comes due: held, it is not sent
    held = await charge_of(quiet, stay_id)
    assert held["status"] == "pending" and held["sent_at"] is None
    assert await provider_order(provider.url, charge["idempotency_key"]) is None

    attendant = await make_staff(quiet, lot.operator_id, "attendant")
    admin = await make_staff(quiet, lot.operator_id, "admin")
    as_attendant = bearer(staff_token(app, attendant))
    listed = (await api.get("/api/v1/operator/disputes", headers=as_attendant)).json()
    dispute = next(d for d in listed if d["id"] == first.json()["id"])
    assert dispute["charge"] == {"id": charge["id"], "amount_fen": 1200, "status": "pending"}
    assert dispute["plate"] == driver.plate
    assert dispute["entry"]["read"]["plate"] == driver.plate
    assert dispute["exit"]["read"]["source"] == "camera"
    assert dispute["exit"]["read"]["confidence"] == pytest.approx(0.98)
    entry_frame = await api.get(dispute["entry"]["frame_url"], headers=as_attendant)
    exit_frame = await api.get(dispute["exit"]["frame_url"], headers=as_attendant)
    assert (entry_frame.content, exit_frame.content) == (ENTRY_JPEG, EXIT_JPEG)

    decide = f"/api/v1/operator/disputes/{dispute['id']}/decision"
    body = {"outcome": "charge_stands", "note": "both frames show the same car"}
    assert (await api.post(decide, json=body, headers=as_attendant)).status_code == 403
    decided = await api.post(decide, json=body, headers=bearer(staff_token(app, admin)))
    assert decided.status_code == 200, decided.text
    assert decided.json()["status"] == "charge_stands"
    twice = await api.post(decide, json=body, headers=bearer(staff_token(app, admin)))
    assert twice.status_code == 409 and error_code(twice) == "already_decided"

    async def collected() -> bool:
        await run_worker(quiet)
        return (await charge_of(quiet, stay_id))["status"] == "succeeded"

    await eventually(collected)
    order = await provider_order(provider.url, charge["idempotency_key"])
    assert order is not None and order["amount_fen"] == 1200
    async with quiet.pool.acquire() as conn:
        audit = await conn.fetchrow(
            "SELECT actor, detail FROM audit_log WHERE action = 'charge_dispute.decided' "
            "AND subject = $1",
            f"charge_dispute:{dispute['id']}",
        )
        messages = await conn.fetch(
            "SELECT kind, body FROM notifications WHERE account_id = $1 ORDER BY id",
            driver.account_id,
        )
        assert await ledger.is_balanced(conn)
    assert audit["actor"] == f"operator_user:{admin.user_id}"
    assert audit["detail"]["outcome"] == "charge_stands"
    kinds = [m["kind"] for m in messages]
    assert kinds[:2] == ["dispute_opened", "dispute_charge_stands"] and "exit_charged" in kinds
    assert "申诉未成立" in messages[1]["body"]


async def test_the_driver_is_right_about_a_held_charge_it_is_cancelled_never_sent(
    quiet: Runtime,
    quiet_api: tuple[FastAPI, httpx.AsyncClient],
    gate: GateProbe,
    provider: ProviderEndpoint,
) -> None:
    app, api = quiet_api
    lot = await create_lot(quiet)
    driver = await make_driver(quiet, unique_plate())
    stay_id = await exit_with_frames(quiet, gate, lot, driver.plate, timedelta(minutes=30))
    charge = await charge_of(quiet, stay_id)
    as_driver = bearer(driver_token(app, driver.account_id))
    dispute = (await api.post(f"/api/v1/me/stays/{stay_id}/dispute", headers=as_driver)).json()
    admin = bearer(staff_token(app, await make_staff(quiet, lot.operator_id, "admin")))
    decided = await api.post(
        f"/api/v1/operator/disputes/{dispute['id']}/decision",
        json={"outcome": "driver_right", "note": "the exit frame shows another car"},
        headers=admin,
    )
    assert decided.status_code == 200, decided.text
    await run_worker(quiet)
    cancelled = await charge_of(quiet, stay_id)
    assert cancelled["status"] == "cancelled" and cancelled["sent_at"] is None
    assert await provider_order(provider.url, charge["idempotency_key"]) is None
    async with quiet.pool.acquire() as conn:
        assert await ledger.is_balanced(conn)
        assert await ledger.balance(conn, ledger.receivable(driver.account_id)) == 0
        assert await ledger.balance(conn, ledger.revenue(lot.id)) == 0
        told = await conn.fetchval(
            "SELECT body FROM notifications WHERE account_id = $1 "
            "AND kind = 'dispute_driver_right'",
            driver.account_id,
        )
    assert told is not None and "不再收取" in told
    # The revenue report: the fee accrued and its cancellation, each in its own column, and
    # the columns add up to the net (nothing was earned).
    (line,) = (await api.get("/api/v1/operator/reports/revenue", headers=admin)).json()
    amount = charge["amount_fen"]
    assert (line["pay_later_fen"], line["cancelled_fen"], line["net_fen"]) == (amount, amount, 0)
    columns = ("pay_later_fen", "paid_at_gate_fen", "paid_at_booth_fen", "passes_fen")
    assert sum(line[c] for c in columns) - line["refunded_fen"] - line["cancelled_fen"] == 0
    exported = await api.get(
        "/api/v1/operator/reports/revenue", params={"format": "csv"}, headers=admin
    )
    assert exported.text.splitlines()[0].endswith(",refunded_fen,cancelled_fen,net_fen")
    # The stay waits in the disputes' queue for the real car to be found.
    to_find = (
        await api.get("/api/v1/operator/disputes", params={"status": "driver_right"}, headers=admin)
    ).json()
    assert dispute["id"] in {d["id"] for d in to_find}


async def test_a_cancelled_charge_the_provider_collects_anyway_is_booked_and_refunded_once(
    quiet: Runtime,
    quiet_api: tuple[FastAPI, httpx.AsyncClient],
    gate: GateProbe,
    provider: ProviderEndpoint,
) -> None:
    """Money taken is never lost: a success for a charge we cancelled is booked (owed back to
    the driver) and refunded in full by itself, once however often the news comes."""
    app, api = quiet_api
    lot = await create_lot(quiet)
    driver = await make_driver(quiet, unique_plate())
    stay_id = await exit_with_frames(quiet, gate, lot, driver.plate, timedelta(minutes=30))
    charge = await charge_of(quiet, stay_id)
    as_driver = bearer(driver_token(app, driver.account_id))
    dispute = (await api.post(f"/api/v1/me/stays/{stay_id}/dispute", headers=as_driver)).json()
    admin = bearer(staff_token(app, await make_staff(quiet, lot.operator_id, "admin")))
    decided = await api.post(
        f"/api/v1/operator/disputes/{dispute['id']}/decision",
        json={"outcome": "driver_right", "note": "the exit frame shows another car"},
        headers=admin,
    )
    assert decided.status_code == 200, decided.text
    assert (await charge_of(quiet, stay_id))["status"] == "cancelled"

    # The provider has the order after all (a request we never saw answered) and collects it.
    key, amount = charge["idempotency_key"], charge["amount_fen"]
    async with httpx.AsyncClient(base_url=provider.url) as books:
        created = await books.post(
            "/_sandbox/orders", json={"out_trade_no": key, "amount_fen": amount}
        )
        assert created.status_code == 201, created.text
    event = {
        "event_id": str(uuid.uuid4()),
        "type": "charge",
        "out_trade_no": key,
        "order_id": created.json()["order_id"],
        "status": "succeeded",
        "amount_fen": amount,
        "reason": None,
        "finished_at": datetime.now(UTC).isoformat(),
    }
    effects = []
    for _ in range(2):  # the news, and a replay of it
        body = orjson.dumps(event)
        headers = {
            signing.SIGNATURE_HEADER: signing.sign(SANDBOX_SECRET, body, int(time.time())),
            "content-type": "application/json",
        }
        answer = await api.post(
            "/api/v1/payments/notifications/sandbox", content=body, headers=headers
        )
        assert answer.status_code == 200, answer.text
        effects.append(answer.json()["effect"])
    assert effects == ["refunding", "no_change"]

    async def refunded() -> list[Any]:
        await run_worker(quiet)
        async with quiet.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT amount_fen, kind, status FROM refunds WHERE charge_id = $1", charge["id"]
            )
        return [dict(r) for r in rows] if rows and rows[0]["status"] == "succeeded" else []

    assert await eventually(refunded) == [
        {"amount_fen": amount, "kind": "overpayment", "status": "succeeded"}
    ]
    async with quiet.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM charges WHERE id = $1", charge["id"])
        audit = await conn.fetch(
            "SELECT actor, detail FROM audit_log WHERE action = 'charge.collected_after_cancel' "
            "AND subject = $1",
            f"charge:{charge['id']}",
        )
        collected = await conn.fetchval(
            "SELECT count(DISTINCT transaction_id) FROM ledger_entries "
            "WHERE charge_id = $1 AND kind = 'charge_settled'",
            charge["id"],
        )
        assert await ledger.is_balanced(conn)
        assert await ledger.balance(conn, ledger.overpaid(driver.account_id)) == 0
        assert await ledger.balance(conn, ledger.revenue(lot.id)) == 0
    assert row["status"] == "cancelled" and row["settled_at"] is not None
    assert collected == 1 and len(audit) == 1 and audit[0]["actor"] == "system"
    order = await provider_order(provider.url, key)
    assert order is not None and order["refunded_fen"] == amount


async def test_not_my_car_after_collection_is_refunded_in_full_when_the_driver_is_right(
    runtime: Runtime,
    gate: GateProbe,
    lot: Lot,
    api: httpx.AsyncClient,
    app: FastAPI,
    provider: ProviderEndpoint,
) -> None:
    driver = await make_driver(runtime, unique_plate())
    stay_id = await exit_with_frames(runtime, gate, lot, driver.plate, timedelta(minutes=100))
    token = await receipt_token_of(runtime, driver)
    charge = await charge_of(runtime, stay_id)

    # One tap on the receipt page: a form POST, answered by the page again.
    tapped = await api.post(f"/r/{token}/dispute", params={"lang": "zh"})
    assert tapped.status_code == 303 and tapped.headers["location"] == f"/r/{token}?lang=zh"
    assert (await api.post(f"/r/{token}/dispute")).status_code == 303
    page = (await api.get(f"/r/{token}")).text
    assert "申诉处理中" in page and 'action="/r/' not in page
    twin = (await api.get(f"/api/v1/receipts/{token}")).json()
    assert twin["dispute"]["status"] == "open" and twin["dispute"]["held"] is False
    # Nothing is refunded before an operator has looked at both frames.
    async with runtime.pool.acquire() as conn:
        refunds = await conn.fetchval(
            "SELECT count(*) FROM refunds WHERE charge_id = $1", charge["id"]
        )
    assert refunds == 0

    admin = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
    decided = await api.post(
        f"/api/v1/operator/disputes/{twin['dispute']['id']}/decision",
        json={"outcome": "driver_right", "note": "another car on the exit frame"},
        headers=admin,
    )
    assert decided.status_code == 200, decided.text
    assert decided.json()["refund_id"] is not None

    async def refunded() -> bool:
        async with runtime.pool.acquire() as conn:
            return bool(
                await conn.fetchval(
                    "SELECT status = 'succeeded' FROM refunds WHERE charge_id = $1", charge["id"]
                )
            )

    await eventually(refunded)
    order = await provider_order(provider.url, charge["idempotency_key"])
    assert order is not None and order["refunded_fen"] == charge["amount_fen"] == 1200
    async with runtime.pool.acquire() as conn:
        assert await ledger.is_balanced(conn)
        assert await ledger.balance(conn, ledger.revenue(lot.id)) == 0
        kinds = [
            r["kind"]
            for r in await conn.fetch(
                "SELECT kind FROM notifications WHERE account_id = $1", driver.account_id
            )
        ]
    assert {"dispute_opened", "dispute_driver_right", "refund"} <= set(kinds)


async def _disputed(api: httpx.AsyncClient, app: FastAPI, driver: Driver, stay_id: int) -> int:
    opened = await api.post(
        f"/api/v1/me/stays/{stay_id}/dispute", headers=bearer(driver_token(app, driver.account_id))
    )
    assert opened.status_code == 200, opened.text
    dispute_id: int = opened.json()["id"]
    return dispute_id


async def _collected_stay(quiet: Runtime, gate: GateProbe) -> tuple[Lot, Driver, int, Any]:
    """A driver's stay of 70 minutes, its charge collected (the worker run here): the lot, the
    driver, the stay's id and its charge."""
    lot = await create_lot(quiet)
    driver = await make_driver(quiet, unique_plate())
    stay_id = await exit_with_frames(quiet, gate, lot, driver.plate, timedelta(minutes=70))

    async def collected() -> bool:
        await run_worker(quiet)
        return (await charge_of(quiet, stay_id))["status"] == "succeeded"

    await eventually(collected)
    return lot, driver, stay_id, await charge_of(quiet, stay_id)


async def _refunded_in_full(quiet: Runtime, provider: ProviderEndpoint, key: str) -> None:
    """Waits, running the worker, until the provider has given the order's money back."""

    async def refunded() -> bool:
        await run_worker(quiet)
        order = await provider_order(provider.url, key)
        return order is not None and order["refunded_fen"] == order["amount_fen"]

    await eventually(refunded)


async def test_not_my_car_holds_a_charge_the_provider_turned_out_never_to_have(
    quiet: Runtime,
    quiet_api: tuple[FastAPI, httpx.AsyncClient],
    gate: GateProbe,
    provider: ProviderEndpoint,
) -> None:
    """The charge's first request failed before it took effect (a 503: the provider never had
    it), then the driver said "not my car". The worker's retry asks the provider, learns it has
    no such order, and holds the charge for the operator as if never sent; the operator agrees
    with the driver at once. Before, the retry sent it anyway: the driver was charged before
    anyone looked at the frames, and the operator could only refund it afterwards."""
    app, api = quiet_api
    lot = await create_lot(quiet)
    driver = await make_driver(quiet, unique_plate())
    stay_id = await exit_with_frames(quiet, gate, lot, driver.plate, timedelta(minutes=70))
    SANDBOX_FAULTS.error_rate = 1.0
    try:
        await quiet.outbox.run_once()
    finally:
        SANDBOX_FAULTS.error_rate = 0.0
    charge = await charge_of(quiet, stay_id)
    assert charge["status"] == "pending" and charge["sent_at"] is not None
    dispute_id = await _disputed(api, app, driver, stay_id)
    async with quiet.pool.acquire() as conn:  # sent an hour ago: no request can still land
        await conn.execute(
            "UPDATE charges SET sent_at = sent_at - interval '1 hour' WHERE id = $1", charge["id"]
        )

    async def asked_again() -> bool:  # the retry comes due after its backoff
        await run_worker(quiet)
        return (await charge_of(quiet, stay_id))["sent_at"] is None

    await eventually(asked_again)
    assert await provider_order(provider.url, charge["idempotency_key"]) is None
    admin = bearer(staff_token(app, await make_staff(quiet, lot.operator_id, "admin")))
    await decide_dispute(api, admin, dispute_id, "driver_right")
    assert (await charge_of(quiet, stay_id))["status"] == "cancelled"
    await run_worker(quiet)
    assert await provider_order(provider.url, charge["idempotency_key"]) is None


async def test_not_my_car_never_cancels_a_charge_whose_request_may_still_land(
    quiet: Runtime,
    quiet_api: tuple[FastAPI, httpx.AsyncClient],
    gate: GateProbe,
    provider: ProviderEndpoint,
) -> None:
    """The charge's first request hangs at the provider: our client gives up, the provider
    applies it when the hang ends, and its notification is lost. The driver says "not my car"
    meanwhile. The retry, sooner than a request can be known dead, finds no order yet: the
    charge is sent again under its key (one order), collected, and the operator's agreement
    with the driver refunds it. Before, the charge was held and cancelled while the hanging
    request took the money, and nothing asked the provider about it again."""
    app, api = quiet_api
    lot = await create_lot(quiet)
    driver = await make_driver(quiet, unique_plate())
    stay_id = await exit_with_frames(quiet, gate, lot, driver.plate, timedelta(minutes=70))
    hang_s = quiet.settings.payment_provider_timeout_s + 2.0
    SANDBOX_FAULTS.timeout_rate = 1.0
    SANDBOX_FAULTS.timeout_s = hang_s
    SANDBOX_FAULTS.lost_notification_rate = 1.0
    try:
        await quiet.outbox.run_once()  # our client gives up; the provider still hangs
        SANDBOX_FAULTS.timeout_rate = 0.0
        charge = await charge_of(quiet, stay_id)
        dispute_id = await _disputed(api, app, driver, stay_id)

        async def collected() -> bool:
            await run_worker(quiet)
            return (await charge_of(quiet, stay_id))["status"] == "succeeded"

        await eventually(collected, timeout_s=hang_s + 10)
    finally:
        SANDBOX_FAULTS.timeout_rate = 0.0
        SANDBOX_FAULTS.timeout_s = 10.0
        SANDBOX_FAULTS.lost_notification_rate = 0.0
    admin = bearer(staff_token(app, await make_staff(quiet, lot.operator_id, "admin")))
    await decide_dispute(api, admin, dispute_id, "driver_right")

    await _refunded_in_full(quiet, provider, charge["idempotency_key"])


async def test_a_refund_the_provider_refuses_for_the_car_parks_reason_is_asked_again(
    quiet: Runtime,
    quiet_api: tuple[FastAPI, httpx.AsyncClient],
    gate: GateProbe,
    provider: ProviderEndpoint,
) -> None:
    """The operator agreed with the driver about a collected charge, and the driver was told
    the fee is refunded. The provider's first answer to the refund is a 401 (the merchant's
    credentials refused: the car park's own problem). Before, the refund was failed for good
    and the driver never got the money; now it stays owed and is asked again."""
    app, api = quiet_api
    lot, driver, stay_id, charge = await _collected_stay(quiet, gate)
    dispute_id = await _disputed(api, app, driver, stay_id)
    admin = bearer(staff_token(app, await make_staff(quiet, lot.operator_id, "admin")))
    await decide_dispute(api, admin, dispute_id, "driver_right")
    SANDBOX_FAULTS.unauthorized_rate = 1.0
    try:
        await quiet.outbox.run_once()
    finally:
        SANDBOX_FAULTS.unauthorized_rate = 0.0
    async with quiet.pool.acquire() as conn:
        refused = await conn.fetchrow(
            "SELECT status, last_error FROM refunds WHERE charge_id = $1", charge["id"]
        )
    assert refused["status"] == "pending" and "401" in refused["last_error"]

    await _refunded_in_full(quiet, provider, charge["idempotency_key"])


async def test_an_operators_refund_with_a_long_reason_reaches_the_provider(
    quiet: Runtime,
    quiet_api: tuple[FastAPI, httpx.AsyncClient],
    gate: GateProbe,
    provider: ProviderEndpoint,
) -> None:
    """The API takes a reason of up to 500 characters, the provider 200: the reason is cut to
    it. Before, the provider refused the request, and the refund, retried unchanged, was never
    paid while still counting against the order (a second try was 409 `refund_not_allowed`)."""
    app, api = quiet_api
    lot, _, _, charge = await _collected_stay(quiet, gate)
    admin = bearer(staff_token(app, await make_staff(quiet, lot.operator_id, "admin")))
    asked = await api.post(
        f"/api/v1/operator/charges/{charge['id']}/refunds",
        json={"amount_fen": charge["amount_fen"], "reason": "退款" * 150},
        headers=admin,
    )
    assert asked.status_code == 201, asked.text

    await _refunded_in_full(quiet, provider, charge["idempotency_key"])


async def test_deleting_the_account_withdraws_its_open_disputes(
    quiet: Runtime,
    quiet_api: tuple[FastAPI, httpx.AsyncClient],
    gate: GateProbe,
    provider: ProviderEndpoint,
) -> None:
    """A driver who deletes their account while a "not my car" of a collected charge waits
    (nothing owed, nothing in flight: deleting is allowed) withdraws it, audit-logged: it
    leaves the operators' queue, and no decision can refund or notify the deleted account.
    Before, it stayed open for an operator to decide."""
    app, api = quiet_api
    lot, driver, stay_id, charge = await _collected_stay(quiet, gate)
    dispute_id = await _disputed(api, app, driver, stay_id)
    deleted = await api.delete("/api/v1/me", headers=bearer(driver_token(app, driver.account_id)))
    assert deleted.status_code == 204, deleted.text

    admin = bearer(staff_token(app, await make_staff(quiet, lot.operator_id, "admin")))
    queue = await api.get("/api/v1/operator/disputes", params={"status": "open"}, headers=admin)
    assert queue.status_code == 200 and queue.json() == []
    shown = (await api.get(f"/api/v1/operator/disputes/{dispute_id}", headers=admin)).json()
    assert (shown["status"], shown["decided_by"]) == ("withdrawn", "account_deleted")
    decided = await api.post(
        f"/api/v1/operator/disputes/{dispute_id}/decision",
        json={"outcome": "driver_right", "note": "another car"},
        headers=admin,
    )
    assert decided.status_code == 409 and error_code(decided) == "already_decided"
    await run_worker(quiet)
    async with quiet.pool.acquire() as conn:
        audited = await conn.fetch(
            "SELECT actor, action FROM audit_log WHERE subject = $1 ORDER BY id",
            f"charge_dispute:{dispute_id}",
        )
        refunds = await conn.fetchval(
            "SELECT count(*) FROM refunds WHERE charge_id = $1", charge["id"]
        )
    actor = f"account:{driver.account_id}"
    assert [(r["actor"], r["action"]) for r in audited] == [
        (actor, "charge_dispute.opened"),
        (actor, "charge_dispute.withdrawn"),
    ]
    assert refunds == 0
    order = await provider_order(provider.url, charge["idempotency_key"])
    assert order is not None and order["refunded_fen"] == 0


async def test_a_deleted_accounts_receipt_links_lead_nowhere(
    runtime: Runtime, gate: GateProbe, lot: Lot, app: FastAPI, api: httpx.AsyncClient
) -> None:
    """After the driver deletes the account, a receipt link it was sent (forwarded, or on a
    phone passed on) shows no stay, no fee and no frame, and opens no dispute in its name.
    Before, all of it still answered."""
    driver = await make_driver(runtime, unique_plate())
    await exit_with_frames(runtime, gate, lot, driver.plate, timedelta(minutes=40))
    token = await receipt_token_of(runtime, driver)
    receipt = (await api.get(f"/api/v1/receipts/{token}")).json()
    entry_frame = receipt["frames"]["entry"]
    assert (await api.get(entry_frame)).status_code == 200

    async def settled() -> bool:
        rows = await charges_of(runtime, lot)
        return bool(rows) and rows[0]["status"] != "pending"

    await eventually(settled)
    deleted = await api.delete("/api/v1/me", headers=bearer(driver_token(app, driver.account_id)))
    assert deleted.status_code == 204, deleted.text
    assert (await api.get(f"/api/v1/receipts/{token}")).status_code == 404
    assert (await api.get(entry_frame)).status_code == 404
    assert (await api.post(f"/r/{token}/dispute")).status_code == 404


# --- 5. bad input ----------------------------------------------------------------------------


async def test_disputes_of_someone_elses_charge_or_by_another_company_change_nothing(
    runtime: Runtime, gate: GateProbe, lot: Lot, api: httpx.AsyncClient, app: FastAPI
) -> None:
    driver = await make_driver(runtime, unique_plate())
    other = await make_driver(runtime, unique_plate())
    stay_id = await exit_with_frames(runtime, gate, lot, driver.plate, timedelta(minutes=20))
    await eventually(
        lambda: _status_is(runtime, stay_id, "succeeded"),
    )
    as_other = bearer(driver_token(app, other.account_id))
    theirs = await api.post(f"/api/v1/me/stays/{stay_id}/dispute", headers=as_other)
    assert theirs.status_code == 404 and error_code(theirs) == "stay_not_found"
    nothing = await api.post("/api/v1/me/stays/999999999/dispute", headers=as_other)
    assert nothing.status_code == 404
    unknown = await api.post("/api/v1/receipts/" + "y" * 32 + "/dispute")
    assert unknown.status_code == 404 and error_code(unknown) == "receipt_not_found"
    async with runtime.pool.acquire() as conn:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM charge_disputes d JOIN charges c ON c.id = d.charge_id "
                "WHERE c.session_id = $1",
                stay_id,
            )
            == 0
        )

    as_driver = bearer(driver_token(app, driver.account_id))
    dispute = (await api.post(f"/api/v1/me/stays/{stay_id}/dispute", headers=as_driver)).json()
    lot_y = await create_lot(runtime)
    admin_y = bearer(staff_token(app, await make_staff(runtime, lot_y.operator_id, "admin")))
    foreign = await api.post(
        f"/api/v1/operator/disputes/{dispute['id']}/decision",
        json={"outcome": "driver_right", "note": "not ours"},
        headers=admin_y,
    )
    assert foreign.status_code == 404 and error_code(foreign) == "dispute_not_found"
    assert dispute["id"] not in {
        d["id"] for d in (await api.get("/api/v1/operator/disputes", headers=admin_y)).json()
    }
    admin_x = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
    bad = await api.post(
        f"/api/v1/operator/disputes/{dispute['id']}/decision",
        json={"outcome": "maybe"},
        headers=admin_x,
    )
    assert bad.status_code == 422 and error_code(bad) == "invalid_request"
    async with runtime.pool.acquire() as conn:
        assert (
            await conn.fetchval("SELECT status FROM charge_disputes WHERE id = $1", dispute["id"])
            == "open"
        )
    rows = await charges_of(runtime, lot)
    assert [r["status"] for r in rows] == ["succeeded"]


async def _status_is(runtime: Runtime, stay_id: int, status: str) -> bool:
    return (await charge_of(runtime, stay_id))["status"] == status


async def test_a_receipt_shows_no_frames_once_the_operator_found_it_was_not_the_drivers_car(
    runtime: Runtime,
    gate: GateProbe,
    lot: Lot,
    api: httpx.AsyncClient,
    app: FastAPI,
) -> None:
    """ "Not my car" decided for the driver: the frames are of another vehicle (someone else's
    car and stay). The driver (or whoever the link was forwarded to) keeps seeing that car's
    entry and exit photos through the receipt link and the app for as long as they are kept.
    Once decided `driver_right`, the stay's frames are no longer served to the driver's side
    (receipt frame links and /api/v1/me/stays/{id}/frames 404); before, they were."""
    driver = await make_driver(runtime, unique_plate())
    stay_id = await exit_with_frames(runtime, gate, lot, driver.plate, timedelta(minutes=100))
    token = await receipt_token_of(runtime, driver)
    me = bearer(driver_token(app, driver.account_id))
    opened = await api.post(f"/api/v1/me/stays/{stay_id}/dispute", headers=me)
    assert opened.status_code == 200, opened.text
    admin = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
    decided = await api.post(
        f"/api/v1/operator/disputes/{opened.json()['id']}/decision",
        json={"outcome": "driver_right", "note": "another car on both frames"},
        headers=admin,
    )
    assert decided.status_code == 200, decided.text
    assert (await charge_of(runtime, stay_id))["status"] == "succeeded"  # refunded, as designed

    receipt = (await api.get(f"/api/v1/receipts/{token}")).json()
    served = []
    for which, url in receipt["frames"].items():
        if url is not None and (await api.get(url)).status_code == 200:
            served.append(f"receipt:{which}")
    for which in ("entry", "exit"):
        got = await api.get(f"/api/v1/me/stays/{stay_id}/frames/{which}", headers=me)
        if got.status_code == 200:
            served.append(f"app:{which}")
    assert served == [], f"another car's frames still served to the driver: {served}"
