"""The daily statement file (`GET /v1/statements/{day}`) merchants reconcile against."""

import csv
import io
import re
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from fastapi import APIRouter
from fastapi.responses import Response

from parking_dev.sandbox.errors import error
from parking_dev.sandbox.routes.common import SandboxDep

router = APIRouter()

_DATE_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}")


@router.get("/v1/statements/{day}")
async def statement(day: str, sandbox: SandboxDep) -> Response:
    """The statement file: money moved on `day` (statement time zone), as CSV."""
    try:
        if not _DATE_PATTERN.fullmatch(day):
            raise ValueError(day)
        start_date = date.fromisoformat(day)
    except ValueError:
        return error(400, "invalid_date", f"expected a date as YYYY-MM-DD, not {day!r}")
    zone = ZoneInfo(sandbox.faults.statement_timezone)
    start = datetime.combine(start_date, datetime.min.time(), tzinfo=zone)
    end = datetime.combine(start_date + timedelta(days=1), datetime.min.time(), tzinfo=zone)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["out_trade_no", "order_id", "type", "amount_fen", "finished_at"])
    for line in sandbox.book.statement(start, end):
        writer.writerow(
            [line.out_trade_no, line.order_id, line.type, line.amount_fen, line.finished_at]
        )
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="statement-{day}.csv"'},
    )
