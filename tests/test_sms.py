"""The Alibaba Cloud SMS adapter, against a local fake of the service that checks every request's
signature: sign-in codes through the login template, drivers' notifications through the charge
and notice templates, and a refused or wrongly signed message never counted as sent."""

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from billing import notifications
from parking.admin import repository as admin
from parking.runtime import Runtime
from parking.settings import Settings
from parking.sms.aliyun import signature
from tests.conftest import Lot, eventually, exit_after, make_driver, unique_plate
from tests.fake_aliyun_sms import FakeAliyunSms, serving
from tests.gates import GateProbe

KEY_ID = "LTAI-test-key"
SECRET = "test-secret-of-the-fake"


@pytest.fixture
async def fake_sms() -> AsyncIterator[FakeAliyunSms]:
    async with serving(KEY_ID, SECRET) as fake:
        yield fake


@pytest.fixture
def settings(settings: Settings, fake_sms: FakeAliyunSms) -> Settings:
    return settings.model_copy(
        update={
            "sms_provider": "aliyun",
            "sms_endpoint": fake_sms.url,
            "sms_access_key_id": KEY_ID,
            "sms_access_key_secret": SecretStr(SECRET),
            "sms_sign_name": "便捷泊车",
            "sms_template_login_code": "SMS_100001",
            "sms_template_charge": "SMS_100002",
            "sms_template_notice": "SMS_100003",
        }
    )


def _phone() -> str:
    return f"139{uuid.uuid4().int % 10**8:08d}"


def test_the_signature_is_the_published_example() -> None:
    # Alibaba Cloud's own worked example (ECS DescribeRegions, key secret "testsecret").
    params = {
        "TimeStamp": "2016-02-23T12:46:24Z",
        "Format": "XML",
        "AccessKeyId": "testid",
        "Action": "DescribeRegions",
        "SignatureMethod": "HMAC-SHA1",
        "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf",
        "Version": "2014-05-26",
        "SignatureVersion": "1.0",
    }
    assert signature("testsecret", "GET", params) == "CT9X0VtwR86fNWSnsc6v8YGOjuE="


async def test_a_sign_in_code_is_sent_through_the_login_template(
    api: httpx.AsyncClient, app: FastAPI, fake_sms: FakeAliyunSms
) -> None:
    phone = _phone()
    sent = await api.post("/api/v1/auth/sign-in-codes", json={"phone": f"+86{phone}"})
    assert sent.status_code == 202, sent.text
    assert fake_sms.refused == []
    [message] = fake_sms.accepted
    assert (message["phone"], message["sign_name"], message["template"]) == (
        phone,
        "便捷泊车",
        "SMS_100001",
    )
    code = message["params"]["code"]
    answer = await api.post(
        "/api/v1/auth/token",
        json={
            "grant_type": "sign_in_code",
            "phone": f"+86{phone}",
            "code": code,
            "challenge_id": sent.json()["challenge_id"],
        },
    )
    assert answer.status_code == 200, answer.text


async def test_a_code_the_service_refuses_is_a_503_not_a_silent_success(
    api: httpx.AsyncClient, fake_sms: FakeAliyunSms
) -> None:
    fake_sms.access_key_secret = "another-secret"  # our signature no longer matches
    answer = await api.post("/api/v1/auth/sign-in-codes", json={"phone": _phone()})
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "sms_unavailable"
    assert fake_sms.refused == ["SignatureDoesNotMatch"] and fake_sms.accepted == []


async def _notify(
    runtime: Runtime,
    account_id: int,
    kind: str,
    body: str,
    params: dict[str, str] | None = None,
) -> int:
    async with runtime.pool.acquire() as conn, conn.transaction():
        notification_id = await notifications.enqueue(
            conn,
            account_id=account_id,
            kind=kind,
            source_key=f"test:{uuid.uuid4().hex}",
            body=body,
            params=params,
        )
    assert notification_id is not None
    return notification_id


async def _status(runtime: Runtime, notification_id: int) -> str:
    async with runtime.pool.acquire() as conn:
        status: str = await conn.fetchval(
            "SELECT status FROM notifications WHERE id = $1", notification_id
        )
    return status


async def test_drivers_notifications_go_to_their_phone_by_template(
    runtime: Runtime, fake_sms: FakeAliyunSms
) -> None:
    phone = _phone()
    async with runtime.pool.acquire() as conn:
        account_id = await admin.create_account(conn, f"+86{phone}")
    tz = ZoneInfo("Asia/Shanghai")
    left = datetime(2026, 12, 6, 18, 2, tzinfo=tz)
    charged = notifications.exit_charged(
        "浙A12345",
        "城中街停车场",
        left - timedelta(hours=2, minutes=10),
        left,
        1205,
        tz,
        receipt_url="https://parking.example.cn/r/abc",
    )
    first = await _notify(runtime, account_id, "exit_charged", charged.body, charged.params)
    second = await _notify(runtime, account_id, "debt_reminder", "您有1笔停车费共¥6.00尚未缴纳")
    for notification_id in (first, second):
        await eventually(lambda n=notification_id: _is_sent(runtime, n))
    by_template = {m["template"]: m for m in fake_sms.accepted}
    assert by_template["SMS_100002"]["params"] == {
        "plate": "浙A12345",
        "car_park": "城中街停车场",
        "time": "18:02",
        "duration": "2小时10分",
        "amount": "12.05",
        "receipt": "https://parking.example.cn/r/abc",
    }
    assert charged.body == (
        "浙A12345 于18:02驶离城中街停车场，停车2小时10分，费用¥12.05已扣款，"
        "凭证：https://parking.example.cn/r/abc"
    )
    assert by_template["SMS_100003"]["params"] == {"content": "您有1笔停车费共¥6.00尚未缴纳"}
    assert {m["phone"] for m in fake_sms.accepted} == {phone}


async def _is_sent(runtime: Runtime, notification_id: int) -> bool:
    return await _status(runtime, notification_id) == "sent"


async def test_a_refused_notification_stays_pending_and_is_retried(
    runtime: Runtime, fake_sms: FakeAliyunSms
) -> None:
    fake_sms.fail_with = "isv.BUSINESS_LIMIT_CONTROL"
    async with runtime.pool.acquire() as conn:
        account_id = await admin.create_account(conn, f"+86{_phone()}")
    notification_id = await _notify(runtime, account_id, "refund", "已退款¥4.00")

    async def retried() -> bool:
        async with runtime.pool.acquire() as conn:
            error = await conn.fetchval(
                "SELECT last_error FROM outbox WHERE kind = 'notification' AND ref_id = $1",
                notification_id,
            )
        return error is not None and "BUSINESS_LIMIT_CONTROL" in error

    await eventually(retried)
    assert await _status(runtime, notification_id) == "pending"
    fake_sms.fail_with = None


async def test_a_pay_later_exit_is_texted_with_the_charge_templates_fields(
    runtime: Runtime, gate: GateProbe, lot: Lot, fake_sms: FakeAliyunSms
) -> None:
    driver = await make_driver(runtime, unique_plate())
    opened = await exit_after(runtime, gate, lot, driver.plate, timedelta(hours=2, minutes=10))
    assert opened["action"] == "open", opened

    async def texted() -> list[dict[str, Any]]:
        return [m for m in fake_sms.accepted if m["template"] == "SMS_100002"]

    [message] = await eventually(texted)
    params = message["params"]
    assert (params["plate"], params["car_park"], params["duration"], params["amount"]) == (
        driver.plate,
        lot.name,
        "2小时10分",
        "18.00",
    )
    assert params["receipt"].startswith(f"{runtime.settings.public_base_url}/r/")
