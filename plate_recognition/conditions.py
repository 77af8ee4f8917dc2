"""Gate conditions: seeded, deterministic degradations of labelled plate photos.

Real gate cameras see plates at night, through glare and rain, moving, far away, heavily
compressed and at an angle (DESIGN.md, "Numbers the system is built to"). The labelled
photos are mostly clean, so evaluation and calibration degrade them in memory, never on
disk: :func:`degrade` turns one image into the same degraded copy every time for the same
``(condition, key, seed)``, where ``key`` names the photo (its file name).

Each condition draws its parameters from a generator seeded by a stable hash of
``(condition, key, seed)`` (CRC-32, not Python's salted ``hash``), so several seeds give
several different degraded copies of one photo and a rerun gives the same ones.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import cv2
import numpy as np

Image = np.ndarray


def _rng(condition: str, key: str, seed: int) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{condition}\0{key}\0{seed}".encode()))


def _clip(image: np.ndarray) -> Image:
    return np.clip(image, 0, 255).astype(np.uint8)


def night(image: Image, rng: np.random.Generator) -> Image:
    """Low light: dark, flattened, a colour cast of sodium or LED light, sensor noise
    (shot noise that grows with signal plus read noise), then the camera's gain."""
    img = image.astype(np.float32) / 255.0
    level = rng.uniform(0.15, 0.3)
    img = np.power(img, rng.uniform(1.0, 1.4)) * level
    cast = np.array([rng.uniform(0.75, 1.15), 1.0, rng.uniform(0.9, 1.3)], dtype=np.float32)
    img = img * cast  # BGR
    shot = rng.normal(0.0, 1.0, img.shape).astype(np.float32) * np.sqrt(img / 400.0)
    read = rng.normal(0.0, rng.uniform(0.004, 0.010), img.shape).astype(np.float32)
    img = img + shot + read
    # The camera's gain brings back part of the light, and the noise with it.
    gain = rng.uniform(0.75, 1.25) / level
    return _clip(img * gain * 255.0)


def glare_rain(image: Image, rng: np.random.Generator) -> Image:
    """A headlamp or sun glare spot washing out part of the plate, and rain streaks."""
    h, w = image.shape[:2]
    img = image.astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.0, 1.0) * h
    sx, sy = rng.uniform(0.12, 0.28) * w, rng.uniform(0.4, 0.9) * h
    spot = np.exp(-(((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))
    img = img + (rng.uniform(110, 190) * spot)[..., None]
    img = img * rng.uniform(0.8, 1.0) + rng.uniform(10, 40)  # veiling glare: less contrast
    streaks: np.ndarray = np.zeros((h, w), np.float32)
    angle = np.deg2rad(rng.uniform(-20, 20))
    length = rng.uniform(0.25, 0.6) * h
    for _ in range(int(rng.integers(max(6, w // 8), max(12, w // 3)))):
        x0, y0 = rng.uniform(0, w), rng.uniform(-0.3 * h, h)
        x1, y1 = x0 + np.sin(angle) * length, y0 + np.cos(angle) * length
        cv2.line(
            streaks,
            (int(x0), int(y0)),
            (int(x1), int(y1)),
            float(rng.uniform(40, 110)),
            1,
            cv2.LINE_AA,
        )
    streaks = cv2.GaussianBlur(streaks, (3, 3), 0)
    img = img + streaks[..., None]
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.7))  # water on the lens
    return _clip(img)


def motion_blur(image: Image, rng: np.random.Generator) -> Image:
    """A car moving through the gate: linear blur along a near-horizontal direction."""
    w = image.shape[1]
    length = max(3, round(rng.uniform(0.03, 0.06) * w))
    angle = rng.uniform(-25, 25)
    kernel: np.ndarray = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), angle, 1.0)
    kernel = np.asarray(cv2.warpAffine(kernel, rot, (length, length)), dtype=np.float32)
    kernel = kernel / max(float(kernel.sum()), 1e-6)
    return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REPLICATE)


def distant(image: Image, rng: np.random.Generator) -> Image:
    """A plate farther from the camera: 35-50 % of its size, as the sensor sampled it."""
    h, w = image.shape[:2]
    scale = rng.uniform(0.35, 0.5)
    small = cv2.resize(
        image, (max(8, round(w * scale)), max(8, round(h * scale))), interpolation=cv2.INTER_AREA
    )
    return small


def jpeg(image: Image, rng: np.random.Generator) -> Image:
    """A camera or uplink squeezing frames hard: JPEG at quality 8-14."""
    quality = int(rng.integers(8, 15))
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR) if ok else None
    if decoded is None:  # pragma: no cover - OpenCV always encodes a valid array
        raise ValueError("JPEG encoding failed")
    return np.asarray(decoded)


def tilt(image: Image, rng: np.random.Generator) -> Image:
    """A camera off the lane's axis: rotation, shear and perspective (the far side of the
    plate shorter), the background filled by the image's own edges."""
    h, w = image.shape[:2]
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
    rot = np.deg2rad(rng.uniform(-10, 10))
    shear = rng.uniform(-0.15, 0.15)
    persp = rng.uniform(-0.18, 0.18)  # share of the height lost on one side
    cx, cy = w / 2, h / 2
    pts = []
    for x, y in src:
        dx, dy = x - cx, y - cy
        dx += shear * dy
        dy *= 1 - persp * (dx / w)  # one side shorter: perspective
        rx = dx * np.cos(rot) - dy * np.sin(rot)
        ry = dx * np.sin(rot) + dy * np.cos(rot)
        pts.append([cx + rx, cy + ry])
    dst = np.array(pts, dtype=np.float32)
    # Keep the whole plate in the frame: grow the output to the warped corners.
    min_xy = dst.min(axis=0)
    dst -= min_xy
    size = np.ceil(dst.max(axis=0)).astype(int)
    matrix = cv2.getPerspectiveTransform(src, dst)
    return cv2.warpPerspective(
        image, matrix, (int(size[0]), int(size[1])), borderMode=cv2.BORDER_REPLICATE
    )


Degradation = Callable[[Image, np.random.Generator], Image]

#: Every gate condition, in the order reports list them.
DEGRADATIONS: dict[str, Degradation] = {
    "night": night,
    "glare_rain": glare_rain,
    "motion_blur": motion_blur,
    "distant": distant,
    "jpeg": jpeg,
    "tilt": tilt,
}
CLEAN = "clean"
CONDITIONS: tuple[str, ...] = (CLEAN, *DEGRADATIONS)


def parse_conditions(spec: str | None) -> tuple[str, ...]:
    """``all`` → every condition, ``gate`` → every degradation, else a comma list."""
    if spec is None or spec == "all":
        return CONDITIONS
    if spec == "gate":
        return tuple(DEGRADATIONS)
    names = tuple(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown or not names:
        raise ValueError(
            f"unknown condition(s) {', '.join(unknown) or spec!r}; choose from "
            f"all, gate, {', '.join(CONDITIONS)}"
        )
    return names


def degrade(image: Image, condition: str, key: str, seed: int = 0) -> Image:
    """``image`` (BGR) under ``condition``; the same copy for the same key and seed."""
    if condition == CLEAN:
        return image
    try:
        fn = DEGRADATIONS[condition]
    except KeyError:
        raise ValueError(f"unknown condition {condition!r}") from None
    return fn(image, _rng(condition, key, seed))


def variants(conditions: Sequence[str], seeds: int) -> list[tuple[str, int]]:
    """``(condition, seed)`` pairs: a clean photo once (its reads are identical), each
    degradation with ``seeds`` different seeds."""
    out: list[tuple[str, int]] = []
    for condition in conditions:
        out.extend((condition, s) for s in range(1 if condition == CLEAN else seeds))
    return out
