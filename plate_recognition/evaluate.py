"""Accuracy evaluation and throughput benchmark on a labelled plate folder.

Usage::

    python -m plate_recognition.evaluate PATH [--engine rapidocr] [--limit N] [--json]
    python -m plate_recognition.evaluate PATH --bench [--seconds 10] [--workers 2] [--json]

``PATH`` holds a ``labels.csv`` (file, plate, color, kind, corners, source) with image
paths relative to it. Progress goes to stderr; the last stdout line is the JSON summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plate_recognition.engines import DEFAULT_ENGINE, ENGINES
from plate_recognition.localise import parse_corners, polygon_iou
from plate_recognition.pipeline import recognise


@dataclass(frozen=True, slots=True)
class Sample:
    path: Path
    plate: str
    color: str
    kind: str
    corners: str


def load_samples(folder: str | Path) -> list[Sample]:
    """Rows of ``folder/labels.csv`` with resolved image paths."""
    root = Path(folder)
    with (root / "labels.csv").open(encoding="utf-8", newline="") as fh:
        return [
            Sample(
                root / row["file"],
                row["plate"],
                row.get("color") or "",
                row.get("kind") or "crop",
                row.get("corners") or "",
            )
            for row in csv.DictReader(fh)
        ]


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j - 1] + (ca != cb), prev[j] + 1, cur[j - 1] + 1))
        prev = cur
    return prev[-1]


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _group_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    chars = sum(len(r["truth"]) for r in rows)
    return {
        "n": n,
        "exact": sum(r["exact"] for r in rows) / n if n else 0.0,
        "top5": sum(r["top5"] for r in rows) / n if n else 0.0,
        "char_accuracy": 1 - sum(r["char_errors"] for r in rows) / chars if chars else 0.0,
    }


def evaluate(
    folder: str | Path,
    engine: str = DEFAULT_ENGINE,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Read every labelled image end to end (localisation included for scenes)."""
    samples = load_samples(folder)[:limit]
    rows: list[dict[str, Any]] = []
    ious: list[float] = []
    times: list[float] = []
    recognise(samples[0].path.read_bytes(), engine=engine)  # load the model untimed
    for i, s in enumerate(samples, 1):
        data = s.path.read_bytes()
        t0 = time.perf_counter()
        rec = recognise(data, engine=engine)
        times.append((time.perf_counter() - t0) * 1000)
        got = rec.plate or ""
        rows.append(
            {
                "file": str(s.path.name),
                "truth": s.plate,
                "read": got,
                "kind": s.kind,
                "color": s.color,
                "exact": got == s.plate,
                "top5": s.plate in [c.plate for c in rec.candidates[:5]],
                "char_errors": min(len(s.plate), levenshtein(got, s.plate)),
            }
        )
        truth_corners = parse_corners(s.corners)
        if truth_corners is not None:
            ious.append(polygon_iou(rec.corners, truth_corners) if rec.corners else 0.0)
        if progress and (i % 50 == 0 or i == len(samples)):
            done = sum(r["exact"] for r in rows)
            print(f"[{engine}] {i}/{len(samples)} exact {done / i:.3f}", file=sys.stderr)
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_color: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_kind[r["kind"]].append(r)
        by_color[r["color"]].append(r)
    green = by_color.get("green", [])
    overall = _group_stats(rows)
    return {
        "engine": engine,
        "n": overall["n"],
        "exact": overall["exact"],
        "top5": overall["top5"],
        "char_accuracy": overall["char_accuracy"],
        "by_kind": {k: _group_stats(v) for k, v in sorted(by_kind.items())},
        "by_color": {k: _group_stats(v) for k, v in sorted(by_color.items())},
        "green_full_length": (
            sum(len(r["read"]) == 8 for r in green) / len(green) if green else None
        ),
        "ms_p50": _percentile(times, 0.5),
        "ms_p99": _percentile(times, 0.99),
        "localisation_iou": statistics.fmean(ious) if ious else None,
        "localisation_iou_gt_0_5": sum(v > 0.5 for v in ious) / len(ious) if ious else None,
        "errors": [
            {"file": r["file"], "truth": r["truth"], "read": r["read"]}
            for r in rows
            if not r["exact"]
        ][:30],
    }


def _bench_worker(paths: list[str], engine: str, seconds: float) -> tuple[int, float]:
    blobs = [Path(p).read_bytes() for p in paths]
    recognise(blobs[0], engine=engine)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        recognise(blobs[done % len(blobs)], engine=engine)
        done += 1
    return done, time.perf_counter() - start


def bench(
    folder: str | Path,
    engine: str = DEFAULT_ENGINE,
    seconds: float = 10.0,
    workers: int = 1,
    kind: str = "crop",
) -> dict[str, Any]:
    """Plates per second on ``kind`` images, one process per worker (one core each)."""
    paths = [str(s.path) for s in load_samples(folder) if s.kind == kind][:200]
    if not paths:
        raise ValueError(f"no {kind} images in {folder}")
    if workers == 1:
        results = [_bench_worker(paths, engine, seconds)]
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_bench_worker, paths, engine, seconds) for _ in range(workers)]
            results = [f.result() for f in futures]
    total = sum(n for n, _ in results)
    rate = sum(n / t for n, t in results)
    return {
        "engine": engine,
        "mode": "bench",
        "kind": kind,
        "workers": workers,
        "cores": os.cpu_count(),
        "plates": total,
        "plates_per_s": rate,
        "plates_per_s_per_core": rate / workers,
        "ms_per_plate_per_core": 1000 * workers / rate if rate else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plate_recognition.evaluate")
    parser.add_argument("path", help="folder with labels.csv and the images it lists")
    parser.add_argument("--engine", default=DEFAULT_ENGINE, choices=ENGINES)
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows")
    parser.add_argument("--json", action="store_true", help="JSON only on stdout")
    parser.add_argument("--bench", action="store_true", help="measure throughput instead")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--kind", default="crop", choices=("crop", "scene"))
    args = parser.parse_args(argv)
    if args.bench:
        result = bench(args.path, args.engine, args.seconds, args.workers, args.kind)
    else:
        result = evaluate(args.path, args.engine, args.limit)
    if not args.json:
        for key, value in result.items():
            if key != "errors":
                print(f"{key}: {value}")
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
