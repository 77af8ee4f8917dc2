"""The company's staff: admins list them, add an admin or attendant, disable one. A disabled
member loses every right at once (staff rights are read on each request) and their sign-ins
are revoked."""

import asyncpg

from billing import audit
from parking.auth import repository as auth_repo
from parking.auth.principal import Principal
from parking.errors import AppError, NotFound
from parking.staff import repository as repo
from parking.staff.schemas import NewStaff, StaffMember


def _company(principal: Principal) -> int:
    assert principal.operator_id is not None
    return principal.operator_id


async def list_staff(conn: asyncpg.Connection, principal: Principal) -> list[StaffMember]:
    return [StaffMember(**dict(row)) for row in await repo.staff(conn, _company(principal))]


async def add_staff(
    conn: asyncpg.Connection, principal: Principal, new: NewStaff, password_hash: str
) -> StaffMember:
    email = new.email.strip().lower()
    try:
        async with conn.transaction():
            user_id = await auth_repo.create_operator_user(
                conn, _company(principal), email, new.name, new.role, password_hash
            )
    except asyncpg.UniqueViolationError:
        raise AppError(409, "staff_exists", "a staff member with this e-mail exists") from None
    await audit.record(
        conn, principal.actor, "staff.created", f"operator_user:{user_id}", {"role": new.role}
    )
    row = await repo.member(conn, _company(principal), user_id)
    assert row is not None
    return StaffMember(**dict(row))


async def disable_staff(
    conn: asyncpg.Connection, principal: Principal, user_id: int
) -> StaffMember:
    if user_id == principal.operator_user_id:
        raise AppError(409, "cannot_disable_self", "an admin cannot disable their own sign-in")
    if not await repo.disable(conn, _company(principal), user_id):
        if await repo.member(conn, _company(principal), user_id) is None:
            raise NotFound("staff_member")
        raise AppError(409, "already_disabled", "this staff member is disabled already")
    await auth_repo.revoke_subject(conn, f"operator_user:{user_id}")
    await audit.record(conn, principal.actor, "staff.disabled", f"operator_user:{user_id}", {})
    row = await repo.member(conn, _company(principal), user_id)
    assert row is not None
    return StaffMember(**dict(row))
