"""The parking rails' two calls beyond deductions: a plate's service state
(`GET /v1/plate-services`) and the registration of a stay at its entry (`POST /v1/parkings`).

The sandbox keeps no plates: an agreement the faults pause is "paused", one they make unknown is
"not_opened", every other is "normal". Entries live in memory, one per `Idempotency-Key`.
"""

import uuid

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from parking_dev.sandbox.routes.common import IdempotencyKey, SandboxDep

router = APIRouter()


def _state(sandbox: SandboxDep, agreement_no: str | None) -> str:
    if agreement_no in sandbox.faults.paused_agreements:
        return "paused"
    if agreement_no in sandbox.faults.unknown_agreements:
        return "not_opened"
    return "normal"


@router.get("/v1/plate-services")
async def plate_service(
    sandbox: SandboxDep,
    agreement_no: str = Query(min_length=1, max_length=64),
    plate: str = Query(min_length=2, max_length=16),
    color: str = Query(min_length=1, max_length=16),
) -> JSONResponse:
    if (failure := await sandbox.fail_query()) is not None:
        return failure
    return JSONResponse(
        {"plate": plate, "color": color, "state": _state(sandbox, agreement_no), "reason": None}
    )


class EntryRequest(BaseModel):
    plate: str = Field(min_length=2, max_length=16)
    color: str = Field(min_length=1, max_length=16)
    entered_at: str = Field(min_length=10, max_length=40)
    car_park_name: str = Field(min_length=1, max_length=200)
    free_duration_s: int = Field(ge=0)
    agreement_no: str | None = Field(default=None, max_length=64)


@router.post("/v1/parkings")
async def register_entry(
    entry: EntryRequest, idempotency_key: IdempotencyKey, sandbox: SandboxDep
) -> JSONResponse:
    if (failure := await sandbox.fail_before_effect()) is not None:
        return failure
    parking_id = sandbox.parkings.setdefault(idempotency_key, f"sbxp_{uuid.uuid4().hex}")
    response = JSONResponse(
        {
            "out_parking_no": idempotency_key,
            "parking_id": parking_id,
            "state": _state(sandbox, entry.agreement_no),
        }
    )
    return await sandbox.fail_after_effect(response)
