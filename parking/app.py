"""The FastAPI application. It is built around a started Runtime (see parking.runtime)."""

from fastapi import FastAPI

from parking.car_parks.router import router as car_parks_router
from parking.errors import install_error_handlers
from parking.health import router as health_router
from parking.payments.router import router as payments_router
from parking.runtime import Runtime


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(
        title="Parking: leave first, pay later",
        version="0.1.0",
    )
    app.state.runtime = runtime
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(car_parks_router)
    app.include_router(payments_router)
    return app
