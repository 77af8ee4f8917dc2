"""Payment routes: the held gate's QR code, the provider's notifications, fee quotes."""

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Request

from gate_controller.protocol import PlateColor
from parking.car_parks.schemas import CarParkCode
from parking.deps import ConnectionDep, RuntimeDep
from parking.errors import NotFound
from parking.payments import service
from parking.payments.schemas import GatePayment, NotificationAccepted, Quote
from parking.ratelimit import client_address, hit

router = APIRouter(prefix="/api/v1", tags=["payments"])

# A notification is a few hundred bytes (parking.app's BodyLimit enforces this).
MAX_NOTIFICATION_BYTES = 16 * 1024
Plate = Annotated[str, Query(min_length=7, max_length=8, pattern=r"^[\w\u4e00-\u9fff]+$")]
Color = Annotated[
    PlateColor | None,
    Query(description="the plate colour; needed when vehicles of one plate text are parked"),
]


@router.get("/gate-payments/{capture_id}")
async def get_gate_payment(capture_id: UUID, runtime: RuntimeDep) -> GatePayment:
    """What a held gate's QR code shows once the payment was started, and whether it is paid."""
    return await service.gate_payment_status(runtime, capture_id)


@router.post("/gate-payments/{capture_id}")
async def start_gate_payment(capture_id: UUID, runtime: RuntimeDep) -> GatePayment:
    """Starts (or returns) the payment of a held exit: the stay's fee now plus any debts."""
    return await service.start_gate_payment(runtime, capture_id)


@router.post("/payments/notifications/{provider}")
async def provider_notification(
    provider: str, request: Request, runtime: RuntimeDep
) -> NotificationAccepted:
    """Signed asynchronous notifications from the payment provider."""
    if provider != runtime.provider.name:
        raise NotFound("provider")
    # At most MAX_NOTIFICATION_BYTES: the app's BodyLimit cuts longer ones off.
    body = await request.body()
    applied = await service.accept_notification(
        runtime, runtime.provider, body, request.headers, client_address(request)
    )
    return NotificationAccepted(effect=applied.effect)


@router.get("/car-parks/{code}/quote")
async def quote(
    code: CarParkCode,
    plate: Plate,
    request: Request,
    conn: ConnectionDep,
    runtime: RuntimeDep,
    color: Color = None,
) -> Quote:
    """The fee a car parked here now would pay if it left now. A plate's identity is (plate,
    colour): 409 `plate_color_required` when vehicles of this plate text in several colours
    are parked here and no `color` was given. Rate-limited per client: it says how long a
    plate has been parked, so it must not serve as a way to find cars."""
    client = client_address(request)
    await hit(
        runtime.redis,
        f"{runtime.settings.redis_key_prefix}ratelimit:quote:{client}",
        runtime.settings.quotes_per_minute_per_client,
        60,
    )
    return await service.quote(conn, code, plate, color)
