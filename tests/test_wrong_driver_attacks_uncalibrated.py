"""Issue #15's findings (test_wrong_driver_attacks.py) with the production default for
cameras: not calibrated (`camera_default_calibrated` False), so a camera's certain read is
one reader's word."""

from collections.abc import Iterator
from datetime import timedelta

import pytest

from parking.runtime import Runtime
from parking.settings import Settings
from tests.conftest import Lot, enter, make_driver, set_car_park, unique_plate
from tests.gates import GateProbe
from tests.test_wrong_driver_attacks import _backdate_binding, _charges, _debts


@pytest.fixture
def settings(settings: Settings) -> Iterator[Settings]:
    settings.camera_default_calibrated = False
    yield settings


async def test_p1_certain_misread_of_an_uncalibrated_camera_never_becomes_a_debt(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    """A plate that fools an uncalibrated camera the same way at both gates (0.99), bound
    without an agreement: held at the exit, the stranger leaves unpaid, the owner's own car
    comes in later."""
    owner = await make_driver(runtime, unique_plate(), pay_later=False)
    await _backdate_binding(runtime, owner.plate, timedelta(days=30))
    await enter(runtime, gate, lot, owner.plate, confidence=0.99)
    held = await gate.decide(lot.code, "out1", gate.capture("out", owner.plate, confidence=0.99))
    assert held["action"] == "hold"
    await gate.decide(lot.code, "in1", gate.capture("in", owner.plate, confidence=0.99))
    assert await _debts(runtime, owner) == [], "a debt on one uncalibrated reader's word"


async def test_p2_certain_misread_of_an_uncalibrated_camera_without_frames_is_not_charged(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    owner = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, owner.plate, confidence=0.99)
    await gate.decide(lot.code, "out1", gate.capture("out", owner.plate, confidence=0.99))
    (charge,) = await _charges(runtime, owner)
    assert charge["status"] in ("awaiting_confirmation", "awaiting_verification"), charge


async def test_p3_a_hold_car_park_uncertain_hold_never_becomes_a_debt(
    runtime: Runtime, gate: GateProbe, lot: Lot
) -> None:
    await set_car_park(runtime, lot, uncertain_exit_policy="hold")
    owner = await make_driver(runtime, unique_plate())
    await enter(runtime, gate, lot, owner.plate, confidence=0.85)
    held = await gate.decide(lot.code, "out1", gate.capture("out", owner.plate, confidence=0.85))
    assert held["action"] == "hold"
    await gate.decide(lot.code, "in1", gate.capture("in", owner.plate, confidence=0.99))
    assert await _debts(runtime, owner) == []
    assert await _charges(runtime, owner) == []
