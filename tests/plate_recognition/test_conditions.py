"""Gate conditions: seeded degradations are deterministic and each changes the image."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from plate_recognition.conditions import (
    CLEAN,
    CONDITIONS,
    DEGRADATIONS,
    degrade,
    parse_conditions,
    variants,
)


def _synthetic_plate() -> np.ndarray:
    """A blue 94×24 plate with white characters, like the labelled crops."""
    img = np.zeros((24, 94, 3), np.uint8)
    img[:] = (170, 60, 20)
    cv2.putText(img, "A12345", (10, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2)
    return img


@pytest.fixture(params=[None, "crop", "scene"])
def image(request: pytest.FixtureRequest, plate_data: Path) -> np.ndarray:
    if request.param is None:
        return _synthetic_plate()
    rows = (plate_data / "labels.csv").read_text(encoding="utf-8").splitlines()[1:]
    name = next(r.split(",")[0] for r in rows if f",{request.param}," in r)
    loaded = cv2.imread(str(plate_data / name))
    assert loaded is not None
    return loaded


@pytest.mark.parametrize("condition", list(DEGRADATIONS))
def test_degradation_is_deterministic_and_changes_the_image(
    image: np.ndarray, condition: str
) -> None:
    first = degrade(image, condition, "photo.jpg", seed=3)
    again = degrade(image.copy(), condition, "photo.jpg", seed=3)
    assert first.dtype == np.uint8 and first.ndim == 3
    assert np.array_equal(first, again)
    other = degrade(image, condition, "photo.jpg", seed=4)
    assert other.shape != first.shape or not np.array_equal(other, first)
    if first.shape == image.shape:
        diff = np.abs(first.astype(np.int16) - image.astype(np.int16))
        assert diff.mean() > 1.0, f"{condition} barely changed the image"
    else:  # distant and tilt change the size
        assert condition in ("distant", "tilt")
    if condition == "distant":
        assert first.shape[0] <= image.shape[0] // 2 + 1
        assert first.shape[1] <= image.shape[1] // 2 + 1


def test_clean_is_the_image_itself() -> None:
    img = _synthetic_plate()
    assert degrade(img, CLEAN, "x") is img


def test_keys_give_different_copies() -> None:
    img = _synthetic_plate()
    assert not np.array_equal(degrade(img, "night", "a.jpg"), degrade(img, "night", "b.jpg"))


def test_parse_conditions_and_variants() -> None:
    assert parse_conditions("all") == CONDITIONS
    assert parse_conditions("gate") == tuple(DEGRADATIONS)
    assert parse_conditions("clean, night,night") == ("clean", "night")
    with pytest.raises(ValueError, match="fog"):
        parse_conditions("night,fog")
    assert variants(("clean", "jpeg"), 3) == [("clean", 0), ("jpeg", 0), ("jpeg", 1), ("jpeg", 2)]
    with pytest.raises(ValueError):
        degrade(_synthetic_plate(), "fog", "x")
