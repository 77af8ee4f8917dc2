"""Grammar-constrained CTC decoding (synthetic recogniser outputs: no model, no data)."""

from __future__ import annotations

import numpy as np
import pytest

from plate_recognition.ctc import class_masks, constrained_positions
from plate_recognition.grammar import rank_candidates, template_candidates, templates

# A tiny alphabet: blank, two provinces, letters, digits.
CHARS = ["", "皖", "浙", "A", "M", "T", "D", "1", "2", "3", "4", "5", "0"]
ORDINARY = templates("blue")[0][0]


def _frames(*columns: dict[str, float]) -> np.ndarray:
    """One row per frame: the given symbol shares, the rest of the mass on blank."""
    probs = np.zeros((len(columns), len(CHARS)))
    for t, column in enumerate(columns):
        for ch, p in column.items():
            probs[t, CHARS.index(ch)] = p
        probs[t, 0] = 1.0 - probs[t].sum()
    return probs


BLANK: dict[str, float] = {}
# 皖A12345 where the smudged province glyph looks like an "M" to the model.
SMUDGED = _frames(
    BLANK,
    {"M": 0.4, "T": 0.1, "D": 0.06, "A": 0.05, "皖": 0.04, "浙": 0.01},
    BLANK,
    {"A": 0.9},
    BLANK,
    {"1": 0.9},
    BLANK,
    {"2": 0.9},
    BLANK,
    {"3": 0.9},
    BLANK,
    {"4": 0.9},
    BLANK,
    {"5": 0.9},
    BLANK,
)


def _greedy(probs: np.ndarray) -> list[list[tuple[str, float]]]:
    """Per character the top four symbols, as the engine's greedy decode offers them."""
    out = []
    for row in probs:
        if row.argmax() != 0:
            nonblank = row[1:] / row[1:].sum()
            top = np.argsort(-nonblank)[:4]
            out.append([(CHARS[i + 1], float(nonblank[i])) for i in top if nonblank[i] > 0])
    return out


def test_a_province_read_as_a_letter_is_recovered() -> None:
    # Greedy decoding offers no province: the grammar can only mark it unknown.
    greedy = rank_candidates(_greedy(SMUDGED), "blue")
    assert greedy[0].plate == "?A12345"
    found = constrained_positions(SMUDGED, CHARS, class_masks(CHARS, ORDINARY))
    assert found is not None
    positions, ratio = found
    assert [alts[0][0] for alts in positions] == list("皖A12345")
    # The province is ranked among provinces only: 皖 0.04 against 浙 0.01.
    assert positions[0][0][1] == pytest.approx(0.8)
    assert positions[0][1] == ("浙", pytest.approx(0.2))
    # The path had to take 皖 (0.04) where M (0.4) was likelier: a tenth of the best path.
    assert ratio == pytest.approx(0.1)
    best = template_candidates(positions, ORDINARY, 1.0, 3)
    assert best[0].plate == "皖A12345"


def test_a_dropped_character_is_found_where_blank_won() -> None:
    # The "3" never beats blank, so greedy reads six characters.
    probs = SMUDGED.copy()
    row = CHARS.index("3")
    probs[9, row], probs[9, 0] = 0.3, 0.7
    assert len(_greedy(probs)) == 6
    found = constrained_positions(probs, CHARS, class_masks(CHARS, ORDINARY))
    assert found is not None
    assert "".join(alts[0][0] for alts in found[0]) == "皖A12345"


def test_too_few_frames_for_the_template() -> None:
    assert constrained_positions(SMUDGED[:5], CHARS, class_masks(CHARS, ORDINARY)) is None
