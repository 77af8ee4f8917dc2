"""Push feeds against a real local HTTP receiver: APDS webhook subscriptions (session start and
end, occupancy at most once per interval with the latest count), signatures, retries with
backoff, a subscription paused after failures in a row and resumed, and the city platform's
feed (entries, exits, free spaces), which loses nothing: a delivery that went dead is retried
by an admin and arrives once, with its event id."""

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from parking.feeds.addresses import refusal
from parking.retention import service as retention
from parking.runtime import Runtime
from tests.apds_schema import schema_errors
from tests.conftest import (
    Lot,
    bearer,
    create_lot,
    enter,
    eventually,
    exit_after,
    make_driver,
    make_staff,
    staff_token,
    unique_plate,
)
from tests.feed_receiver import Receiver
from tests.gates import GateProbe


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as endpoint:
        yield endpoint


@pytest.fixture
def fast(runtime: Runtime) -> Runtime:
    """Retries after 50 ms (doubling), occupancy at most once a second."""
    runtime.settings.feed_retry_base_s = 0.05
    runtime.settings.feed_occupancy_interval_s = 1.0
    return runtime


async def _admin(runtime: Runtime, app: FastAPI, lot: Lot) -> dict[str, str]:
    return bearer(staff_token(app, await make_staff(runtime, lot.operator_id, "admin")))


async def _subscribe(
    api: httpx.AsyncClient, admin: dict[str, str], url: str, topics: list[str], lot: Lot
) -> dict[str, Any]:
    created = await api.post(
        "/apds/v4/webhooks",
        json={"endpoint": url, "topics": topics, "places": [lot.code]},
        headers=admin,
    )
    assert created.status_code == 200, created.text
    body: dict[str, Any] = created.json()
    assert body["status"] == "ok" and body["secret"].startswith("whsec_")
    assert schema_errors("ResponseStatusWithId", body) == []
    return body


async def _deliveries(runtime: Runtime, lot: Lot, topic: str) -> list[Any]:
    async with runtime.pool.acquire() as conn:
        return await conn.fetch(
            """SELECT d.*, o.attempts, o.dead_at, o.id AS job_id FROM feed_deliveries d
               JOIN outbox o ON o.kind = 'feed_delivery' AND o.ref_id = d.id
               WHERE d.car_park_id = $1 AND d.topic = $2 ORDER BY d.id""",
            lot.id,
            topic,
        )


async def test_session_events_are_signed_retried_and_apds_sessions(
    fast: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    receiver: Receiver,
) -> None:
    admin = await _admin(fast, app, lot)
    subscription = await _subscribe(
        api, admin, receiver.url, ["SessionCreated", "SessionUpdated"], lot
    )
    receiver.failures_left = 2
    driver = await make_driver(fast, unique_plate())
    left = await exit_after(fast, gate, lot, driver.plate, timedelta(minutes=40))
    assert left["action"] == "open"

    async def both() -> bool:
        return len(receiver.taken()) == 2

    await eventually(both)
    created, updated = sorted(receiver.taken(), key=lambda r: r.json["type"])
    assert (created.json["type"], updated.json["type"]) == ("SessionCreated", "SessionUpdated")
    # The two refused attempts were the first event's, with its id, and it came a third time.
    refused = [r for r in receiver.received if r.answered == 500]
    assert len(refused) == 2 and {r.event_id for r in refused} <= {
        created.event_id,
        updated.event_id,
    }
    for event in (created, updated):
        assert event.signed_with(subscription["secret"])
        assert not event.signed_with("whsec_someone-else")
        assert event.json["id"] == event.event_id
        assert schema_errors("Session", event.json["data"]) == []
        credential = event.json["data"]["identifiedCredentials"][0]
        assert credential["identifier"]["id"] == driver.plate
    assert "actualEnd" in updated.json["data"] and "actualEnd" not in created.json["data"]

    # Delivered means no more attempts: nothing else arrives, every delivery is sent once.
    async def both_sent() -> bool:
        rows = await _deliveries(fast, lot, "session_started") + await _deliveries(
            fast, lot, "session_ended"
        )
        return [r["status"] for r in rows] == ["sent", "sent"]

    await eventually(both_sent)
    assert len(receiver.received) == 4
    listed = await api.get("/apds/v4/webhooks", headers=admin)
    assert listed.json()[0]["consecutive_failures"] == 0


async def test_occupancy_goes_at_most_once_per_interval_with_the_latest_count(
    fast: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    receiver: Receiver,
) -> None:
    admin = await _admin(fast, app, lot)
    subscription = await _subscribe(api, admin, receiver.url, ["OccupancyUpdated"], lot)
    assert fast.occupancy_watcher is not None
    await asyncio.wait_for(fast.occupancy_watcher.ready.wait(), 10)
    plates = [unique_plate() for _ in range(6)]
    for plate in plates:
        await enter(fast, gate, lot, plate, parked_for=timedelta(minutes=1))

    def count(event: Any) -> int:
        demand: int = event.json["data"]["demandTable"][0]["demandType"][0]["count"]
        return demand

    async def latest_arrived() -> bool:
        taken = receiver.taken("occupancy")
        return bool(taken) and count(taken[-1]) == len(plates)

    await eventually(latest_arrived, timeout_s=20)
    taken = receiver.taken("occupancy")
    assert len(taken) < len(plates)  # changes were folded together
    for event in taken:
        assert event.signed_with(subscription["secret"])
        assert schema_errors("HierarchyElementReference", event.json["data"]) == []
        assert event.json["type"] == "OccupancyUpdated"

    async def recorded() -> list[Any]:
        # The receiver answers before the sender records the delivery as sent.
        rows = await _deliveries(fast, lot, "occupancy")
        sent = [r for r in rows if r["status"] == "sent"]
        return sent if [r["sent_value"] for r in sent] == [count(e) for e in taken] else []

    sent = await eventually(recorded)
    gaps = [later["sent_at"] - earlier["sent_at"] for earlier, later in pairwise(sent)]
    assert all(gap >= timedelta(seconds=1) for gap in gaps), gaps


async def test_a_failing_subscriber_is_paused_and_resumed(
    fast: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    receiver: Receiver,
) -> None:
    fast.settings.feed_pause_after_failures = 3
    admin = await _admin(fast, app, lot)
    subscription = await _subscribe(api, admin, receiver.url, ["SessionCreated"], lot)
    receiver.down = True
    await enter(fast, gate, lot, unique_plate(), parked_for=timedelta(minutes=1))

    async def paused() -> Any:
        listed = (await api.get("/apds/v4/webhooks", headers=admin)).json()
        return listed[0]["paused"] and listed[0]

    state = await eventually(paused)
    assert state["consecutive_failures"] == 3

    async def skipped() -> bool:
        rows = await _deliveries(fast, lot, "session_started")
        return [r["status"] for r in rows] == ["skipped"]

    # The delivery in hand is dropped at its next attempt, not sent.
    await eventually(skipped)
    attempts = len(receiver.received)
    # Paused: a new stay queues nothing for it.
    await enter(fast, gate, lot, unique_plate(), parked_for=timedelta(minutes=1))
    assert len(await _deliveries(fast, lot, "session_started")) == 1
    assert len(receiver.received) == attempts

    receiver.down = False
    resumed = await api.post(f"/apds/v4/webhooks/{subscription['id']}/resume", headers=admin)
    assert resumed.status_code == 200 and resumed.json()["paused"] is False
    plate = unique_plate()
    await enter(fast, gate, lot, plate, parked_for=timedelta(minutes=1))

    async def delivered() -> bool:
        return any(
            r.json["data"]["identifiedCredentials"][0]["identifier"]["id"] == plate
            for r in receiver.taken()
        )

    await eventually(delivered)
    # Another company cannot resume or delete it; its own admin can delete it.
    other = await _admin(fast, app, await create_lot(fast))
    for attempt in ("", "/resume"):
        method = "POST" if attempt else "DELETE"
        url = f"/apds/v4/webhooks/{subscription['id']}{attempt}"
        assert (await api.request(method, url, headers=other)).status_code == 404
    gone = await api.delete(f"/apds/v4/webhooks/{subscription['id']}", headers=admin)
    assert gone.status_code == 200 and gone.json()["status"] == "ok"
    assert (await api.get("/apds/v4/webhooks", headers=admin)).json() == []


@pytest.mark.parametrize(
    "body",
    [
        {"endpoint": "ftp://example.test/x", "topics": ["SessionCreated"]},
        {"endpoint": "http://127.0.0.1/x", "topics": ["SystemEvents"]},
        {"endpoint": "http://127.0.0.1/x", "topics": []},
        {"endpoint": "http://127.0.0.1/x", "topics": ["SessionCreated"], "places": ["nope"]},
    ],
)
async def test_bad_subscriptions_are_refused_in_apds_shape(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, lot: Lot, body: dict[str, Any]
) -> None:
    admin = await _admin(runtime, app, lot)
    refused = await api.post("/apds/v4/webhooks", json=body, headers=admin)
    assert refused.status_code in (404, 422), refused.text
    assert schema_errors("ResponseStatus", refused.json()) == []
    assert (await api.get("/apds/v4/webhooks", headers=admin)).json() == []


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("192.168.1.1", True),
        ("169.254.169.254", True),
        ("fe80::1", True),
        ("fc00::1", True),
        ("224.0.0.1", True),
        ("ff02::1", True),
        ("0.0.0.0", True),
        ("::", True),
        ("100.64.0.1", True),
        ("::ffff:10.0.0.1", True),
        ("8.8.8.8", False),
        ("2400:3200::1", False),
    ],
)
def test_only_public_addresses_take_feeds(address: str, refused: bool) -> None:
    assert (refusal(ipaddress.ip_address(address), allow_loopback=False) is not None) is refused
    # Loopback may be allowed (development, tests); nothing else is.
    allowed = refusal(ipaddress.ip_address(address), allow_loopback=True) is None
    assert allowed == (not refused or address in ("127.0.0.1", "::1"))


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://10.0.0.7/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[fd00::1]/hook",
        "http://0.0.0.0:8000/hook",
        # A name, resolved when subscribing: loopback is refused unless allowed.
        "http://localhost:8000/hook",
        "http://127.0.0.1:8000/hook",
    ],
)
async def test_internal_endpoints_are_refused_when_set(
    runtime: Runtime, app: FastAPI, api: httpx.AsyncClient, lot: Lot, endpoint: str
) -> None:
    runtime.settings.feed_allow_loopback = False
    admin = await _admin(runtime, app, lot)
    refused = await api.post(
        "/apds/v4/webhooks",
        json={"endpoint": endpoint, "topics": ["SessionCreated"]},
        headers=admin,
    )
    assert refused.status_code == 422, refused.text
    assert schema_errors("ResponseStatus", refused.json()) == []
    assert "address" in refused.json()["message"]
    city = await api.put(
        "/api/v1/operator/city-platform",
        json={"endpoint": endpoint, "key": "city-platform-key-0123456789"},
        headers=admin,
    )
    assert city.status_code == 422, city.text
    assert city.json()["error"]["code"] == "endpoint_refused"
    assert (await api.get("/apds/v4/webhooks", headers=admin)).json() == []
    assert (await api.get("/api/v1/operator/city-platform", headers=admin)).json() is None


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_an_endpoint_that_turned_internal_is_refused_at_delivery(
    fast: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    receiver: Receiver,
    host: str,
) -> None:
    """Checked when sent too: a name that resolves elsewhere by then (DNS rebinding) is
    refused, and the connection goes to the addresses checked."""
    admin = await _admin(fast, app, lot)
    url = receiver.url.replace("127.0.0.1", host)
    await _subscribe(api, admin, url, ["SessionCreated"], lot)
    # The subscription was accepted (loopback allowed); it is not any more.
    fast.settings.feed_allow_loopback = False
    await enter(fast, gate, lot, unique_plate(), parked_for=timedelta(minutes=1))

    async def refused() -> Any:
        rows = await _deliveries(fast, lot, "session_started")
        async with fast.pool.acquire() as conn:
            error = await conn.fetchval(
                "SELECT last_error FROM outbox WHERE id = $1", rows[0]["job_id"]
            )
        return error and "loopback" in error and error

    await eventually(refused)
    assert receiver.received == []


async def test_the_city_platform_gets_entries_exits_and_free_spaces_and_loses_none(
    fast: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    receiver: Receiver,
) -> None:
    admin = await _admin(fast, app, lot)
    key = "city-platform-key-0123456789"
    configured = await api.put(
        "/api/v1/operator/city-platform",
        json={"endpoint": receiver.url, "key": key},
        headers=admin,
    )
    assert configured.status_code == 200, configured.text
    assert configured.json()["topics"] == ["entry", "exit", "spaces"]
    assert fast.occupancy_watcher is not None
    await asyncio.wait_for(fast.occupancy_watcher.ready.wait(), 10)
    # The platform is never paused, however often it fails; a delivery dies after 2 attempts.
    fast.settings.feed_pause_after_failures = 1
    assert fast.feed_outbox is not None
    fast.feed_outbox.queue.policy.max_attempts["feed_delivery"] = 2  # type: ignore[index]
    receiver.down = True
    driver = await make_driver(fast, unique_plate())
    left = await exit_after(fast, gate, lot, driver.plate, timedelta(minutes=70))
    assert left["action"] == "open"

    async def all_dead() -> list[Any]:
        rows = [
            r
            for topic in ("session_started", "session_ended")
            for r in await _deliveries(fast, lot, topic)
        ]
        return rows if len(rows) == 2 and all(r["status"] == "dead" for r in rows) else []

    dead = await eventually(all_dead)
    listed = await api.get("/api/v1/operator/jobs", params={"state": "dead"}, headers=admin)
    assert {j["id"] for j in listed.json() if j["kind"] == "feed_delivery"} >= {
        r["job_id"] for r in dead
    }
    # The stay's exit waited for its entry (a receiver never gets an exit before its entry):
    # it was not attempted until the entry's two attempts were over.
    entry_id = str(next(r["id"] for r in dead if r["topic"] == "session_started"))
    attempts = [r.event_id for r in receiver.received]
    entry_attempts = [n for n, event_id in enumerate(attempts) if event_id == entry_id]
    assert len(entry_attempts) == 2, attempts
    assert all(
        n > entry_attempts[-1] for n, event_id in enumerate(attempts) if event_id != entry_id
    ), attempts
    assert (await api.get("/api/v1/operator/city-platform", headers=admin)).json()[
        "consecutive_failures"
    ] >= 2

    # The exit never had an attempt of its own: it went dead with its entry.
    (exit_row,) = [r for r in dead if r["topic"] == "session_ended"]
    assert exit_row["attempts"] == 0, exit_row

    # The platform is back: an admin retries the entry's dead delivery, and the exit goes
    # again with it; each arrives once, with its delivery's id (the entry's failed attempts
    # had it too).
    receiver.down = False
    failed_ids = {r.event_id for r in receiver.received} | {str(r["id"]) for r in dead}
    (entry_row,) = [r for r in dead if r["topic"] == "session_started"]
    retried = await api.post(f"/api/v1/operator/jobs/{entry_row['job_id']}/retry", headers=admin)
    assert retried.status_code == 200, retried.text
    again = await api.post(f"/api/v1/operator/jobs/{exit_row['job_id']}/retry", headers=admin)
    assert again.status_code == 409, "the exit was retried with its entry"

    async def both_taken() -> list[Any]:
        taken = [r for r in receiver.taken() if r.json["eventType"] in ("entry", "exit")]
        return taken if len(taken) == 2 else []

    entry, exit_ = sorted(await eventually(both_taken), key=lambda r: r.json["eventType"])
    assert {entry.event_id, exit_.event_id} <= failed_ids
    for event in (entry, exit_):
        assert event.signed_with(key) and event.json["eventId"] == event.event_id
        assert event.json["parkCode"] == lot.code and event.json["plateNo"] == driver.plate
        assert event.json["plateColor"] == "蓝牌"
    assert exit_.json["feeFen"] == 1200 and "exitTime" in exit_.json
    # Free spaces, as the signs count them.
    await enter(fast, gate, lot, unique_plate(), parked_for=timedelta(minutes=1))

    async def spaces() -> Any:
        taken = [r for r in receiver.taken() if r.json["eventType"] == "spaces"]
        return taken and taken[-1].json["occupiedSpaces"] == 1 and taken[-1]

    latest = await eventually(spaces, timeout_s=20)
    assert latest.json["freeSpaces"] == 49 and latest.json["totalSpaces"] == 50
    assert latest.signed_with(key)
    removed = await api.delete("/api/v1/operator/city-platform", headers=admin)
    assert removed.status_code == 204
    assert (await api.get("/api/v1/operator/city-platform", headers=admin)).json() is None


async def test_an_exit_waiting_for_its_entry_uses_none_of_its_own_attempts(
    fast: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    receiver: Receiver,
) -> None:
    # The platform fails the stay's entry three times (attempts 4 a delivery). Before, its exit
    # spent an attempt each time it was tried while waiting, and went dead before its entry
    # was through. Now waiting is no attempt: the exit is sent once, after its entry.
    admin = await _admin(fast, app, lot)
    configured = await api.put(
        "/api/v1/operator/city-platform",
        json={"endpoint": receiver.url, "key": "city-platform-key-waiting-0001"},
        headers=admin,
    )
    assert configured.status_code == 200, configured.text
    fast.settings.feed_retry_base_s = 0.5
    assert fast.feed_outbox is not None
    fast.feed_outbox.queue.policy.max_attempts["feed_delivery"] = 4  # type: ignore[index]
    receiver.down = True
    driver = await make_driver(fast, unique_plate())
    assert (await exit_after(fast, gate, lot, driver.plate, timedelta(minutes=70)))["action"]

    async def entry_failed_thrice() -> tuple[Any, Any] | None:
        """The entry after its third attempt, and its exit as it waits (not in a worker's
        hands)."""
        (entry,) = await _deliveries(fast, lot, "session_started")
        async with fast.pool.acquire() as conn:
            exit_ = await conn.fetchrow(
                """SELECT o.attempts, o.dead_at, o.last_error FROM feed_deliveries d
                   JOIN outbox o ON o.kind = 'feed_delivery' AND o.ref_id = d.id
                   WHERE d.car_park_id = $1 AND d.topic = 'session_ended'
                     AND o.locked_until IS NULL""",
                lot.id,
            )
        waiting = exit_ and exit_["last_error"] == "waits for the stay's start to be delivered"
        return (entry, exit_) if entry["attempts"] >= 3 and waiting else None

    entry, exit_ = await eventually(entry_failed_thrice, timeout_s=20)
    assert entry["dead_at"] is None and entry["attempts"] == 3, entry
    assert (exit_["attempts"], exit_["dead_at"]) == (0, None), "waiting is no attempt"

    receiver.down = False

    async def both_taken() -> list[Any]:
        taken = [r for r in receiver.taken() if r.json["eventType"] in ("entry", "exit")]
        return taken if len(taken) == 2 else []

    first, second = await eventually(both_taken, timeout_s=20)
    assert (first.json["eventType"], second.json["eventType"]) == ("entry", "exit")
    (exit_,) = await _deliveries(fast, lot, "session_ended")
    assert (exit_["status"], exit_["attempts"], exit_["dead_at"]) == ("sent", 1, None)
    assert [r.event_id for r in receiver.received].count(str(exit_["id"])) == 1


async def test_an_admin_retrying_an_exit_that_died_with_its_entry_retries_both(
    fast: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    gate: GateProbe,
    lot: Lot,
    receiver: Receiver,
) -> None:
    admin = await _admin(fast, app, lot)
    configured = await api.put(
        "/api/v1/operator/city-platform",
        json={"endpoint": receiver.url, "key": "city-platform-key-retry-exit-01"},
        headers=admin,
    )
    assert configured.status_code == 200, configured.text
    assert fast.feed_outbox is not None
    fast.feed_outbox.queue.policy.max_attempts["feed_delivery"] = 2  # type: ignore[index]
    receiver.down = True
    driver = await make_driver(fast, unique_plate())
    assert (await exit_after(fast, gate, lot, driver.plate, timedelta(minutes=70)))["action"]

    async def both_dead() -> dict[str, Any]:
        rows = {
            topic: r
            for topic in ("session_started", "session_ended")
            for r in await _deliveries(fast, lot, topic)
        }
        dead = len(rows) == 2 and all(r["status"] == "dead" for r in rows.values())
        return rows if dead else {}

    dead = await eventually(both_dead)
    assert str(dead["session_ended"]["id"]) not in {r.event_id for r in receiver.received}
    receiver.down = False
    exit_job = dead["session_ended"]["job_id"]
    retried = await api.post(f"/api/v1/operator/jobs/{exit_job}/retry", headers=admin)
    assert retried.status_code == 200, retried.text

    async def both_taken() -> list[Any]:
        taken = [r for r in receiver.taken() if r.json["eventType"] in ("entry", "exit")]
        return taken if len(taken) == 2 else []

    first, second = await eventually(both_taken)
    assert (first.json["eventType"], second.json["eventType"]) == ("entry", "exit")
    async with fast.pool.acquire() as conn:
        detail = await conn.fetchval(
            "SELECT detail FROM audit_log WHERE action = 'job.retried' AND subject = $1",
            f"outbox:{exit_job}",
        )
    assert detail["retried_with"] == [dead["session_started"]["job_id"]]


async def test_the_city_platform_gets_a_heartbeat_of_free_spaces_without_changes(
    fast: Runtime,
    app: FastAPI,
    api: httpx.AsyncClient,
    lot: Lot,
    receiver: Receiver,
) -> None:
    admin = await _admin(fast, app, lot)
    key = "city-platform-key-heartbeat-0001"
    configured = await api.put(
        "/api/v1/operator/city-platform", json={"endpoint": receiver.url, "key": key}, headers=admin
    )
    assert configured.status_code == 200
    fast.settings.feed_city_heartbeat_s = 0.2

    async def beats() -> list[Any]:
        taken = [r for r in receiver.taken() if r.json["parkCode"] == lot.code]
        return taken if len(taken) >= 2 else []

    for beat in await eventually(beats, timeout_s=20):
        assert beat.signed_with(key)
        assert beat.json["eventType"] == "spaces" and beat.json["freeSpaces"] == 50
    assert len({beat.event_id for beat in await beats()}) == len(await beats())


async def test_finished_deliveries_are_pruned_pending_ones_never(
    runtime: Runtime, lot: Lot
) -> None:
    old = {"sent": 8, "skipped": 8, "dead": 31, "pending": 400}
    async with runtime.pool.acquire() as conn:
        subscription = await conn.fetchval(
            """INSERT INTO feed_subscriptions (operator_id, format, endpoint, secret, topics)
               VALUES ($1, 'apds', 'http://127.0.0.1:9/x', 'whsec_x', ARRAY['occupancy'])
               RETURNING id""",
            lot.operator_id,
        )
        ids = {}
        for status, days in {**old, "recent_dead": 10}.items():
            ids[status] = await conn.fetchval(
                """INSERT INTO feed_deliveries (subscription_id, topic, car_park_id, status,
                                                created_at)
                   VALUES ($1, 'occupancy', $2, $3, now() - make_interval(days => $4))
                   RETURNING id""",
                subscription,
                lot.id,
                "dead" if status == "recent_dead" else status,
                days,
            )
    counts = await retention.prune(
        runtime.pool, retention.Retention.from_settings(runtime.settings), datetime.now(UTC)
    )
    # (The worker's hourly pass, run at its start, may have pruned them first.)
    assert counts["feed_deliveries"] >= 0
    async with runtime.pool.acquire() as conn:
        left = {
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM feed_deliveries WHERE id = ANY($1)", list(ids.values())
            )
        }
    assert {status for status, row_id in ids.items() if row_id in left} == {
        "pending",
        "recent_dead",
    }


async def test_charges_and_feed_deliveries_have_workers_of_their_own(runtime: Runtime) -> None:
    assert runtime.feed_outbox is not None
    async with runtime.pool.acquire() as conn:
        job = await conn.fetchval(
            "INSERT INTO outbox (kind, ref_id) VALUES ('feed_delivery', -1) RETURNING id"
        )
    # The charges' worker never claims it; the feeds' worker does (and finds no delivery).
    assert "charge" in runtime.outbox.queue.kinds
    assert "feed_delivery" not in runtime.outbox.queue.kinds
    assert runtime.feed_outbox.queue.kinds == ["feed_delivery"]

    async def done() -> bool:
        async with runtime.pool.acquire() as conn:
            return bool(
                await conn.fetchval("SELECT done_at IS NOT NULL FROM outbox WHERE id = $1", job)
            )

    await eventually(done)
    assert runtime.feed_outbox.stats.failures == 0
    claimed = await runtime.outbox.queue.claim(50)
    assert all(j.kind != "feed_delivery" for j in claimed)
    await runtime.outbox.queue.release((j.id, j.attempts) for j in claimed)


async def test_feed_bookkeeping_commits_without_waiting_for_the_disk_and_money_does(
    runtime: Runtime,
) -> None:
    """A delivery's marks (sent, due, dead) are done again if a crash loses them (the receiver
    drops repeats by event id): the feeds' connections commit without waiting for the WAL's
    flush, which the lanes' commits share. Everything else, money first, waits for it."""
    assert runtime.feeds is not None
    async with runtime.feeds.pool.acquire() as conn:
        assert await conn.fetchval("SHOW synchronous_commit") == "off"
    async with runtime.pool.acquire() as conn:
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
    async with runtime.outbox.pool.acquire() as conn:
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
