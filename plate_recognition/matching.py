"""Match a plate read against the plates parked in a lot, confusion-aware.

Charging the wrong account is the worst failure, so a fuzzy match is accepted only when
it is close to the read *and* clearly closer than any other parked plate; everything
else goes to an operator as ``ambiguous`` or ``no_match``. Distances are a weighted edit
distance whose substitution costs reflect what OCR actually confuses (0/D/Q, 8/B, ...).

A read that is itself a plausible plate (grammatical as read, nothing corrected, its
province known) is never bent onto a look-alike: "no entry record" explains it as well as
a misread does, so it matches only a parked plate it equals, or one the reader itself
offers among its alternatives while its own top candidate is weak. Different provinces are
different cars: a read whose province is known never matches another province's plate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from plate_recognition.grammar import PROVINCES, Candidate, is_valid

MatchStatus = Literal["exact", "fuzzy", "ambiguous", "no_match"]

# Groups of characters OCR confuses with each other on plates.
CONFUSION_GROUPS: tuple[str, ...] = (
    "0DQOU",
    "8B3",
    "2Z",
    "5S",
    "17TIJL",
    "6G",
    "4A",
    "CG",
    "MN",
    "VY",
    "EF",
    "KX",
    "PR",
    "HN",
    "UV",
)
# Province glyphs that share a radical or outline and get swapped by recognisers.
PROVINCE_GROUPS: tuple[str, ...] = (
    "沪津湘浙渝",  # the water radical 氵
    "晋陕",
    "吉青",
    "京宁",
    "贵赣",
    "鄂鲁",
)
CONFUSABLE_COST = 0.35
PROVINCE_LOOKALIKE_COST = 0.45
#: Province glyphs are the hardest to read: any swap is cheaper than a serial swap.
PROVINCE_COST = 0.7
UNKNOWN_PROVINCE_COST = 0.5
SUBSTITUTION_COST = 1.0
INDEL_COST = 0.8
#: Cost per natural-log unit by which a candidate's score is below the top candidate's.
RANK_WEIGHT = 0.3
#: Defaults tuned on the seeded lot simulation in tests/plate_recognition/test_matching.py.
MAX_DISTANCE = 1.0
MIN_MARGIN = 0.6
#: Below this score a plausible read's own top candidate is weak enough for one of the
#: reader's alternatives (never a mere look-alike) to be the plate.
WEAK_TOP_SCORE = 0.5

_PAIR_COST: dict[tuple[str, str], float] = {}
for _group, _cost in [(g, CONFUSABLE_COST) for g in CONFUSION_GROUPS] + [
    (g, PROVINCE_LOOKALIKE_COST) for g in PROVINCE_GROUPS
]:
    for _a in _group:
        for _b in _group:
            if _a != _b:
                _PAIR_COST[(_a, _b)] = min(_cost, _PAIR_COST.get((_a, _b), _cost))


def substitution_cost(a: str, b: str) -> float:
    """Cost of reading ``a`` where the plate says ``b`` (symmetric)."""
    if a == b:
        return 0.0
    pair = _PAIR_COST.get((a, b))
    if pair is not None:
        return pair
    if a == "?" or b == "?":
        return UNKNOWN_PROVINCE_COST
    if a in PROVINCES and b in PROVINCES:
        return PROVINCE_COST
    return SUBSTITUTION_COST


def plate_distance(read: str, plate: str, cutoff: float = math.inf) -> float:
    """Weighted edit distance; ``inf`` as soon as it is certain to exceed ``cutoff``."""
    n, m = len(read), len(plate)
    if abs(n - m) * INDEL_COST > cutoff:
        return math.inf
    if n == m and cutoff < 2 * INDEL_COST:
        # Equal lengths: any alignment with indels needs two of them, already over the
        # cutoff, so the substitution-only (Hamming) cost is exact -- and much cheaper.
        total = 0.0
        for a, b in zip(read, plate, strict=True):
            if a != b:
                total += substitution_cost(a, b)
                if total > cutoff:
                    return math.inf
        return total
    # Only a couple of indels can stay under any sensible cutoff: a band keeps it cheap
    # (the lane matches every read against every parked plate).
    band = min(max(n, m), int(cutoff / INDEL_COST) + 1) if cutoff < math.inf else max(n, m)
    inf = math.inf
    prev = [j * INDEL_COST if j <= band else inf for j in range(m + 1)]
    for i in range(1, n + 1):
        a = read[i - 1]
        cur = [i * INDEL_COST if i <= band else inf] + [inf] * m
        row_min = cur[0]
        for j in range(max(1, i - band), min(m, i + band) + 1):
            b = plate[j - 1]
            sub = prev[j - 1] + (0.0 if a == b else substitution_cost(a, b))
            best = min(sub, prev[j] + INDEL_COST, cur[j - 1] + INDEL_COST)
            cur[j] = best
            if best < row_min:
                row_min = best
        if row_min > cutoff:
            return inf
        prev = cur
    return prev[m]


@dataclass(frozen=True, slots=True)
class MatchResult:
    """Outcome of matching: ``plate`` is set only for ``exact``/``fuzzy``.

    ``distance`` is the best parked plate's cost, ``margin`` the gap to the runner-up
    (``inf`` when there is none); ``ranked`` lists the closest parked plates for the
    operator's exception queue.
    """

    status: MatchStatus
    plate: str | None
    distance: float
    margin: float
    ranked: tuple[tuple[str, float], ...] = ()

    @property
    def matched(self) -> bool:
        return self.plate is not None


def _as_pairs(candidates: Iterable[Candidate | tuple[str, float]]) -> list[tuple[str, float]]:
    pairs = [(c.plate, c.score) if isinstance(c, Candidate) else (c[0], c[1]) for c in candidates]
    return sorted(((p, s) for p, s in pairs if p), key=lambda ps: -ps[1])


def _top(candidates: Sequence[Candidate | tuple[str, float]]) -> Candidate | None:
    best: Candidate | None = None
    for c in candidates:
        cand = c if isinstance(c, Candidate) else Candidate(c[0], c[1])
        if cand.plate and (best is None or cand.score > best.score):
            best = cand
    return best


def plausible_plate(candidate: Candidate) -> bool:
    """Whether a read is a plate on its own: grammatical as read (nothing corrected) with its
    province read. Such a read is never bent onto a look-alike (see `match`)."""
    return (
        not candidate.corrected and candidate.plate[:1] in PROVINCES and is_valid(candidate.plate)
    )


def same_province(read: str, plate: str) -> bool:
    """False when the read's province is known and differs: another province's plate is
    another car. An unread province ("?") contradicts nothing."""
    return read[:1] not in PROVINCES or read[:1] == plate[:1]


def match(
    candidates: Sequence[Candidate | tuple[str, float]],
    parked_plates: Iterable[str],
    *,
    raw: str | None = None,
    max_distance: float = MAX_DISTANCE,
    min_margin: float = MIN_MARGIN,
    max_candidates: int = 5,
    weak_top_score: float = WEAK_TOP_SCORE,
) -> MatchResult:
    """Match ranked read candidates against the plates currently parked.

    Each parked plate costs the cheapest over candidates of (edit distance + a penalty
    growing with how far the candidate ranks below the top one). The best plate is
    accepted only if its cost is at most ``max_distance`` and the runner-up's cost is at
    least ``min_margin`` higher; ``raw`` (the engine's unconstrained text) is a last-
    resort candidate for reads the grammar could not parse (e.g. a dropped character).

    Parked plates of another province than the top candidate's are never considered. When
    the top candidate is a plausible plate (`plausible_plate`), the best parked plate is
    accepted only if it *is* that plate, or if it is one of the reader's own alternatives
    and the top candidate scored below ``weak_top_score``; otherwise the read is a car with
    no entry record (``no_match``), whatever parked plate it resembles.
    """
    head = _top(candidates)
    province = (head.plate if head is not None else raw or "")[:1]
    parked_plates = [p for p in parked_plates if same_province(province, p)]
    pairs = _as_pairs(candidates)[:max_candidates]
    top = pairs[0][1] if pairs else 1.0
    reads = [(p, RANK_WEIGHT * math.log(max(top, 1e-12) / max(s, 1e-12))) for p, s in pairs]
    if raw and all(raw != p for p, _ in reads):
        reads.append((raw, 0.0 if not reads else RANK_WEIGHT))
    if not reads:
        return MatchResult("no_match", None, math.inf, math.inf)
    # Plates costing this much can neither match nor spoil a margin: stop computing them.
    cutoff = max_distance + min_margin - 1e-9
    costs: list[tuple[float, str]] = []
    for plate in set(parked_plates):
        best = math.inf
        for read, penalty in reads:
            if penalty < min(best, cutoff + 1e-9):
                best = min(best, penalty + plate_distance(read, plate, cutoff - penalty))
        if best <= cutoff:
            costs.append((best, plate))
    costs.sort()
    ranked = tuple((p, round(c, 4)) for c, p in costs[:5])
    if not costs:
        return MatchResult("no_match", None, math.inf, math.inf, ranked)
    best_cost, best_plate = costs[0]
    margin = costs[1][0] - best_cost if len(costs) > 1 else math.inf
    if best_cost > max_distance:
        return MatchResult("no_match", None, best_cost, margin, ranked)
    if province not in PROVINCES:
        # Without its province the read cannot tell the parked car from another province's
        # car with the same letters: that is for a person.
        return MatchResult("no_match", None, best_cost, margin, ranked)
    if head is not None and best_plate not in {p for p, _ in pairs}:
        # Only a plate the reader (or the grammar's correction of what it read) offers: a
        # parked plate that differs where the read was a valid character is a look-alike.
        return MatchResult("no_match", None, best_cost, margin, ranked)
    if (
        head is not None
        and plausible_plate(head)
        and best_plate != head.plate
        and head.score >= weak_top_score
    ):
        # The read is a valid plate that is not parked here: "no entry record" explains it as
        # well as a misread of a look-alike does. Never bend it.
        return MatchResult("no_match", None, best_cost, margin, ranked)
    if margin < min_margin:
        return MatchResult("ambiguous", None, best_cost, margin, ranked)
    status: MatchStatus = "exact" if best_cost == 0.0 else "fuzzy"
    return MatchResult(status, best_plate, best_cost, margin, ranked)
