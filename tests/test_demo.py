"""`parking-dev demo` end to end on the machine's servers: every exit decided, every bound exit
with a fee charged exactly once, ledger balanced, only the deliberate dead letters."""

from pathlib import Path

import pytest

from parking.settings import Settings
from parking_dev import sandbox
from parking_dev.demo import run_demo
from tests.conftest import MQTT_URL, REDIS_URL


@pytest.mark.parametrize("provider", ["sandbox", "wechat"])
async def test_demo_city_runs_end_to_end(
    settings: Settings, database_url: str, tmp_path: Path, provider: str
) -> None:
    settings.data_dir = tmp_path  # the sandbox provider's books start empty like this database
    settings.database_url = database_url
    settings.redis_url = REDIS_URL
    settings.mqtt_url = MQTT_URL
    # Its API serves the held cars' QR pages (and hears the sandbox's notifications).
    settings.api_port = sandbox.free_port()
    settings.public_base_url = f"http://127.0.0.1:{settings.api_port}"
    settings.payment_provider = provider  # type: ignore[assignment]
    # On WeChat's rails a short balance is advanced (垫资): charged, never a debt.
    faults = sandbox.FaultConfig(decline_rate=0.3, seed=3) if provider == "wechat" else None
    summary = await run_demo(settings, duration_s=4, rate=25, faults=faults)

    assert summary["exits"] > 20 and summary["entries"] > 10
    assert summary["opened"] + summary["held"] == summary["exits"], summary
    assert summary["unanswered"] == 0
    assert summary["charged"] == summary["bound_exits_with_fee"] > 0, summary
    assert summary["charges_pending"] == summary["charges_failed"] == 0
    assert summary["duplicates_ignored"] >= summary["duplicates_sent"]
    assert summary["dead_letters"] == summary["dead_letters_expected"] == 3
    assert summary["notifications_sent"] >= summary["charged"]
    assert summary["ledger_balanced"] is True
    # Held drivers paid on the page their QR code opens, and the barrier opened for them.
    assert summary["paid_by_qr"] >= 1, summary
    assert summary["charges_per_session_max"] == 1
    assert summary["debts"] == 0 and summary["notifications_rejected"] == 0
    assert 0 < summary["decision_p50_ms"] <= summary["decision_p99_ms"]
    if provider == "wechat":
        assert summary["charges_advanced"] > 0, summary
