"""Payment-provider adapters. Everything outside this module sees only `PaymentProvider`.

An Alipay or WeChat Pay pay-later adapter is another class with the same two methods.
"""

from dataclasses import dataclass
from typing import Literal, Protocol

import httpx


@dataclass(frozen=True, slots=True)
class ChargeResult:
    status: Literal["succeeded", "declined"]
    provider_ref: str
    reason: str | None = None


class ProviderUnavailable(Exception):
    """Timeout, connection error or 5xx: the outcome is unknown, retry with the same key."""


class PaymentProvider(Protocol):
    name: str

    async def charge(
        self, *, idempotency_key: str, agreement_no: str, amount_fen: int, description: str
    ) -> ChargeResult: ...

    async def lookup(self, *, idempotency_key: str) -> ChargeResult | None:
        """What the provider did with a charge, or None when it never received it."""
        ...

    async def aclose(self) -> None: ...


class SandboxProvider:
    """Client of the sandbox provider (billing.sandbox), a real HTTP service."""

    name = "sandbox"

    def __init__(self, base_url: str, timeout_s: float = 3.0) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout_s)

    async def charge(
        self, *, idempotency_key: str, agreement_no: str, amount_fen: int, description: str
    ) -> ChargeResult:
        try:
            response = await self._http.post(
                "/v1/charges",
                json={
                    "agreement_no": agreement_no,
                    "amount_fen": amount_fen,
                    "description": description,
                },
                headers={"Idempotency-Key": idempotency_key},
            )
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500:
            raise ProviderUnavailable(f"provider answered {response.status_code}")
        if response.status_code == 402:
            body = response.json()
            return ChargeResult("declined", body["order_id"], body.get("reason"))
        response.raise_for_status()
        body = response.json()
        return ChargeResult("succeeded", body["order_id"])

    async def lookup(self, *, idempotency_key: str) -> ChargeResult | None:
        try:
            response = await self._http.get(f"/v1/charges/{idempotency_key}")
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code == 404:
            return None
        if response.status_code >= 500:
            raise ProviderUnavailable(f"provider answered {response.status_code}")
        response.raise_for_status()
        body = response.json()
        if body["status"] == "declined":
            return ChargeResult("declined", body["order_id"], body.get("reason"))
        return ChargeResult("succeeded", body["order_id"])

    async def aclose(self) -> None:
        await self._http.aclose()
