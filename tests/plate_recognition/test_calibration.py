"""Calibrated scores: the fit is monotone in [0, 1], the bound is honest, and the shipped
table's certain threshold holds on a small seeded sample of degraded photos."""

from __future__ import annotations

import json
import random
from pathlib import Path

import cv2
import pytest

from plate_recognition import calibration
from plate_recognition.calibration import (
    Calibrator,
    calibrate_candidates,
    certain_threshold,
    choose_threshold,
    expected_calibration_error,
    fit_isotonic,
    upper_bound,
)
from plate_recognition.evaluate import calibrate, collect_reads
from plate_recognition.grammar import Candidate
from plate_recognition.pipeline import recognise

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _synthetic_reads(n: int, seed: int = 7) -> tuple[list[float], list[bool]]:
    """Raw scores whose true precision is score**3 (over-confident, like a raw reader)."""
    rng = random.Random(seed)
    scores = [rng.random() for _ in range(n)]
    return scores, [rng.random() < s**3 for s in scores]


def test_isotonic_fit_is_monotone_and_a_probability() -> None:
    scores, hits = _synthetic_reads(5000)
    knots = fit_isotonic(scores, hits)
    xs = [x for x, _ in knots]
    ys = [y for _, y in knots]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    assert ys == sorted(ys)
    assert all(0.0 < y < 1.0 for y in ys)  # shrunk: never claims certainty outright
    cal = Calibrator(tuple(xs), tuple(ys))
    grid = [cal(i / 1000) for i in range(-10, 1011)]
    assert grid == sorted(grid) and all(0.0 <= v <= 1.0 for v in grid)
    # Calibrated, it tracks the true precision (score**3) far better than the raw score.
    assert cal(0.5) == pytest.approx(0.125, abs=0.06)
    calibrated = [cal(s) for s in scores]
    ece_raw = expected_calibration_error(scores, hits)
    ece_cal = expected_calibration_error(calibrated, hits)
    assert ece_raw is not None and ece_cal is not None and ece_cal < ece_raw / 3


def test_shipped_table_is_monotone_in_unit_interval() -> None:
    cal = calibration.calibrator("rapidocr")
    assert cal is not None, "plate_recognition/calibration.json has no rapidocr table"
    grid = [cal(i / 2000) for i in range(2001)]
    assert grid == sorted(grid)
    assert all(0.0 <= v <= 1.0 for v in grid)
    assert 0.5 < certain_threshold() < 1.0
    assert certain_threshold("no-such-engine") == calibration.NOT_CERTAIN


def test_calibrated_candidates_keep_order_and_ratios() -> None:
    cands = (Candidate("皖A12345", 0.8), Candidate("皖A1234S", 0.4), Candidate("皖A12B45", 0.1))
    out = calibrate_candidates(cands, "rapidocr")
    assert [c.plate for c in out] == [c.plate for c in cands]
    assert out[0].score == pytest.approx(calibration.calibrate_score(0.8, "rapidocr"))
    assert out[1].score / out[0].score == pytest.approx(0.5)
    assert calibrate_candidates((), "rapidocr") == ()
    assert calibrate_candidates(cands, "no-such-engine") == cands


def test_clopper_pearson_upper_bound() -> None:
    assert upper_bound(0, 30_000) == pytest.approx(3.0 / 30_000, rel=0.01)
    assert upper_bound(0, 10) == pytest.approx(1 - 0.05**0.1)
    # Known values: 1 in 100 → 4.66 %, 5 in 1,000 → 1.05 % (one-sided 95 %).
    assert upper_bound(1, 100) == pytest.approx(0.0466, abs=2e-4)
    assert upper_bound(5, 1000) == pytest.approx(0.0105, abs=2e-4)
    assert upper_bound(3, 3) == 1.0 and upper_bound(0, 0) == 1.0


def test_threshold_needs_enough_error_free_reads() -> None:
    # 40,000 reads at 0.99 or more, none wrong: 3/40,000 < 1e-4, so 0.99 is certain.
    scores = [0.99] * 40_000 + [0.9] * 1000 + [0.5] * 1000
    wrong = [False] * 40_000 + [True] + [False] * 999 + [True] * 300 + [False] * 700
    choice = choose_threshold(scores, wrong)
    assert choice["reached"] and choice["threshold"] == 0.99
    assert choice["reads_above"] == 40_000 and choice["wrong_valid_above"] == 0
    # 1,000 error-free reads cannot show 1e-4: the bound reached is reported, not the target.
    small = choose_threshold(scores[39_000:], wrong[39_000:])
    assert not small["reached"] and small["threshold"] == 0.99
    assert small["upper95"] == pytest.approx(upper_bound(0, 1000))


def test_shipped_threshold_reads_no_wrong_valid_plate_on_a_seeded_sample(
    plate_data: Path, plate_rows: list[dict[str, str]]
) -> None:
    """20 photos, clean and under every gate condition with seeds the table was not
    fitted on: nothing at or above the certain threshold is a different valid plate."""
    rows = collect_reads(plate_data, seeds=1, seed_start=9001, limit=20, progress=False)
    assert len(rows) == 20 * 7
    certain = certain_threshold()
    above = [r for r in rows if r["score"] >= certain]
    assert above, "no read is certain at all"
    assert not [r for r in above if r["wrong_valid"]]
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)


def test_a_small_plate_is_never_certain() -> None:
    """A plate under SMALL_PLATE_PX pixels high shows S and 5, B and 8 a pixel apart: however
    sure the engines, its read stays just below the certain threshold."""
    certain = certain_threshold("fused")
    sure = (Candidate("皖A28579", 1.0), Candidate("皖A28S79", 0.01))
    near = calibrate_candidates(sure, "fused", plate_px=24)
    assert near[0].score >= certain
    for plate_px in (9, 12, calibration.SMALL_PLATE_PX - 0.5):
        far = calibrate_candidates(sure, "fused", plate_px=plate_px)
        assert far[0].score < certain
        assert far[0].score == pytest.approx(certain, abs=1e-5)  # still a very likely read
        assert far[1].score / far[0].score == pytest.approx(0.01)


def test_a_small_plate_read_from_a_photo_is_not_certain() -> None:
    """The same photo read at its own size and shrunk to a distant plate's: both read surely,
    only the first is certain; the second stays below a lower threshold the lane may be set
    to as well. Each read says how high the plate was."""
    image = cv2.imread(str(FIXTURES / "plate_wanAD2Y34.jpg"), cv2.IMREAD_COLOR)
    near = recognise(image, kind_hint="crop")
    assert near.plate == "皖AD2Y34" and near.plate_px == image.shape[0]
    assert near.confidence >= certain_threshold()
    h, w = image.shape[:2]
    small = cv2.resize(image, (w * 14 // h, 14), interpolation=cv2.INTER_AREA)
    far = recognise(small, kind_hint="crop")
    assert far.plate == "皖AD2Y34" and far.plate_px == 14
    assert calibration.calibrate_score(far.raw_score, "fused") >= certain_threshold(), (
        "read as surely as the near one: only its size keeps it from certain"
    )
    assert far.confidence < certain_threshold()
    lower = certain_threshold() - 0.01
    assert recognise(small, kind_hint="crop", certain_score=lower).confidence < lower


def test_an_engine_without_a_table_reads_no_small_plate_certain() -> None:
    sure = (Candidate("皖A28579", 1.0),)
    assert calibrate_candidates(sure, "no-such-engine", plate_px=24)[0].score == 1.0
    assert calibrate_candidates(sure, "no-such-engine", plate_px=10)[0].score < 1.0


def _saved_reads(path: Path, reads: list[tuple[float, bool, float | None]]) -> Path:
    """Reads as `parking plates calibrate --save-reads` writes them: (raw score, exact, the
    plate's height or None for a read saved without it)."""
    lines = []
    for seed, (raw, exact, plate_px) in enumerate(reads):
        row = {
            "file": "x.jpg", "condition": "distant", "seed": seed, "kind": "crop",
            "color": "blue", "truth": "皖A28S79", "read": "皖A28S79" if exact else "皖A28579",
            "raw_score": raw, "exact": exact, "wrong_valid": not exact, "ms": 1, "cpu_ms": 1,
        }  # fmt: skip
        lines.append(json.dumps(row | ({} if plate_px is None else {"plate_px": plate_px})))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_threshold_is_chosen_on_plates_that_can_be_certain(tmp_path: Path) -> None:
    """A wrong read of a small plate scored above every read of larger ones does not push the
    certain threshold over them: it can never be certain. Saved without its size, it does."""
    larger = [(0.999, True, 24.0)] * 400 + [(0.95, True, 24.0)] * 400 + [(0.9, False, 24.0)]
    thresholds = {}
    for name, plate_px in (("small", 11.0), ("size unknown", None)):
        reads = _saved_reads(tmp_path / "reads.jsonl", [*larger, (0.99, False, plate_px)])
        result = calibrate("-", "fused", reads=[reads], out=None, progress=False, all_photos=True)
        assert result["threshold"]["wrong_valid_above"] == 0
        thresholds[name] = result["threshold"]["reads_above"]
    # Small: certain from the 0.95 reads up; size unknown: the 0.999 reads alone.
    assert thresholds == {"small": 800, "size unknown": 400}
