"""Sandbox pay-later provider: a real HTTP service with the failure modes of a real one.

It is shaped like Alipay / WeChat Pay "pay after use": the merchant deducts a fee under a
driver's signed pay-later agreement (`POST /v1/charges`), or shows a QR code the driver pays in
a wallet app (`POST /v1/payments`). Every order lives in one namespace keyed by the merchant's
`out_trade_no`, sent as the `Idempotency-Key` header, so a retry never makes a second order.

Like the real thing, a deduction is accepted asynchronously (202 "processing") and finishes a
moment later; the outcome reaches the merchant as a webhook notification signed with the shared
secret (billing.signing), retried with backoff while the merchant does not answer 2xx. A
merchant that misses a notification asks with the order query (`GET /v1/orders/{no}`), and
checks its books against the daily statement file (`GET /v1/statements/{date}`).

Failures are injected by `FaultConfig` (seeded, changeable at runtime through
`POST /_sandbox/faults`): requests answer 503 before or after taking effect, hang before or
after taking effect, deductions are declined; notifications are lost, duplicated, late, or
accompanied by a forgery with a wrong signature. The `/_sandbox/` admin endpoints also make the
provider's books disagree with the merchant's (extra, missing or wrong-amount orders), which is
what reconciliation exists to catch.

Orders are kept in SQLite, so a file database survives a restart of the provider; charges still
processing when it stopped are finished after it starts again. Notifications not yet delivered
when it stops are lost, as with a real provider outage: the order query still answers.

Modules: `faults` (FaultConfig and its command-line flags), `store` (the SQLite books),
`provider` (the state: faults, books, notifications), `routes/` (one APIRouter per concern:
orders, payments, payer, refunds, statements, admin), `app` (create_app), `server` (running,
serve, free_port).
"""

from parking_dev.sandbox.app import create_app
from parking_dev.sandbox.faults import FaultConfig, add_arguments, faults_from_args
from parking_dev.sandbox.provider import (
    NOTIFICATION_LOG_SIZE,
    NOTIFY_TIMEOUT_S,
    Delivery,
    Sandbox,
)
from parking_dev.sandbox.server import free_port, running, serve
from parking_dev.sandbox.store import Order, OrderBook, Refund, StatementLine

__all__ = [
    "NOTIFICATION_LOG_SIZE",
    "NOTIFY_TIMEOUT_S",
    "Delivery",
    "FaultConfig",
    "Order",
    "OrderBook",
    "Refund",
    "Sandbox",
    "StatementLine",
    "add_arguments",
    "create_app",
    "faults_from_args",
    "free_port",
    "running",
    "serve",
]
