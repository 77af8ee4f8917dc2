"""What an operator runs on day one (`parking admin …`): companies, car parks with their
tariff, the first staff, gates with their broker and camera credentials, API keys, and the
car park's uncertain-exit policy. Each write is audit-logged in the caller's transaction
(which the caller owns); secrets are returned once and only their hashes are stored."""

import asyncio
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import asyncpg
from pydantic import ValidationError

from billing import audit
from billing.tariff import Tariff
from gate_controller.protocol import GateAddress, Topics
from parking.admin import repository as repo
from parking.auth import repository as auth_repo
from parking.auth.principal import CITY_KEY_PREFIX, GATE_KEY_PREFIX
from parking.auth.tokens import digest, hash_password, new_secret
from parking.car_parks.schemas import check_car_park_name
from parking.gates import provision
from parking.gates import repository as gates_repo

# The shortest password a staff member may have (the API's rule for a new password).
MIN_PASSWORD_CHARS = 12
CAMERA_KEY_BYTES = 32


class AdminError(ValueError):
    """Input refused; nothing was written (the command exits with status 2)."""


@dataclass(frozen=True, slots=True)
class CarParkSpec:
    company: str
    code: str
    name: str
    capacity: int
    tariff: Tariff
    address: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    uncertain_exit_policy: Literal["hold", "open_confirm"] = "open_confirm"


def _company_ref(ref: str) -> str:
    ref = ref.strip()
    if not ref:
        raise AdminError("a company is named by its id or its name")
    return ref


async def _company(conn: asyncpg.Connection, ref: str, *, lock: bool = False) -> int:
    found = await repo.company_id(conn, _company_ref(ref), lock=lock)
    if found is None:
        raise AdminError(f"no company {ref!r}")
    return found


async def _car_park(conn: asyncpg.Connection, code: str) -> asyncpg.Record:
    row = await repo.car_park_by_code(conn, code)
    if row is None:
        raise AdminError(f"no car park with code {code!r}")
    return row


async def create_company(conn: asyncpg.Connection, actor: str, name: str) -> dict[str, Any]:
    name = name.strip()
    if not 1 <= len(name) <= 200:
        raise AdminError("a company's name has 1 to 200 characters")
    company_id = await repo.insert_company(conn, name)
    if company_id is None:
        raise AdminError(f"a company named {name!r} exists already")
    await audit.record(
        conn, actor, "admin.company_created", f"operator:{company_id}", {"name": name}
    )
    return {"company_id": company_id, "name": name}


def parse_tariff(text: str) -> Tariff:
    try:
        return Tariff.model_validate_json(text)
    except ValidationError as exc:
        raise AdminError(f"tariff: {exc}") from None


async def create_car_park(
    conn: asyncpg.Connection, actor: str, spec: CarParkSpec, now: datetime
) -> dict[str, Any]:
    if not provision.CODE.fullmatch(spec.code):
        raise AdminError(f"car park code {spec.code!r}: 1-64 characters of A-Z a-z 0-9 _ -")
    if spec.capacity < 0:
        raise AdminError("capacity: 0 or more")
    if (spec.latitude is None) != (spec.longitude is None):
        raise AdminError("give both --lat and --lon, or neither")
    if spec.latitude is not None and not -90 <= spec.latitude <= 90:
        raise AdminError("--lat: -90 to 90")
    if spec.longitude is not None and not -180 <= spec.longitude <= 180:
        raise AdminError("--lon: -180 to 180")
    address = spec.address.strip() if spec.address else None
    if address is not None and len(address) > 200:
        raise AdminError("an address has at most 200 characters")
    try:
        name = check_car_park_name(spec.name)
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    operator_id = await _company(conn, spec.company, lock=True)
    if await repo.has_platform_staff(conn, operator_id):
        raise AdminError("this is the platform's own company: it runs no car parks")
    try:
        async with conn.transaction():  # a savepoint: a taken code leaves nothing behind
            car_park_id = await repo.create_car_park(
                conn,
                operator_id=operator_id,
                code=spec.code,
                name=name,
                capacity=spec.capacity,
                latitude=spec.latitude,
                longitude=spec.longitude,
                uncertain_exit_policy=spec.uncertain_exit_policy,
                address=address,
            )
    except asyncpg.UniqueViolationError:
        raise AdminError(f"a car park with code {spec.code!r} exists already") from None
    tariff_id = await repo.create_tariff(conn, car_park_id, effective_from=now, tariff=spec.tariff)
    detail = {
        "code": spec.code,
        "name": name,
        "capacity": spec.capacity,
        "address": address,
        "latitude": spec.latitude,
        "longitude": spec.longitude,
        "uncertain_exit_policy": spec.uncertain_exit_policy,
        "tariff_id": tariff_id,
    }
    await audit.record(conn, actor, "admin.car_park_created", f"car_park:{car_park_id}", detail)
    return {"car_park_id": car_park_id, "company_id": operator_id, **detail}


async def set_policy(
    conn: asyncpg.Connection, actor: str, code: str, uncertain_exit_policy: str
) -> dict[str, Any]:
    if uncertain_exit_policy not in ("hold", "open_confirm"):
        raise AdminError("uncertain exit policy: hold or open_confirm")
    car_park = await _car_park(conn, code)
    before = car_park["uncertain_exit_policy"]
    await repo.set_uncertain_exit_policy(conn, car_park["id"], uncertain_exit_policy)
    await audit.record(
        conn,
        actor,
        "admin.car_park_policy_set",
        f"car_park:{car_park['id']}",
        {"uncertain_exit_policy": uncertain_exit_policy, "before": before},
    )
    return {"car_park": code, "uncertain_exit_policy": uncertain_exit_policy, "before": before}


async def create_staff(
    conn: asyncpg.Connection,
    actor: str,
    *,
    company: str,
    email: str,
    name: str,
    role: Literal["admin", "attendant", "platform"],
    password: str | None,
) -> dict[str, Any]:
    """A staff member; without `password` one is drawn and returned once (to be changed at
    the first sign-in: POST /api/v1/auth/password)."""
    email = email.strip().lower()
    if "@" not in email or any(char.isspace() for char in email) or len(email) > 200:
        raise AdminError(f"{email!r} is not an e-mail address")
    if not name.strip():
        raise AdminError("a staff member has a name")
    drawn = password is None
    if password is None:
        password = secrets.token_urlsafe(12)
    elif len(password) < MIN_PASSWORD_CHARS:
        raise AdminError(f"a password has at least {MIN_PASSWORD_CHARS} characters")
    operator_id = await _company(conn, company, lock=True)
    if role == "platform" and await repo.runs_car_parks(conn, operator_id):
        # The city's reviewers would share a company with an operator whose admins see its
        # audit log and could disable them.
        raise AdminError(
            "platform staff belong to the platform's own company, which runs no car parks"
        )
    password_hash = await asyncio.to_thread(hash_password, password)
    try:
        async with conn.transaction():
            user_id = await auth_repo.create_operator_user(
                conn, operator_id, email, name.strip(), role, password_hash
            )
    except asyncpg.UniqueViolationError:
        raise AdminError(f"a staff member with e-mail {email!r} exists already") from None
    await audit.record(
        conn,
        actor,
        "admin.staff_created",
        f"operator_user:{user_id}",
        {"company_id": operator_id, "role": role, "password": "drawn" if drawn else "given"},
    )
    result: dict[str, Any] = {
        "user_id": user_id,
        "company_id": operator_id,
        "email": email,
        "role": role,
    }
    if drawn:
        result["password"] = password
    return result


async def create_gate(
    conn: asyncpg.Connection,
    actor: str,
    *,
    car_park: str,
    code: str,
    direction: Literal["in", "out", "both"],
    topic_prefix: str,
    broker_dir: Path,
    server_public_key: str | None = None,
) -> dict[str, Any]:
    """A gate, with what its installer needs once: its broker login (the broker's files in
    `broker_dir` are rewritten for every gate as `parking gates provision --from-db` does,
    keeping the passwords already there), a new key for its camera (the agent's
    `[camera] key`, also set in the camera; not stored here) and, when commands are signed,
    the public key the agent checks them with (`server_public_key`)."""
    if not provision.CODE.fullmatch(code):
        raise AdminError(f"gate code {code!r}: 1-64 characters of A-Z a-z 0-9 _ -")
    car_park_row = await _car_park(conn, car_park)
    try:
        async with conn.transaction():
            gate_id = await repo.create_gate(conn, car_park_row["id"], code, direction)
    except asyncpg.UniqueViolationError:
        raise AdminError(f"car park {car_park!r} has a gate {code!r} already") from None
    address = GateAddress(car_park, code)
    topics = Topics(topic_prefix)
    username = provision.gate_username(address)
    gates = await gates_repo.gate_addresses(conn)
    try:
        written = await asyncio.to_thread(
            provision.provision, gates, broker_dir, prefix=topic_prefix
        )
    except provision.ProvisionError as exc:
        raise AdminError(str(exc)) from None
    password = next(a.password for a in written.accounts if a.username == username)
    broker = {
        "username": username,
        "password": password,
        "files": {name: str(path) for name, path in written.files.items()},
    }
    camera_key = secrets.token_urlsafe(CAMERA_KEY_BYTES)
    await audit.record(
        conn,
        actor,
        "admin.gate_created",
        f"gate:{gate_id}",
        {"car_park": car_park, "code": code, "direction": direction, "broker_user": username},
    )
    return {
        "gate_id": gate_id,
        "car_park": car_park,
        "gate": code,
        "direction": direction,
        "topic_root": topics.root,
        "broker": broker,
        "camera_key": camera_key,
        "server_public_key": server_public_key,
    }


async def create_api_key(
    conn: asyncpg.Connection,
    actor: str,
    *,
    kind: Literal["city", "gate"],
    label: str,
    gate: str | None,
) -> dict[str, Any]:
    """A new key, returned once (only its SHA-256 is stored)."""
    label = label.strip()
    if not 1 <= len(label) <= 200:
        raise AdminError("a key's label has 1 to 200 characters")
    gate_id: int | None = None
    if kind == "gate":
        if gate is None:
            raise AdminError("a gate key names its gate: --gate CAR_PARK/GATE")
        try:
            address = provision.parse_gate(gate)
        except provision.ProvisionError as exc:
            raise AdminError(str(exc)) from None
        gate_id = await repo.gate_id(conn, address.lot, address.gate)
        if gate_id is None:
            raise AdminError(f"no gate {gate!r}")
    elif gate is not None:
        raise AdminError("a city key belongs to no gate")
    key = new_secret(CITY_KEY_PREFIX if kind == "city" else GATE_KEY_PREFIX)
    key_id = await auth_repo.create_api_key(conn, kind, digest(key), label, gate_id)
    await audit.record(
        conn,
        actor,
        "admin.api_key_created",
        f"api_key:{key_id}",
        {"kind": kind, "label": label, "gate_id": gate_id},
    )
    return {"api_key_id": key_id, "kind": kind, "label": label, "gate": gate, "key": key}


async def list_api_keys(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    return [
        {
            "api_key_id": row["id"],
            "kind": row["kind"],
            "label": row["label"],
            "gate": f"{row['car_park']}/{row['gate']}" if row["gate"] else None,
            "created_at": row["created_at"].astimezone(UTC).isoformat(),
            "revoked_at": row["revoked_at"].astimezone(UTC).isoformat()
            if row["revoked_at"]
            else None,
        }
        for row in await repo.api_keys(conn)
    ]


async def revoke_api_key(conn: asyncpg.Connection, actor: str, key_id: int) -> dict[str, Any]:
    kind = await repo.revoke_api_key(conn, key_id)
    if kind is None:
        raise AdminError(f"no API key {key_id} that is not revoked already")
    await audit.record(conn, actor, "admin.api_key_revoked", f"api_key:{key_id}", {"kind": kind})
    return {"api_key_id": key_id, "revoked": True}
