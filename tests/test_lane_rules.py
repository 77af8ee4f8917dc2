"""The exit decision's pure plate resolution (parking.lanes.rules.resolve_plate), without a
database: what a misread simulation builds on."""

from gate_controller.protocol import CameraRead
from parking.lanes.reading import ocr_reading
from parking.lanes.rules import (
    Certainty,
    ExitRead,
    identity_color,
    is_certain,
    priced_color,
    resolve_plate,
)
from plate_recognition.grammar import Candidate, candidates_from_text
from plate_recognition.pipeline import Recognition

CERTAINTY = Certainty(ocr_score=0.995, camera_scores={"cheap-cam": 0.995}, camera_default=0.98)


def camera(
    plate: str, score: float, color: str | None = "blue", model: str | None = None
) -> ExitRead:
    return ExitRead((Candidate(plate, score),), color, "camera", model, plate)


def test_a_certain_read_needs_its_sources_score_a_colour_and_a_plate_of_that_colour() -> None:
    assert is_certain(camera("浙A12345", 0.98), CERTAINTY)
    assert not is_certain(camera("浙A12345", 0.97), CERTAINTY)
    assert not is_certain(camera("浙A12345", 0.99, model="cheap-cam"), CERTAINTY)
    assert not is_certain(camera("浙A12345", 0.99, color=None), CERTAINTY)
    assert not is_certain(camera("浙A12345", 0.99, color="green"), CERTAINTY)  # 7 characters
    assert is_certain(camera("浙AD12345", 0.99, color="green"), CERTAINTY)
    ocr = ExitRead((Candidate("浙A12345", 0.99),), "blue", "ocr")
    assert not is_certain(ocr, CERTAINTY)


def _frame(plate: str, color: str | None, sure: bool) -> Recognition:
    return Recognition(
        "fused", "scene", (Candidate(plate, 0.999),), color, raw=plate, color_sure=sure
    )


def test_a_server_read_is_certain_of_a_vehicle_only_with_a_colour_a_frame_showed_surely() -> None:
    """The server's score calibrates the characters; a blue and a yellow 浙A12345 are two
    vehicles. A colour only guessed, or taken from the doubtful camera, leaves it uncertain."""
    doubtful = CameraRead(plate="浙A12345", color="blue", confidence=0.6)
    shown = ocr_reading(doubtful, [_frame("浙A12345", "yellow", True)] * 2, None)
    assert (shown.color, shown.color_sure, is_certain(shown, CERTAINTY)) == ("yellow", True, True)
    # A colour shown surely outranks more frames that only guess another.
    mixed = [_frame("浙A12345", "blue", False)] * 2 + [_frame("浙A12345", "yellow", True)]
    assert ocr_reading(doubtful, mixed, None).color == "yellow"
    for frames in ([_frame("浙A12345", "blue", False)], [_frame("浙A12345", None, False)]):
        read = ocr_reading(doubtful, frames, None)
        assert (read.color, read.color_sure, is_certain(read, CERTAINTY)) == ("blue", False, False)
    # Frames that surely show two colours show none surely; a car behind shows nothing of it.
    torn = [_frame("浙A12345", "blue", True), _frame("浙A12345", "yellow", True)]
    behind = [_frame("浙A12345", None, False)] * 2 + [_frame("浙B67890", "blue", True)]
    for frames in (torn, torn[::-1], behind):
        assert not ocr_reading(doubtful, frames, None).color_sure
    # A small new-energy plate's eight characters settle its colour (green); a large one's are
    # a green or a yellow plate's (a lorry's yellow-green), two vehicles.
    green = ocr_reading(None, [_frame("浙AD12345", "green", False)], None)
    assert is_certain(green, CERTAINTY)
    for guessed in ("green", "yellow"):
        large = ocr_reading(None, [_frame("浙A12345D", guessed, False)], None)
        assert not is_certain(large, CERTAINTY)
        shown = ocr_reading(None, [_frame("浙A12345D", guessed, True)], None)
        assert is_certain(shown, CERTAINTY)


def test_a_certain_read_is_its_own_vehicle_or_none_here() -> None:
    parked = {("浙A12345", "blue"): True, ("浙A1234S", "blue"): True}
    exact = resolve_plate(camera("浙A12345", 0.99), parked, (), CERTAINTY)
    assert (exact.status, exact.identity, exact.reads_certain) == (
        "exact",
        ("浙A12345", "blue"),
        True,
    )
    yellow = resolve_plate(camera("浙A12345", 0.99, "yellow"), parked, (), CERTAINTY)
    assert (yellow.status, yellow.identity) == ("no_entry", ("浙A12345", "yellow"))
    gone = resolve_plate(camera("浙B99999", 0.99), {}, {("浙B99999", "blue")}, CERTAINTY)
    assert (gone.status, gone.left) == ("exact", True)


def test_a_read_that_is_not_certain_needs_a_unique_match_with_a_margin() -> None:
    parked = {("浙U58871", "blue"): True, ("浙U5B871", "blue"): True}
    for score in (0.8, 0.95):
        assert resolve_plate(camera("浙U5B871", score), parked, (), CERTAINTY).status == (
            "ambiguous"
        )
    alone = resolve_plate(camera("浙U5B871", 0.95), {("浙U5B871", "blue"): True}, (), CERTAINTY)
    assert (alone.status, alone.certain, alone.reads_certain) == ("fuzzy", False, False)
    # No colour read: a blue car and a yellow lorry with these characters are both candidates.
    two = {("浙U5B871", "blue"): True, ("浙U5B871", "yellow"): True}
    assert resolve_plate(camera("浙U5B871", 0.95, None), two, (), CERTAINTY).status == "ambiguous"


def test_a_valid_plate_not_parked_here_is_a_car_with_no_entry_record() -> None:
    parked = {("浙W61245", "blue"): True}
    for stranger in ("皖W61245", "浙W6124S"):
        read = ExitRead(tuple(candidates_from_text(stranger, 0.6)), "blue", "camera")
        resolved = resolve_plate(read, parked, (), CERTAINTY)
        assert (resolved.status, resolved.identity) == ("no_entry", (stranger, "blue"))
    assert resolve_plate(ExitRead((), None, "none"), parked, (), CERTAINTY).status == "unreadable"


def test_colours_of_stays_and_prices_follow_the_plate_type() -> None:
    assert identity_color("浙A12345", "green") == "blue"
    assert identity_color("浙AD12345", None) == "green"
    assert identity_color("浙A12345", "yellow") == "yellow"
    assert priced_color("浙A12345", "green", vouched=False) is None
    assert priced_color("浙AD12345", "green", vouched=False) == "green"
    assert priced_color("浙A12345D", "green", vouched=False) is None  # or a yellow lorry's
    assert priced_color("浙A12345D", "green", vouched=True) == "green"
    assert priced_color("浙A12345", "yellow", vouched=True) == "yellow"
