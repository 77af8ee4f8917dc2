"""PP-OCRv4 recogniser (PaddleOCR's ONNX model, shipped in plate_recognition/models/).

Only the recognition network is used: localisation already produced a rectified plate,
so rapidocr's text detector and angle classifier would only cost time. We run the ONNX
session ourselves to get the per-frame CTC probabilities, restrict them to the plate
alphabet (so 皖 cannot come out as some other of the 6,600 glyphs) and keep the top
alternatives per character for the grammar and for matching.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from plate_recognition.engines.ctc_reader import CtcReader, open_model
from plate_recognition.grammar import PLATE_CHARSET

_MODEL_FILE = "ch_PP-OCRv4_rec_infer.onnx"
#: The classes the shipped model scores, its classifier cut from PaddleOCR's 6,625 glyphs to
#: them (`scripts/slim-ocr-model`): the plate alphabet, and I and O, which the grammar reads as
#: 1 and 0.
PLATE_CLASSES = frozenset(PLATE_CHARSET) | {"I", "O"}
# The model was trained on 48-pixel lines padded to at least 320 wide. 40 pixels reads the
# same share of plates on our data in ~25% less time. Padding to 200 (not the scaled 266)
# costs 0.6 point on crops (98.0 % against 98.6 %) and reads every scene and green plate
# (13/13 against 12/13), at ~27 ms a plate instead of ~38 ms on the 2-core reference machine
# (`parking plates eval` / `parking plates bench`, 2026-11-22).
HEIGHT = 40
_MIN_WIDTH = 200
_MAX_WIDTH = HEIGHT * 12
#: Pixels of the resized line per output frame (the network's horizontal stride).
FRAME_PX = 8


class RapidOcrReader(CtcReader):
    """Plate reader on the PP-OCRv4 recogniser. Build once per process (~0.3 s)."""

    name = "rapidocr"

    def __init__(self, threads: int | None = None) -> None:
        self._session, self._input, meta = open_model(_MODEL_FILE, threads)
        # CTC label 0 is the blank; the classes the model kept follow (`PLATE_CLASSES`).
        super().__init__(("", *meta["character"].splitlines()))

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        h, w = image.shape[:2]
        # No plate is wider than a few heights; a strip far wider (hostile input) would cost
        # the model memory growing with the square of its width.
        width = min(max(1, math.ceil(HEIGHT * w / h)), _MAX_WIDTH)
        resized = cv2.resize(image, (width, HEIGHT), interpolation=cv2.INTER_CUBIC)
        batch = np.zeros((1, 3, HEIGHT, max(width, _MIN_WIDTH)), dtype=np.float32)
        batch[0, :, :, :width] = resized.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        return batch

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Per-frame probabilities over the plate alphabet (blank first), rows summing to 1."""
        return np.asarray(self._session.run(None, {self._input: self._prepare(image)})[0][0])
