"""Engines, localisation and the pipeline on real plate photos (skipped without data)."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from plate_recognition import pipeline
from plate_recognition.conditions import degrade
from plate_recognition.engines import get_reader
from plate_recognition.engines.base import ReadResult
from plate_recognition.engines.rapidocr import PLATE_CLASSES, RapidOcrReader
from plate_recognition.engines.tesseract import serial_image
from plate_recognition.grammar import Candidate
from plate_recognition.holdout import unseen
from plate_recognition.localise import find_plates, parse_corners, plate_color, polygon_iou
from plate_recognition.pipeline import recognise, vote

N_CROPS = 12


def _crops(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [r for r in rows if r["kind"] == "crop"][:N_CROPS]


def test_rapidocr_reads_real_crops(plate_data: Path, plate_rows: list[dict[str, str]]) -> None:
    reader = get_reader("rapidocr")
    rows = _crops(plate_rows)
    exact = sum(
        reader.read(cv2.imread(str(plate_data / r["file"])), r["color"]).plate == r["plate"]
        for r in rows
    )
    assert exact >= len(rows) - 1


def test_the_shipped_ppocr_model_reads_the_plate_alphabet_alone() -> None:
    """Its classifier is cut to the blank and the plate alphabet (`parking_dev.ocr_model`):
    every class it scores is one the reader keeps, and every plate character is one."""
    reader = RapidOcrReader()
    probs = reader._session.run(None, {reader._input: np.zeros((1, 3, 40, 200), np.float32)})
    assert probs[0].shape[-1] == len(reader.chars)
    assert reader.chars[0] == "" and set(reader.chars[1:]) == PLATE_CLASSES


def _frames(chars: tuple[str, ...], *columns: dict[str, float]) -> np.ndarray:
    """Per-frame probabilities over the reader's symbols: each column's given shares, the
    rest on blank, with a blank frame between characters."""
    probs = np.zeros((2 * len(columns) + 1, len(chars)))
    for k, column in enumerate(columns):
        for ch, p in column.items():
            probs[2 * k + 1, chars.index(ch)] = p
    probs[:, 0] = 1.0 - probs.sum(axis=1)
    return probs


def _sure(ch: str) -> dict[str, float]:
    return {ch: 0.95}


def test_a_sure_green_plate_is_read_with_all_eight_characters() -> None:
    reader = RapidOcrReader()
    # 皖AD12345 with its D faint: the greedy decode skips it and reads seven characters.
    faint_d = {"D": 0.3}
    probs = _frames(reader.chars, *map(_sure, "皖A"), faint_d, *map(_sure, "12345"))
    assert reader.decode(probs).raw == "皖A12345"
    result = reader.decode(probs, "green", color_sure=True)
    assert result.plate == "皖AD12345"


def test_a_sure_colour_limits_the_constrained_decode_to_its_shapes() -> None:
    reader = RapidOcrReader()
    # A blue 皖A12345 with a doubtful 5 and a faint mark after it a forced path reads as D.
    probs = _frames(reader.chars, *map(_sure, "皖A1234"), {"5": 0.5, "S": 0.4}, {"D": 0.2})
    unsure = {c.plate for c in reader.decode(probs, "blue").candidates}
    sure = reader.decode(probs, "blue", color_sure=True)
    assert "皖A12345D" in unsure  # the green/yellow large-vehicle shape, forced
    assert sure.plate == "皖A12345"
    assert all(len(c.plate) == 7 for c in sure.candidates)


def test_a_blue_plate_under_a_green_cast_has_no_sure_colour(
    plate_data: Path, plate_rows: list[dict[str, str]]
) -> None:
    """Its hue is in the green range, its light characters on a dark ground say blue: the
    colour is unknown, and the plate is read with seven characters (it was read as an
    8-character new-energy plate while its colour was taken for green)."""
    row = next(r for r in plate_rows if "75d1297f78714a02" in r["file"])
    image = cv2.imread(str(plate_data / row["file"]))
    assert plate_color(image) == (None, False)
    assert recognise(image, "crop").plate == row["plate"] == "皖AK5D11"
    sure_blue = next(
        cv2.imread(str(plate_data / r["file"]))
        for r in _crops(plate_rows)
        if plate_color(cv2.imread(str(plate_data / r["file"])))[1]
    )
    assert plate_color(sure_blue) == ("blue", True)


def test_tesseract_engine_runs(plate_data: Path, plate_rows: list[dict[str, str]]) -> None:
    reader = get_reader("tesseract")
    row = _crops(plate_rows)[0]
    result = reader.read(cv2.imread(str(plate_data / row["file"])), "blue")
    assert result.engine == "tesseract"
    assert result.raw  # it reads something; accuracy is measured by the evaluation
    assert all(0 < c.score <= 1 for c in result.candidates)


def test_green_scenes_read_full_length(plate_data: Path, plate_rows: list[dict[str, str]]) -> None:
    for row in (r for r in plate_rows if r["kind"] == "scene" and r["color"] == "green"):
        rec = recognise((plate_data / row["file"]).read_bytes())
        assert rec.color == "green"
        assert rec.plate is not None and len(rec.plate) == 8
        assert row["plate"] in [c.plate for c in rec.candidates[:5]]


def test_tesseract_serial_image_drops_frame_and_province(
    plate_data: Path, plate_rows: list[dict[str, str]]
) -> None:
    row = _crops(plate_rows)[0]
    binary = serial_image(cv2.imread(str(plate_data / row["file"])), "blue")
    assert set(np.unique(binary)) <= {0, 255}
    ink_columns = np.flatnonzero((binary == 0).any(axis=0))
    # Six serial characters remain; the left sixth (province glyph, frame) is blank.
    assert ink_columns.size and ink_columns[0] > 0.12 * binary.shape[1]


# The last is a blurred, light-green new-energy plate whose colour mask is loose.
@pytest.mark.parametrize("name", ["0ee2893a76568d53", "d32fae0d8ff813b7", "db1488e1ca9a5da0"])
def test_localisation_on_scenes(
    plate_data: Path, plate_rows: list[dict[str, str]], name: str
) -> None:
    row = next(r for r in plate_rows if name in r["file"])
    truth = parse_corners(row["corners"])
    assert truth is not None
    regions = find_plates(cv2.imread(str(plate_data / row["file"])))
    assert max(polygon_iou(r.corners, truth) for r in regions) > 0.5


def test_pipeline_from_bytes_and_vote(plate_data: Path, plate_rows: list[dict[str, str]]) -> None:
    scene = next(r for r in plate_rows if "0ee2893a76568d53" in r["file"])
    rec = recognise((plate_data / scene["file"]).read_bytes())
    assert rec.kind == "scene"
    assert rec.plate == scene["plate"]
    assert rec.corners is not None
    assert polygon_iou(rec.corners, parse_corners(scene["corners"]) or rec.corners) > 0.5
    # Results cross process boundaries (ProcessPoolExecutor) intact.
    assert pickle.loads(pickle.dumps(rec)) == rec

    crop = _crops(plate_rows)[0]
    frames = [recognise((plate_data / crop["file"]).read_bytes()) for _ in range(2)]
    assert frames[0].kind == "crop"
    assert vote(frames)[0].plate == crop["plate"]


class _ScoredReader:
    """A reader whose every read is one plate at a fixed raw score, counting its reads."""

    name = "rapidocr"

    def __init__(self, score: float) -> None:
        self.score = score
        self.reads = 0

    def read(
        self, image: np.ndarray, color: str | None = None, color_sure: bool = False
    ) -> ReadResult:
        self.reads += 1
        return ReadResult(self.name, (Candidate("皖A12345", self.score),))


@pytest.mark.parametrize(("score", "reads"), [(0.95, 1), (0.7, 2), (0.3, 2)])
def test_a_doubtful_crop_is_read_again(
    monkeypatch: pytest.MonkeyPatch, score: float, reads: int
) -> None:
    scored = _ScoredReader(score)
    monkeypatch.setitem(pipeline._READERS, "rapidocr", scored)
    crop = np.full((24, 94, 3), 128, dtype=np.uint8)
    assert recognise(crop, "crop", "rapidocr", calibrated=False).plate == "皖A12345"
    assert scored.reads == reads


def test_pipeline_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        recognise(b"not an image")


def test_doubtful_crops_are_read_again_denoised(
    plate_data: Path, plate_rows: list[dict[str, str]]
) -> None:
    """Heavy JPEG and night noise: the grammar-constrained decode and the denoised grey
    variant (read when the first read is doubtful) read far more of the same 40 crops
    (2026-12-06: JPEG 32 → 52 of 80, night 64 → 79 of 80 with the reader before them)."""
    rows = [r for r in plate_rows if r["kind"] == "crop"][:40]
    images = [(cv2.imread(str(plate_data / r["file"])), r) for r in rows]

    def exact(condition: str) -> int:
        return sum(
            recognise(
                degrade(image, condition, Path(r["file"]).name, seed), "crop", "rapidocr"
            ).plate
            == r["plate"]
            for image, r in images
            for seed in (7, 8)
        )

    assert exact("jpeg") >= 48
    assert exact("night") >= 72


def test_a_plate_in_a_dark_frame_is_found_once_the_light_is_evened_out(
    plate_data: Path, plate_rows: list[dict[str, str]]
) -> None:
    """A whole frame at night (a tenth of the light, a sodium cast, the camera's noise): the
    blue plate is grey to the colour-led localisation, which found no plate in these three
    copies. Looked at again with the light evened out, each reads exactly."""
    row = next(r for r in plate_rows if r["plate"] == "皖A0N718" and r["kind"] == "scene")
    image = cv2.imread(str(plate_data / row["file"]), cv2.IMREAD_COLOR)
    for seed in range(3):
        dark = degrade(image, "night", Path(row["file"]).name, seed)
        found = recognise(dark, kind_hint="scene")
        assert found.plate == "皖A0N718", seed
        assert found.corners is not None
        truth = parse_corners(row["corners"])
        assert truth is not None and polygon_iou(found.corners, truth) > 0.5


def _held_out_crops(
    plate_data: Path, plate_rows: list[dict[str, str]]
) -> list[tuple[np.ndarray, dict[str, str]]]:
    rows = [r for r in plate_rows if r["kind"] == "crop" and unseen(Path(r["file"]).name, "crop")]
    return [(cv2.imread(str(plate_data / r["file"]), cv2.IMREAD_COLOR), r) for r in rows]


def test_only_crops_squeezed_hard_by_jpeg_are_smoothed(
    plate_data: Path, plate_rows: list[dict[str, str]]
) -> None:
    """The photos as they are (JPEG files at an ordinary quality) keep every pixel; the same
    crops coded at quality 10 are smoothed; a crop too narrow to tell is left alone."""
    crops = _held_out_crops(plate_data, plate_rows)
    for image, row in crops:
        assert pipeline.deblocked(image) is image, row["file"]
    squeezed = [
        cv2.imdecode(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 10])[1], 1)
        for image, _ in crops
    ]
    smoothed = sum(pipeline.deblocked(image) is not image for image in squeezed)
    assert smoothed >= 0.9 * len(squeezed)
    # Half of a squeezed crop, its block grid kept: blocky, but too few block edges to trust.
    narrow = next(
        image[:, :48] for image in squeezed if pipeline.jpeg_blockiness(image[:, :48]) >= 1.3
    )
    assert pipeline.deblocked(narrow) is narrow


def test_crops_squeezed_hard_by_jpeg_read_better_smoothed(
    plate_data: Path, plate_rows: list[dict[str, str]]
) -> None:
    """Held-out crops at JPEG quality 8-14 (seeds 8 and 9): the default reader read 194 of
    228 exactly as they came, 200 with their block edges smoothed away."""
    crops = _held_out_crops(plate_data, plate_rows)
    exact = sum(
        recognise(degrade(image, "jpeg", Path(r["file"]).name, seed), "crop").plate == r["plate"]
        for image, r in crops
        for seed in (8, 9)
    )
    assert exact >= 197
