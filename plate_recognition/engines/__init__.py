"""Plate reading engines behind one interface, chosen by name."""

from __future__ import annotations

from plate_recognition.engines.base import PlateReader, ReadResult

#: The PlateNet engines and their networks in ``models/``: the same design and training photos,
#: trained from different seeds on different degraded copies (``scripts/train-reader --seed``).
PLATENET_MODELS = {"platenet": "platenet.onnx", "platenet2": "platenet2.onnx"}
ENGINES = ("fused", "rapidocr", *PLATENET_MODELS, "tesseract", "combined")
DEFAULT_ENGINE = "fused"


def get_reader(name: str = DEFAULT_ENGINE) -> PlateReader:
    """A new reader for ``name``. Construction loads models: cache it per process."""
    # Imports are local so that choosing one engine never loads another's runtime.
    if name == "rapidocr":
        from plate_recognition.engines.rapidocr import RapidOcrReader

        return RapidOcrReader()
    if name == "fused":
        from plate_recognition.engines.voting import fused

        return fused()
    if name in PLATENET_MODELS:
        from plate_recognition.engines.platenet import PlateNetReader

        return PlateNetReader(name)
    if name == "tesseract":
        from plate_recognition.engines.tesseract import TesseractReader

        return TesseractReader()
    if name == "combined":
        from plate_recognition.engines.voting import combined

        return combined()
    raise ValueError(f"unknown plate engine {name!r}; choose one of {', '.join(ENGINES)}")


__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "PLATENET_MODELS",
    "PlateReader",
    "ReadResult",
    "get_reader",
]
