import asyncio
from collections.abc import Awaitable

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from parking.deps import RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(runtime: RuntimeDep) -> JSONResponse:
    """200 when PostgreSQL, Redis and the MQTT broker answer; 503 naming those that do not."""
    checks: dict[str, bool] = {}

    async def check(name: str, probe: Awaitable[object]) -> None:
        try:
            async with asyncio.timeout(2.0):
                await probe
            checks[name] = True
        except Exception:
            checks[name] = False

    await asyncio.gather(
        check("postgresql", runtime.pool.fetchval("SELECT 1")),
        check("redis", runtime.redis.ping()),
    )
    checks["mqtt"] = runtime.mqtt.connected
    ok = all(checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "degraded", "checks": checks}, status_code=200 if ok else 503
    )
