"""`parking billing ...`: reconciliation, money reports (JSON or CSV), refunds, reminders."""

import argparse
import sys
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson

from billing import debts, reconcile, refunds, reports
from billing.providers import PaymentProvider
from parking.db import create_pool
from parking.infra import endpoints
from parking.runtime import make_provider, payment_provider
from parking.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="billing_command", required=True)
    p_rec = sub.add_parser("reconcile", help="compare one day's books with the provider statement")
    p_rec.add_argument("date", type=date.fromisoformat, help="YYYY-MM-DD (local day)")
    p_report = sub.add_parser("report", help="revenue, refunds or debt ageing")
    p_report.add_argument("kind", choices=["revenue", "refunds", "debts"])
    p_report.add_argument("--from", dest="start", type=date.fromisoformat)
    p_report.add_argument("--to", dest="end", type=date.fromisoformat)
    p_report.add_argument("--csv", action="store_true", help="CSV instead of JSON lines")
    p_refund = sub.add_parser("refund", help="refund (part of) a charged fee, with a reason")
    p_refund.add_argument("--charge", type=int, required=True, help="charge id")
    p_refund.add_argument("--amount", type=int, required=True, help="fen")
    p_refund.add_argument("--reason", required=True)
    p_refund.add_argument("--actor", required=True, help="who asks for it (audit log)")
    sub.add_parser("remind", help="queue the debt reminders that are due now")


async def run(settings: Settings, args: argparse.Namespace) -> int:
    async with endpoints(settings, database_only=True) as eps:
        pool = await create_pool(eps.database_url, min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                if args.billing_command == "reconcile":
                    async with payment_provider(settings) as endpoint:
                        provider: PaymentProvider = make_provider(settings, endpoint)
                        try:
                            statement = await provider.statement(args.date)
                        finally:
                            await provider.aclose()
                    async with conn.transaction():
                        result = await reconcile.reconcile(
                            conn, provider.name, args.date, statement, settings.timezone
                        )
                    print(orjson.dumps(result.summary()).decode())
                    return 0 if not result.differences else 1
                if args.billing_command == "refund":
                    try:
                        async with conn.transaction():
                            refund = await refunds.request_for_charge(
                                conn,
                                charge_id=args.charge,
                                amount_fen=args.amount,
                                reason=args.reason,
                                actor=args.actor,
                            )
                    except refunds.RefundNotAllowed as exc:
                        print(f"refund refused: {exc}", file=sys.stderr)
                        return 2
                    print(orjson.dumps({"refund_id": refund.id, "status": refund.status}).decode())
                    return 0
                if args.billing_command == "remind":
                    async with conn.transaction():
                        sent = await debts.send_reminders(
                            conn,
                            every=timedelta(days=settings.debt_reminder_every_days),
                            now=datetime.now(UTC),
                            language=settings.message_language,
                        )
                    print(orjson.dumps({"reminders": sent}).decode())
                    return 0
                today = datetime.now(ZoneInfo(settings.timezone)).date()
                start = args.start or today - timedelta(days=30)
                end = args.end or today
                if args.kind == "revenue":
                    rows = await reports.revenue(
                        conn, start=start, end=end, timezone=settings.timezone
                    )
                elif args.kind == "refunds":
                    rows = await reports.refunds(
                        conn, start=start, end=end, timezone=settings.timezone
                    )
                else:
                    rows = await debts.ageing(conn, datetime.now(UTC))
        finally:
            await pool.close()
    if args.csv:
        sys.stdout.write(reports.to_csv(rows))
    else:
        for row in rows:
            print(orjson.dumps(row).decode())
    return 0
