"""PP-OCRv4 recogniser (PaddleOCR's ONNX model, shipped in plate_recognition/models/).

Only the recognition network is used: localisation already produced a rectified plate,
so rapidocr's text detector and angle classifier would only cost time. We run the ONNX
session ourselves to get the per-frame CTC probabilities, restrict them to the plate
alphabet (so 皖 cannot come out as some other of the 6,600 glyphs) and keep the top
alternatives per character for the grammar and for matching.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from plate_recognition.ctc import class_masks, constrained_positions
from plate_recognition.engines.base import ReadResult, freeze_positions
from plate_recognition.grammar import (
    PLATE_CHARSET,
    Alternatives,
    merge_candidates,
    rank_candidates,
    template_candidates,
    templates,
)

_MODEL_FILE = "ch_PP-OCRv4_rec_infer.onnx"
# The model was trained on 48-pixel lines padded to at least 320 wide. 40 pixels reads the
# same share of plates on our data in ~25% less time. Padding to 200 (not the scaled 266)
# costs 0.6 point on crops (98.0 % against 98.6 %) and reads every scene and green plate
# (13/13 against 12/13), at ~27 ms a plate instead of ~38 ms on the 2-core reference machine
# (`parking plates eval` / `parking plates bench`, 2026-11-22).
_HEIGHT = 40
_MIN_WIDTH = 200
_TOP_K = 4
#: Below this raw score the greedy read is doubtful: the grammar-constrained decode
#: (:mod:`plate_recognition.ctc`) is added to its candidates.
CONSTRAIN_BELOW = 0.9
#: Exponent of the constrained path's probability relative to the greedy one in the
#: score of its candidates.
FORCED_WEIGHT = 0.5


def _model_path() -> Path:
    return Path(__file__).resolve().parent.parent / "models" / _MODEL_FILE


class RapidOcrReader:
    """Plate reader on the PP-OCRv4 recogniser. Build once per process (~0.3 s)."""

    name = "rapidocr"

    def __init__(self, threads: int | None = None) -> None:
        opts = ort.SessionOptions()
        # One thread per process: callers scale with a process pool, one worker per core.
        opts.intra_op_num_threads = threads or int(os.environ.get("PLATE_OCR_THREADS", "1"))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(_model_path()), opts, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        meta = self._session.get_modelmeta().custom_metadata_map
        # CTC label 0 is the blank; the model's dictionary follows, then a space.
        charset = ["", *meta["character"].splitlines(), " "]
        wanted = set(PLATE_CHARSET) | {"I", "O"}  # I/O kept so the grammar can fix them
        keep = [0] + [i for i, ch in enumerate(charset) if ch in wanted]
        self._keep = np.array(keep, dtype=np.int64)
        self._chars = [charset[i] for i in keep]
        #: The symbols of :meth:`probabilities`' columns, the blank ("") first.
        self.chars: tuple[str, ...] = tuple(self._chars)
        self._mask_cache: dict[tuple[str, ...], np.ndarray] = {}

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        h, w = image.shape[:2]
        width = max(1, math.ceil(_HEIGHT * w / h))
        resized = cv2.resize(image, (width, _HEIGHT), interpolation=cv2.INTER_CUBIC)
        batch = np.zeros((1, 3, _HEIGHT, max(width, _MIN_WIDTH)), dtype=np.float32)
        batch[0, :, :, :width] = resized.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        return batch

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Per-frame probabilities over the plate alphabet (blank first), rows summing to 1."""
        probs = self._session.run(None, {self._input: self._prepare(image)})[0][0]
        probs = probs[:, self._keep]
        return np.asarray(probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-9))

    def _greedy(self, probs: np.ndarray) -> list[Alternatives]:
        """Per-character alternatives from a greedy CTC decode."""
        best = probs.argmax(axis=1)
        out: list[Alternatives] = []
        t = 0
        while t < len(best):
            label = int(best[t])
            end = t
            while end + 1 < len(best) and best[end + 1] == label:
                end += 1
            if label != 0:
                # The segment's peak frame carries the sharpest distribution over characters.
                frame = probs[t + int(probs[t : end + 1, label].argmax())]
                nonblank = frame[1:]
                total = float(nonblank.sum()) or 1.0
                top = np.argsort(-nonblank)[:_TOP_K]
                out.append([(self._chars[i + 1], float(nonblank[i]) / total) for i in top])
            t = end + 1
        return out

    def positions(self, image: np.ndarray) -> list[Alternatives]:
        """Per-character alternatives from a CTC decode restricted to the plate alphabet."""
        return self._greedy(self.probabilities(image))

    def _masks(self, template: tuple[str, ...]) -> np.ndarray:
        masks = self._mask_cache.get(template)
        if masks is None:
            masks = self._mask_cache[template] = class_masks(self._chars, template)
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
                found = constrained_positions(probs, self._chars, self._masks(template), _TOP_K)
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
