"""The sandbox's HTTP routes, one router per concern; `ROUTERS` is what the app includes."""

from parking_dev.sandbox.routes import (
    admin,
    orders,
    parking,
    payer,
    payments,
    refunds,
    statements,
)

ROUTERS = (
    orders.router,
    parking.router,
    payments.router,
    payer.router,
    refunds.router,
    statements.router,
    admin.router,
)
