"""Lot simulation: exits read with realistic OCR confusions must never match wrongly."""

from __future__ import annotations

import random

from plate_recognition.grammar import (
    DIGITS,
    LETTERS,
    PROVINCES,
    candidates_from_text,
)
from plate_recognition.matching import CONFUSION_GROUPS, PROVINCE_GROUPS, match, plate_distance

SEED = 20240611
LOTS = 25
PARKED = 200
EXITS_PER_LOT = 60
STRANGERS_PER_LOT = 15  # cars with no entry record: any match is a wrong match


def _confusable(ch: str, rng: random.Random) -> str:
    groups = [g for g in (*CONFUSION_GROUPS, *PROVINCE_GROUPS) if ch in g]
    if not groups:
        return ch
    return rng.choice([c for c in rng.choice(groups) if c != ch])


def _synthetic_plate(rng: random.Random) -> str:
    province = rng.choice("皖皖皖苏浙沪京豫")
    if rng.random() < 0.15:
        return (
            province
            + rng.choice(LETTERS)
            + rng.choice("DF")
            + "".join(rng.choice(LETTERS + DIGITS) for _ in range(1))
            + "".join(rng.choice(DIGITS) for _ in range(4))
        )
    return province + rng.choice(LETTERS) + "".join(rng.choice(LETTERS + DIGITS) for _ in range(5))


def _misread(plate: str, rng: random.Random) -> str:
    """What the camera reports: mostly right, sometimes one or two realistic errors."""
    chars = list(plate)
    r = rng.random()
    if r < 0.80:
        return plate
    if r < 0.90:  # one confusable substitution
        i = rng.randrange(1, len(chars))
        chars[i] = _confusable(chars[i], rng)
    elif r < 0.94:  # two confusable substitutions
        for i in rng.sample(range(1, len(chars)), 2):
            chars[i] = _confusable(chars[i], rng)
    elif r < 0.97:  # province glyph swapped for any other
        chars[0] = rng.choice([p for p in PROVINCES if p != chars[0]])
    else:  # a dropped character
        del chars[rng.randrange(len(chars))]
    return "".join(chars)


def _plate_pool(rng: random.Random, real: list[str]) -> list[str]:
    pool = set(real)
    while len(pool) < 4000:
        pool.add(_synthetic_plate(rng))
    return sorted(pool)


def test_distance_costs() -> None:
    assert plate_distance("皖A12345", "皖A12345") == 0
    assert plate_distance("皖A1234B", "皖A12348") < plate_distance("皖A1234C", "皖A12348")
    assert plate_distance("沪A12345", "浙A12345") < plate_distance("沪A12345", "皖A12345")
    assert plate_distance("皖A1235", "皖A12345") == 0.8


def test_ambiguous_when_two_parked_plates_fit() -> None:
    result = match(candidates_from_text("皖A1234B"), ["皖A12348", "皖A1234B", "苏E00000"])
    assert result.status == "exact" or result.status == "ambiguous"
    result = match(candidates_from_text("皖A1234X"), ["皖A12348", "皖A1234B"])
    assert result.status in ("ambiguous", "no_match")
    assert result.plate is None


def test_simulated_lots_never_match_wrongly(real_plates: list[str]) -> None:
    rng = random.Random(SEED)
    pool = _plate_pool(rng, real_plates)
    right = wrong = unmatched = stranger_matched = 0
    for _ in range(LOTS):
        parked = rng.sample(pool, PARKED)
        parked_set = set(parked)
        for plate in rng.sample(parked, EXITS_PER_LOT):
            read = _misread(plate, rng)
            result = match(candidates_from_text(read, 0.9), parked, raw=read)
            if result.plate == plate:
                right += 1
            elif result.plate is None:
                unmatched += 1
            else:
                wrong += 1
        strangers = [p for p in rng.sample(pool, STRANGERS_PER_LOT * 2) if p not in parked_set]
        for plate in strangers[:STRANGERS_PER_LOT]:
            read = _misread(plate, rng)
            if match(candidates_from_text(read, 0.9), parked, raw=read).plate is not None:
                stranger_matched += 1
    exits = right + wrong + unmatched
    print(
        f"matched right {right}/{exits} = {right / exits:.4f}, to operator {unmatched}, "
        f"wrong {wrong}, strangers matched {stranger_matched}"
    )
    assert wrong == 0
    assert stranger_matched == 0
    assert right / exits >= 0.99
