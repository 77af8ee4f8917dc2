"""Chinese licence plate grammar (GA 36), normalisation and ranked candidate generation.

A plate is a province glyph, an issuing-authority letter and a serial:

* ordinary (blue / yellow / black / white): ``皖A12345`` -- 5 alphanumerics, no I or O;
* ordinary with a use suffix: ``粤Z1234港``, ``京A1234警``, ``沪A1234学`` -- 4 + suffix glyph;
* new energy small car (green, 8 chars): ``皖AD12345`` -- D/F (or A-K pure-electric /
  hybrid letters) third, then one alphanumeric and four digits;
* new energy large vehicle (green/yellow, 8 chars): ``皖A12345D`` -- five digits then D/F.

The module never "silently corrects": :func:`rank_candidates` turns per-position character
alternatives from an OCR engine into a ranked list of grammatical plates with scores,
penalising each positional substitution (``0`` read where a letter must be -> ``D``/``Q``).
"""

from __future__ import annotations

import heapq
import math
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PROVINCES = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼"
#: I and O are never issued: they would be confused with 1 and 0.
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
DIGITS = "0123456789"
ALNUM = LETTERS + DIGITS
SUFFIXES = "警学挂港澳领试超"
#: Third character of small new-energy plates: D/A-C/E pure electric, F/G-K hybrid
#: (GA 36-2018 extended the original D/F set when the D/F serials ran out).
NEV_SMALL_CLASS = "DFABCEGHJK"
NEV_LARGE_CLASS = "DF"
#: Every character any plate can contain; engines restrict their output alphabet to it.
PLATE_CHARSET = PROVINCES + ALNUM + SUFFIXES

COLORS = ("blue", "green", "yellow", "white", "black")

_SEPARATORS = "·•・.-_ \t\r\n:：|'\"`"

# Look-alike substitutions used when a position's character class excludes what was read.
# Costs are multiplicative confidence penalties: a corrected character is never as good
# as one the engine actually read.
_TO_LETTER: dict[str, tuple[tuple[str, float], ...]] = {
    "0": (("D", 0.5), ("Q", 0.3)),
    "O": (("D", 0.4), ("Q", 0.4)),
    "8": (("B", 0.6),),
    "2": (("Z", 0.6),),
    "5": (("S", 0.6),),
    "6": (("G", 0.5),),
    "1": (("T", 0.3), ("J", 0.2)),
    "7": (("T", 0.4),),
    "4": (("A", 0.3),),
    "I": (("J", 0.3), ("T", 0.3)),
    "3": (("B", 0.2),),
}
_TO_DIGIT: dict[str, tuple[tuple[str, float], ...]] = {
    "D": (("0", 0.5),),
    "Q": (("0", 0.5),),
    "O": (("0", 0.7),),
    "U": (("0", 0.3),),
    "B": (("8", 0.6),),
    "Z": (("2", 0.6),),
    "S": (("5", 0.6),),
    "G": (("6", 0.5),),
    "T": (("7", 0.4), ("1", 0.3)),
    "I": (("1", 0.7),),
    "J": (("1", 0.3),),
    "L": (("1", 0.3),),
    "A": (("4", 0.3),),
}
# Within alphanumeric positions only I/O are illegal.
_ALNUM_FIX: dict[str, tuple[tuple[str, float], ...]] = {
    "O": (("0", 0.7), ("D", 0.3), ("Q", 0.2)),
    "I": (("1", 0.7), ("J", 0.2), ("T", 0.2)),
}
#: Penalty for a plate shape the colour guess says is unlikely. Soft, because colour is
#: guessed from pixels under any light, and a hard rule would turn a wrong guess into a
#: wrong plate.
_COLOR_MISMATCH = 0.02
#: Penalty for a province glyph the engine did not offer at all (unknown province).
_MISSING_PROVINCE = 0.05

# Templates: one character class per position.
_ORDINARY = (PROVINCES, LETTERS, ALNUM, ALNUM, ALNUM, ALNUM, ALNUM)
_WITH_SUFFIX = (PROVINCES, LETTERS, ALNUM, ALNUM, ALNUM, ALNUM, SUFFIXES)
_NEV_SMALL = (PROVINCES, LETTERS, NEV_SMALL_CLASS, ALNUM, DIGITS, DIGITS, DIGITS, DIGITS)
_NEV_LARGE = (PROVINCES, LETTERS, DIGITS, DIGITS, DIGITS, DIGITS, DIGITS, NEV_LARGE_CLASS)

_ALL_TEMPLATES = (_ORDINARY, _WITH_SUFFIX, _NEV_SMALL, _NEV_LARGE)
_TEMPLATES_BY_COLOR: dict[str | None, tuple[tuple[str, ...], ...]] = {
    None: _ALL_TEMPLATES,
    "blue": (_ORDINARY, _WITH_SUFFIX),
    "yellow": (_ORDINARY, _WITH_SUFFIX, _NEV_LARGE),
    "green": (_NEV_SMALL, _NEV_LARGE),
    "white": (_ORDINARY, _WITH_SUFFIX),
    "black": (_ORDINARY, _WITH_SUFFIX),
}

#: Per-position alternatives: ``[(char, probability), ...]`` best first.
Alternatives = Sequence[tuple[str, float]]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A grammatical plate with a score in (0, 1]; ``corrected`` lists fixed positions."""

    plate: str
    score: float
    corrected: tuple[int, ...] = ()


def normalise(raw: str | None) -> str | None:
    """Canonical plate text: separators removed, fullwidth to ASCII, uppercase.

    Returns ``None`` for empty input or input containing characters no plate can hold.
    The result is not necessarily grammatical; check with :func:`is_valid`.
    """
    if raw is None:
        return None
    # NFKC folds fullwidth ``ＡＢ１`` to ASCII and leaves CJK glyphs alone.
    text = unicodedata.normalize("NFKC", raw).upper()
    text = "".join(ch for ch in text if ch not in _SEPARATORS)
    if not text or any(ch not in PLATE_CHARSET and ch not in "IO" for ch in text):
        return None
    return text


def _fits(plate: str, template: tuple[str, ...]) -> bool:
    return len(plate) == len(template) and all(
        ch in cls for ch, cls in zip(plate, template, strict=True)
    )


def is_valid(plate: str, color: str | None = None) -> bool:
    """Whether ``plate`` (canonical form) is grammatical, optionally for a plate colour."""
    templates = _TEMPLATES_BY_COLOR.get(color)
    if templates is None:
        raise ValueError(f"unknown plate colour {color!r}")
    return any(_fits(plate, t) for t in templates)


def settled_color(plate: str) -> str | None:
    """The colour the characters alone settle: the one colour whose plates take this form (a
    small new-energy plate's eight: green), else ``None``. A large new-energy plate's eight are
    a green's or a yellow's, and a blue and a yellow 浙A12345 are two vehicles."""
    colors = [color for color in COLORS if is_valid(plate, color)]
    return colors[0] if len(colors) == 1 else None


def _position_options(alts: Alternatives, cls: str) -> list[tuple[str, float, bool]]:
    """Characters allowed by ``cls`` for one position: ``(char, prob, corrected)``."""
    best: dict[str, tuple[float, bool]] = {}

    def offer(ch: str, p: float, corrected: bool) -> None:
        if ch in cls and p > best.get(ch, (0.0, False))[0]:
            best[ch] = (p, corrected)

    for ch, p in alts:
        if ch in cls:
            offer(ch, p, False)
            continue
        if cls == PROVINCES:
            continue
        if cls in (LETTERS, NEV_SMALL_CLASS, NEV_LARGE_CLASS):
            fixes = _TO_LETTER.get(ch, ())
        elif cls == DIGITS:
            fixes = _TO_DIGIT.get(ch, ())
        else:
            fixes = _ALNUM_FIX.get(ch, ())
        for fixed, penalty in fixes:
            offer(fixed, p * penalty, True)
    if cls == PROVINCES and not best:
        # Province unreadable: keep the plate alive as a low-score "?" so matching can
        # still compare the rest of it against parked plates.
        best["?"] = (_MISSING_PROVINCE, True)
    return [(ch, p, c) for ch, (p, c) in sorted(best.items(), key=lambda kv: -kv[1][0])]


def _best_products(
    options: list[list[tuple[str, float, bool]]], limit: int
) -> list[tuple[float, str, tuple[int, ...]]]:
    """Top ``limit`` combinations by product of probabilities (lazy best-first search)."""
    if any(not opts for opts in options):
        return []
    logp = [[-math.log(max(p, 1e-12)) for _, p, _ in opts] for opts in options]
    start = tuple(0 for _ in options)
    heap: list[tuple[float, tuple[int, ...]]] = [(sum(lp[0] for lp in logp), start)]
    seen = {start}
    out: list[tuple[float, str, tuple[int, ...]]] = []
    while heap and len(out) < limit:
        cost, idx = heapq.heappop(heap)
        chars = [options[i][j] for i, j in enumerate(idx)]
        out.append(
            (
                math.exp(-cost),
                "".join(c for c, _, _ in chars),
                tuple(i for i, (_, _, fixed) in enumerate(chars) if fixed),
            )
        )
        for i, j in enumerate(idx):
            if j + 1 < len(options[i]):
                nxt = (*idx[:i], j + 1, *idx[i + 1 :])
                if nxt not in seen:
                    seen.add(nxt)
                    heapq.heappush(heap, (cost - logp[i][j] + logp[i][j + 1], nxt))
    return out


def _length_variants(
    positions: Sequence[Alternatives], length: int
) -> Iterable[tuple[Sequence[Alternatives], float]]:
    """The read itself, with one low-confidence position dropped when it is too long, or
    with an unread province when it is one short.

    CTC readers sometimes emit a spurious character (a rivet, a border); dropping the
    least confident one costs that character's confidence as a penalty.
    """
    if len(positions) == length:
        yield positions, 1.0
    elif len(positions) == length - 1:
        # The province glyph is the one most often lost (faded, covered by the frame).
        yield [[], *positions], 1.0
    elif len(positions) == length + 1:
        for i in range(len(positions)):
            top = positions[i][0][1] if positions[i] else 0.0
            yield [*positions[:i], *positions[i + 1 :]], 0.5 * (1.0 - top)


def templates(
    color: str | None = None, color_sure: bool = False
) -> list[tuple[tuple[str, ...], float]]:
    """Every plate template (one character class per position) with its prior for
    ``color``: 1 for the colour's usual shapes, a soft penalty for the others; only the
    colour's usual shapes when the colour is sure (a green plate: the two 8-character
    shapes)."""
    usual = _TEMPLATES_BY_COLOR.get(color)
    if usual is None:
        raise ValueError(f"unknown plate colour {color!r}")
    if color_sure and color is not None:
        return [(t, 1.0) for t in usual]
    return [(t, 1.0 if t in usual else _COLOR_MISMATCH) for t in _ALL_TEMPLATES]


def template_candidates(
    positions: Sequence[Alternatives], template: tuple[str, ...], penalty: float, limit: int
) -> list[Candidate]:
    """The best ``limit`` plates of one template from per-position alternatives of exactly
    its length, each score a product of probabilities times ``penalty``."""
    options = [_position_options(alts, cls) for alts, cls in zip(positions, template, strict=True)]
    return _candidates_of(options, penalty, limit)


def _candidates_of(
    options: list[list[tuple[str, float, bool]]], penalty: float, limit: int
) -> list[Candidate]:
    return [
        Candidate(plate, score * penalty, fixed)
        for score, plate, fixed in _best_products(options, limit)
    ]


def merge_candidates(groups: Iterable[Iterable[Candidate]], limit: int = 10) -> list[Candidate]:
    """One ranking from several: each plate keeps its best score."""
    best: dict[str, Candidate] = {}
    for group in groups:
        for cand in group:
            if cand.plate not in best or cand.score > best[cand.plate].score:
                best[cand.plate] = cand
    return sorted(best.values(), key=lambda c: -c.score)[:limit]


def rank_candidates(
    positions: Sequence[Alternatives],
    color: str | None = None,
    limit: int = 10,
) -> list[Candidate]:
    """Ranked grammatical plates from per-position alternatives.

    ``positions[i]`` lists ``(char, probability)`` guesses for the i-th character read.
    Every template is tried; those not usual for ``color`` (e.g. 7 characters on a green
    plate) are penalised, not excluded. Characters outside a position's class are mapped
    through the look-alike tables with a penalty. Scores are products of
    per-position probabilities (times penalties), so they are comparable across
    candidates; the list is sorted best first. If nothing fits the grammar it is empty
    and the caller must treat the read as unreadable.
    """
    norm = [[(_norm_char(ch), p) for ch, p in alts] for alts in positions]
    # The templates share a class at most positions: a position's options for a class are
    # worked out once (this halved the CPU of ranking a read).
    options_of: dict[tuple[tuple[tuple[str, float], ...], str], list[tuple[str, float, bool]]] = {}

    def options(alts: Alternatives, cls: str) -> list[tuple[str, float, bool]]:
        key = (tuple(alts), cls)
        if key not in options_of:
            options_of[key] = _position_options(alts, cls)
        return options_of[key]

    groups = []
    for template, prior in templates(color):
        for variant, length_penalty in _length_variants(norm, len(template)):
            penalty = prior * length_penalty
            if penalty > 0.0:
                found = [options(alts, cls) for alts, cls in zip(variant, template, strict=True)]
                groups.append(_candidates_of(found, penalty, limit))
    return merge_candidates(groups, limit)


def candidates_from_text(
    raw: str, confidence: float = 1.0, color: str | None = None, limit: int = 10
) -> list[Candidate]:
    """Ranked candidates from a plain text read (e.g. a camera's own read)."""
    text = normalise(raw)
    if text is None:
        return []
    return rank_candidates([[(ch, confidence)] for ch in text], color, limit)


def _norm_char(ch: str) -> str:
    return unicodedata.normalize("NFKC", ch).upper()
