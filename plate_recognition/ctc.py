"""Plate-grammar-constrained decoding of a CTC recogniser's output.

A greedy CTC decode takes each frame's most likely symbol. Under heavy compression or at
a distance the province glyph comes out as a Latin letter (皖 read ``M``, ``T``, ``U``)
or as blank, and the grammar can then only guess it (``?``). :func:`constrained_positions`
instead finds, for one plate template (``皖A12345``: a province, a letter, five
alphanumerics), the best CTC alignment whose i-th emitted symbol belongs to the template's
i-th character class (Viterbi over the usual CTC states, blank between labels), and returns
per-position alternatives restricted to each class, read at the frame where the class is
most likely. :mod:`plate_recognition.grammar` ranks them like any other read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from plate_recognition.grammar import Alternatives

_NEG = -1e9


def best_path_runs(labels: Sequence[int] | np.ndarray) -> list[tuple[int, int, int]]:
    """The characters of a best (per-frame argmax) CTC path: each run of one label, blanks
    (0) left out, as (first frame, last frame, label)."""
    runs: list[tuple[int, int, int]] = []
    t = 0
    while t < len(labels):
        end = t
        while end + 1 < len(labels) and labels[end + 1] == labels[t]:
            end += 1
        if labels[t] != 0:
            runs.append((t, end, int(labels[t])))
        t = end + 1
    return runs


def class_masks(chars: Sequence[str], template: Sequence[str]) -> np.ndarray:
    """Boolean (positions × symbols) mask: which CTC symbols each position may be.
    Symbol 0 is the blank and belongs to no class."""
    masks = np.zeros((len(template), len(chars)), dtype=bool)
    for k, cls in enumerate(template):
        masks[k, 1:] = [ch in cls for ch in chars[1:]]
    return masks


def constrained_positions(
    probs: np.ndarray,
    chars: Sequence[str],
    masks: np.ndarray,
    top_k: int = 4,
    within_class: tuple[int, ...] = (0,),
) -> tuple[list[Alternatives], float] | None:
    """Best alignment of ``probs`` (frames × symbols, blank first, rows summing to 1) to
    the template whose classes are ``masks`` (see :func:`class_masks`).

    Returns the per-position alternatives (each class's top ``top_k`` symbols at that
    position's best frame, as shares of the frame's non-blank probability, of the class's
    own for the positions in ``within_class``) and the alignment's probability relative to
    the unconstrained best path (≤ 1: how much the template had to force); ``None`` when
    the image has fewer frames than the template has characters.
    """
    frames = probs.shape[0]
    length = masks.shape[0]
    if frames < length:
        return None
    logp = np.log(np.maximum(probs, 1e-12))
    # Emission of label state k at frame t: its class's best symbol.
    emit = np.where(masks[None, :, :], logp[:, None, :], _NEG).max(axis=2)  # (T, L)
    blank = logp[:, 0]
    states = 2 * length + 1  # blank, label 0, blank, label 1, ..., blank
    score = np.full(states, _NEG)
    back = np.zeros((frames, states), dtype=np.int8)  # 0 stay, 1 from the state before
    score[0] = blank[0]
    score[1] = emit[0, 0]
    for t in range(1, frames):
        # A character follows the previous one only through a blank frame. (CTC may skip
        # the blank between two different symbols, but a class's best symbol can be the
        # same as its neighbour's, and CTC would merge those: 皖ACC220 read 皖AAC220.)
        prev = np.concatenate(([_NEG], score[:-1]))
        choice = (prev > score).astype(np.int8)
        best = np.where(choice == 1, prev, score)
        emission = np.empty(states)
        emission[0::2] = blank[t]
        emission[1::2] = emit[t]
        score = best + emission
        back[t] = choice
    end = states - 1 if score[-1] >= score[-2] else states - 2
    if score[end] <= _NEG / 2:
        return None
    ratio = float(np.exp(min(0.0, score[end] - logp.max(axis=1).sum())))
    # Trace back which frames each label state held.
    path = np.empty(frames, dtype=np.int64)
    s = end
    for t in range(frames - 1, -1, -1):
        path[t] = s
        s -= int(back[t, s])
    out: list[Alternatives] = []
    for k in range(length):
        held = np.flatnonzero(path == 2 * k + 1)
        t = int(held[emit[held, k].argmax()])
        cls = np.flatnonzero(masks[k])
        # Shares of the frame's non-blank probability; the province glyph's, though, among
        # the provinces alone: a smudged glyph the model takes for a Latin letter still
        # ranks the provinces sensibly, and any province beats none.
        norm = probs[t, cls] if k in within_class else probs[t, 1:]
        mass = float(norm.sum()) or 1.0
        ranked = cls[np.argsort(-probs[t, cls])][:top_k]
        out.append([(chars[i], float(probs[t, i]) / mass) for i in ranked])
    return out, ratio
