"""The provider's books in SQLite: orders, refunds and the statement lines they make."""

import sqlite3
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any, Literal


def utc_iso(moment: datetime) -> str:
    """Fixed-width UTC timestamps, so that comparing the strings compares the instants."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def now_iso() -> str:
    return utc_iso(datetime.now(UTC))


OrderKind = Literal["charge", "payment"]
OrderStatus = Literal["processing", "succeeded", "declined", "pending_payment", "closed"]


@dataclass
class Order:
    order_id: str
    out_trade_no: str
    kind: OrderKind
    agreement_no: str | None
    amount_fen: int
    description: str
    status: OrderStatus
    reason: str | None
    created_at: str
    finished_at: str | None
    refunded_fen: int
    notify_url: str | None
    voided: bool  # left off the statement by /_sandbox/.../void; never shown to the merchant

    def body(self, base_url: str) -> dict[str, Any]:
        """The order as the API shows it."""
        shown = asdict(self)
        del shown["voided"]
        if self.kind == "payment":
            shown["pay_url"] = f"{base_url}/pay/{self.out_trade_no}"
        return shown


@dataclass
class Refund:
    refund_id: str
    out_refund_no: str
    out_trade_no: str
    amount_fen: int
    reason: str
    status: Literal["succeeded"]
    finished_at: str

    def body(self) -> dict[str, Any]:
        return asdict(self)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    out_trade_no TEXT PRIMARY KEY,
    order_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    agreement_no TEXT,
    amount_fen INTEGER NOT NULL,
    description TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    created_at TEXT NOT NULL,
    finished_at TEXT,
    refunded_fen INTEGER NOT NULL,
    notify_url TEXT,
    voided INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_by_finished_at ON orders (finished_at);
CREATE TABLE IF NOT EXISTS refunds (
    out_refund_no TEXT PRIMARY KEY,
    refund_id TEXT NOT NULL UNIQUE,
    out_trade_no TEXT NOT NULL REFERENCES orders (out_trade_no),
    amount_fen INTEGER NOT NULL,
    reason TEXT NOT NULL,
    status TEXT NOT NULL,
    finished_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS refunds_by_finished_at ON refunds (finished_at);
"""

_ORDER_COLUMNS = ", ".join(f.name for f in fields(Order))
_REFUND_COLUMNS = ", ".join(f.name for f in fields(Refund))


@dataclass(frozen=True)
class StatementLine:
    out_trade_no: str  # the out_refund_no for a refund
    order_id: str  # the refund_id for a refund
    type: Literal["charge", "payment", "refund"]
    amount_fen: int
    finished_at: str


class OrderBook:
    """The provider's books in SQLite.

    Every method runs to completion without awaiting, and the server has one event-loop thread,
    so each read-check-write is atomic with respect to concurrent requests.
    """

    def __init__(self, db_path: str) -> None:
        # Only the event-loop thread uses the connection, but that need not be the thread that
        # created the app (uvicorn may start its loop elsewhere).
        self._db = sqlite3.connect(db_path, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def order(self, out_trade_no: str) -> Order | None:
        row = self._db.execute(
            f"SELECT {_ORDER_COLUMNS} FROM orders WHERE out_trade_no = ?", (out_trade_no,)
        ).fetchone()
        return None if row is None else Order(**{**dict(row), "voided": bool(row["voided"])})

    def orders(self) -> list[Order]:
        rows = self._db.execute(f"SELECT {_ORDER_COLUMNS} FROM orders ORDER BY created_at")
        return [Order(**{**dict(row), "voided": bool(row["voided"])}) for row in rows]

    def add_order(self, order: Order) -> None:
        with self._db:
            self._db.execute(
                f"INSERT INTO orders ({_ORDER_COLUMNS}) VALUES "
                f"({', '.join(':' + f.name for f in fields(Order))})",
                asdict(order),
            )

    def _update(self, out_trade_no: str, assignments: str, *params: object) -> Order:
        with self._db:
            self._db.execute(
                f"UPDATE orders SET {assignments} WHERE out_trade_no = ?", (*params, out_trade_no)
            )
        order = self.order(out_trade_no)
        assert order is not None, out_trade_no
        return order

    def finish(self, out_trade_no: str, status: OrderStatus, reason: str | None) -> Order:
        return self._update(
            out_trade_no, "status = ?, reason = ?, finished_at = ?", status, reason, now_iso()
        )

    def set_amount(self, out_trade_no: str, amount_fen: int) -> Order:
        return self._update(out_trade_no, "amount_fen = ?", amount_fen)

    def void(self, out_trade_no: str) -> Order:
        return self._update(out_trade_no, "voided = 1")

    def refund(self, out_refund_no: str) -> Refund | None:
        row = self._db.execute(
            f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE out_refund_no = ?", (out_refund_no,)
        ).fetchone()
        return None if row is None else Refund(**dict(row))

    def add_refund(self, refund: Refund) -> None:
        with self._db:
            self._db.execute(
                f"INSERT INTO refunds ({_REFUND_COLUMNS}) VALUES "
                f"({', '.join(':' + f.name for f in fields(Refund))})",
                asdict(refund),
            )
            self._db.execute(
                "UPDATE orders SET refunded_fen = refunded_fen + ? WHERE out_trade_no = ?",
                (refund.amount_fen, refund.out_trade_no),
            )

    def processing(self) -> list[str]:
        rows = self._db.execute("SELECT out_trade_no FROM orders WHERE status = 'processing'")
        return [row["out_trade_no"] for row in rows]

    def statement(self, start: datetime, end: datetime) -> list[StatementLine]:
        """Money that moved in [start, end): succeeded orders and refunds."""
        bounds = (utc_iso(start), utc_iso(end))
        orders = self._db.execute(
            """SELECT out_trade_no, order_id, kind, amount_fen, finished_at FROM orders
               WHERE status = 'succeeded' AND voided = 0
                 AND finished_at >= ? AND finished_at < ?""",
            bounds,
        )
        refunds = self._db.execute(
            """SELECT out_refund_no, refund_id, 'refund', amount_fen, finished_at FROM refunds
               WHERE finished_at >= ? AND finished_at < ?""",
            bounds,
        )
        lines = [StatementLine(*row) for row in [*orders, *refunds]]
        return sorted(lines, key=lambda line: (line.finished_at, line.out_trade_no))
