from __future__ import annotations

import pytest

from plate_recognition.grammar import (
    candidates_from_text,
    is_valid,
    normalise,
    rank_candidates,
    templates,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("皖A·1A346", "皖A1A346"),
        (" 京ａ 12345 ", "京A12345"),
        ("粤B-D12345", "粤BD12345"),
        ("", None),
        ("hello!", None),
        (None, None),
    ],
)
def test_normalise(raw: str | None, expected: str | None) -> None:
    assert normalise(raw) == expected


@pytest.mark.parametrize(
    ("plate", "color", "ok"),
    [
        ("皖A1A346", None, True),
        ("皖A1A346", "blue", True),
        ("皖A1A346", "green", False),
        ("皖AD12345", "green", True),  # small new-energy: D third
        ("皖A12345F", "green", True),  # large new-energy: F last
        ("皖AD1234X", "green", False),  # last four of a small NEV are digits
        ("京A1234警", None, True),
        ("粤Z1234港", "blue", True),
        ("皖AI2345", None, False),  # I is never issued
        ("皖112345", None, False),  # second position is a letter
        ("XA12345", None, False),
    ],
)
def test_is_valid(plate: str, color: str | None, ok: bool) -> None:
    assert is_valid(plate, color) is ok


def test_position_two_must_be_a_letter_but_stays_ranked() -> None:
    cands = candidates_from_text("皖012345", 0.9, "blue")
    plates = [c.plate for c in cands]
    assert plates[:2] == ["皖D12345", "皖Q12345"]
    assert cands[0].corrected == (1,)
    assert cands[0].score < 0.9  # a corrected character is never as good as a read one


def test_new_energy_digits_are_fixed() -> None:
    cands = candidates_from_text("皖AD1B34S", 0.95, "green")
    assert cands[0].plate == "皖AD18345"
    assert cands[0].corrected == (4, 7)


def test_alternatives_ranked_by_product_of_probabilities() -> None:
    positions = [
        [("皖", 0.99)],
        [("A", 0.98)],
        [("8", 0.6), ("B", 0.4)],
        [("1", 0.99)],
        [("2", 0.99)],
        [("3", 0.99)],
        [("4", 0.99)],
    ]
    cands = rank_candidates(positions, "blue")
    assert [c.plate for c in cands[:2]] == ["皖A81234", "皖AB1234"]
    assert cands[0].score > cands[1].score > 0


def test_spurious_character_is_dropped_and_missing_province_marked() -> None:
    long_read = [[(ch, 0.99)] for ch in "皖A12345"] + [[("1", 0.3)]]
    assert rank_candidates(long_read, "blue")[0].plate == "皖A12345"
    short_read = [[(ch, 0.99)] for ch in "A12345"]
    assert rank_candidates(short_read, "blue")[0].plate == "?A12345"


def test_colour_is_a_soft_prior() -> None:
    seven = [[(ch, 0.99)] for ch in "皖A12345"]
    assert rank_candidates(seven, "green")[0].plate == "皖A12345"


def test_a_sure_colour_keeps_only_its_shapes() -> None:
    sure_green = templates("green", color_sure=True)
    assert sure_green and all(len(t) == 8 and prior == 1.0 for t, prior in sure_green)
    assert {len(t) for t, _ in templates("blue", color_sure=True)} == {7}
    # A guess that is not sure keeps every shape, penalised; no colour keeps every shape.
    assert {len(t) for t, _ in templates("green")} == {7, 8}
    assert templates(None, color_sure=True) == templates(None)


def test_unknown_colour_rejected() -> None:
    with pytest.raises(ValueError):
        is_valid("皖A12345", "purple")
