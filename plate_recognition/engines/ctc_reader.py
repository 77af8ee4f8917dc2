"""What every CTC plate recogniser shares: per-frame probabilities in, ranked plates out.

An engine says how it turns an image into per-frame probabilities over its symbols
(:meth:`CtcReader.probabilities`, the blank first); the greedy decode, the per-character
alternatives and the grammar-constrained decode of doubtful reads are the same for all.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from plate_recognition.ctc import best_path_runs, class_masks, constrained_positions
from plate_recognition.engines.base import ReadResult, freeze_positions
from plate_recognition.grammar import (
    Alternatives,
    merge_candidates,
    rank_candidates,
    template_candidates,
    templates,
)

_TOP_K = 4
#: Below this raw score the greedy read is doubtful: the grammar-constrained decode
#: (:mod:`plate_recognition.ctc`) is added to its candidates.
CONSTRAIN_BELOW = 0.9
#: Exponent of the constrained path's probability relative to the greedy one in the
#: score of its candidates.
FORCED_WEIGHT = 0.5


class CtcReader:
    """Base of the CTC engines. Subclasses set :attr:`name` and :attr:`chars` (the
    symbols of :meth:`probabilities`' columns, the blank ``""`` first)."""

    name: str
    chars: tuple[str, ...]

    def __init__(self, chars: tuple[str, ...]) -> None:
        self.chars = chars
        self._mask_cache: dict[tuple[str, ...], np.ndarray] = {}

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Per-frame probabilities over :attr:`chars`, rows summing to 1."""
        raise NotImplementedError

    def _greedy(self, probs: np.ndarray) -> list[Alternatives]:
        """Per-character alternatives from a greedy CTC decode."""
        out: list[Alternatives] = []
        for start, end, label in best_path_runs(probs.argmax(axis=1)):
            # The segment's peak frame carries the sharpest distribution over characters.
            frame = probs[start + int(probs[start : end + 1, label].argmax())]
            nonblank = frame[1:]
            total = float(nonblank.sum()) or 1.0
            top = np.argsort(-nonblank)[:_TOP_K]
            out.append([(self.chars[i + 1], float(nonblank[i]) / total) for i in top])
        return out

    def positions(self, image: np.ndarray) -> list[Alternatives]:
        """Per-character alternatives from a greedy CTC decode of ``image``."""
        return self._greedy(self.probabilities(image))

    def _masks(self, template: tuple[str, ...]) -> np.ndarray:
        masks = self._mask_cache.get(template)
        if masks is None:
            masks = self._mask_cache[template] = class_masks(self.chars, template)
        return masks

    def read(
        self, image: np.ndarray, color: str | None = None, color_sure: bool = False
    ) -> ReadResult:
        """Greedy read ranked over every plate shape; when doubtful, also the constrained
        decode, over the colour's own shapes alone when the colour is sure (a template of
        another colour forced onto the frames won a clean blue plate read as 8 characters)."""
        return self.decode(self.probabilities(image), color, color_sure)

    def decode(
        self, probs: np.ndarray, color: str | None = None, color_sure: bool = False
    ) -> ReadResult:
        """The read of per-frame probabilities over :attr:`chars` (see :meth:`read`)."""
        positions = self._greedy(probs)
        candidates = rank_candidates(positions, color)
        if not candidates or candidates[0].score < CONSTRAIN_BELOW:
            groups = [candidates]
            for template, prior in templates(color, color_sure):
                found = constrained_positions(probs, self.chars, self._masks(template), _TOP_K)
                if found is not None:
                    # Scaled by how much the template forced the path (its square root:
                    # chosen on seeds 500-501; the full ratio lost most of the JPEG gain,
                    # none lets forced paths outrank right greedy reads of tilted plates).
                    alts, forced = found
                    penalty = prior * forced**FORCED_WEIGHT
                    groups.append(template_candidates(alts, template, penalty, 10))
            candidates = merge_candidates(groups)
        return ReadResult(
            engine=self.name,
            candidates=tuple(candidates),
            raw="".join(alts[0][0] for alts in positions),
            positions=freeze_positions(positions),
        )


def open_model(
    file: str, threads: int | None = None
) -> tuple[ort.InferenceSession, str, dict[str, str]]:
    """A model shipped in ``plate_recognition/models/``: its onnxruntime session on the CPU
    (one thread unless told otherwise: callers scale with a process pool, one worker per
    core), the name of its input and its metadata."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or int(os.environ.get("PLATE_OCR_THREADS", "1"))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    path = Path(__file__).resolve().parent.parent / "models" / file
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name, session.get_modelmeta().custom_metadata_map
