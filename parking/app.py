"""The FastAPI application. It is built around a started Runtime (see parking.runtime)."""

import secrets
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from parking.apds.router import router as apds_router
from parking.auth.router import router as auth_router
from parking.auth.service import PasswordChecks
from parking.auth.sms import SmsSender
from parking.auth.tokens import TokenSigner
from parking.bodylimit import BodyLimit
from parking.booth.router import router as booth_router
from parking.car_parks.router import router as car_parks_router
from parking.confirmations.router import router as confirmations_router
from parking.dashboard.router import router as dashboard_router
from parking.disputes.router import driver_router as driver_disputes_router
from parking.disputes.router import router as disputes_router
from parking.drivers.router import router as drivers_router
from parking.errors import install_error_handlers
from parking.feeds.router import router as feeds_router
from parking.health import router as health_router
from parking.logging import get_logger, server_log_config
from parking.merchants.router import merchant_router
from parking.merchants.router import operator_router as merchants_router
from parking.operators.router import router as operators_router
from parking.ownership.router import router as ownership_router
from parking.pages.router import STATIC_ASSETS
from parking.pages.router import router as pages_router
from parking.passes.router import driver_router as passes_driver_router
from parking.passes.router import operator_router as passes_operator_router
from parking.payments.router import MAX_NOTIFICATION_BYTES
from parking.payments.router import router as payments_router
from parking.production import ConfigurationError
from parking.public.router import router as public_router
from parking.public.signs import SignsFastPath
from parking.public.signs import router as signs_router
from parking.receipts.router import router as receipts_router
from parking.receipts.signing import FrameSigner
from parking.rights.router import router as rights_router
from parking.runtime import Runtime
from parking.staff.router import router as staff_router

log = get_logger(__name__)

# Routes whose bodies may be larger than PARKING_MAX_BODY_BYTES: a tariff table with a year of
# holidays and many bands.
TARIFF_MAX_BODY_BYTES = 256 * 1024


def create_app(runtime: Runtime, sms: SmsSender | None = None) -> FastAPI:
    app = FastAPI(
        title="Parking: leave first, pay later",
        version="0.1.0",
    )
    app.state.runtime = runtime
    settings = runtime.settings
    if settings.jwt_secret is None:
        if settings.env == "production":
            raise ConfigurationError("PARKING_JWT_SECRET is required in production")
        log.warning("auth.ephemeral_signing_key", hint="set PARKING_JWT_SECRET in production")
        key = secrets.token_urlsafe(48)
    else:
        key = settings.jwt_secret.get_secret_value()
    app.state.signer = TokenSigner(key, settings.access_token_ttl_s)
    app.state.sms = sms or runtime.sms
    app.state.password_checks = PasswordChecks.from_settings(settings)
    app.state.frame_signer = FrameSigner.from_settings(settings)
    if app.state.frame_signer is None:
        log.warning(
            "receipts.no_frame_key", hint="set PARKING_RECEIPT_KEY: receipts show no frames"
        )
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(auth_router)
    app.include_router(car_parks_router)
    app.include_router(payments_router)
    app.include_router(drivers_router)
    app.include_router(operators_router)
    app.include_router(booth_router)
    app.include_router(confirmations_router)
    app.include_router(ownership_router)
    app.include_router(public_router)
    app.include_router(signs_router)
    app.include_router(apds_router)
    app.include_router(feeds_router)
    app.include_router(dashboard_router)
    app.include_router(receipts_router)
    app.include_router(disputes_router)
    app.include_router(pages_router)
    app.mount("/static/pages", STATIC_ASSETS, name="pages-static")
    app.include_router(rights_router)
    app.include_router(merchants_router)
    app.include_router(staff_router)
    app.include_router(merchant_router)
    app.include_router(passes_operator_router)
    app.include_router(passes_driver_router)
    app.include_router(driver_disputes_router)
    if settings.trusted_proxies:
        # uvicorn's own middleware, with our list: the right-most hop of X-Forwarded-For that
        # is not a trusted proxy becomes request.client, which per-client limits count.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)
    # Guidance signs' polls, once their key and the board are known, before the routing.
    app.add_middleware(SignsFastPath, state=app.state)
    # Outermost: an oversized body is refused before anything else runs.
    app.add_middleware(
        BodyLimit,
        default=settings.max_body_bytes,
        routes=[
            (r"/api/v1/payments/notifications/[^/]+", MAX_NOTIFICATION_BYTES),
            (
                r"/api/v1/operator/car-parks/[^/]+/tariffs",
                max(TARIFF_MAX_BODY_BYTES, settings.max_body_bytes),
            ),
        ],
    )
    return app


def server_config(app: FastAPI, host: str, port: int, **options: Any) -> uvicorn.Config:
    """How `parking serve`, the demo and the tests serve the app. uvicorn's proxy headers are
    off: by default it believes X-Forwarded-For from 127.0.0.1, so any local client could
    claim to be anyone; the app honours the header from PARKING_TRUSTED_PROXIES only."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        proxy_headers=False,
        # Open dashboard event streams must not hold a shutdown for ever.
        timeout_graceful_shutdown=5,
        # Its lines quote raw query strings, which carry plates.
        access_log=False,
        log_config=server_log_config(),
        **options,
    )
