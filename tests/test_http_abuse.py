"""Nobody can exhaust the service over HTTP (issue #17): per-client limits count the real client,
bodies are bounded before anything reads them, public lists are cached and limited."""

import csv
import gzip
import io
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime

import httpx
import orjson
from fastapi import FastAPI

from billing import reports, signing
from parking.app import TARIFF_MAX_BODY_BYTES, create_app
from parking.retention import service as retention
from parking.runtime import Runtime
from parking_dev import sandbox
from tests.conftest import SANDBOX_SECRET, Lot, api_server
from tests.test_access_matrix import ROWS

QUOTE = "/api/v1/car-parks/NOPE/quote"
NOTIFICATIONS = "/api/v1/payments/notifications/sandbox"
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


async def test_an_untrusted_peer_cannot_name_a_trusted_hop_in_forwarded_for(
    runtime: Runtime,
) -> None:
    """The manifests trust 10.0.0.0/8; a client at 127.0.0.1 (not trusted) rotates the header,
    with a trusted-looking hop at its right end: still one client."""
    runtime.settings.quotes_per_minute_per_client = 3
    runtime.settings.trusted_proxies = ["10.0.0.0/8"]
    async with (
        api_server(runtime, sandbox.free_port()) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        statuses = await _quote_statuses(http, [f"198.51.100.{n}, 10.0.0.{n}" for n in range(6)])
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


async def test_forwarded_for_over_two_header_lines_counts_the_real_client(
    runtime: Runtime,
) -> None:
    """Behind the ingress: a forged hop in a header line of the client's own, then the line the
    ingress appended (the client's address, the ingress's own hop)."""
    runtime.settings.trusted_proxies = ["127.0.0.0/8", "10.0.0.0/8"]
    runtime.settings.login_codes_per_hour_per_client = 2
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as http:
        statuses = [
            (
                await http.post(
                    CODES,
                    json={"phone": _phone()},
                    headers=[
                        ("X-Forwarded-For", f"203.0.113.{n}"),
                        ("X-Forwarded-For", "192.0.2.66, 10.1.2.3"),
                    ],
                )
            ).status_code
            for n in range(4)
        ]
    assert statuses == [202, 202, 429, 429]


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


async def test_a_chunked_body_over_a_socket_stops_at_the_limit_and_gzip_is_not_inflated(
    runtime: Runtime,
) -> None:
    """No Content-Length (chunked) over TCP, and a gzip bomb (64 MiB of zeros in ~64 KiB,
    under the limit) that must not be inflated."""
    limit = runtime.settings.max_body_bytes
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while pulled < 256 * limit:
            pulled += 16 * 1024
            yield b"y" * (16 * 1024)

    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), 9)
    assert len(bomb) < limit
    async with (
        api_server(runtime, sandbox.free_port()) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as http,
    ):
        try:
            chunked: int | str = (
                await http.post("/api/v1/auth/token", content=endless())
            ).status_code
        except httpx.TransportError as exc:  # the server closed after its 413
            chunked = type(exc).__name__
        inflated = await http.post(
            CODES,
            content=bomb,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
    assert pulled < 64 * limit, (chunked, pulled)
    assert inflated.status_code in (400, 413, 415, 422), inflated.text


async def test_every_route_refuses_an_oversized_body_before_anything_else(
    api: httpx.AsyncClient, runtime: Runtime
) -> None:
    """Every route of the access matrix (which lists every route the app serves), anonymous or
    not, answers a body over the largest limit (a tariff table's) with 413: no route reads it,
    nobody is authenticated first."""
    big = b"x" * (max(TARIFF_MAX_BODY_BYTES, runtime.settings.max_body_bytes) + 1)
    for row in ROWS:
        path = re.sub(r"\{[^}]+\}", "1", row.path)
        answer = await api.request(row.method, path, content=big)
        assert answer.status_code == 413, (row.method, row.path, answer.status_code)
        assert answer.json()["error"]["code"] == "payload_too_large"


def test_csv_exports_defuse_cells_a_spreadsheet_would_run_as_formulas() -> None:
    rows = [
        {"car_park": '=HYPERLINK("http://x")', "reason": "+1", "net_fen": -500},
        {"car_park": "@SUM(A1)", "reason": "-2", "net_fen": 0},
        {"car_park": "\tx", "reason": "\rcmd", "net_fen": 12},
        {"car_park": "plain", "reason": "a=b", "net_fen": -1},
    ]
    parsed = list(csv.DictReader(io.StringIO(reports.to_csv(rows), newline="")))
    assert [r["car_park"] for r in parsed] == [
        '\'=HYPERLINK("http://x")',
        "'@SUM(A1)",
        "'\tx",
        "plain",
    ]
    assert [r["reason"] for r in parsed] == ["'+1", "'-2", "'\rcmd", "a=b"]
    # Numbers are numbers: a negative amount is not a formula.
    assert [r["net_fen"] for r in parsed] == ["-500", "0", "12", "-1"]


async def test_the_refunds_list_reads_only_the_companys_car_parks_through_an_index(
    runtime: Runtime,
) -> None:
    async with runtime.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = await conn.fetchval(
            "EXPLAIN (FORMAT JSON) " + reports.REFUNDS_SQL,
            date(2026, 1, 1),
            date(2026, 1, 31),
            "Asia/Shanghai",
            [1, 2],
        )
    assert "refunds_car_park_created" in str(plan)


async def test_junk_notifications_keep_only_an_excerpt_and_are_throttled_per_client(
    api: httpx.AsyncClient, runtime: Runtime
) -> None:
    runtime.settings.rejected_notifications_per_minute_per_client = 3
    marker = uuid.uuid4().hex
    junk = (marker + "x" * 12_000).encode()
    statuses = [
        (await api.post("/api/v1/payments/notifications/sandbox", content=junk)).status_code
        for _ in range(5)
    ]
    assert statuses == [401, 401, 401, 429, 429]
    async with runtime.pool.acquire() as conn:
        kept = await conn.fetch(
            "SELECT length(payload) AS kept, payload_size FROM dead_letters "
            "WHERE position($1::bytea in payload) = 1",
            marker.encode(),
        )
    assert [(r["kept"], r["payload_size"]) for r in kept] == [(4096, len(junk))] * 3


async def test_junk_notifications_from_many_addresses_store_a_bounded_amount(
    runtime: Runtime,
) -> None:
    """Junk from a botnet (every request from a new address, behind the trusted ingress) is
    dead-lettered at most PARKING_REJECTED_NOTIFICATIONS_PER_MINUTE times a minute over all
    clients; the provider's own signed notifications are still answered."""
    runtime.settings.trusted_proxies = ["127.0.0.0/8"]
    runtime.settings.rejected_notifications_per_minute = 3
    marker = uuid.uuid4().hex
    transport = httpx.ASGITransport(app=create_app(runtime))  # the peer: a trusted proxy
    async with httpx.AsyncClient(transport=transport, base_url="http://parking.test") as http:
        statuses = [
            (
                await http.post(
                    NOTIFICATIONS,
                    content=(marker + "x" * 100).encode(),
                    headers={"X-Forwarded-For": f"198.51.100.{n}"},
                )
            ).status_code
            for n in range(1, 6)
        ]
        body = orjson.dumps(
            {
                "event_id": str(uuid.uuid4()),
                "type": "charge",
                "out_trade_no": f"s0-{marker}",
                "order_id": "sbx_unknown",
                "status": "succeeded",
                "amount_fen": 100,
                "reason": None,
                "finished_at": datetime.now(UTC).isoformat(),
            }
        )
        valid = await http.post(
            NOTIFICATIONS,
            content=body,
            headers={
                signing.SIGNATURE_HEADER: signing.sign(SANDBOX_SECRET, body, int(time.time())),
                "content-type": "application/json",
                "X-Forwarded-For": "198.51.100.9",
            },
        )
    assert statuses == [401, 401, 401, 429, 429]
    assert valid.status_code == 200 and valid.json() == {"effect": "unknown_order"}, valid.text
    async with runtime.pool.acquire() as conn:
        kept = await conn.fetchval(
            "SELECT count(*) FROM dead_letters WHERE position($1::bytea in payload) = 1",
            marker.encode(),
        )
    assert kept == 3


async def test_dead_letters_lose_their_payloads_with_the_images(runtime: Runtime) -> None:
    """A bad capture's payload carries a plate and frames: it goes when images go. (Ages below
    the dead letters' own retention, 30 days, which the maintenance loop prunes whole.)"""
    marker = uuid.uuid4().hex
    async with runtime.pool.acquire() as conn:
        for age_days in (20, 1):
            await conn.execute(
                """INSERT INTO dead_letters
                       (source, topic, reason, payload, payload_size, received_at)
                   VALUES ('mqtt', $1, 'invalid_json', $2, 10,
                           now() - make_interval(days => $3))""",
                marker,
                b'{"plate": "\xe6\xb5\x99A12345"}',
                age_days,
            )
    await retention.expire_images(runtime.pool, 10, datetime.now(UTC))
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT payload IS NULL AS erased, payload_size FROM dead_letters WHERE topic = $1 "
            "ORDER BY received_at",
            marker,
        )
    assert [(r["erased"], r["payload_size"]) for r in rows] == [(True, 10), (False, 10)]


async def test_old_dead_letters_of_every_source_lose_their_payload(runtime: Runtime) -> None:
    """A forged notification's excerpt (it may quote a phone) as well as a bad capture's frames,
    older than the image retention, through the maintenance loop's own call."""
    marker = uuid.uuid4().hex
    days = runtime.settings.image_retention_days
    async with runtime.pool.acquire() as conn:
        for source in ("provider_notification", "mqtt"):
            await conn.execute(
                """INSERT INTO dead_letters
                       (source, topic, reason, payload, payload_size, received_at)
                   VALUES ($1, $2, 'invalid_notification', $3, 10,
                           now() - make_interval(days => $4))""",
                source,
                marker,
                b'{"phone": "13712345678", "plate": "\xe6\xb5\x99A12345"}',
                days + 1,
            )
    await retention.expire_images(runtime.pool, days, datetime.now(UTC))
    async with runtime.pool.acquire() as conn:
        kept = await conn.fetchval(
            "SELECT count(*) FROM dead_letters WHERE topic = $1 AND payload IS NOT NULL", marker
        )
    assert kept == 0
