"""Nobody can exhaust the service over HTTP (issue #17): per-client limits count the real client,
bodies are bounded before anything reads them, public lists are cached and limited."""

import uuid
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from parking.app import create_app
from parking.runtime import Runtime
from parking_dev import sandbox
from tests.conftest import Lot, api_server

QUOTE = "/api/v1/car-parks/NOPE/quote"
CODES = "/api/v1/auth/sign-in-codes"


def _phone() -> str:
    return f"137{uuid.uuid4().int % 10**8:08d}"


async def _quote_statuses(http: httpx.AsyncClient, forwarded_for: list[str]) -> list[int]:
    return [
        (
            await http.get(QUOTE, params={"plate": "浙A12345"}, headers={"X-Forwarded-For": hop})
        ).status_code
        for hop in forwarded_for
    ]


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(runtime: Runtime) -> None:
    """The served API with no trusted proxy: a client rotating X-Forwarded-For is still one
    client (the local peer), so the quote limit holds."""
    runtime.settings.quotes_per_minute_per_client = 3
    async with (
        api_server(runtime, sandbox.free_port()) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        statuses = await _quote_statuses(http, [f"198.51.100.{n}" for n in range(6)])
    assert statuses == [404, 404, 404, 429, 429, 429]


async def test_behind_trusted_proxies_each_client_has_its_own_limits(runtime: Runtime) -> None:
    """Behind the ingress (a trusted peer) the right-most untrusted hop is the client: one client
    is limited however it forges the left of the header, and another is not limited with it."""
    runtime.settings.trusted_proxies = ["127.0.0.0/8", "10.0.0.0/8"]
    runtime.settings.login_codes_per_hour_per_client = 2
    app: FastAPI = create_app(runtime)
    transport = httpx.ASGITransport(app=app)  # the peer is 127.0.0.1, a trusted proxy
    async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as http:

        async def ask(forwarded_for: str) -> int:
            answer = await http.post(
                CODES, json={"phone": _phone()}, headers={"X-Forwarded-For": forwarded_for}
            )
            return answer.status_code

        # A forged left part, then the ingress's own hop (10.x), trusted and skipped.
        mallory = [await ask(f"203.0.113.{n}, 192.0.2.66, 10.1.2.3") for n in range(4)]
        alice = [await ask("192.0.2.7, 10.1.2.3") for _ in range(2)]
    assert mallory == [202, 202, 429, 429]
    assert alice == [202, 202]


async def test_an_oversized_body_is_refused_before_it_is_read_or_anyone_is_authenticated(
    api: httpx.AsyncClient, runtime: Runtime, lot: Lot
) -> None:
    limit = runtime.settings.max_body_bytes
    big = b"x" * (limit + 1)
    routes = [
        ("POST", "/api/v1/auth/token"),  # anonymous by nature
        ("PATCH", f"/api/v1/operator/car-parks/{lot.code}"),  # staff only: 413 before 401
        ("POST", "/api/v1/payments/notifications/sandbox"),  # smaller limit of its own
    ]
    for method, path in routes:
        answer = await api.request(
            method, path, content=big, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 413, (path, answer.text)
        assert answer.json()["error"]["code"] == "payload_too_large"

    # No Content-Length (chunked): counted as it streams, and reading stops at the limit.
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while pulled < 100 * limit:
            pulled += 4096
            yield b"y" * 4096

    answer = await api.post("/api/v1/auth/token", content=endless())
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "payload_too_large"
    assert pulled <= limit + 2 * 4096

    # Within the limit all is as before; a route's larger limit lets a tariff table through.
    ok = await api.post("/api/v1/auth/sign-in-codes", json={"phone": _phone()})
    assert ok.status_code == 202
    padded = b'{"phone": "' + _phone().encode() + b'"' + b" " * (limit - 40) + b"}"
    assert (
        await api.post(
            "/api/v1/auth/sign-in-codes",
            content=padded,
            headers={"Content-Type": "application/json"},
        )
    ).status_code == 202
    tariff_path = f"/api/v1/operator/car-parks/{lot.code}/tariffs"
    table = b"{" + b" " * (limit + 1) + b"}"
    tariff = await api.post(
        tariff_path, content=table, headers={"Content-Type": "application/json"}
    )
    assert tariff.status_code == 401  # read (it fits) and then refused for want of a token
