"""The books a finance team signs off: reconciliation against the provider's statement,
refunds as reversing entries, debt reminders and ageing, revenue reports, and a database role
that cannot rewrite the ledger."""

import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from billing import debts, ledger, reconcile, refunds, reports
from parking.runtime import ProviderEndpoint, Runtime
from tests.conftest import (
    Lot,
    bearer,
    charges_of,
    decide_dispute,
    driver_in_debt,
    driver_token,
    eventually,
    exit_after,
    make_driver,
    make_staff,
    staff_token,
    stay_debt,
    unique_plate,
)
from tests.gates import GateProbe


async def _charged_exits(
    runtime: Runtime, gate: GateProbe, lot: Lot, n: int
) -> list[asyncpg.Record]:
    drivers = [await make_driver(runtime, unique_plate()) for _ in range(n)]
    for driver in drivers:
        await exit_after(runtime, gate, lot, driver.plate, timedelta(minutes=90))

    async def settled() -> list[asyncpg.Record]:
        rows = await charges_of(runtime, lot)
        return rows if len(rows) == n and all(r["status"] == "succeeded" for r in rows) else []

    rows: list[asyncpg.Record] = await eventually(settled, timeout_s=20)
    return rows


def _today(runtime: Runtime) -> datetime:
    return datetime.now(ZoneInfo(runtime.settings.timezone))


async def test_reconciliation_puts_each_difference_in_one_bucket_and_reruns_the_same(
    runtime: Runtime, provider: ProviderEndpoint, gate: GateProbe, lot: Lot
) -> None:
    rows = await _charged_exits(runtime, gate, lot, 4)
    wrong, missing = rows[0]["idempotency_key"], rows[1]["idempotency_key"]
    twice = rows[2]["idempotency_key"]
    extra = f"x{uuid.uuid4().hex[:20]}"
    async with httpx.AsyncClient(base_url=provider.url) as books:
        # The provider's books differ from ours in the three ways that happen.
        assert (
            await books.post(f"/_sandbox/orders/{wrong}/amount", json={"amount_fen": 1100})
        ).status_code == 200
        assert (await books.post(f"/_sandbox/orders/{missing}/void")).status_code == 200
        created = await books.post(
            "/_sandbox/orders", json={"out_trade_no": extra, "amount_fen": 777}
        )
        assert created.status_code == 201, created.text
    day = _today(runtime).date()
    ours = {r["idempotency_key"] for r in rows} | {extra}

    async def run() -> reconcile.Reconciliation:
        statement = await runtime.provider.statement(day)
        # A number the statement lists twice: taken twice, not one line standing for both.
        statement += [line for line in statement if line.out_trade_no == twice]
        async with runtime.pool.acquire() as conn, conn.transaction():
            return await reconcile.reconcile(
                conn, runtime.provider.name, day, statement, runtime.settings.timezone
            )

    first = await run()
    mine = {d.out_trade_no: d for d in first.differences if d.out_trade_no in ours}
    assert {k: d.bucket for k, d in mine.items()} == {
        wrong: "amount_mismatch",
        missing: "missing_at_provider",
        extra: "missing_in_ledger",
        twice: "amount_mismatch",
    }
    assert (mine[wrong].ledger_amount_fen, mine[wrong].provider_amount_fen) == (1200, 1100)
    assert (mine[twice].provider_amount_fen, mine[twice].detail) == (2400, "listed 2 times")
    assert mine[extra].detail == "no such order in our books"
    keys = [d.out_trade_no for d in first.differences]
    assert len(keys) == len(set(keys)), "every difference is in exactly one bucket"

    second = await run()
    assert second.differences == first.differences
    assert second.new_exceptions == 0, "re-running records nothing new"
    async with runtime.pool.acquire() as conn:
        recorded = await conn.fetch(
            "SELECT out_trade_no, bucket FROM reconciliation_exceptions "
            "WHERE statement_date = $1 AND out_trade_no = ANY($2)",
            day,
            list(ours),
        )
        # Nothing is corrected: our charge keeps the amount we booked.
        amount = await conn.fetchval(
            "SELECT amount_fen FROM charges WHERE idempotency_key = $1", wrong
        )
    assert sorted((r["out_trade_no"], r["bucket"]) for r in recorded) == sorted(
        (k, d.bucket) for k, d in mine.items()
    )
    assert amount == 1200


async def test_refund_is_a_reversing_entry_with_reason_audit_and_a_message(
    runtime: Runtime, provider: ProviderEndpoint, gate: GateProbe, lot: Lot
) -> None:
    [charge] = await _charged_exits(runtime, gate, lot, 1)
    async with runtime.pool.acquire() as conn, conn.transaction():
        refund = await refunds.request_for_charge(
            conn,
            charge_id=charge["id"],
            amount_fen=400,
            reason="barrier fault, driver waited",
            actor="operator:alice",
        )
    async with runtime.pool.acquire() as conn, conn.transaction():
        with pytest.raises(refunds.RefundNotAllowed):
            await refunds.request_for_charge(
                conn, charge_id=charge["id"], amount_fen=900, reason="too much", actor="op:bob"
            )

    async def done() -> bool:
        async with runtime.pool.acquire() as conn:
            return (
                await conn.fetchval("SELECT status FROM refunds WHERE id = $1", refund.id)
                == "succeeded"
            )

    await eventually(done)
    async with httpx.AsyncClient(base_url=provider.url) as books:
        order = (await books.get(f"/v1/orders/{charge['idempotency_key']}")).json()
    assert order["refunded_fen"] == 400
    async with runtime.pool.acquire() as conn:
        assert await ledger.is_balanced(conn)
        assert await ledger.balance(conn, ledger.revenue(lot.id)) == -(1200 - 400)
        audit = await conn.fetchrow(
            "SELECT actor, detail FROM audit_log WHERE subject = $1", f"refund:{refund.id}"
        )
        message = await conn.fetchval(
            "SELECT body FROM notifications WHERE source_key = $1",
            f"refund:{refund.id}:succeeded",
        )
        day = _today(runtime).date()
        revenue = await reports.revenue(
            conn, start=day, end=day, timezone=runtime.settings.timezone, car_park_ids=[lot.id]
        )
        listed = await reports.refunds(conn, start=day, end=day, timezone=runtime.settings.timezone)
    assert audit["actor"] == "operator:alice"
    assert audit["detail"]["reason"] == "barrier fault, driver waited"
    assert message == "已退款¥4.00：barrier fault, driver waited"
    assert [(r["pay_later_fen"], r["refunded_fen"], r["net_fen"]) for r in revenue] == [
        (1200, 400, 800)
    ]
    assert any(r["id"] == refund.id and r["requested_by"] == "operator:alice" for r in listed)
    csv_text = reports.to_csv(revenue)
    assert csv_text.splitlines()[0].startswith("day,car_park,")
    # pay-later, paid at the gate, paid at the booth, passes, refunded, cancelled, net
    assert csv_text.splitlines()[1].endswith(",1200,0,0,0,400,0,800")


async def test_debts_get_reminders_at_an_interval_and_show_in_the_ageing_report(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    driver = await driver_in_debt(runtime, gate, lot)
    async with runtime.pool.acquire() as conn:
        owed = await conn.fetchrow("SELECT * FROM debts WHERE account_id = $1", driver.account_id)
    now = datetime.now(UTC)
    async with runtime.pool.acquire() as conn:
        await conn.execute(
            "UPDATE debts SET created_at = $2 WHERE id = $1", owed["id"], now - timedelta(days=40)
        )

    async def reminders() -> list[str]:
        async with runtime.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT body FROM notifications WHERE account_id = $1 AND kind = 'debt_reminder' "
                "ORDER BY id",
                driver.account_id,
            )
        return [r["body"] for r in rows]

    for when in (now, now + timedelta(days=1), now + timedelta(days=3, minutes=1)):
        async with runtime.pool.acquire() as conn, conn.transaction():
            await debts.send_reminders(conn, every=timedelta(days=3), now=when)
    assert len(await reminders()) == 2, "one now, the next only after the interval"
    assert (await reminders())[0] == "您有1笔停车费共¥6.00尚未缴纳，请在App中缴纳，以继续无感离场"
    async with runtime.pool.acquire() as conn, conn.transaction():
        await debts.send_reminders(
            conn, every=timedelta(days=3), now=now + timedelta(days=7), language="en"
        )
    assert (await reminders())[2] == (
        "You owe ¥6.00 in parking fees (1 unpaid stays); pay in the app to leave without "
        "stopping again"
    )

    async with runtime.pool.acquire() as conn:
        report = {row["age_days"]: row for row in await debts.ageing(conn, now)}
    assert report["31-90"]["debts"] >= 1 and report["31-90"]["amount_fen"] >= 600


async def test_the_application_role_cannot_update_or_delete_the_ledger(
    runtime: Runtime,
) -> None:
    class Rollback(Exception):
        pass

    async with runtime.pool.acquire() as conn:
        with pytest.raises(Rollback):
            async with conn.transaction():
                await conn.execute("SET LOCAL ROLE parking_app")
                await ledger.post(conn, "test_entry", [("test:a", 5), ("test:b", -5)])
                for statement in (
                    "UPDATE ledger_entries SET amount_fen = 1 WHERE kind = 'test_entry'",
                    "DELETE FROM ledger_entries WHERE kind = 'test_entry'",
                    "TRUNCATE ledger_entries",
                ):
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        async with conn.transaction():
                            await conn.execute(statement)
                raise Rollback


async def test_not_my_car_on_a_failed_charge_holds_its_debt_until_an_operator_decides(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, gate: GateProbe, lot: Lot
) -> None:
    """A declined charge is a debt that blocks pay-later. Before, its "not my car" was refused
    ("owed as a debt: contact the car park"): a stranger's declined charge left the wrong driver
    blocked. Now the dispute puts the debt on hold (no block, no reminder) until an admin
    decides: the driver right, the debt is waived and its accrual reversed; the charge
    standing, it is owed again."""
    admin = bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))
    for outcome, blocked_after, waived in (
        ("driver_right", False, True),
        ("charge_stands", True, False),
    ):
        driver = await driver_in_debt(runtime, gate, lot)
        async with runtime.pool.acquire() as conn:
            charge = await conn.fetchrow(
                "SELECT id, session_id, status FROM charges WHERE account_id = $1",
                driver.account_id,
            )
        assert charge["status"] == "failed"
        opened = await api.post(
            f"/api/v1/me/stays/{charge['session_id']}/dispute",
            headers=bearer(driver_token(app, driver.account_id)),
        )
        assert opened.status_code == 200, opened.text
        assert (opened.json()["status"], opened.json()["held"]) == ("open", True)
        async with runtime.pool.acquire() as conn, conn.transaction():
            assert not await conn.fetchval(
                "SELECT blocked_for_arrears FROM accounts WHERE id = $1", driver.account_id
            )
            await debts.send_reminders(
                conn, every=timedelta(days=3), now=datetime.now(UTC) + timedelta(days=40)
            )
            reminded = await conn.fetchval(
                "SELECT count(*) FROM notifications WHERE account_id = $1"
                " AND kind = 'debt_reminder'",
                driver.account_id,
            )
        assert reminded == 0
        async with runtime.pool.acquire() as conn, conn.transaction():
            # A payment priced before the dispute (a QR code at a gate, the app's) and paid
            # after it settles nothing of the disputed debt: what was paid for it is overpaid.
            debt_id = await conn.fetchval("SELECT id FROM debts WHERE charge_id = $1", charge["id"])
            assert await debts.settle(conn, driver.account_id, -1, [debt_id]) == 0

        await decide_dispute(api, admin, opened.json()["id"], outcome)
        async with runtime.pool.acquire() as conn:
            owed = await conn.fetchval(
                "SELECT COALESCE(sum(amount_fen), 0) FROM ledger_entries"
                " WHERE charge_id = $1 AND ledger_account = $2",
                charge["id"],
                f"receivable:account:{driver.account_id}",
            )
        assert await stay_debt(runtime, driver.account_id, charge["session_id"]) == (
            blocked_after,
            waived,
            waived,
        )
        assert owed == (0 if waived else 600), "the driver owes the fee only if it stands"
