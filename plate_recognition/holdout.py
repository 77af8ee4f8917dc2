"""Which labelled photos the shipped plate model never saw in training.

The model in ``plate_recognition/models/`` was trained on the shared crops' training part
alone (``devtools/parking_dev/reader_training.py``); its accuracy and its calibration are
measured on the held-out part, so that neither is flattered by photos it learnt. The split
is a stable hash of the file name, the same on every machine.
"""

from __future__ import annotations

import zlib
from pathlib import PurePath

from plate_recognition.engines import PLATENET_MODELS

#: One photo in this many is held out.
HOLDOUT_EVERY = 4
#: Engines whose model learnt from the shared photos' training part: measured and calibrated
#: on the held-out part alone.
TRAINED_ON_SHARED = frozenset({*PLATENET_MODELS, "fused"})


def held_out(file: str | PurePath) -> bool:
    """True when the photo named ``file`` (any path; only its name counts) is held out."""
    name = PurePath(file).name
    return zlib.crc32(name.encode()) % HOLDOUT_EVERY == 0


def unseen(file: str | PurePath, kind: str) -> bool:
    """True when no shipped model learnt from this photo: the held-out crops, and every
    whole frame (training takes crops alone)."""
    return kind != "crop" or held_out(file)
