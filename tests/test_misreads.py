"""`parking-dev bench --misreads` (issue #15, "Measure it"): the misread simulation, and proof
that it decides exits as the lane does (the same cases through the real lane and through
`parking_dev.misreads.decide_exit`)."""

import json
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import cv2
import pytest

from billing import fees
from gate_controller.protocol import CameraRead
from parking.lanes import repository as repo
from parking.lanes.reading import camera_reading
from parking.lanes.repository import CameraOwnRead
from parking.lanes.rules import (
    Certainty,
    FrameRead,
    Identity,
    Verdict,
    Verification,
    frames_to_verify,
    verify_charge,
)
from parking.runtime import Runtime
from parking.settings import Settings
from parking_dev.misreads import (
    COLOUR_OUTCOMES,
    OCR_TABLE_PATH,
    ColourModel,
    MisreadModel,
    OcrModel,
    colour_table,
    decide_exit,
    ocr_table,
    run_misreads,
)
from plate_recognition import calibration
from tests.conftest import Lot, enter, make_driver, set_car_park
from tests.gates import GateProbe

SMALL = MisreadModel(car_parks=40, vehicles=20_000)


def _without_timings(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in ("build_s", "duration_s")}


@pytest.fixture(scope="module")
def small_run() -> dict[str, Any]:
    return run_misreads(Settings(), exits=20_000, seed=15)


def test_a_small_run_charges_no_stranger(small_run: dict[str, Any]) -> None:
    assert small_run["wrong_account_charges"] == 0, small_run["wrong_account_cases"]


def test_a_small_harsh_run_charges_no_stranger(small_run: dict[str, Any]) -> None:
    # Worse cameras, more plates that read wrong the same way, more look-alikes and strangers.
    report = run_misreads(Settings(), exits=20_000, seed=15, model=MisreadModel.harsh())
    assert report["wrong_account_charges"] == 0, report["wrong_account_cases"]
    harsher = report["by_misread_kind"]["consistent"]["exits"]
    assert harsher > 3 * small_run["by_misread_kind"]["consistent"]["exits"]


def test_a_small_run_counts_add_up(small_run: dict[str, Any]) -> None:
    report = small_run
    assert report["exits"] == 20_000
    assert sum(report["by_outcome"].values()) == report["exits"]
    assert report["needs_person"] + report["auto_exits"] == report["exits"]
    kinds = report["by_misread_kind"].values()
    assert sum(k["exits"] for k in kinds) == report["exits"]
    assert sum(k.get("needs_person", 0) for k in kinds) == report["needs_person"]
    assert (
        sum(k.get("wrong_account_charges", 0) for k in kinds) == (report["wrong_account_charges"])
    )
    listed = [c for c in report["wrong_account_cases"] if not c["awaiting_confirmation"]]
    assert len(listed) == report["wrong_account_charges"]
    # Every automatic charge rests on two certain reads: an exact match of a certain entry.
    assert all(c["resolution"] == "exact" and c["entry_certain"] for c in listed)
    # The model's misreads happen: consistent ones, random ones, strangers, double reads.
    names = set(report["by_misread_kind"])
    for kind in ("clean", "consistent", "random_char", "hard_frame", "unreadable"):
        assert kind in names, kind
    assert any(n.startswith("stranger_") for n in names)
    assert any(n.startswith("double_read_") for n in names)
    assert report["by_outcome"]["exited_pay_later"] > 0


def test_a_run_is_the_same_for_its_seed() -> None:
    first = run_misreads(Settings(), exits=3_000, seed=7, model=SMALL)
    again = run_misreads(Settings(), exits=3_000, seed=7, model=SMALL)
    other = run_misreads(Settings(), exits=3_000, seed=8, model=SMALL)
    assert _without_timings(first) == _without_timings(again)
    assert _without_timings(first) != _without_timings(other)


# The lane and the simulation decide alike.


async def _simulated(
    runtime: Runtime, lot: Lot, plate: str | None, confidence: float, color: str
) -> tuple[str, int | None, int | None]:
    """What the simulation decides for this exit read, given the lane's records as they are."""
    settings = runtime.settings
    camera = (
        CameraRead(plate=plate, color=color, confidence=confidence)  # type: ignore[arg-type]
        if plate
        else None
    )
    reading = camera_reading(camera, settings.camera_min_confidence, False)
    assert reading is not None
    at = datetime.now(UTC)
    async with runtime.pool.acquire() as conn, conn.transaction():
        parked, left = await repo.cars_here(
            conn, lot.id, at - timedelta(seconds=settings.duplicate_read_window_s), at
        )
        stays = {i: await repo.open_session_for_update(conn, lot.id, *i) for i in parked}
        versions = await fees.tariff_versions(conn, lot.id)
        gate = await conn.fetchrow(
            "SELECT no_entry_policy, no_entry_fee_fen, uncertain_exit_policy FROM car_parks"
            " WHERE id = $1",
            lot.id,
        )

    def stay_of(identity: Identity) -> repo.OpenSession | None:
        return stays.get(identity)

    _, plan = decide_exit(
        reading,
        parked,
        set(left),
        stay_of,
        Certainty.from_settings(settings),
        versions,
        at=at,
        no_entry_fee_fen=(
            gate["no_entry_fee_fen"] if gate["no_entry_policy"] == "fixed_fee" else None
        ),
        car_park_policy=gate["uncertain_exit_policy"],
    )
    rule = plan.rule
    # What the gate is told: a held stay's fee and debts, an exit's fee, nothing otherwise.
    shown = (
        None
        if rule is None
        else rule.fee_fen
        if rule.charge_to or plan.outcome == "exited_free"
        else rule.due_fen
    )
    return plan.outcome, shown, rule.charge_to[0] if rule and rule.charge_to else None


async def _lane(
    runtime: Runtime, gate: GateProbe, lot: Lot, plate: str | None, confidence: float, color: str
) -> tuple[str, int | None, int | None]:
    capture = gate.capture("out", plate, confidence=confidence, color=color)
    command = await gate.decide(lot.code, "out1", capture)
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow(
            """SELECT c.outcome, ch.account_id AS charged FROM captures c
               LEFT JOIN charges ch ON ch.session_id = c.session_id
                   AND c.outcome LIKE 'exited_%'
               WHERE c.capture_id = $1""",
            capture.capture_id,
        )
    return row["outcome"], command.get("fee_fen"), row["charged"]


CASES = {
    # name: (entries [(plate, confidence, colour, minutes)], exit (plate, confidence, colour),
    #        car park policies, bound plates)
    "certain_both": ([("浙M3M001", 0.99, "blue", 90)], ("浙M3M001", 0.99, "blue"), {}, True),
    "uncertain_both": ([("浙M3M002", 0.85, "blue", 90)], ("浙M3M002", 0.85, "blue"), {}, True),
    "uncertain_hold": (
        [("浙M3M003", 0.85, "blue", 90)],
        ("浙M3M003", 0.92, "blue"),
        {"uncertain_exit_policy": "hold"},
        True,
    ),
    "certain_entry_doubtful_exit": (
        [("浙M3M004", 0.99, "blue", 90)],
        ("浙M3M004", 0.95, "blue"),
        {},
        True,
    ),
    "yellow_both": ([("浙M3M005", 0.99, "yellow", 90)], ("浙M3M005", 0.99, "yellow"), {}, True),
    "short_stay": ([("浙M3M006", 0.99, "blue", 0)], ("浙M3M006", 0.99, "blue"), {}, True),
    "unbound": ([("浙M3M007", 0.99, "blue", 90)], ("浙M3M007", 0.99, "blue"), {}, False),
    "lookalikes_doubtful": (
        [("浙U38871", 0.99, "blue", 90), ("浙U3B871", 0.99, "blue", 90)],
        ("浙U3B871", 0.95, "blue"),
        {},
        True,
    ),
    "lookalike_no_entry": (
        [("浙M3M0B8", 0.99, "blue", 90)],
        ("浙M3M088", 0.99, "blue"),
        {},
        True,
    ),
    "no_entry_fixed_fee": (
        [("浙M3M009", 0.99, "blue", 90)],
        ("皖M3M009", 0.99, "blue"),
        {"no_entry_policy": "fixed_fee", "no_entry_fee_fen": 1000},
        True,
    ),
    "unreadable": ([("浙M3M010", 0.99, "blue", 90)], (None, 0.0, "blue"), {}, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_the_lane_and_the_simulation_decide_alike(
    runtime: Runtime, gate: GateProbe, lot: Lot, case: str
) -> None:
    entries, (plate, confidence, color), policies, bound = CASES[case]
    if policies:
        await set_car_park(runtime, lot, **policies)
    drivers = {}
    for entry_plate, *_ in entries:
        if bound:
            drivers[entry_plate] = await make_driver(runtime, entry_plate)
    for entry_plate, entry_confidence, entry_color, minutes in entries:
        await enter(
            runtime,
            gate,
            lot,
            entry_plate,
            confidence=entry_confidence,
            color=entry_color,
            parked_for=timedelta(minutes=minutes),
        )

    simulated = await _simulated(runtime, lot, plate, confidence, color)
    decided = await _lane(runtime, gate, lot, plate, confidence, color)
    assert decided == simulated, case

    if decided[0].startswith("exited_"):
        # The same car read again at once: both call it the same car leaving.
        again = await _simulated(runtime, lot, plate, confidence, color)
        assert again[0] == "duplicate_read"
        assert (await _lane(runtime, gate, lot, plate, confidence, color))[0] == again[0]


# The rule a charge's verification applies (the worker's and the simulation's), and the
# simulated server reader against what it was measured to read.


def test_a_charge_is_verified_only_when_no_frame_contradicts_and_each_unsure_end_agrees() -> None:
    plate = ("浙M3M011", "blue")
    rules = Verification(agree_score=0.9, contradict_score=0.9)
    agree = FrameRead("浙M3M011", 0.95, "blue", color_sure=True)
    unsure, nothing = FrameRead("浙M3M011", 0.5), None
    assert verify_charge(plate, ((agree,), (unsure, agree)), rules) == Verdict("verified")
    # A proven end (None) needs no frame; an unproven one with none, or none sure, is a person's.
    assert verify_charge(plate, (nothing, (agree,)), rules) == Verdict("verified")
    assert verify_charge(plate, ((agree,), ()), rules) == Verdict(
        "unconfirmed", "no_second_reader", "exit"
    )
    assert verify_charge(plate, ((unsure,), (agree,)), rules) == Verdict(
        "unconfirmed", "no_agreeing_frame", "entry"
    )
    # Another valid plate, or the plate in another colour, read with confidence on any frame.
    other = FrameRead("浙M3M017", 0.93, "blue")
    assert verify_charge(plate, ((agree, other), (agree,)), rules) == Verdict(
        "refuted", "another_vehicle", "entry"
    )
    yellow = FrameRead("浙M3M011", 0.97, "yellow")
    assert verify_charge(plate, ((agree,), (agree, yellow)), rules) == Verdict(
        "refuted", "another_vehicle", "exit"
    )
    # Unsure misreads and unreadable frames contradict nothing.
    weak = FrameRead("浙M3M017", 0.6, "blue")
    assert verify_charge(plate, ((agree, weak), (agree, FrameRead(None, 0.0))), rules) == (
        Verdict("verified")
    )


def test_a_colour_the_characters_do_not_settle_needs_a_frame_that_shows_it() -> None:
    """Eight characters settle green only in a small new-energy plate's form: a large one's
    (five digits, then D or F) are a green or a yellow lorry's plate. A camera that says
    green at both gates is one reader of the colour, as for seven characters."""
    rules = Verification(agree_score=0.9, contradict_score=0.9)
    for plate in ("浙A12345D", "浙M3M011"):
        color = "green" if len(plate) == 8 else "blue"
        unseen = FrameRead(plate, 0.97, None)
        shown = FrameRead(plate, 0.97, color, color_sure=True)
        assert verify_charge((plate, color), ((unseen,), (unseen,)), rules) == Verdict(
            "unconfirmed", "colour_unconfirmed", "entry"
        )
        assert verify_charge((plate, color), ((shown,), (shown,)), rules) == Verdict("verified")
    small = FrameRead("浙AD12345", 0.97, None)
    assert verify_charge(("浙AD12345", "green"), ((small,), (small,)), rules) == Verdict("verified")


def test_a_small_plates_frames_may_refute_a_charge_but_never_vouch_for_it() -> None:
    """A plate a few pixels high: the camera and the server see the same pixels, and a D read
    as 0 by one is read so by the other. Its frames neither agree nor settle an end, however
    sure; a frame of it that reads another vehicle still refutes."""
    plate = ("浙AD2Y34", "blue")
    rules = Verification(agree_score=0.9, contradict_score=0.9, certain_score=0.99)
    small_sure = FrameRead("浙AD2Y34", 0.999, "blue", True, small=True)
    large_sure = FrameRead("浙AD2Y34", 0.999, "blue", True)
    assert verify_charge(plate, ((large_sure,), (large_sure,)), rules) == Verdict("verified")
    assert verify_charge(plate, ((small_sure,), (large_sure,)), rules) == Verdict(
        "unconfirmed", "plate_too_small", "entry"
    )
    small_unsure = FrameRead("浙AD2Y34", 0.5, "blue", small=True)
    assert verify_charge(plate, ((small_unsure,), (large_sure,)), rules) == Verdict(
        "unconfirmed", "no_agreeing_frame", "entry"
    )
    # Settled by a large frame read surely, an end is not undone by a small one agreeing.
    assert verify_charge(plate, ((large_sure, small_sure), (large_sure,)), rules) == Verdict(
        "verified"
    )
    small_other = FrameRead("浙A02Y34", 0.95, "blue", small=True)
    assert verify_charge(
        plate, ((large_sure,), (FrameRead("浙AD2Y34", 0.95), small_other)), rules
    ) == (Verdict("refuted", "another_vehicle", "exit"))


def test_an_unproven_end_needs_a_frame_that_surely_shows_the_colour() -> None:
    """A yellow 浙M3M011 the camera took for blue at both gates, its frames read in a light
    that shows no colour surely: the characters agree at both ends, yet only the camera named
    the colour, and the blue plate's holder would pay for the lorry. A green plate's eight
    characters settle its colour; a proven end needs no frame."""
    plate = ("浙M3M011", "blue")
    rules = Verification(agree_score=0.9, contradict_score=0.9, certain_score=0.99)
    colourless = FrameRead("浙M3M011", 0.999, None)
    guessed = FrameRead("浙M3M011", 0.97, "blue")
    sure = FrameRead("浙M3M011", 0.97, "blue", color_sure=True)
    assert verify_charge(plate, ((colourless, guessed), (sure,)), rules) == Verdict(
        "unconfirmed", "colour_unconfirmed", "entry"
    )
    assert verify_charge(plate, ((guessed, sure), (colourless,)), rules) == Verdict(
        "unconfirmed", "colour_unconfirmed", "exit"
    )
    # Settled by a sure read of its characters, an end still needs its colour shown.
    assert verify_charge(plate, (None, (colourless,)), rules) == Verdict(
        "unconfirmed", "colour_unconfirmed", "exit"
    )
    # A sure colour on a frame read as another plate (a car behind) shows nothing of this one;
    # on a frame of this plate with one character misread, it does.
    behind = FrameRead("浙B5K017", 0.4, "blue", color_sure=True)
    assert verify_charge(plate, ((guessed, behind), (sure,)), rules).reason == (
        "colour_unconfirmed"
    )
    misread = FrameRead("浙M3M0D1", 0.4, "blue", color_sure=True)
    assert verify_charge(plate, ((guessed, misread), (sure,)), rules) == Verdict("verified")
    assert verify_charge(plate, ((guessed, sure), (colourless, sure)), rules) == (
        Verdict("verified")
    )
    assert verify_charge(plate, (None, (sure,)), rules) == Verdict("verified")
    green = ("浙AD12345", "green")
    assert verify_charge(
        green, ((FrameRead("浙AD12345", 0.97, None),), (FrameRead("浙AD12345", 0.97),)), rules
    ) == Verdict("verified")


def test_frames_that_disagree_on_the_colour_leave_the_charge_to_a_person() -> None:
    """A yellow plate the camera took for blue at both gates: the stay is the blue plate's, and
    five of its six frames show blue. The one yellow frame is weakly read, but the colour is
    half the identity and no score calibrates it."""
    plate = ("浙M3M011", "blue")
    rules = Verification(agree_score=0.95, contradict_score=0.9, certain_score=0.99)
    sure = FrameRead("浙M3M011", 0.999, "blue", color_sure=True)
    yellow = FrameRead("浙M3M0D1", 0.35, "yellow", color_sure=True)
    colour_differs = Verdict("unconfirmed", "colour_differs", "entry")
    assert verify_charge(plate, ((sure, yellow, sure), (sure, sure, sure)), rules) == (
        colour_differs
    )
    # Beside a proven end (no frames to weigh) too.
    assert verify_charge(plate, (None, (sure, yellow)), rules) == Verdict(
        "unconfirmed", "colour_differs", "exit"
    )
    # A frame that reads another vehicle surely still refutes.
    other = FrameRead("浙M3M017", 0.999, "blue", color_sure=True)
    assert verify_charge(plate, ((sure, yellow), (other,)), rules).outcome == "refuted"
    # A colour that is only the likelier guess, or none, takes no part; nor a frame without
    # a plate.
    guessed = FrameRead("浙M3M0D1", 0.35, "yellow", color_sure=False)
    unseen = FrameRead("浙M3M0D1", 0.35, None)
    no_plate = FrameRead(None, 0.0, "yellow", color_sure=True)
    assert verify_charge(plate, ((sure, guessed, unseen), (sure, no_plate)), rules) == (
        Verdict("verified")
    )


def test_an_end_the_server_decided_counts_its_frames_only_when_the_camera_named_the_car() -> None:
    # Before, an end the server's reader decided was never corroborated (always unconfirmed).
    identity = ("浙M3M011", "blue")
    frames = (FrameRead("浙M3M011", 0.95, "blue", True),)
    rules = Verification(agree_score=0.9, contradict_score=0.9)

    def end(source: str, camera: CameraOwnRead | None) -> Any:
        return frames_to_verify(identity, False, source, frames, camera)

    named = CameraOwnRead("浙M·3M011", "blue", 0.85, "cam")
    assert end("ocr", named) == frames
    assert verify_charge(identity, (end("ocr", named), None), rules) == Verdict("verified")
    assert end("ocr", CameraOwnRead("浙M3M011", None, 0.4)) == frames  # no colour reported
    # Another plate, or the plate in another colour: the readers disagree, a person decides
    # (an uncalibrated camera's read refutes nothing).
    for other in (
        CameraOwnRead("浙M3M017", "blue", 0.85),
        CameraOwnRead("浙M3M011", "yellow", 0.85),
    ):
        assert end("ocr", other) == ()
        assert verify_charge(identity, (end("ocr", other), None), rules) == Verdict(
            "unconfirmed", "no_second_reader", "entry"
        )
    # No camera read: the server reading its own frames again is no second reader.
    assert end("ocr", None) == ()
    assert end("camera", None) == frames
    assert frames_to_verify(identity, True, "ocr", frames, None) is None


def test_the_simulated_server_reader_reads_as_it_was_measured() -> None:
    ocr = OcrModel.load()
    table = json.loads(OCR_TABLE_PATH.read_text(encoding="utf-8"))["conditions"]
    rng = random.Random(15)
    for condition in ("clean", "night", "jpeg"):
        rows = table[condition]
        reads = sum(r[2] + r[3] + r[4] for r in rows)
        drawn = [ocr.draw(rng, condition) for _ in range(20_000)]
        exact = sum(o == "exact" for o, _ in drawn) / len(drawn)
        assert abs(exact - sum(r[2] for r in rows) / reads) < 0.015, condition
        sure_wrong = sum(o == "wrong_valid" and s >= 0.9 for o, s in drawn) / len(drawn)
        measured = sum(r[3] for r in rows if r[0] >= 0.9) / reads
        assert abs(sure_wrong - measured) < 0.004, condition


def test_the_simulated_frames_show_the_colour_as_the_reader_was_measured_to() -> None:
    table = json.loads(OCR_TABLE_PATH.read_text(encoding="utf-8"))["colour"]
    colour = ColourModel(table)
    rng = random.Random(15)
    for condition in ("clean", "glare_rain", "motion_blur"):
        counts = table["conditions"][condition]
        drawn = Counter(colour.draw(rng, condition) for _ in range(20_000))
        for outcome, n in zip(COLOUR_OUTCOMES, counts, strict=True):
            assert abs(drawn[outcome] / 20_000 - n / sum(counts)) < 0.01, (condition, outcome)
    assert colour.frame_colour("sure", "yellow") == ("yellow", True)
    assert colour.frame_colour("other_sure", "yellow") == ("blue", True)
    assert colour.frame_colour("other_guess", "blue") == ("yellow", False)
    assert colour.frame_colour("none", "blue") == (None, False)


def test_the_colour_table_counts_what_the_reader_shows_of_each_photo(tmp_path: Path) -> None:
    """A photo of a blue plate, and the same photo in night mode (monochrome): clean, the one
    shows blue surely and the other no colour; every condition counts both once a seed."""
    photo = Path(__file__).parent / "fixtures" / "plate_wanAD2Y34.jpg"
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "colour.jpg").write_bytes(photo.read_bytes())
    grey = cv2.cvtColor(cv2.imread(str(photo), cv2.IMREAD_GRAYSCALE), cv2.COLOR_GRAY2BGR)
    cv2.imwrite(str(tmp_path / "images" / "grey.png"), grey)
    (tmp_path / "labels.csv").write_text(
        "file,plate,color,kind,corners,source\n"
        "images/colour.jpg,皖AD2Y34,blue,crop,,test\n"
        "images/grey.png,皖AD2Y34,blue,crop,,test\n",
        encoding="utf-8",
    )
    table = colour_table(tmp_path, seeds=2)
    assert table["columns"] == list(COLOUR_OUTCOMES)
    assert table["conditions"]["clean"] == [1, 0, 1, 0, 0]
    assert all(sum(counts) == 4 for c, counts in table["conditions"].items() if c != "clean")


def test_the_measured_table_has_sorted_disjoint_bins_with_one_starting_at_certain(
    tmp_path: Path,
) -> None:
    """The certain threshold is an edge wherever it falls among the fixed ones (it fell below
    0.998 and 0.999 with the fused reader: unsorted edges put certain reads in a bin that
    started below it, so the simulation drew most of them as uncertain)."""
    reads = tmp_path / "reads.jsonl"
    lines = [
        {"condition": "clean", "raw_score": k / 400, "exact": True, "wrong_valid": False}
        for k in range(401)
    ]
    reads.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    rows = ocr_table(reads)["conditions"]["clean"]
    assert sum(sum(r[2:]) for r in rows) == len(lines)
    assert all(low < high for low, high, *_ in rows)
    assert all(a[1] <= b[0] for a, b in pairwise(rows))
    threshold = calibration.certain_threshold()
    certain = [r for r in rows if r[0] >= threshold]
    assert certain and certain[0][0] == threshold
