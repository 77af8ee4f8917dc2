"""Train the small plate recognisers shipped as ``plate_recognition/models/platenet.onnx``
and ``platenet2.onnx`` (the same recipe from another ``--seed``).

    ./scripts/train-reader [--steps 12000] [--seed 21] [--out plate_recognition/models/…]
    ./scripts/train-reader --seed 22 --out plate_recognition/models/platenet2.onnx

A CRNN-style network (convolutions, then 1-D convolutions along the plate, CTC over the
plate alphabet) read at 24×96, about the crops' own 94×24. It learns from the training part of
the shared labelled crops (:mod:`plate_recognition.holdout` keeps a quarter out for
measuring) under heavy, randomised degradations of our own, wider than the evaluation's
gate conditions and drawn independently of them: crop jitter and perspective, darkness
and sensor noise, colour casts and inverted polarity (yellow plates are dark on light),
glare and streaks, motion and focus blur, down-sampling, heavy JPEG. PyTorch is needed
only here, never at run time: the network is exported to ONNX and read with onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from plate_recognition.conditions import DEGRADATIONS
from plate_recognition.ctc import best_path_runs
from plate_recognition.engines.rapidocr import FRAME_PX, RapidOcrReader
from plate_recognition.engines.rapidocr import HEIGHT as RECOGNISER_HEIGHT
from plate_recognition.evaluate import load_samples
from plate_recognition.grammar import PLATE_CHARSET
from plate_recognition.holdout import unseen

HEIGHT, WIDTH = 24, 96
#: CTC classes: the blank, then the plate alphabet.
CLASSES = ("", *PLATE_CHARSET)
_INDEX = {ch: i for i, ch in enumerate(CLASSES)}

Labelled = list[tuple[np.ndarray, str]]
Boxes = list[tuple[int, int]]
Segmented = list[tuple[np.ndarray, str, Boxes]]


def load_training(folder: Path) -> Labelled:
    """The labelled crops outside the held-out part, as (BGR image, plate)."""
    out = []
    for sample in load_samples(folder):
        if unseen(sample.path.name, sample.kind):
            continue
        image = cv2.imread(str(sample.path), cv2.IMREAD_COLOR)
        if image is not None:
            out.append((image, sample.plate))
    return out


def _jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Imperfect localisation and a camera off axis: each corner moved, margins gained or
    (a little) lost, a slight turn, at the photo's own size. Corners move inwards too
    little to cut a character off: a label must stay true to its picture."""
    h, w = image.shape[:2]
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    # Per corner: how far it moves outwards (negative: inwards), along x and y.
    out_x = rng.uniform(-0.015, 0.08, 4) * w
    out_y = rng.uniform(-0.05, 0.2, 4) * h
    sign = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float32)
    moved = src + sign * np.stack([out_x, out_y], axis=1).astype(np.float32)
    angle = np.deg2rad(rng.uniform(-5, 5))
    centre = moved.mean(axis=0)
    c, s_ = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s_], [s_, c]], np.float32)
    moved = (moved - centre) @ rot.T + centre
    matrix = cv2.getPerspectiveTransform(moved.astype(np.float32), src)
    border = cv2.BORDER_REPLICATE if rng.random() < 0.7 else cv2.BORDER_CONSTANT
    fill = tuple(float(v) for v in rng.uniform(0, 255, 3))
    return cv2.warpPerspective(image, matrix, (w, h), borderMode=border, borderValue=fill)


def _light(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img: np.ndarray = image.astype(np.float32)
    if rng.random() < 0.15:  # inverted polarity: yellow and white plates, dark on light
        img = 255.0 - img
    if rng.random() < 0.2:
        img = img[:, :, rng.permutation(3)]
    if rng.random() < 0.1:
        gray = img.mean(axis=2, keepdims=True)
        img = np.repeat(gray, 3, axis=2)
    contrast = rng.uniform(0.4, 1.3)
    img = (img - 128.0) * contrast + 128.0 + rng.uniform(-60, 60)
    img = img * rng.uniform(0.7, 1.3, 3).astype(np.float32)
    if rng.random() < 0.25:  # dark and noisy
        img = img * rng.uniform(0.1, 0.4)
        img = img + rng.normal(0, rng.uniform(2, 12), img.shape)
        img = img / max(float(img.max()), 1.0) * rng.uniform(120, 255)
    return np.clip(img, 0, 255).astype(np.uint8)


def _glare(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    img = image.astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(1, 3))):
        cx, cy = rng.uniform(0, w), rng.uniform(-0.2 * h, 1.2 * h)
        sx, sy = rng.uniform(0.08, 0.4) * w, rng.uniform(0.3, 1.2) * h
        spot = np.exp(-(((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))
        img += (rng.uniform(60, 220) * spot)[..., None]
    streaks = np.zeros((h, w), np.float32)
    angle = np.deg2rad(rng.uniform(-30, 30))
    for _ in range(int(rng.integers(0, w // 2 + 1))):
        x0, y0 = rng.uniform(0, w), rng.uniform(-0.5 * h, h)
        length = rng.uniform(0.2, 0.8) * h
        end = (int(x0 + math.sin(angle) * length), int(y0 + math.cos(angle) * length))
        cv2.line(streaks, (int(x0), int(y0)), end, float(rng.uniform(30, 130)), 1, cv2.LINE_AA)
    img += cv2.GaussianBlur(streaks, (3, 3), 0)[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w = image.shape[1]
    if rng.random() < 0.5:
        sigma = rng.uniform(0.4, 1.6)
        return cv2.GaussianBlur(image, (0, 0), sigma)
    length = max(2, round(rng.uniform(0.02, 0.09) * w))
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), rng.uniform(-35, 35), 1.0)
    kernel = np.asarray(cv2.warpAffine(kernel, rot, (length, length)), np.float32)
    kernel /= max(float(kernel.sum()), 1e-6)
    return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REPLICATE)


def _small(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    scale = rng.uniform(0.25, 0.7)
    size = (max(6, round(w * scale)), max(4, round(h * scale)))
    method = [cv2.INTER_AREA, cv2.INTER_LINEAR, cv2.INTER_NEAREST][int(rng.integers(0, 3))]
    return cv2.resize(image, size, interpolation=method)


def _jpeg(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    quality = int(rng.integers(4, 40))
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR) if ok else None
    return image if decoded is None else np.asarray(decoded)


#: The degradations one copy may draw (a few of them, in this order).
_DEGRADATIONS = (_glare, _blur, _small, _jpeg)


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One randomly degraded copy of a crop, resized to the network's input: jitter, light
    and colour, then up to three degradations (each copy still readable by a person, most
    of the time: more stacked at once teach the network to guess)."""
    if rng.random() < 0.85:
        image = _jitter(image, rng)
    if rng.random() < 0.7:
        image = _light(image, rng)
    count = int(rng.choice(4, p=[0.2, 0.4, 0.3, 0.1]))
    chosen = sorted(rng.choice(len(_DEGRADATIONS) + 1, size=count, replace=False))
    for k in chosen:
        if k == len(_DEGRADATIONS):  # one of the evaluation's own kinds, on fresh seeds
            name = list(DEGRADATIONS)[int(rng.integers(0, len(DEGRADATIONS)))]
            image = DEGRADATIONS[name](image, rng)
        else:
            image = _DEGRADATIONS[k](image, rng)
    return cv2.resize(image, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)


def character_boxes(reader: RapidOcrReader, image: np.ndarray, plate: str) -> Boxes | None:
    """Each character's column span in a crop, cut halfway between the frames where the
    general PP-OCR recogniser emits it and the next; ``None`` unless its greedy read is
    exactly ``plate`` (the alignment is then trustworthy)."""
    h, w = image.shape[:2]
    runs = best_path_runs(reader.probabilities(image).argmax(axis=1))
    if "".join(reader.chars[label] for _, _, label in runs) != plate:
        return None
    # A frame of the recogniser covers FRAME_PX pixels of the crop resized to its height.
    scale = w / math.ceil(RECOGNISER_HEIGHT * w / h) * FRAME_PX
    cuts = [
        0,
        *(round(scale * (runs[i][1] + 1 + runs[i + 1][0]) / 2) for i in range(len(runs) - 1)),
        w,
    ]
    return [(cuts[i], cuts[i + 1]) for i in range(len(runs))]


def segmented(samples: Labelled) -> Segmented:
    """The 7-character training crops whose characters :func:`character_boxes` finds."""
    reader = RapidOcrReader()
    out = []
    for image, plate in samples:
        boxes = character_boxes(reader, image, plate) if len(plate) == 7 else None
        if boxes is not None:
            out.append((image, plate, boxes))
    return out


def splice(base: Segmented, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A plate nobody photographed: one crop with about half its characters replaced by the
    same position's character cut from other crops. A few hundred photographed plates
    teach a network those plates; recombined ones teach it characters."""
    image, plate, boxes = base[int(rng.integers(0, len(base)))]
    out, chars = image.copy(), list(plate)
    h = image.shape[0]
    for k in range(7):
        if rng.random() < 0.5:
            continue
        donor, donor_plate, donor_boxes = base[int(rng.integers(0, len(base)))]
        (x0, x1), (d0, d1) = boxes[k], donor_boxes[k]
        if not 0.75 <= (d1 - d0) / (x1 - x0) <= 1.33:
            continue  # photographed at another scale: the cell would not fit
        cell = cv2.resize(donor[:, d0:d1], (x1 - x0, h), interpolation=cv2.INTER_LINEAR)
        # The donor's colours brought to the base's own (per channel mean and spread).
        own = image[:, x0:x1].reshape(-1, 3).astype(np.float32)
        theirs = cell.reshape(-1, 3).astype(np.float32)
        spread = own.std(axis=0) / np.maximum(theirs.std(axis=0), 1.0)
        moved = (cell.astype(np.float32) - theirs.mean(axis=0)) * spread + own.mean(axis=0)
        out[:, x0:x1] = np.clip(moved, 0, 255).astype(np.uint8)
        chars[k] = donor_plate[k]
    return out, "".join(chars)


def _augment_many(
    args: tuple[Labelled, Segmented, int, int],
) -> tuple[np.ndarray, list[str]]:
    samples, spliceable, count, seed = args
    rng = np.random.default_rng(seed)
    images = np.empty((count, HEIGHT, WIDTH, 3), np.uint8)
    plates = []
    for k in range(count):
        if spliceable and rng.random() < 0.6:
            image, plate = splice(spliceable, rng)
        else:
            image, plate = samples[int(rng.integers(0, len(samples)))]
        if rng.random() < 0.9:
            images[k] = augment(image, rng)
        else:
            images[k] = cv2.resize(image, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
        plates.append(plate)
    return images, plates


def make_set(
    samples: Labelled, spliceable: Segmented, count: int, seed: int, procs: int = 2
) -> tuple[np.ndarray, list[str]]:
    """``count`` degraded copies of training crops (or of their recombinations), made on
    ``procs`` cores."""
    chunk = math.ceil(count / (procs * 8))
    starts = range(0, count, chunk)
    jobs = [
        (samples, spliceable, min(chunk, count - i), seed * 1000 + n) for n, i in enumerate(starts)
    ]
    with Pool(procs) as pool:
        parts = pool.map(_augment_many, jobs)
    return np.concatenate([p[0] for p in parts]), [pl for p in parts for pl in p[1]]


def build_model() -> Any:
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]

    class PlateNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                *block(3, 24),
                nn.MaxPool2d(2),  # 12×48
                *block(24, 48),
                nn.MaxPool2d(2),  # 6×24
                *block(48, 96),
                *block(96, 96),
                nn.MaxPool2d((2, 1)),  # 3×24
                *block(96, 128),
                nn.Conv2d(128, 160, (3, 1), bias=False),
                nn.BatchNorm2d(160),
                nn.ReLU(inplace=True),
            )  # 1×24: a frame every 4 pixels of the plate's width
            self.sequence = nn.Sequential(
                nn.Conv1d(160, 160, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Dropout(0.1),
                nn.Conv1d(160, 160, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv1d(160, len(CLASSES), 1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.features(x).squeeze(2)  # N × C × T
            return self.sequence(f)  # N × classes × T

    return PlateNet()


def to_tensor(images: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def greedy(logits: Any) -> list[str]:
    """Each sample's best-path read (for the training log)."""
    return [
        "".join(CLASSES[label] for _, _, label in best_path_runs(row))
        for row in logits.argmax(dim=1).numpy()
    ]


#: The shipped model's seed; another seed trains an independent network on other copies.
DEFAULT_SEED = 21


def train(
    folder: Path, steps: int, batch: int, set_size: int, out: Path, seed: int = DEFAULT_SEED
) -> dict[str, Any]:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    # Each generation's degraded copies are drawn from their own seed, distinct per network.
    generation_seed = 1000 * (seed - DEFAULT_SEED)
    samples = load_training(folder)
    spliceable = segmented(samples)
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    started = time.monotonic()
    step, generation = 0, 0
    log: list[dict[str, Any]] = []
    while step < steps:
        images, plates = make_set(samples, spliceable, set_size, seed=generation_seed + generation)
        generation += 1
        order = np.random.default_rng(generation_seed + generation).permutation(len(plates))
        model.train()
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            x = to_tensor(images[idx])
            targets = torch.tensor([_INDEX[c] for k in idx for c in plates[k]], dtype=torch.long)
            lengths = torch.tensor([len(plates[k]) for k in idx], dtype=torch.long)
            logits = model(x)  # N × C × T
            logp = logits.permute(2, 0, 1).log_softmax(2)  # T × N × C
            t = torch.full((len(idx),), logp.shape[0], dtype=torch.long)
            loss = ctc(logp, targets, t, lengths)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 200 == 0:
                model.eval()
                with torch.no_grad():
                    acc = float(
                        np.mean(
                            [
                                p == q
                                for p, q in zip(
                                    greedy(logits), [plates[k] for k in idx], strict=True
                                )
                            ]
                        )
                    )
                model.train()
                entry = {
                    "step": step,
                    "loss": round(float(loss.detach()), 4),
                    "batch_exact": acc,
                    "s": round(time.monotonic() - started),
                }
                log.append(entry)
                print(json.dumps(entry), flush=True)
            if step >= steps:
                break
    model.eval()
    export(model, out)
    return {
        "steps": steps,
        "seed": seed,
        "training_photos": len(samples),
        "spliceable_photos": len(spliceable),
        "seconds": round(time.monotonic() - started),
        "out": str(out),
    }


def export(model: Any, out: Path) -> None:
    import torch

    class WithSoftmax(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x).permute(0, 2, 1).softmax(2)

    wrapped = WithSoftmax(model).eval()
    dummy = torch.zeros(1, 3, HEIGHT, WIDTH)
    torch.onnx.export(
        wrapped,
        (dummy,),
        str(out),
        input_names=["image"],
        output_names=["probs"],
        dynamic_axes={"image": {0: "n"}, "probs": {0: "n"}},
        opset_version=17,
        dynamo=False,
    )
    import onnx

    proto = onnx.load(str(out))
    meta = proto.metadata_props.add()
    meta.key, meta.value = "classes", json.dumps(list(CLASSES), ensure_ascii=False)
    size = proto.metadata_props.add()
    size.key, size.value = "input", f"{HEIGHT}x{WIDTH}"
    onnx.save(proto, str(out))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/plates"))
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--set-size", type=int, default=40000, help="degraded copies made per generation"
    )
    parser.add_argument("--out", type=Path, default=Path("plate_recognition/models/platenet.onnx"))
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    print(json.dumps(train(args.data, args.steps, args.batch, args.set_size, args.out, args.seed)))


if __name__ == "__main__":
    main()
