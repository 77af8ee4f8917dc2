"""`parking-dev bench --city-day` at a tiny scale: the day it loads is consistent (the books
balance, every pay-later stay has its one charge, every stay its captures, the lane's counters
match the open stays) and its JSON carries every figure. No timings are asserted: speed is for
the benchmark to report."""

import uuid
from pathlib import Path

import asyncpg

from gate_controller.protocol import Command
from parking.settings import Settings
from parking_dev.bench import sandbox_process
from parking_dev.citybench import PER_STAY_TABLES, CityDayConfig, run_city_day
from tests.conftest import ADMIN_DSN, MQTT_URL, REDIS_URL, _dsn_for

VIEWS = {
    "operator.stays.car_park",
    "operator.stays.plate",
    "operator.exceptions",
    "operator.dashboard",
    "operator.revenue",
    "operator.revenue_csv",
    "operator.debts",
    "public.car_parks",
    "public.nearby",
    "public.places",
    "public.car_park",
}


async def test_city_day_loads_a_consistent_day_and_reports_its_figures(
    settings: Settings, tmp_path: Path
) -> None:
    settings.database_url = ADMIN_DSN
    settings.redis_url = REDIS_URL
    settings.mqtt_url = MQTT_URL
    database = f"parking_cityday_test_{uuid.uuid4().hex[:8]}"
    config = CityDayConfig(
        car_parks=20,
        stays=2000,
        rate=20,
        replay_seconds=3,
        query_calls=2,
        load_workers=2,
        database=database,
        seed=7,
        explain_path=tmp_path / "explain.txt",
    )
    try:
        with sandbox_process() as provider:
            result = await run_city_day(settings, provider, config)
        conn = await asyncpg.connect(_dsn_for(database))
        try:
            await _check_the_books(conn, result)
        finally:
            await conn.close()
    finally:
        admin = await asyncpg.connect(ADMIN_DSN)
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()

    assert result["car_parks"] == 20
    assert result["stays"] == 2000
    assert result["history"]["outcomes"]["entered"] == 2000
    assert result["load_stays_per_s"] > 0
    assert set(PER_STAY_TABLES) <= set(result["tables"])
    assert result["tables"]["sessions"]["rows"] == 2000
    assert result["tables"]["captures"]["rows"] > 2 * 1500  # entries, most exits, double reads
    assert result["db_bytes_per_million_stays"] > 0

    replay = result["replay"]
    assert replay["errors"] == 0
    assert replay["decisions"] == replay["captures_sent"] > 0
    assert replay["charged"] == replay["outcomes"].get("exited_pay_later", 0)
    assert replay["exits_wrong_plate"] == 0
    assert 0 < replay["p50_ms"] <= replay["p95_ms"] <= replay["p99_ms"] <= replay["max_ms"]
    assert replay["throughput_per_s"] > 0

    assert set(result["queries"]) == VIEWS
    for route, figures in result["queries"].items():
        assert figures["errors"] == 0, route
        assert 0 < figures["p50_ms"] <= figures["p99_ms"], route
    explained = config.explain_path.read_text(encoding="utf-8")
    for route in VIEWS:
        assert f"==== {route}:" in explained
    assert "custom plan" in explained and "generic plan" in explained
    assert "Execution Time" in explained

    checks = result["checks"]
    assert checks["ledger_balanced"] is True
    assert checks["charges_per_session_max"] == 1
    for name in (
        "pay_later_stays_without_charge",
        "charges_of_other_stays",
        "entries_without_capture",
        "exits_without_capture",
        "open_debts_of_unblocked_accounts",
        # The lane's live counters after the replay against the open stays in PostgreSQL.
        "occupancy_counters_off",
    ):
        assert checks[name] == 0, name

    extrapolation = result["extrapolation"]
    assert extrapolation["bytes_per_year"] == 365 * extrapolation["bytes_per_day"] > 0
    assert (
        extrapolation["city_peak_hour_captures_per_s"]
        > (extrapolation["city_average_captures_per_s"])
    )
    assert set(result["timings_s"]) >= {"seed", "load", "replay", "queries", "total"}


async def _check_the_books(conn: asyncpg.Connection, result: dict[str, object]) -> None:
    """The kept database, read directly rather than through the bench's own checks."""
    replay = result["replay"]
    assert isinstance(replay, dict)
    # Every entry (history and replay) opened one stay.
    assert await conn.fetchval("SELECT count(*) FROM sessions") == 2000 + replay["outcomes"].get(
        "entered", 0
    )
    # Double entry: every transaction and the whole ledger sum to zero.
    assert await conn.fetchval("SELECT COALESCE(sum(amount_fen), 0) FROM ledger_entries") == 0
    assert (
        await conn.fetchval(
            """SELECT count(*) FROM (SELECT transaction_id FROM ledger_entries
               GROUP BY transaction_id HAVING sum(amount_fen) <> 0) t"""
        )
        == 0
    )
    # Revenue is what was charged after the exit and what was paid at the gate.
    revenue, charged, paid = await conn.fetchrow(
        """SELECT (SELECT -sum(amount_fen) FROM ledger_entries
                   WHERE ledger_account LIKE 'revenue:car_park:%'),
                  (SELECT sum(amount_fen) FROM charges),
                  (SELECT sum(stay_fee_fen) FROM payments WHERE status = 'succeeded')"""
    )
    assert revenue == charged + paid > 0
    # One charge per pay-later stay, none for any other; a declined charge is a debt.
    assert await conn.fetchval("SELECT count(*) FROM charges") == await conn.fetchval(
        "SELECT count(*) FROM sessions WHERE settlement = 'pay_later'"
    )
    assert await conn.fetchval(
        "SELECT count(*) FROM charges WHERE status = 'failed'"
    ) == await conn.fetchval("SELECT count(*) FROM debts")
    # Every stay has its entry capture, and every closed stay its exit capture.
    missing = await conn.fetchval(
        """SELECT count(*) FROM sessions s
           WHERE NOT EXISTS (SELECT 1 FROM captures c WHERE c.capture_id = s.entry_capture_id
                             AND c.session_id = s.id AND c.direction = 'in')
              OR (s.status = 'closed' AND NOT EXISTS (
                  SELECT 1 FROM captures c WHERE c.capture_id = s.exit_capture_id
                  AND c.session_id = s.id AND c.direction = 'out'))"""
    )
    assert missing == 0
    # The stored commands are what the lane sends and re-sends to a gate.
    for row in await conn.fetch(
        "SELECT capture_id, command FROM captures ORDER BY received_at LIMIT 200"
    ):
        command = Command.model_validate_json(row["command"])
        assert command.capture_id == row["capture_id"]
