"""SQL of sign-in: accounts by phone, sign-in codes, refresh tokens, operator staff, API keys."""

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: int
    kind: Literal["city", "gate"]
    gate_id: int | None


@dataclass(frozen=True, slots=True)
class LoginCode:
    id: int
    code_hash: str
    expires_at: datetime
    attempts: int


@dataclass(frozen=True, slots=True)
class RefreshToken:
    id: int
    subject: str
    family: uuid.UUID
    expires_at: datetime
    rotated_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class OperatorUser:
    id: int
    operator_id: int
    role: Literal["admin", "attendant", "merchant"]
    password_hash: str
    # Set for the role 'merchant': the merchant they validate stays for.
    merchant_id: int | None = None


async def api_key(conn: asyncpg.Connection, key_hash: str) -> ApiKey | None:
    row = await conn.fetchrow(
        "SELECT id, kind, gate_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        key_hash,
    )
    return ApiKey(row["id"], row["kind"], row["gate_id"]) if row else None


async def create_api_key(
    conn: asyncpg.Connection, kind: str, key_hash: str, label: str, gate_id: int | None = None
) -> int:
    key_id: int = await conn.fetchval(
        """INSERT INTO api_keys (kind, key_hash, label, gate_id) VALUES ($1, $2, $3, $4)
           RETURNING id""",
        kind,
        key_hash,
        label,
        gate_id,
    )
    return key_id


async def account_active(conn: asyncpg.Connection, account_id: int) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT 1 FROM accounts WHERE id = $1 AND deleted_at IS NULL", account_id
        )
    )


async def account_for_phone(conn: asyncpg.Connection, phone: str) -> int:
    """The account of a phone number, created at its first sign-in."""
    account_id: int = await conn.fetchval(
        """INSERT INTO accounts (phone) VALUES ($1)
           ON CONFLICT (phone) DO UPDATE SET phone = EXCLUDED.phone RETURNING id""",
        phone,
    )
    return account_id


async def insert_code(
    conn: asyncpg.Connection, phone: str, code_hash: str, expires_at: datetime
) -> int:
    code_id: int = await conn.fetchval(
        """INSERT INTO login_codes (phone, code_hash, expires_at) VALUES ($1, $2, $3)
           RETURNING id""",
        phone,
        code_hash,
        expires_at,
    )
    return code_id


async def unused_code(conn: asyncpg.Connection, code_id: int, phone: str) -> LoginCode | None:
    """The phone's code `code_id` while unused, locked: concurrent attempts count one by one."""
    row = await conn.fetchrow(
        """SELECT id, code_hash, expires_at, attempts FROM login_codes
           WHERE id = $1 AND phone = $2 AND consumed_at IS NULL
           FOR UPDATE""",
        code_id,
        phone,
    )
    return LoginCode(**dict(row)) if row else None


async def count_attempt(conn: asyncpg.Connection, code_id: int, *, consumed: bool) -> None:
    await conn.execute(
        """UPDATE login_codes SET attempts = attempts + 1,
                  consumed_at = CASE WHEN $2 THEN now() ELSE consumed_at END
           WHERE id = $1""",
        code_id,
        consumed,
    )


async def insert_refresh(
    conn: asyncpg.Connection,
    token_hash: str,
    subject: str,
    family: uuid.UUID,
    expires_at: datetime,
) -> None:
    await conn.execute(
        """INSERT INTO refresh_tokens (token_hash, subject, family, expires_at)
           VALUES ($1, $2, $3, $4)""",
        token_hash,
        subject,
        family,
        expires_at,
    )


async def refresh_token(conn: asyncpg.Connection, token_hash: str) -> RefreshToken | None:
    row = await conn.fetchrow(
        """SELECT id, subject, family, expires_at, rotated_at, revoked_at FROM refresh_tokens
           WHERE token_hash = $1 FOR UPDATE""",
        token_hash,
    )
    return RefreshToken(**dict(row)) if row else None


async def mark_rotated(conn: asyncpg.Connection, token_id: int) -> None:
    await conn.execute("UPDATE refresh_tokens SET rotated_at = now() WHERE id = $1", token_id)


async def revoke_family(conn: asyncpg.Connection, family: uuid.UUID) -> None:
    await conn.execute(
        "UPDATE refresh_tokens SET revoked_at = now() WHERE family = $1 AND revoked_at IS NULL",
        family,
    )


async def revoke_subject(conn: asyncpg.Connection, subject: str) -> None:
    await conn.execute(
        "UPDATE refresh_tokens SET revoked_at = now() WHERE subject = $1 AND revoked_at IS NULL",
        subject,
    )


async def revoke_subject_except(
    conn: asyncpg.Connection, subject: str, keep_family: uuid.UUID | None
) -> None:
    """Ends every sign-in of `subject` but `keep_family` (the one asking)."""
    await conn.execute(
        """UPDATE refresh_tokens SET revoked_at = now()
           WHERE subject = $1 AND revoked_at IS NULL AND family IS DISTINCT FROM $2""",
        subject,
        keep_family,
    )


async def set_password(conn: asyncpg.Connection, user_id: int, password_hash: str) -> None:
    await conn.execute(
        "UPDATE operator_users SET password_hash = $2 WHERE id = $1", user_id, password_hash
    )


async def operator_user_by_email(conn: asyncpg.Connection, email: str) -> OperatorUser | None:
    row = await conn.fetchrow(
        """SELECT id, operator_id, role, password_hash, merchant_id FROM operator_users
           WHERE email = $1 AND disabled_at IS NULL""",
        email,
    )
    return OperatorUser(**dict(row)) if row else None


async def create_operator_user(
    conn: asyncpg.Connection,
    operator_id: int,
    email: str,
    name: str,
    role: str,
    password_hash: str,
    merchant_id: int | None = None,
) -> int:
    user_id: int = await conn.fetchval(
        """INSERT INTO operator_users (operator_id, email, name, role, password_hash, merchant_id)
           VALUES ($1, $2, $3, $4, $5, $6) RETURNING id""",
        operator_id,
        email,
        name,
        role,
        password_hash,
        merchant_id,
    )
    return user_id


async def operator_user_by_id(
    conn: asyncpg.Connection, user_id: int, session: uuid.UUID | None = None
) -> OperatorUser | None:
    """An enabled staff member; with `session`, only while that sign-in is not revoked
    (signed out, reused refresh token, password changed)."""
    row = await conn.fetchrow(
        """SELECT id, operator_id, role, password_hash, merchant_id FROM operator_users
           WHERE id = $1 AND disabled_at IS NULL
             AND ($2::uuid IS NULL OR EXISTS (
                 SELECT 1 FROM refresh_tokens WHERE family = $2 AND revoked_at IS NULL))""",
        user_id,
        session,
    )
    return OperatorUser(**dict(row)) if row else None
