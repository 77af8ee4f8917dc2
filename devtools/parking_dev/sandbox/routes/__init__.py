"""The sandbox's HTTP routes, one router per concern; `ROUTERS` is what the app includes."""

from parking_dev.sandbox.routes import admin, orders, payer, payments, refunds, statements

ROUTERS = (
    orders.router,
    payments.router,
    payer.router,
    refunds.router,
    statements.router,
    admin.router,
)
