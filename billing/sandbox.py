"""Sandbox pay-later provider: a real HTTP service with the failure modes of a real one.

POST /v1/charges with an `Idempotency-Key` header charges an agreement once per key: a retry
with the same key returns the first answer, a different amount under the same key is a 409.
Failures are injected by configuration: a share of requests answer 503, or time out, or
are applied and then answer 503 (the case where only the idempotency key prevents a double
charge); agreements listed in `declined_agreements` are declined.
"""

import asyncio
import contextlib
import random
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field


@dataclass
class FaultConfig:
    error_rate: float = 0.0  # 503 before doing anything
    lost_response_rate: float = 0.0  # charge applied, then 503
    timeout_rate: float = 0.0  # hang longer than any sane client timeout
    timeout_s: float = 10.0
    declined_agreements: set[str] = field(default_factory=set)
    seed: int | None = None


class ChargeRequest(BaseModel):
    agreement_no: str = Field(min_length=1, max_length=64)
    amount_fen: int = Field(gt=0)
    description: str = Field(default="", max_length=200)


@dataclass
class Order:
    order_id: str
    idempotency_key: str
    agreement_no: str
    amount_fen: int
    status: str
    reason: str | None = None

    def body(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "idempotency_key": self.idempotency_key,
            "agreement_no": self.agreement_no,
            "amount_fen": self.amount_fen,
            "status": self.status,
            "reason": self.reason,
        }


def create_app(faults: FaultConfig | None = None) -> FastAPI:
    faults = faults or FaultConfig()
    rng = random.Random(faults.seed)
    orders: dict[str, Order] = {}
    app = FastAPI(title="Sandbox pay-later provider")
    app.state.orders = orders
    app.state.faults = faults

    @app.post("/v1/charges")
    async def create_charge(
        request: ChargeRequest, idempotency_key: Annotated[str, Header(min_length=8)]
    ) -> JSONResponse:
        if rng.random() < faults.error_rate:
            return JSONResponse({"error": "service_unavailable"}, status_code=503)
        if rng.random() < faults.timeout_rate:
            await asyncio.sleep(faults.timeout_s)
        order = orders.get(idempotency_key)
        if order is None:
            declined = request.agreement_no in faults.declined_agreements
            order = Order(
                order_id=f"sbx_{uuid.uuid4().hex}",
                idempotency_key=idempotency_key,
                agreement_no=request.agreement_no,
                amount_fen=request.amount_fen,
                status="declined" if declined else "succeeded",
                reason="insufficient_funds" if declined else None,
            )
            orders[idempotency_key] = order
        elif (order.agreement_no, order.amount_fen) != (request.agreement_no, request.amount_fen):
            return JSONResponse({"error": "idempotency_key_reused"}, status_code=409)
        if rng.random() < faults.lost_response_rate:
            return JSONResponse({"error": "service_unavailable"}, status_code=503)
        return JSONResponse(order.body(), status_code=402 if order.status == "declined" else 200)

    @app.get("/v1/charges/{idempotency_key}")
    async def get_charge(idempotency_key: str) -> JSONResponse:
        order = orders.get(idempotency_key)
        if order is None:
            return JSONResponse({"error": "not_found"}, status_code=404)
        return JSONResponse(order.body())

    @app.get("/v1/statement")
    async def statement() -> list[dict[str, Any]]:
        return [o.body() for o in orders.values()]

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def running(
    faults: FaultConfig | None = None, port: int | None = None
) -> AsyncIterator[tuple[str, FastAPI]]:
    """Serves the sandbox on 127.0.0.1 inside the current event loop; yields (url, app)."""
    app = create_app(faults)
    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await task
