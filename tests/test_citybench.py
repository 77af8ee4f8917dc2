"""`parking-dev bench --city-day` at a tiny scale: the day it loads is consistent (the books
balance, every pay-later stay has its one charge, every stay its captures, the lane's counters
match the open stays, every stay was decided by the lane's own rules) and its JSON carries every
figure. No timings are asserted: speed is for the benchmark to report."""

import json
import uuid
from collections import Counter
from pathlib import Path

import asyncpg

from billing.charges import accrual_lines, settlement_lines
from billing.payments import received_lines
from gate_controller.protocol import Command
from parking.lanes.repository import PayLater, all_tariff_versions
from parking.lanes.rules import exit_rule, priced_color
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
            await _check_every_exit_follows_the_lanes_rules(conn)
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
        # Every capture, loaded or replayed, can be found by its id alone (a resend meets it).
        "captures_without_key",
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


# Exit outcomes the lane's rule (parking.lanes.rules.exit_rule) decides, and "paid_at_gate": a
# held exit whose payment was booked. The others (unreadable, ambiguous, no entry) are a person's.
_RULED = (
    "exited_free",
    "exited_pay_later",
    "held_unbound",
    "held_no_agreement",
    "held_arrears",
    "held_over_limit",
    "held_no_tariff",
    "paid_at_gate",
)
PROVIDER = "sandbox"


async def _check_every_exit_follows_the_lanes_rules(conn: asyncpg.Connection) -> None:
    """Every exit in the kept database (the loader's day and the lane's replay alike) decided
    again from its stored rows with the lane's own rule: the tariff's fee for the stay, and
    free, pay-later or held (and why) from the driver's binding, agreement, limit and open debts
    at the moment of the decision. The stored outcome, fee, command, charge, payment and their
    ledger lines must be what that rule implies, so a rule changed in the lane that the loader
    did not follow (or the other way round) fails here."""
    # Read jsonb as the service's pool does (parking.db), for the tariffs and the commands.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    versions = await all_tariff_versions(conn)
    rows = await conn.fetch(
        """WITH exits AS (
               SELECT c.capture_id, c.outcome, c.command, s.id AS session_id, s.car_park_id,
                      s.plate, s.plate_color, s.entered_at, s.fixed_fee_fen, s.status,
                      s.fee_fen, s.settlement, s.account_id AS stay_account_id,
                      -- Whether the charge may rest on the reads: entry and exit certain.
                      s.entry_certain, COALESCE(c.read_certain, false) AS exit_certain,
                      -- An attendant's plate for an unreadable exit: decided when resolved.
                      COALESCE(e.resolved_at, c.received_at) AS decided_at
               FROM captures c
               JOIN sessions s ON s.id = c.session_id
               LEFT JOIN lane_exceptions e
                   ON e.capture_id = c.capture_id AND e.status = 'resolved'
               WHERE c.direction = 'out' AND c.outcome = ANY($1::text[]))
           SELECT x.*, a.id AS account_id, pa.id AS agreement_id, pa.per_session_limit_fen,
                  (SELECT COALESCE(sum(d.amount_fen), 0)::bigint FROM debts d
                   WHERE d.account_id = a.id AND d.created_at <= x.decided_at
                     AND (d.settled_at IS NULL OR d.settled_at > x.decided_at)) AS open_debt_fen,
                  ch.id AS charge_id, ch.status AS charge_status, ch.amount_fen AS charged_fen,
                  ch.account_id AS charge_account_id, ch.agreement_id AS charge_agreement_id,
                  p.id AS payment_id, p.account_id AS payment_account_id, p.stay_fee_fen,
                  p.debt_fen AS paid_debt_fen, p.amount_fen AS paid_fen
           FROM exits x
           -- The driver's pay-later state as the lane reads it (parking.lanes.repository): the
           -- binding of the vehicle (plate and colour) and the agreement that covered the entry.
           LEFT JOIN plate_bindings b ON b.plate = x.plate AND b.color = x.plate_color
               AND b.unbound_at IS NULL AND b.bound_at <= x.entered_at
           LEFT JOIN accounts a ON a.id = b.account_id AND a.deleted_at IS NULL
           LEFT JOIN pay_later_agreements pa
               ON pa.account_id = a.id AND pa.cancelled_at IS NULL
               AND pa.signed_at <= x.entered_at
           LEFT JOIN charges ch ON ch.session_id = x.session_id
           LEFT JOIN payments p ON p.capture_id = x.capture_id AND p.status = 'succeeded'""",
        list(_RULED),
    )
    booked: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for line in await conn.fetch(
        """SELECT kind, COALESCE(charge_id, payment_id) AS ref, ledger_account, amount_fen
           FROM ledger_entries
           WHERE kind IN ('fee_accrued', 'charge_settled', 'payment_received')"""
    ):
        key = (line["kind"], line["ref"])
        booked.setdefault(key, []).append((line["ledger_account"], line["amount_fen"]))
    seen: Counter[str] = Counter()
    for row in rows:
        stay = f"stay {row['session_id']} ({row['outcome']})"
        state = (
            None
            if row["account_id"] is None
            else PayLater(
                row["account_id"],
                row["agreement_id"],
                row["per_session_limit_fen"],
                blocked_for_arrears=row["open_debt_fen"] > 0,
                debt_fen=row["open_debt_fen"],
            )
        )
        rule = exit_rule(
            versions.get(row["car_park_id"], []),
            entered_at=row["entered_at"],
            at=row["decided_at"],
            # The colour discount as the lane gives it (parking.lanes.rules.priced_color).
            plate_color=priced_color(
                row["plate"],
                row["plate_color"],
                vouched=state is not None or row["entry_certain"] or row["exit_certain"],
            ),
            fixed_fee_fen=row["fixed_fee_fen"],
            pay_later_state=state,
            reads_certain=row["entry_certain"] and row["exit_certain"],
            uncertain_policy="open_confirm",
        )
        outcome = row["outcome"]
        seen[outcome] += 1
        command = row["command"]
        if rule is None:
            assert outcome == "held_no_tariff", stay
            continue
        if outcome == "paid_at_gate":
            # Held, then paid through the QR code: the stay's fee and the debts behind it.
            assert rule.charge_to is None and rule.outcome.startswith("held_"), (stay, rule)
            assert row["payment_id"] is not None, stay
            assert (row["stay_fee_fen"], row["paid_debt_fen"], row["paid_fen"]) == (
                rule.fee_fen,
                rule.debt_fen,
                rule.due_fen,
            ), (stay, rule)
            assert (row["status"], row["settlement"], row["fee_fen"]) == (
                "closed",
                "paid_at_gate",
                rule.fee_fen,
            ), stay
            assert sorted(booked[("payment_received", row["payment_id"])]) == sorted(
                received_lines(
                    PROVIDER,
                    row["paid_fen"],
                    stay_fen=rule.fee_fen,
                    car_park_id=row["car_park_id"],
                    debt_fen=rule.debt_fen,
                    account_id=row["payment_account_id"],
                )
            ), stay
        else:
            assert outcome == rule.outcome, (stay, rule)
            if rule.charge_to is None and outcome != "exited_free":  # still held at the gate
                assert row["status"] == "open" and command["fee_fen"] == rule.due_fen, stay
            else:
                assert command["fee_fen"] == rule.fee_fen, stay
                assert (row["status"], row["fee_fen"]) == ("closed", rule.fee_fen), stay
        if rule.charge_to is None:
            assert row["charge_id"] is None, f"{stay} was charged"
            continue
        account_id, agreement_id = rule.charge_to
        assert row["settlement"] == "pay_later" and row["stay_account_id"] == account_id, stay
        assert (row["charged_fen"], row["charge_account_id"], row["charge_agreement_id"]) == (
            rule.fee_fen,
            account_id,
            agreement_id,
        ), (stay, rule)
        assert sorted(booked[("fee_accrued", row["charge_id"])]) == sorted(
            accrual_lines(account_id, row["car_park_id"], rule.fee_fen)
        ), stay
        if row["charge_status"] == "succeeded":
            assert sorted(booked[("charge_settled", row["charge_id"])]) == sorted(
                settlement_lines(PROVIDER, account_id, rule.fee_fen)
            ), stay
    # Every closed stay was re-decided, and the day had each kind of exit.
    closed = await conn.fetchval("SELECT count(*) FROM sessions WHERE status = 'closed'")
    assert seen["exited_free"] + seen["exited_pay_later"] + seen["paid_at_gate"] == closed
    for outcome in ("exited_free", "exited_pay_later", "paid_at_gate", "held_unbound"):
        assert seen[outcome] > 0, (outcome, seen)
