"""Image in, ranked plate candidates out.

:func:`recognise` is a plain module-level function with picklable arguments and result,
so the lane service can run it in a ``concurrent.futures.ProcessPoolExecutor``; each
worker process builds its engine once, on first use, and keeps it.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import PIL.Image

from plate_recognition.calibration import calibrate_candidates
from plate_recognition.engines import DEFAULT_ENGINE, PlateReader, ReadResult, get_reader
from plate_recognition.engines.base import vote as engine_vote
from plate_recognition.grammar import Candidate
from plate_recognition.localise import Corners, corners_height, find_plates, plate_color

Kind = Literal["crop", "scene"]

#: A read this confident (raw score) is taken without test-time variants, and in a scene
#: ends the search through further plate candidates. Reading crops again only below 0.6
#: saved 5-8 % of the CPU but lost 0.3-0.4 point under the gate conditions on seed 600
#: and on the held-out seeds (night, distant and JPEG 0.6-1.2 points each): the second
#: read still changes results for the better between 0.6 and 0.9.
_GOOD_ENOUGH = 0.9

_READERS: dict[str, PlateReader] = {}


def _stretched_gray(image: np.ndarray) -> np.ndarray:
    """Grey, min-max stretched copy: a light-green or washed-out plate gains contrast."""
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    gray = cv2.normalize(gray, np.empty_like(gray), 0, 255, cv2.NORM_MINMAX)
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)


#: Height a small crop is brought up to (bicubic) before it is smoothed.
_DENOISE_HEIGHT = 72


def _denoised_gray(image: np.ndarray) -> np.ndarray:
    """Grey, upscaled and edge-preserving smoothed copy: JPEG blocks and chroma smear,
    sensor noise at night and the pixels of a small distant plate flatten out while the
    characters' edges stay (a bilateral filter at the size of a character's stroke)."""
    h, w = image.shape[:2]
    if h < _DENOISE_HEIGHT:
        size = (max(1, round(w * _DENOISE_HEIGHT / h)), _DENOISE_HEIGHT)
        image = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
    smooth = cv2.bilateralFilter(image, 9, 60, 7)
    return cv2.cvtColor(cv2.cvtColor(smooth, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)


Variant = Callable[[np.ndarray], np.ndarray]

#: JPEG codes 8×8 blocks apart; squeezed hard (quality ~10) each block keeps little more than
#: its mean, and the steps between blocks cut through characters. A crop whose brightness
#: steps at block edges are this many times its steps elsewhere was squeezed so. Crops at JPEG
#: quality 8-14 (seeds 1000-1001) scored 1.22 at their 5th percentile (1.58 median); under
#: every other condition, and the photos as they are (JPEG files at an ordinary quality), 1.10
#: at their 95th (tilted crops 1.26: the 2 % of them over 1.3 read the same smoothed).
_BLOCKY = 1.3
#: Below this width a crop has too few block edges to tell (a distant plate's 35-50 px).
_BLOCKY_MIN_WIDTH = 64
#: The smoothing that hides the block edges without blurring the strokes away.
_DEBLOCK_SIGMA = 0.8


def jpeg_blockiness(image: np.ndarray) -> float:
    """How much more the brightness steps at JPEG's 8-pixel block edges than elsewhere (about
    1 for an image whose blocks do not show), on the grid of the image as it was coded: a plate
    cut out of a coded frame at another offset shows none."""
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    gray = gray.astype(np.float32)
    ratios = []
    for steps in (np.abs(np.diff(gray, axis=1)), np.abs(np.diff(gray, axis=0)).T):
        edge = np.arange(steps.shape[1]) % 8 == 7
        if edge.any() and not edge.all():
            # Steps of under a grey level elsewhere are a flat image, not a smooth one.
            ratios.append(float(steps[:, edge].mean()) / max(float(steps[:, ~edge].mean()), 1.0))
    return sum(ratios) / len(ratios) if ratios else 1.0


def deblocked(crop: np.ndarray) -> np.ndarray:
    """A crop squeezed hard by JPEG (`jpeg_blockiness`), smoothed just enough that its block
    edges no longer read as strokes; any other crop as it is. Held-out crops at JPEG quality
    8-14, seeds 1000, 1001 and 2000 (where it was chosen): the fused reader 83.6 → 87.7 %
    exact (PP-OCR's own read 47 → 66 % on seeds 1000-1001), every other condition's reads
    unchanged; over the calibration's 52 seeds (6,604 reads), JPEG crops and frames 86.2 →
    89.5 %. The `rapidocr` engine's denoised re-read of a doubtful crop reads the smoothed crop
    too (JPEG 68.1 → 76.4 %, seeds 1000-1001). Whole frames are left alone: the rectified plate
    has lost the block grid, and the frames of our labelled scenes are themselves coded that
    hard (1.4-5.9) and read no better smoothed."""
    if crop.shape[1] < _BLOCKY_MIN_WIDTH or jpeg_blockiness(crop) < _BLOCKY:
        return crop
    return cv2.GaussianBlur(crop, (0, 0), _DEBLOCK_SIGMA)


#: Test-time variants read when the first read is doubtful, per kind of image. Chosen for
#: the PP-OCR reader on seeds 500-501 of the degraded crops (apart from calibration's and
#: the held-out seeds): the denoised grey copy lifts heavy JPEG, night and distant crops.
#: Scene crops, rectified at 220×70 under any light, keep the contrast-stretched copy;
#: other engines read a crop once, as they were measured. (For the fused reader the
#: denoised copies, read by both engines, added 2.6 points under JPEG and lost some under
#: glare, blur and distance, for twice PP-OCR's CPU: held-out seeds 1000-1001.)
_VARIANTS: dict[str, tuple[Variant, ...]] = {
    "crop": (_denoised_gray,),
    "scene": (_stretched_gray,),
}


def _variants(kind: Kind, engine: str) -> tuple[Variant, ...]:
    return _VARIANTS[kind] if kind == "scene" or engine == "rapidocr" else ()


def _read_voted(
    r: PlateReader,
    image: np.ndarray,
    color: str | None,
    color_sure: bool,
    variants: tuple[Variant, ...],
) -> ReadResult:
    """Read ``image``; when unsure, also each variant of it, and vote.

    Averaging the views' candidate scores (a candidate one view lacks counts 0) rewards
    plates they agree on, the way :func:`vote` does across frames. The variants cost a
    read each, so a confident first read (most clean plates) is taken as it is.
    """
    first = r.read(image, color, color_sure)
    if (first.best is not None and first.best.score >= _GOOD_ENOUGH) or not variants:
        return first
    results = [first, *(r.read(variant(image), color, color_sure) for variant in variants)]
    lead = max(results, key=lambda res: res.best.score if res.best else 0.0)
    return ReadResult(
        engine=first.engine,
        candidates=engine_vote(results),
        raw=lead.raw,
        positions=lead.positions,
    )


@dataclass(frozen=True, slots=True)
class Recognition:
    """Result of reading one image: ranked candidates (maybe none) and where the plate was.

    ``corners`` (bottom-right, bottom-left, top-left, top-right) is ``None`` for crops
    and for frames where no plate was found. ``color_sure``: the plate's colour is sure
    (:func:`plate_recognition.localise.plate_color`), not just the likelier guess. The top
    candidate's score is the calibrated probability that the read is exactly right
    (:mod:`plate_recognition.calibration`);
    ``raw_score`` is the engine's own score it was mapped from. ``plate_px``: the plate's
    height in the image's own pixels (a crop's height; in a frame, its corners'), what
    tells a small, distant plate from a near one.
    """

    engine: str
    kind: Kind
    candidates: tuple[Candidate, ...]
    color: str | None = None
    corners: Corners | None = None
    raw: str = ""
    elapsed_ms: float = 0.0
    raw_score: float = 0.0
    color_sure: bool = False
    plate_px: float = 0.0

    @property
    def plate(self) -> str | None:
        return self.candidates[0].plate if self.candidates else None

    @property
    def confidence(self) -> float:
        return self.candidates[0].score if self.candidates else 0.0


def reader(engine: str = DEFAULT_ENGINE) -> PlateReader:
    """The process-wide reader for ``engine`` (built on first use)."""
    if engine not in _READERS:
        _READERS[engine] = get_reader(engine)
    return _READERS[engine]


#: The most pixels an encoded image may declare: a 24-megapixel frame, beyond any gate camera's.
#: A few kilobytes of PNG can declare gigapixels (a decompression bomb): the limit is checked in
#: the header, before anything is decoded.
MAX_IMAGE_PIXELS = 24_000_000


def _declared_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding it (Pillow reads lazily)."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except (OSError, PIL.Image.DecompressionBombError) as exc:
        raise ValueError(f"image bytes could not be decoded: {exc}") from exc
    return width, height


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
    """BGR image from encoded bytes (JPEG/PNG/...) or an array (gray or BGR). ValueError for
    bytes that are not an image, or declare more than `MAX_IMAGE_PIXELS`."""
    if isinstance(data, np.ndarray):
        image = data
    else:
        width, height = _declared_size(data)
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image too large: {width}x{height} pixels")
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if decoded is None:
            raise ValueError("image bytes could not be decoded")
        image = decoded
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 8:
        raise ValueError(f"unsupported image shape {image.shape}")
    return image


def guess_kind(image: np.ndarray) -> Kind:
    """A wide, short image is already a plate; anything else is a camera frame."""
    h, w = image.shape[:2]
    return "crop" if w >= 2 * h and h <= 200 else "scene"


def recognise(
    image: bytes | np.ndarray,
    kind_hint: Kind | None = None,
    engine: str = DEFAULT_ENGINE,
    color_hint: str | None = None,
    calibrated: bool = True,
    certain_score: float | None = None,
) -> Recognition:
    """Read the plate in ``image`` (encoded bytes or BGR array).

    ``kind_hint`` says whether it is a plate crop or a whole camera frame (guessed from
    its shape otherwise). Never raises for an unreadable plate: ``candidates`` is empty.
    Raises ``ValueError`` for undecodable input. ``calibrated=False`` leaves the engine's
    raw scores (what ``parking plates calibrate`` fits the table on). ``certain_score``: the
    certain threshold the caller decides with, when lower than the engine's (a small plate's
    read is kept below both).
    """
    start = time.perf_counter()
    frame = decode_image(image)
    kind = kind_hint or guess_kind(frame)
    r = reader(engine)
    if kind == "crop":
        color, color_sure = plate_color(frame)
        if color_hint is not None:
            color, color_sure = color_hint, color_hint == color and color_sure
        result = _read_voted(r, deblocked(frame), color, color_sure, _variants("crop", r.name))
        return Recognition(
            engine=r.name,
            kind="crop",
            candidates=_scored(
                result.candidates, r.name, calibrated, frame.shape[0], certain_score
            ),
            color=color,
            raw=result.raw,
            elapsed_ms=(time.perf_counter() - start) * 1000,
            raw_score=result.candidates[0].score if result.candidates else 0.0,
            color_sure=color_sure,
            plate_px=frame.shape[0],
        )
    best = _best_region(r, frame, color_hint)
    if best is None or best[0] < _GOOD_ENOUGH:
        # Nothing read well: look again in the frame with its light evened out.
        again = _best_region(r, light_normalised(frame), color_hint)
        if again is not None and (best is None or again[0] > best[0]):
            best = again
    elapsed = (time.perf_counter() - start) * 1000
    if best is None or not best[1].candidates:
        return Recognition(r.name, "scene", (), elapsed_ms=elapsed)
    raw_score, result, corners, color, color_sure = best
    plate_px = corners_height(corners)
    candidates = _scored(result.candidates, r.name, calibrated, plate_px, certain_score)
    return Recognition(
        r.name,
        "scene",
        candidates,
        color,
        corners,
        result.raw,
        elapsed,
        raw_score,
        color_sure,
        plate_px,
    )


def light_normalised(frame: np.ndarray) -> np.ndarray:
    """The frame with its light evened out: grey-world white balance (a sodium or LED cast
    turns a blue plate grey or green, and localisation looks for blue and green), a 3×3
    median against sensor noise, and local contrast equalisation of the lightness (a plate in
    the dark or beside a headlamp gets the contrast of one in daylight). Held-out whole frames
    under night light, seeds 1000-1003: 25 of 52 read exactly without it, 41 with it."""
    f = frame.astype(np.float32)
    means = f.reshape(-1, 3).mean(axis=0)
    balanced = np.clip(f * (means.mean() / np.maximum(means, 1.0)), 0, 255).astype(np.uint8)
    lab = cv2.cvtColor(cv2.medianBlur(balanced, 3), cv2.COLOR_BGR2LAB)
    lab[:, :, 0] = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(8, 8)).apply(lab[:, :, 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2BGR)


_Found = tuple[float, ReadResult, Corners, str | None, bool]


def _best_region(r: PlateReader, frame: np.ndarray, color_hint: str | None) -> _Found | None:
    """The best read of the plate candidates in a frame: (raw score, read, corners, colour,
    colour sure). Localisation ranks regions by shape and colour; the recogniser's confidence
    decides, and a read good enough ends the search."""
    best: _Found | None = None
    for region in find_plates(frame):
        color = color_hint or region.color
        # The blob's colour is sure when the rectified crop shows it surely too.
        color_sure = color is not None and plate_color(region.crop) == (color, True)
        result = _read_voted(r, region.crop, color, color_sure, _variants("scene", r.name))
        score = result.candidates[0].score if result.candidates else 0.0
        if best is None or score > best[0]:
            best = (score, result, region.corners, color, color_sure)
        if score >= _GOOD_ENOUGH:
            break
    return best


def _scored(
    candidates: tuple[Candidate, ...],
    engine: str,
    calibrated: bool,
    plate_px: float,
    certain_score: float | None,
) -> tuple[Candidate, ...]:
    if not calibrated:
        return candidates
    return calibrate_candidates(candidates, engine, plate_px, certain_score)


def vote(recognitions: Iterable[Recognition], limit: int = 10) -> list[Candidate]:
    """Combine several reads of the same car (successive frames) into one ranking.

    A plate's score is its mean score over all frames, a frame that did not propose it
    counting 0, so one confident misread cannot outvote consistent reads.
    """
    return list(engine_vote(list(recognitions), limit=limit))
