"""The booth's operator routes: booth payments (attendants and admins of the car park) and the
gate clocks found wrong. Routes that command a gate commit before they publish."""

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query

from parking.auth.principal import OperatorDep
from parking.booth import service
from parking.booth.schemas import BoothPayment, ClockSkew, NewBoothPayment
from parking.car_parks.schemas import CarParkCode
from parking.deps import ConnectionDep, RuntimeDep
from parking.operators.schemas import CODE_PATTERN

router = APIRouter(prefix="/api/v1/operator", tags=["operator"])


@router.post("/car-parks/{code}/booth-payments", status_code=201)
async def record_booth_payment(
    code: CarParkCode, request: NewBoothPayment, operator: OperatorDep, runtime: RuntimeDep
) -> BoothPayment:
    """Cash or a card taken at the booth for a held exit (`capture_id`) or a stay whose car left
    while the gate was offline (`session_id`). The amount must be the stay's fee exactly (409
    `amount_mismatch` gives it); the stay closes as 'paid_at_booth', the ledger books it, a held
    gate opens. A stay's fee is taken once: a second payment of any kind is refused."""
    async with runtime.pool.acquire() as conn, conn.transaction():
        payment, effect = await service.record_payment(
            conn,
            operator,
            code,
            request,
            now=datetime.now(UTC),
            command_ttl=timedelta(seconds=runtime.settings.command_ttl_s),
        )
    await service.apply(runtime, effect)
    return payment


@router.get("/clock-skews")
async def list_clock_skews(
    operator: OperatorDep,
    conn: ConnectionDep,
    car_park: Annotated[str | None, Query(pattern=CODE_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[ClockSkew]:
    """Offline captures whose gate clock was more than PARKING_GATE_CLOCK_TOLERANCE_S after we
    received them or before their stay's entry, newest first: their stay was priced at the
    time we received the capture."""
    return await service.list_clock_skews(conn, operator, car_park=car_park, limit=limit)
