"""PlateNet: a small CTC recogniser trained for plates alone (``models/platenet.onnx``).

Trained by ``scripts/train-reader`` on the training part of the shared labelled crops
under heavy randomised degradations (:mod:`plate_recognition.holdout` keeps a quarter out
for measuring). It reads a plate at 24×96, about the crops' own 94×24, in about a tenth of the
CPU of the general PP-OCR recogniser, and its symbols are the plate alphabet itself. Its
training photos are blue plates; yellow and white ones it learnt from inverted copies.
"""

from __future__ import annotations

import json

import cv2
import numpy as np

from plate_recognition.engines import PLATENET_MODELS
from plate_recognition.engines.ctc_reader import CtcReader, open_model


class PlateNetReader(CtcReader):
    """Plate reader on one PlateNet (``name``, one of
    :data:`plate_recognition.engines.PLATENET_MODELS`). Build once per process."""

    def __init__(self, name: str = "platenet", threads: int | None = None) -> None:
        self.name = name
        self._session, self._input, meta = open_model(PLATENET_MODELS[name], threads)
        height, width = meta["input"].split("x")
        self._size = (int(width), int(height))
        super().__init__(tuple(json.loads(meta["classes"])))

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        resized = cv2.resize(image, self._size, interpolation=cv2.INTER_CUBIC)
        return resized.transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1.0

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Per-frame probabilities over the plate alphabet (blank first), rows summing to 1."""
        return np.asarray(self._session.run(None, {self._input: self._prepare(image)})[0][0])
