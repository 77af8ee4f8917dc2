"""PARKING_ENV=production fails closed: `parking serve` (and lanes, worker) refuses to start on
any stand-in for the outside world and names every missing setting, while a production
configuration starts and development keeps its stand-ins."""

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from pydantic import SecretStr

from parking import cli
from parking.gates import config as gate_configs
from parking.infra import Endpoints
from parking.production import ConfigurationError, ProductionRefused, stand_ins
from parking.runtime import ProviderEndpoint, running
from parking.settings import Settings
from parking_dev import sandbox
from tests.conftest import MQTT_URL, REDIS_URL

PARKING = Path(sys.executable).parent / "parking"
GATE_KEY = gate_configs.private_key_pem(gate_configs.generate_private_key())


@pytest.fixture(scope="module")
async def adapter_url() -> AsyncIterator[str]:
    """A payment provider adapter's service that is not the sandbox (it only has to answer
    for what it is)."""

    async def describe(_: web.Request) -> web.Response:
        return web.json_response({"openapi": "3.1.0", "info": {"title": "Pay-later adapter"}})

    app = web.Application()
    app.router.add_get("/openapi.json", describe)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def production_values(database_url: str, provider_url: str) -> dict[str, Any]:
    """Everything production needs, as settings values."""
    return {
        "env": "production",
        "database_url": database_url,
        "redis_url": REDIS_URL,
        "mqtt_url": MQTT_URL,
        "payment_provider_url": provider_url,
        "payment_provider_secret": SecretStr("provider-notification-secret"),
        "sms_provider": "aliyun",
        "sms_access_key_id": "LTAI-key",
        "sms_access_key_secret": SecretStr("sms-secret"),
        "sms_sign_name": "便捷泊车",
        "sms_template_login_code": "SMS_1",
        "sms_template_charge": "SMS_2",
        "sms_template_notice": "SMS_3",
        "jwt_secret": SecretStr("j" * 48),
        "gate_config_key": SecretStr(GATE_KEY),
        "public_base_url": "https://parking.example.cn",
        "receipt_key": SecretStr("r" * 48),
        "log_pseudonym_key": SecretStr("p" * 48),
    }


def _settings(values: dict[str, Any]) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture(autouse=True)
def _no_parking_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test gives counts (a developer's PARKING_* variables would not)."""
    for name in Settings.model_fields:
        monkeypatch.delenv(f"PARKING_{name.upper()}", raising=False)


async def _refusal(values: dict[str, Any]) -> ProductionRefused:
    """Starts `parking serve` as the command does (the API alone) and returns its refusal."""
    with pytest.raises(ProductionRefused) as refused:
        await cli._serve(_settings(values), lanes=False, outbox_worker=False)
    return refused.value


# (setting changed, its value, the variable named, words of the reason)
CASES = [
    ("database_url", None, "PARKING_DATABASE_URL", "embedded PostgreSQL"),
    ("redis_url", None, "PARKING_REDIS_URL", "embedded Redis"),
    ("mqtt_url", None, "PARKING_MQTT_URL", "embedded MQTT broker"),
    ("payment_provider_url", None, "PARKING_PAYMENT_PROVIDER_URL", "in-process sandbox"),
    ("payment_provider_secret", None, "PARKING_PAYMENT_PROVIDER_SECRET", "could not be verified"),
    ("sms_provider", None, "PARKING_SMS_PROVIDER", "dev SMS sender"),
    ("sms_access_key_secret", None, "PARKING_SMS_ACCESS_KEY_SECRET", "aliyun"),
    ("sms_template_charge", None, "PARKING_SMS_TEMPLATE_CHARGE", "aliyun"),
    ("dev_adapters", True, "PARKING_DEV_ADAPTERS", "dev vehicle registry"),
    ("jwt_secret", None, "PARKING_JWT_SECRET", "random key per process"),
    ("gate_config_key", None, "PARKING_GATE_CONFIG_KEY", "unsigned"),
    ("public_base_url", None, "PARKING_PUBLIC_BASE_URL", "http://127.0.0.1:8000"),
    ("public_base_url", "http://parking.example.cn", "PARKING_PUBLIC_BASE_URL", "https://"),
    ("receipt_key", None, "PARKING_RECEIPT_KEY", "no gate photos"),
    ("log_pseudonym_key", None, "PARKING_LOG_PSEUDONYM_KEY", "random key per process"),
    ("feed_allow_loopback", True, "PARKING_FEED_ALLOW_LOOPBACK", "endpoints on loopback"),
]


@pytest.mark.parametrize(("field", "value", "variable", "reason"), CASES)
async def test_production_refuses_each_stand_in_by_name(
    field: str, value: Any, variable: str, reason: str, database_url: str, adapter_url: str
) -> None:
    values = production_values(database_url, adapter_url)
    if value is None:
        del values[field]
    else:
        values[field] = value
    refusal = await _refusal(values)
    assert [item.setting for item in refusal.missing] == [variable], str(refusal)
    assert reason in str(refusal)


async def test_sms_and_notifier_stand_ins_are_both_named(
    database_url: str, adapter_url: str
) -> None:
    values = production_values(database_url, adapter_url)
    del values["sms_provider"]
    text = str(await _refusal(values))
    assert "dev SMS sender" in text and "in-memory notifier" in text


async def test_production_refuses_a_provider_url_that_is_the_sandbox(
    database_url: str, provider: ProviderEndpoint
) -> None:
    refusal = await _refusal(production_values(database_url, provider.url))
    assert [item.setting for item in refusal.missing] == ["PARKING_PAYMENT_PROVIDER_URL"]
    assert "is the sandbox payment provider" in str(refusal)


async def test_production_on_wechat_rails_refuses_the_emulator_and_missing_keys(
    database_url: str, adapter_url: str, tmp_path: Path
) -> None:
    values = production_values(database_url, adapter_url)
    values["payment_provider"] = "wechat"
    # No merchant key at all: the in-process emulator would stand in for WeChat. Each key is
    # named once, with the emulator as its reason, and nothing else is named for it.
    refusal = await _refusal(values)
    named = [item.setting for item in refusal.missing]
    assert named == _settings(values).wechat_missing(), str(refusal)
    assert "PARKING_WECHAT_MCHID" in named and "emulator" in str(refusal)
    # Every key, but WeChat's API replaced by another host (an emulator somewhere).
    key = tmp_path / "key.pem"
    key.write_text("not read before the refusal")
    values |= {
        "wechat_mchid": "1900000001",
        "wechat_appid": "wx0000000000000001",
        "wechat_cert_serial_no": "SERIAL",
        "wechat_private_key_path": key,
        "wechat_apiv3_key": SecretStr("k" * 32),
        "wechat_platform_public_key_path": key,
        "wechat_platform_public_key_id": "PUB_KEY_ID_1",
        "wechat_app_secret": SecretStr("s" * 32),
        "wechat_api_url": adapter_url,
        "wechat_login_url": adapter_url,
    }
    refusal = await _refusal(values)
    assert [item.setting for item in refusal.missing] == [
        "PARKING_WECHAT_API_URL",
        "PARKING_WECHAT_LOGIN_URL",
    ], str(refusal)
    assert "not WeChat's API" in str(refusal)
    assert "not WeChat's sign-in API" in str(refusal)


def test_every_missing_setting_is_named_at_once() -> None:
    names = [item.setting for item in stand_ins(_settings({"env": "production"}))]
    assert len(names) >= 11 and len(set(names)) == len(names)
    assert {"PARKING_PAYMENT_PROVIDER_URL", "PARKING_SMS_PROVIDER", "PARKING_JWT_SECRET"} <= set(
        names
    )


def test_development_uses_its_stand_ins_and_defaults_the_public_url_to_the_api() -> None:
    settings = _settings({"api_host": "0.0.0.0", "api_port": 8123})
    assert settings.public_base_url == "http://127.0.0.1:8123"
    assert _settings({"api_port": 8124}).public_base_url == "http://127.0.0.1:8124"
    assert _settings({"public_base_url": "https://p.example.cn/"}).public_base_url == (
        "https://p.example.cn"
    )
    assert stand_ins(_settings({})) != [], "the stand-ins are there, and allowed"


async def _run(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        str(PARKING),
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


def _environment(values: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARKING_")}
    for name, value in values.items():
        text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        env[f"PARKING_{name.upper()}"] = text
    return env


async def test_parking_serve_in_production_without_settings_exits_2_naming_them(
    tmp_path: Path,
) -> None:
    code, output = await _run("serve", env=_environment({"env": "production"}), cwd=tmp_path)
    assert code == 2, output
    for name in ("PARKING_DATABASE_URL", "PARKING_PAYMENT_PROVIDER_URL", "PARKING_JWT_SECRET"):
        assert name in output
    assert "Traceback" not in output


async def test_parking_lanes_and_worker_refuse_too(tmp_path: Path) -> None:
    for command in ("lanes", "worker"):
        code, output = await _run(command, env=_environment({"env": "production"}), cwd=tmp_path)
        assert code == 2 and "PARKING_SMS_PROVIDER" in output, output


async def test_a_complete_production_configuration_starts(
    database_url: str, adapter_url: str, tmp_path: Path
) -> None:
    port = sandbox.free_port()
    values = {**production_values(database_url, adapter_url), "api_port": port}
    values["mqtt_client_id"] = f"production-test-{port}"
    process = await asyncio.create_subprocess_exec(
        str(PARKING),
        "serve",
        "--no-lanes",
        "--no-worker",
        env=_environment(values),
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                assert process.returncode is None, "the production start ended"
                try:
                    health = await client.get("/health")
                    break
                except httpx.TransportError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        assert health.status_code == 200, health.text
    finally:
        if process.returncode is None:
            process.terminate()
        _, errors = await asyncio.wait_for(process.communicate(), timeout=30)
    assert "refuses" not in errors.decode(errors="replace")


async def test_reconciling_in_production_never_asks_an_in_process_sandbox(
    database_url: str, tmp_path: Path
) -> None:
    env = _environment({"env": "production", "database_url": database_url})
    code, output = await _run("billing", "reconcile", "2026-12-01", env=env, cwd=tmp_path)
    assert code == 2, output
    assert "PARKING_PAYMENT_PROVIDER_URL is not set" in output and "Traceback" not in output


async def test_half_configured_sms_stops_a_development_start_naming_what_is_missing(
    settings: Settings, database_url: str, provider: ProviderEndpoint
) -> None:
    half = settings.model_copy(update={"sms_provider": "aliyun", "sms_access_key_id": "LTAI"})
    with pytest.raises(ConfigurationError) as refused:
        async with running(half, Endpoints(database_url, REDIS_URL, MQTT_URL), provider):
            pass
    assert "PARKING_SMS_ACCESS_KEY_SECRET" in str(refused.value)
    assert "PARKING_SMS_ACCESS_KEY_ID" not in str(refused.value)
