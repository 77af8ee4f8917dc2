"""Calibrated plate scores: the reader's raw score → the measured probability that the
read is exactly right.

A reader's raw score is a product of per-character probabilities and grammar penalties:
it ranks candidates well but is not a probability (a blurred plate can come out as a
different, valid plate scored 0.9). ``calibration.json`` (shipped beside this module,
rebuilt by ``parking plates calibrate PATH``) holds, per engine, a monotone table fitted
by isotonic regression (pool adjacent violators) on reads of the labelled photos, clean
and under every gate condition of :mod:`plate_recognition.conditions`, and the *certain*
threshold: the lowest calibrated score above which different-valid-plate reads stayed
≤ 1 in 10,000 by the one-sided 95 % Clopper-Pearson upper bound.

:func:`calibrate_candidates` is applied by :func:`plate_recognition.pipeline.recognise`,
so the top candidate's ``score`` IS the calibrated probability; the other candidates keep
their raw ratio to it (ranking and matching margins unchanged). An engine without a table
keeps its raw scores and has no certain threshold (1.0: nothing it reads is certain).
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from plate_recognition.engines import DEFAULT_ENGINE
from plate_recognition.grammar import Candidate

TABLE_PATH = Path(__file__).resolve().parent / "calibration.json"
#: The wrong-valid-plate rate a certain read must stay under (DESIGN.md step 5).
TARGET_WRONG_RATE = 1e-4
#: Confidence of the one-sided upper bound on that rate.
CONFIDENCE = 0.95
#: Nothing is certain when the table is missing: no read passes a threshold above 1.
NOT_CERTAIN = 1.0


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True, slots=True)
class Calibrator:
    """Piecewise-linear monotone map from raw score to calibrated probability."""

    raw: tuple[float, ...]
    calibrated: tuple[float, ...]

    def __call__(self, score: float) -> float:
        xs, ys = self.raw, self.calibrated
        if not xs:
            return min(1.0, max(0.0, score))
        if score <= xs[0]:
            return ys[0]
        if score >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, score)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 if x1 == x0 else y0 + (y1 - y0) * (score - x0) / (x1 - x0)


def load_table(path: Path = TABLE_PATH) -> dict[str, Any]:
    if not path.is_file():
        return {"engines": {}}
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    data.setdefault("engines", {})
    return data


@lru_cache(maxsize=8)
def calibrator(engine: str) -> Calibrator | None:
    """The shipped calibrator for ``engine`` (``None`` when it has no table)."""
    entry = load_table()["engines"].get(engine)
    if not entry:
        return None
    knots = entry["knots"]
    return Calibrator(tuple(k[0] for k in knots), tuple(k[1] for k in knots))


@lru_cache(maxsize=8)
def certain_threshold(engine: str = DEFAULT_ENGINE) -> float:
    """The shipped *certain* threshold on the calibrated score of ``engine`` (the default
    of the lane's ``plate_certain_score``); 1.0 when the engine is not calibrated."""
    entry = load_table()["engines"].get(engine)
    return float(entry["certain_threshold"]) if entry else NOT_CERTAIN


#: A plate fewer pixels high than this is never read *certain*. Its characters are then under
#: about 10 pixels high, and what tells S from 5, B from 8 or D from 0 is a pixel or two: every
#: engine can agree on the wrong one. Of the 25 highest-scored wrong valid reads of held-out
#: seeds 0-15, 12 were distant crops 8-12 pixels high (15 % of the reads), and on new seeds two
#: such reads (皖A28S79 read 皖A28579, 皖AC129B read 皖AC1298) went past the threshold fitted
#: there (docs/plate-reading.md).
SMALL_PLATE_PX = 16.0


def is_small_plate(plate_px: float | None) -> bool:
    """A plate this small (its height in the image's pixels) is never certain; ``None`` or 0
    (size unknown) is not small."""
    return plate_px is not None and 0 < plate_px < SMALL_PLATE_PX


def calibrate_score(
    score: float, engine: str, plate_px: float | None = None, certain_score: float | None = None
) -> float:
    """``score``'s calibrated probability; a small plate's (:data:`SMALL_PLATE_PX`) is kept
    just below the certain threshold: the engine's, or ``certain_score`` (the one the caller
    decides with) when that is lower."""
    cal = calibrator(engine)
    calibrated = cal(score) if cal else min(1.0, max(0.0, score))
    threshold = certain_threshold(engine)
    if certain_score is not None:
        threshold = min(threshold, certain_score)
    return capped(calibrated, plate_px, threshold)


def capped(score: float, plate_px: float | None, threshold: float) -> float:
    """``score``, kept just below the certain ``threshold`` when the plate is small."""
    return min(score, max(0.0, threshold - 1e-6)) if is_small_plate(plate_px) else score


def calibrate_candidates(
    candidates: Sequence[Candidate],
    engine: str,
    plate_px: float | None = None,
    certain_score: float | None = None,
) -> tuple[Candidate, ...]:
    """The top candidate's score replaced by its calibrated probability (:func:`calibrate_score`;
    an engine without a table keeps its raw score, a small plate's kept below certain), the
    others scaled by the same factor (their order and ratios to the top are kept)."""
    if not candidates:
        return ()
    top = candidates[0].score
    new_top = calibrate_score(top, engine, plate_px, certain_score)
    factor = new_top / top if top > 0 else 0.0
    return tuple(
        Candidate(c.plate, new_top if i == 0 else min(new_top, c.score * factor), c.corrected)
        for i, c in enumerate(candidates)
    )


# --------------------------------------------------------------------------- statistics


def _log_binom_cdf(k: int, n: int, p: float) -> float:
    """log P(X ≤ k) for X ~ Binomial(n, p), summed in log space."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 0.0 if k >= n else -math.inf
    lp, lq = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    terms = [
        base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
        for i in range(k + 1)
    ]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


def upper_bound(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on a rate seen ``k`` times in ``n``.

    With ``k = 0`` it is ``1 - (1 - confidence) ** (1 / n)`` ≈ 3/n at 95 %.
    """
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    alpha = 1.0 - confidence
    if k == 0:
        return 1.0 - alpha ** (1.0 / n)
    target = math.log(alpha)
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _log_binom_cdf(k, n, mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def fit_isotonic(scores: Sequence[float], hits: Sequence[bool]) -> list[tuple[float, float]]:
    """Monotone (non-decreasing) knots ``(raw score, probability)`` by pool adjacent
    violators. Each pooled block's probability is shrunk to ``(k + 1) / (n + 2)`` (a block
    of 300 exact reads is 0.9967, not 1.0) and kept monotone by a running maximum; its knot
    sits at the block's mean raw score, the extremes at its lowest and highest."""
    pairs = sorted(zip(scores, hits, strict=True))
    blocks: list[list[float]] = []  # [sum hits, count, sum score, min score, max score]
    for s, h in pairs:
        blocks.append([float(h), 1.0, s, s, s])
        while len(blocks) > 1 and (
            blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]
            or blocks[-2][4] == blocks[-1][3]  # equal scores belong to one block
        ):
            b = blocks.pop()
            a = blocks[-1]
            a[0] += b[0]
            a[1] += b[1]
            a[2] += b[2]
            a[4] = b[4]
    knots: list[tuple[float, float]] = []
    running = 0.0
    for i, (k, n, total, lo, hi) in enumerate(blocks):
        running = max(running, (k + 1) / (n + 2))
        x = lo if i == 0 else hi if i == len(blocks) - 1 else total / n
        if knots and x <= knots[-1][0]:
            knots[-1] = (knots[-1][0], running)
        else:
            knots.append((x, running))
    if len(blocks) == 1:
        k, n, _, lo, hi = blocks[0]
        knots = [(lo, running), (hi, running)] if hi > lo else [(lo, running)]
    return [(round(x, 6), round(y, 6)) for x, y in knots]


def expected_calibration_error(
    scores: Sequence[float], hits: Sequence[bool], bins: int = 10
) -> float | None:
    """Σ over equal-width score bins of (share of reads) × |exact rate − mean score|."""
    if not scores:
        return None
    sums: list[list[float]] = [[0.0, 0.0, 0.0] for _ in range(bins)]
    for s, h in zip(scores, hits, strict=True):
        b = sums[min(bins - 1, max(0, int(s * bins)))]
        b[0] += 1
        b[1] += h
        b[2] += s
    n = len(scores)
    return sum(c / n * abs(k / c - t / c) for c, k, t in sums if c)


#: Bin edges of the printed reliability table (calibrated score).
RELIABILITY_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 1.0)


def reliability_table(
    scores: Sequence[float], exact: Sequence[bool], wrong_valid: Sequence[bool]
) -> list[dict[str, Any]]:
    """Per score bin: reads, exact, wrong valid plate, precision, mean score and the upper
    bound on the wrong-valid-plate rate."""
    rows = []
    edges = RELIABILITY_EDGES
    for lo, hi in itertools.pairwise(edges):
        idx = [i for i, s in enumerate(scores) if lo <= s < hi or (hi == 1.0 and s == 1.0)]
        n = len(idx)
        k = sum(exact[i] for i in idx)
        w = sum(wrong_valid[i] for i in idx)
        rows.append(
            {
                "bin": f"[{lo:g}, {hi:g}{']' if hi == 1.0 else ')'}",
                "reads": n,
                "exact": k,
                "wrong_valid": w,
                "precision": round(k / n, 6) if n else None,
                "mean_score": round(sum(scores[i] for i in idx) / n, 6) if n else None,
                "wrong_valid_upper95": round(upper_bound(w, n), 6) if n else None,
            }
        )
    return rows


def choose_threshold(
    scores: Sequence[float], wrong_valid: Sequence[bool], target: float = TARGET_WRONG_RATE
) -> dict[str, Any]:
    """The lowest calibrated score t whose reads at or above t have an upper bound on the
    wrong-valid-plate rate ≤ ``target``.

    When no t reaches ``target`` (too few reads), the lowest t above which no wrong valid
    plate was read at all (which gives the smallest bound of any error-free set), and
    ``reached`` is false: the bound actually reached is reported, never the target.
    """
    ordered = sorted(zip(scores, wrong_valid, strict=True), key=lambda sw: -sw[0])
    best_zero: tuple[float, int] | None = None
    chosen: tuple[float, int, int] | None = None
    n = wrong = 0
    i = 0
    while i < len(ordered):
        t = ordered[i][0]
        while i < len(ordered) and ordered[i][0] == t:
            n += 1
            wrong += ordered[i][1]
            i += 1
        if wrong == 0:
            best_zero = (t, n)
        if wrong / n <= target and upper_bound(wrong, n) <= target:
            chosen = (t, n, wrong)
    if chosen is not None:
        t, n_above, w_above = chosen
        reached = True
    elif best_zero is not None:
        t, n_above = best_zero
        w_above, reached = 0, False
    else:
        return {
            "threshold": NOT_CERTAIN,
            "reads_above": 0,
            "wrong_valid_above": 0,
            "upper95": 1.0,
            "reached": False,
            "target": target,
        }
    return {
        # Rounded up: a read scored just below (a wrong one, say) never reaches it.
        "threshold": math.ceil(t * 1e6) / 1e6,
        "reads_above": n_above,
        "wrong_valid_above": w_above,
        "upper95": upper_bound(w_above, n_above),
        "reached": reached,
        "target": target,
    }
