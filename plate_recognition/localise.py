"""Find licence plates in a camera frame and rectify them to canonical plate images.

Chinese plates are saturated blue (ordinary cars), light green (new energy) or yellow
(large vehicles) rectangles with an aspect ratio near 3.1-3.4. We threshold each colour in
HSV, close the characters' holes, and keep quadrilateral-ish blobs with plate-like shape;
a vertical-edge density map adds candidates when colour fails (night, colour cast).
Candidates are ranked, not decided: the pipeline reads the best few and keeps the one
the recogniser is most confident about, which also rejects blue signs and car bodies.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: Corner order used throughout (and in labels.csv): bottom-right, bottom-left, top-left,
#: top-right, as (x, y) pixel coordinates.
Corners = tuple[tuple[float, float], tuple[float, float], tuple[float, float], tuple[float, float]]

#: Canonical rectified sizes (width, height): 440x140 mm ordinary, 480x140 mm new energy.
CANONICAL_SIZE = {"blue": (220, 70), "yellow": (220, 70), "green": (240, 70)}
_DEFAULT_SIZE = (220, 70)
#: Plate colours with dark characters on a light ground.
LIGHT_COLORS = frozenset({"green", "yellow", "white"})
_MIN_COLOR_SHARE = 0.25
#: Share of a crop its colour must cover (with the characters' polarity agreeing) to be
#: sure. Of the 500 labelled crops clean and 3 copies under each gate condition (seeds
#: 700-702) none clean, distant, JPEG or tilted got a wrong sure colour, ≤ 0.5 % of the
#: glare, motion-blurred and night ones; 89 % of the clean crops are sure.
SURE_COLOR_SHARE = 0.35

# HSV ranges (OpenCV hue is 0-179). Green is wide and weakly saturated because new-energy
# plates fade from green to white towards the top.
_HSV_RANGES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "blue": ((98, 90, 50), (128, 255, 255)),
    "green": ((38, 45, 90), (88, 255, 255)),
    "yellow": ((12, 90, 90), (34, 255, 255)),
}
# Extra masks for hard light: a strict one separates a plate from a dark blue bumper, the
# loose ones catch purple-cast blue and night-time green.
_HSV_VARIANTS: tuple[tuple[str, tuple[int, int, int], tuple[int, int, int]], ...] = (
    *((name, lo, hi) for name, (lo, hi) in _HSV_RANGES.items()),
    ("blue", (98, 120, 110), (128, 255, 255)),
    ("blue", (100, 60, 60), (140, 255, 255)),
    ("green", (38, 60, 35), (88, 255, 255)),
)
# Margins added around a blob before rectifying, as fractions of the plate's width/height
# (left+right, top, bottom): the recogniser reads better with a little background, and a
# new-energy plate's mask misses its white top.
_MARGINS = {"green": (0.04, 0.30, 0.08)}
_DEFAULT_MARGIN = (0.03, 0.10, 0.10)
_MIN_ASPECT, _MAX_ASPECT = 1.8, 6.5
_MAX_CANDIDATES = 6
#: A row of 7-8 characters crosses dark/light at least ~12 times; car paint, lamps and
#: signs rarely do.
_MIN_TRANSITIONS = 7.0
#: Where :func:`_tighten` looks for a light plate around its colour blob: the frame it
#: warps the neighbourhood to (w, h) and how far it grows the blob (side, top, bottom).
_TIGHTEN_FRAME = (240, 120)
_TIGHTEN_SEARCH = (0.1, 0.6, 0.4)


@dataclass(frozen=True, slots=True)
class PlateRegion:
    """One plate candidate in a frame: corners, rectified crop, colour guess, score."""

    corners: Corners
    crop: np.ndarray
    color: str | None
    score: float


def order_corners(points: np.ndarray) -> Corners:
    """Order four points as bottom-right, bottom-left, top-left, top-right."""
    pts = np.asarray(points, dtype=np.float64).reshape(4, 2)
    by_y = pts[np.argsort(pts[:, 1])]
    top = by_y[:2][np.argsort(by_y[:2, 0])]
    bottom = by_y[2:][np.argsort(by_y[2:, 0])]
    tl, tr = top
    bl, br = bottom
    return (
        (float(br[0]), float(br[1])),
        (float(bl[0]), float(bl[1])),
        (float(tl[0]), float(tl[1])),
        (float(tr[0]), float(tr[1])),
    )


def corners_height(corners: Corners) -> float:
    """A plate quadrilateral's height in pixels: the mean of its left and right sides."""
    br, bl, tl, tr = (np.array(c) for c in corners)
    return float((np.linalg.norm(bl - tl) + np.linalg.norm(br - tr)) / 2)


def rectify(image: np.ndarray, corners: Corners, size: tuple[int, int]) -> np.ndarray:
    """Perspective-warp the quadrilateral ``corners`` to a ``size`` (w, h) image."""
    w, h = size
    src = np.array(corners, dtype=np.float32)
    dst = np.array([[w - 1, h - 1], [0, h - 1], [0, 0], [w - 1, 0]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(src, dst)
    return cv2.warpPerspective(image, matrix, (w, h), flags=cv2.INTER_CUBIC)


def expand(corners: Corners, side: float, top: float, bottom: float) -> Corners:
    """Grow a plate quadrilateral along its own axes (keeps the perspective)."""
    br, bl, tl, tr = (np.array(c) for c in corners)
    right = ((tr - tl) + (br - bl)) / 2
    down = ((bl - tl) + (br - tr)) / 2
    new = (
        br + side * right + bottom * down,
        bl - side * right + bottom * down,
        tl - side * right - top * down,
        tr + side * right - top * down,
    )
    return (
        (float(new[0][0]), float(new[0][1])),
        (float(new[1][0]), float(new[1][1])),
        (float(new[2][0]), float(new[2][1])),
        (float(new[3][0]), float(new[3][1])),
    )


def _color_shares(crop: np.ndarray) -> dict[str, float]:
    """Share of the crop's pixels in each plate colour's HSV range."""
    hsv = cv2.cvtColor(crop, cv2.COLOR_BGR2HSV)
    area = float(crop.shape[0] * crop.shape[1])
    return {
        name: cv2.countNonZero(cv2.inRange(hsv, np.array(lo), np.array(hi))) / area
        for name, (lo, hi) in _HSV_RANGES.items()
    }


def classify_color(crop: np.ndarray) -> str | None:
    """Plate background colour of a (roughly) cropped plate: blue, green, yellow or None."""
    shares = _color_shares(crop)
    name = max(shares, key=lambda k: shares[k])
    # The background covers well over half of a plate; characters and border the rest.
    return name if shares[name] >= _MIN_COLOR_SHARE else None


def _light_background(crop: np.ndarray) -> bool:
    """Whether the plate is dark characters on a light ground (green, yellow, white)
    rather than light on dark (blue, black): the larger Otsu class of the crop's middle,
    which the characters never fill, is the ground."""
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    h, w = gray.shape
    middle = gray[h // 6 : h - h // 6, w // 20 : w - w // 20]
    _, binary = cv2.threshold(middle, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(binary.mean()) > 0.5


def plate_color(crop: np.ndarray) -> tuple[str | None, bool]:
    """Colour of a rectified plate crop and whether it is *sure*: ``(None, False)`` when no
    colour covers enough of it or when hue and character polarity disagree (a blue plate
    under a green cast still has light characters on a dark ground); sure when the colour
    also covers at least :data:`SURE_COLOR_SHARE` of the crop. Sure is what lets the reader
    restrict its constrained decoding to the colour's plate shapes."""
    shares = _color_shares(crop)
    name = max(shares, key=lambda k: shares[k])
    if shares[name] < _MIN_COLOR_SHARE or _light_background(crop) != (name in LIGHT_COLORS):
        return None, False
    return name, shares[name] >= SURE_COLOR_SHARE


def polygon_iou(a: Corners, b: Corners) -> float:
    """Intersection over union of two convex quadrilaterals."""
    pa = cv2.convexHull(np.array(a, dtype=np.float32))
    pb = cv2.convexHull(np.array(b, dtype=np.float32))
    inter, _ = cv2.intersectConvexConvex(pa, pb)
    union = cv2.contourArea(pa) + cv2.contourArea(pb) - inter
    return float(inter / union) if union > 0 else 0.0


def _quad(contour: np.ndarray) -> np.ndarray:
    """Four corners of a blob: its polygon approximation if that has 4 points, else the
    minimum-area rectangle (keeps perspective when the plate is seen at an angle)."""
    hull = cv2.convexHull(contour)
    peri = cv2.arcLength(hull, True)
    for eps in (0.02, 0.03, 0.04, 0.06):
        approx = cv2.approxPolyDP(hull, eps * peri, True)
        if len(approx) == 4:
            return approx.reshape(4, 2).astype(np.float32)
    return cv2.boxPoints(cv2.minAreaRect(contour)).astype(np.float32)


def _shape_score(contour: np.ndarray, image_area: float) -> float:
    """How plate-like a blob is (0 = not at all): aspect near 3.2, solid, sensible size."""
    (_, _), (rw, rh), _ = cv2.minAreaRect(contour)
    long_side, short_side = max(rw, rh), min(rw, rh)
    if short_side < 8 or long_side < 30:
        return 0.0
    aspect = long_side / short_side
    area = long_side * short_side
    if not _MIN_ASPECT <= aspect <= _MAX_ASPECT or not 3e-4 <= area / image_area <= 0.15:
        return 0.0
    fill = cv2.contourArea(contour) / area
    if fill < 0.45:
        return 0.0
    return fill * float(np.exp(-abs(np.log(aspect / 3.2))))


def _colour_blobs(
    hsv: np.ndarray, lo: tuple[int, int, int], hi: tuple[int, int, int]
) -> list[np.ndarray]:
    mask = cv2.inRange(hsv, np.array(lo), np.array(hi))
    k = max(3, mask.shape[1] // 120)
    # Closing fills the characters (which are not plate-coloured) without merging the
    # plate into neighbouring same-coloured paint.
    mask = cv2.morphologyEx(
        mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (3 * k, k))
    )
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((k, k), np.uint8))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return list(contours)


def _edge_blobs(gray: np.ndarray) -> list[np.ndarray]:
    """Regions dense in vertical strokes: a row of characters, whatever the colours."""
    blur = cv2.GaussianBlur(gray, (5, 5), 0)
    sobel = cv2.convertScaleAbs(cv2.Sobel(blur, cv2.CV_16S, 1, 0, ksize=3))
    _, binary = cv2.threshold(sobel, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    w = gray.shape[1]
    k = max(3, w // 60)
    binary = cv2.morphologyEx(
        binary, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (2 * k, max(3, k // 2)))
    )
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, np.ones((max(3, k // 2),) * 2, np.uint8))
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return list(contours)


def _transitions(crop: np.ndarray) -> float:
    """Median count of dark/light changes along the middle rows of a rectified crop."""
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    h = gray.shape[0]
    band = gray[int(0.3 * h) : int(0.7 * h)]
    _, binary = cv2.threshold(band, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    changes = np.abs(np.diff(binary.astype(np.int8), axis=1)).sum(axis=1)
    return float(np.median(changes))


def _tighten(image: np.ndarray, corners: Corners) -> Corners | None:
    """Bounds of the bright rectangle around a light (new-energy) plate's colour blob.

    The green mask of a new-energy plate catches only its greener lower part (the top
    fades to white), so the blob is loose; the plate as a whole is brighter than the car
    around it, which Otsu on the neighbourhood separates.
    """
    w, h = _TIGHTEN_FRAME
    side, top, bottom = _TIGHTEN_SEARCH
    src = np.array(expand(corners, side, top, bottom), dtype=np.float32)
    dst = np.array([[w - 1, h - 1], [0, h - 1], [0, 0], [w - 1, 0]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(src, dst)
    gray = cv2.cvtColor(cv2.warpPerspective(image, matrix, (w, h)), cv2.COLOR_BGR2GRAY)
    _, bright = cv2.threshold(
        cv2.GaussianBlur(gray, (5, 5), 0), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU
    )
    # Closing fills the dark characters so the plate is one component.
    bright = cv2.morphologyEx(
        bright, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (w // 16, h // 13))
    )
    contours, _ = cv2.findContours(bright, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    rect = cv2.minAreaRect(max(contours, key=cv2.contourArea))
    # The blob's own area in this frame; a plate is neither much smaller nor much larger.
    blob_area = (w / (1 + 2 * side)) * (h / (1 + top + bottom))
    if not 0.5 <= rect[1][0] * rect[1][1] / blob_area <= 2.0:
        return None
    box = cv2.boxPoints(rect).reshape(-1, 1, 2).astype(np.float32)
    return order_corners(cv2.perspectiveTransform(box, np.linalg.inv(matrix)).reshape(4, 2))


def _framed(
    image: np.ndarray, corners: Corners, color: str | None, margins: tuple[float, float, float]
) -> tuple[np.ndarray, float]:
    """Rectified crop of a candidate (with ``margins``) and its texture."""
    crop = rectify(image, expand(corners, *margins), CANONICAL_SIZE.get(color or "", _DEFAULT_SIZE))
    return crop, _transitions(crop)


def find_plates(image: np.ndarray, limit: int = _MAX_CANDIDATES) -> list[PlateRegion]:
    """Plate candidates in a BGR frame, best first (possibly empty)."""
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    image_area = float(image.shape[0] * image.shape[1])
    scored: list[tuple[float, np.ndarray, str | None]] = []
    for name, lo, hi in _HSV_VARIANTS:
        for contour in _colour_blobs(hsv, lo, hi):
            s = _shape_score(contour, image_area)
            if s > 0:
                scored.append((s, contour, name))
    # Edge blobs rank below colour blobs of the same shape: colour is the stronger cue.
    for contour in _edge_blobs(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)):
        s = _shape_score(contour, image_area)
        if s > 0:
            scored.append((0.5 * s, contour, None))
    scored.sort(key=lambda t: -t[0])
    regions: list[PlateRegion] = []
    for score, contour, color in scored:
        corners = order_corners(_quad(contour))
        if any(polygon_iou(corners, r.corners) > 0.5 for r in regions):
            continue
        if color is None:
            color = classify_color(rectify(image, corners, _DEFAULT_SIZE))
        crop, texture = _framed(image, corners, color, _MARGINS.get(color or "", _DEFAULT_MARGIN))
        tight = _tighten(image, corners) if color == "green" else None
        if tight is not None:
            # Keep whichever framing shows more character strokes.
            tight_crop, tight_texture = _framed(image, tight, color, _DEFAULT_MARGIN)
            if tight_texture >= texture:
                corners, crop, texture = tight, tight_crop, tight_texture
        if texture < _MIN_TRANSITIONS:
            continue
        regions.append(PlateRegion(corners, crop, color, score * min(1.0, texture / 14.0)))
        if len(regions) >= limit:
            break
    return sorted(regions, key=lambda r: -r.score)


def parse_corners(text: str) -> Corners | None:
    """Corners from labels.csv's ``x,y;x,y;x,y;x,y`` (empty -> None)."""
    if not text.strip():
        return None
    pts = [tuple(float(v) for v in p.split(",")) for p in text.split(";")]
    if len(pts) != 4 or any(len(p) != 2 for p in pts):
        raise ValueError(f"bad corners {text!r}")
    return (
        (pts[0][0], pts[0][1]),
        (pts[1][0], pts[1][1]),
        (pts[2][0], pts[2][1]),
        (pts[3][0], pts[3][1]),
    )
