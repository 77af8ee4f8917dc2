"""The company's staff (admins only): list, add an admin or attendant, disable one."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path

from parking.auth.principal import OperatorAdminDep
from parking.auth.tokens import hash_password
from parking.deps import ConnectionDep, RuntimeDep
from parking.operators.schemas import MAX_ID
from parking.staff import service
from parking.staff.schemas import NewStaff, StaffMember

router = APIRouter(prefix="/api/v1/operator/staff", tags=["operator"])


@router.get("")
async def list_staff(admin: OperatorAdminDep, conn: ConnectionDep) -> list[StaffMember]:
    """The company's staff, enabled first (merchants' sign-ins with their merchant)."""
    return await service.list_staff(conn, admin)


@router.post("", status_code=201)
async def add_staff(new: NewStaff, admin: OperatorAdminDep, runtime: RuntimeDep) -> StaffMember:
    """An admin or attendant with a password of 12+ characters (to be changed at the first
    sign-in); 409 `staff_exists` when the e-mail is taken."""
    # scrypt off the event loop, before a connection is taken.
    password_hash = await asyncio.to_thread(hash_password, new.password)
    async with runtime.pool.acquire() as conn, conn.transaction():
        return await service.add_staff(conn, admin, new, password_hash)


@router.post("/{staff_id}/disable")
async def disable_staff(
    staff_id: Annotated[int, Path(ge=1, le=MAX_ID)], admin: OperatorAdminDep, conn: ConnectionDep
) -> StaffMember:
    """Disables a member at once (their sign-ins end); 409 for oneself or one already off."""
    return await service.disable_staff(conn, admin, staff_id)
