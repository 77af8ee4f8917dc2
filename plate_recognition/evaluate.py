"""Accuracy evaluation and throughput benchmark on a labelled plate folder.

Usage (``parking plates eval|calibrate|bench PATH ...`` runs the same)::

    python -m plate_recognition.evaluate PATH [--engine rapidocr] [--conditions all]
        [--seeds 1] [--limit N] [--json]
    python -m plate_recognition.evaluate PATH --calibrate [--seeds 8] [--json]
    python -m plate_recognition.evaluate PATH --bench [--seconds 10] [--workers 2] [--json]

``PATH`` holds a ``labels.csv`` (file, plate, color, kind, corners, source and optionally
condition) with image paths relative to it. Rows whose ``condition`` is empty or
``clean`` are also read degraded under each requested gate condition
(:mod:`plate_recognition.conditions`, in memory); rows labelled with another condition
are read as they are and counted under it. Progress goes to stderr; the last stdout line
is the JSON summary.
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

import cv2
import numpy as np

from plate_recognition import calibration
from plate_recognition.conditions import CLEAN, CONDITIONS, degrade, parse_conditions
from plate_recognition.engines import DEFAULT_ENGINE, ENGINES
from plate_recognition.grammar import is_valid
from plate_recognition.holdout import TRAINED_ON_SHARED, unseen
from plate_recognition.localise import parse_corners, polygon_iou
from plate_recognition.pipeline import Kind, recognise

#: Scores at which ``wrong_valid_above`` reports the share of different-valid-plate reads.
WRONG_VALID_SCORES = (0.5, 0.8, 0.9, 0.95, 0.99, 0.999)


@dataclass(frozen=True, slots=True)
class Sample:
    path: Path
    plate: str
    color: str
    kind: str
    corners: str
    condition: str = ""


def load_samples(folder: str | Path, held_out_only: bool = False) -> list[Sample]:
    """Rows of ``folder/labels.csv`` with resolved image paths; with ``held_out_only``,
    only those no shipped model was trained on (:func:`plate_recognition.holdout.unseen`)."""
    root = Path(folder)
    with (root / "labels.csv").open(encoding="utf-8", newline="") as fh:
        samples = [
            Sample(
                root / row["file"],
                row["plate"],
                row.get("color") or "",
                row.get("kind") or "crop",
                row.get("corners") or "",
                (row.get("condition") or "").strip(),
            )
            for row in csv.DictReader(fh)
        ]
    return [s for s in samples if unseen(s.path.name, s.kind)] if held_out_only else samples


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


def _condition_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy and calibration quality of one condition's reads."""
    stats = _group_stats(rows)
    scores = [r["score"] for r in rows]
    hits = [r["exact"] for r in rows]
    ece = calibration.expected_calibration_error(scores, hits)
    ece_raw = calibration.expected_calibration_error([r["raw_score"] for r in rows], hits)
    stats.update(
        {
            "wrong_valid": sum(r["wrong_valid"] for r in rows),
            "mean_score": statistics.fmean(scores) if scores else None,
            "ece": round(ece, 4) if ece is not None else None,
            "ece_uncalibrated": round(ece_raw, 4) if ece_raw is not None else None,
        }
    )
    return stats


def _jobs(
    samples: Sequence[Sample], conditions: Sequence[str], seeds: int, seed_start: int
) -> list[tuple[Sample, str, int]]:
    """What to read: a labelled-degraded row as it is, a clean row once clean and
    ``seeds`` times under each requested degradation."""
    jobs: list[tuple[Sample, str, int]] = []
    for s in samples:
        if s.condition and s.condition != CLEAN:
            jobs.append((s, s.condition, -1))  # already degraded: read as it is
            continue
        for condition in conditions:
            if condition == CLEAN:
                jobs.append((s, CLEAN, 0))
            else:
                jobs.extend((s, condition, seed_start + k) for k in range(seeds))
    return jobs


def read_one(sample: Sample, condition: str, seed: int, engine: str) -> dict[str, Any]:
    """One read of one (maybe degraded) photo: the record evaluation and calibration use.

    ``raw_score`` is the engine's own score, ``score`` the calibrated one (the shipped
    table); a read is ``wrong_valid`` when it is a grammatical plate other than the label.
    """
    data = sample.path.read_bytes()
    image: bytes | np.ndarray = data
    if seed >= 0 and condition != CLEAN:
        frame = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if frame is None:
            raise ValueError(f"{sample.path} could not be decoded")
        image = degrade(np.asarray(frame), condition, sample.path.name, seed)
    kind: Kind = "crop" if sample.kind == "crop" else "scene"
    t0, c0 = time.perf_counter(), time.process_time()
    rec = recognise(image, kind_hint=kind, engine=engine)
    ms, cpu_ms = (time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000
    got = rec.plate or ""
    return {
        "file": sample.path.name,
        "condition": condition,
        "seed": seed,
        "kind": sample.kind,
        "color": sample.color,
        "truth": sample.plate,
        "read": got,
        "raw_score": rec.raw_score,
        "score": rec.confidence,
        "exact": got == sample.plate,
        "wrong_valid": bool(got) and got != sample.plate and is_valid(got),
        "top5": sample.plate in [c.plate for c in rec.candidates[:5]],
        "char_errors": min(len(sample.plate), levenshtein(got, sample.plate)),
        "ms": ms,
        "cpu_ms": cpu_ms,
        "corners": list(rec.corners) if rec.corners else None,
        "plate_px": rec.plate_px,
    }


def _read_chunk(jobs: list[tuple[Sample, str, int]], engine: str) -> list[dict[str, Any]]:
    return [read_one(s, c, seed, engine) for s, c, seed in jobs]


def collect_reads(
    folder: str | Path,
    engine: str = DEFAULT_ENGINE,
    conditions: Sequence[str] = CONDITIONS,
    seeds: int = 1,
    seed_start: int = 0,
    limit: int | None = None,
    workers: int = 1,
    progress: bool = True,
    held_out_only: bool = False,
) -> list[dict[str, Any]]:
    """Read every labelled photo under every requested condition (see :func:`read_one`)."""
    samples = load_samples(folder, held_out_only)[:limit]
    if not samples:
        raise ValueError(f"no labelled images in {folder}")
    jobs = _jobs(samples, conditions, seeds, seed_start)
    recognise(samples[0].path.read_bytes(), engine=engine)  # load the model untimed
    rows: list[dict[str, Any]] = []
    chunks = [jobs[i : i + 50] for i in range(0, len(jobs), 50)]

    def report() -> None:
        if progress:
            done = sum(r["exact"] for r in rows)
            print(
                f"[{engine}] {len(rows)}/{len(jobs)} exact {done / len(rows):.3f}",
                file=sys.stderr,
                flush=True,
            )

    if workers <= 1:
        for chunk in chunks:
            rows.extend(_read_chunk(chunk, engine))
            report()
    else:
        with ProcessPoolExecutor(workers) as pool:
            for part in pool.map(_read_chunk, chunks, [engine] * len(chunks)):
                rows.extend(part)
                report()
    return rows


def _wrong_valid_above(rows: list[dict[str, Any]], engine: str) -> dict[str, Any]:
    n = len(rows) or 1
    out: dict[str, Any] = {}
    for t in WRONG_VALID_SCORES:
        out[f"{t:g}"] = sum(r["wrong_valid"] and r["score"] > t for r in rows) / n
    certain = calibration.certain_threshold(engine)
    wrong = sum(r["wrong_valid"] and r["score"] >= certain for r in rows)
    above = sum(r["score"] >= certain for r in rows)
    out["certain"] = {
        "threshold": certain,
        "reads_above": above,
        "share_above": above / n,
        "wrong_valid": wrong,
        "share": wrong / n,
        "wrong_valid_upper95_above": calibration.upper_bound(wrong, above),
    }
    return out


def summarise(rows: list[dict[str, Any]], engine: str) -> dict[str, Any]:
    """The evaluation summary of a list of reads."""
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_color: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_condition: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_kind[r["kind"]].append(r)
        by_color[r["color"]].append(r)
        by_condition[r["condition"]].append(r)
    clean = by_condition.get(CLEAN, [])
    gate = [r for r in rows if r["condition"] != CLEAN]
    green = [r for r in clean if r["color"] == "green"]
    overall = _group_stats(rows)
    ious = [
        polygon_iou(tuple(map(tuple, r["corners"])), truth) if r["corners"] else 0.0  # type: ignore[arg-type]
        for r in clean
        if (truth := r.get("truth_corners")) is not None
    ]
    times = [r["ms"] for r in rows]
    gate_by = {c: _group_stats(v)["exact"] for c, v in by_condition.items() if c != CLEAN}
    return {
        "engine": engine,
        "calibrated": calibration.calibrator(engine) is not None,
        "n": overall["n"],
        "exact": overall["exact"],
        "top5": overall["top5"],
        "char_accuracy": overall["char_accuracy"],
        "exact_clean": _group_stats(clean)["exact"] if clean else None,
        "exact_gate": _group_stats(gate)["exact"] if gate else None,
        "exact_gate_worst": min(gate_by.values()) if gate_by else None,
        "by_condition": {
            c: _condition_stats(v)
            for c, v in sorted(by_condition.items(), key=lambda kv: _condition_order(kv[0]))
        },
        "by_kind": {k: _group_stats(v) for k, v in sorted(by_kind.items())},
        "by_color": {k: _group_stats(v) for k, v in sorted(by_color.items())},
        "wrong_valid_above": _wrong_valid_above(rows, engine),
        "green_full_length": (
            sum(len(r["read"]) == 8 for r in green) / len(green) if green else None
        ),
        "ms_p50": _percentile(times, 0.5),
        "ms_p99": _percentile(times, 0.99),
        "cpu_ms_per_plate": statistics.fmean(r["cpu_ms"] for r in rows) if rows else None,
        "localisation_iou": statistics.fmean(ious) if ious else None,
        "localisation_iou_gt_0_5": sum(v > 0.5 for v in ious) / len(ious) if ious else None,
        "errors": [
            {
                "file": r["file"],
                "condition": r["condition"],
                "truth": r["truth"],
                "read": r["read"],
                "score": round(r["score"], 4),
            }
            for r in sorted(rows, key=lambda r: -r["score"])
            if not r["exact"]
        ][:30],
    }


def evaluate(
    folder: str | Path,
    engine: str = DEFAULT_ENGINE,
    limit: int | None = None,
    progress: bool = True,
    conditions: Sequence[str] | None = None,
    seeds: int = 1,
    seed_start: int = 0,
    workers: int = 1,
    held_out_only: bool = False,
) -> dict[str, Any]:
    """Read every labelled image end to end (localisation included for scenes).

    ``conditions`` defaults to the labelled conditions alone when labels.csv has a
    ``condition`` column, else to every condition (clean and the six gate conditions).
    """
    samples = load_samples(folder, held_out_only)[:limit]
    if conditions is None:
        labelled = any(s.condition for s in samples)
        conditions = (CLEAN,) if labelled else CONDITIONS
    rows = collect_reads(
        folder, engine, conditions, seeds, seed_start, limit, workers, progress, held_out_only
    )
    corners = {s.path.name: parse_corners(s.corners) for s in samples}
    for r in rows:
        r["truth_corners"] = corners.get(r["file"])
    result = summarise(rows, engine)
    result["conditions"] = list(conditions)
    result["seeds"] = seeds
    result["seed_start"] = seed_start
    result["held_out_only"] = held_out_only
    return result


_SAVED_FIELDS = (
    "file", "condition", "seed", "kind", "color", "truth", "read",
    "raw_score", "exact", "wrong_valid", "ms", "cpu_ms", "plate_px",
)  # fmt: skip


def calibrate(
    folder: str | Path,
    engine: str = DEFAULT_ENGINE,
    seeds: int = 8,
    seed_start: int = 0,
    limit: int | None = None,
    workers: int = 1,
    reads: Sequence[str | Path] = (),
    save_reads: str | Path | None = None,
    out: str | Path | None = calibration.TABLE_PATH,
    progress: bool = True,
    held_out_only: bool = False,
    all_photos: bool = False,
) -> dict[str, Any]:
    """Fit the engine's calibration on reads of ``folder`` under every condition (or on
    reads saved earlier with ``save_reads``), choose the certain threshold and write both
    into the table file ``out`` (``None``: print only).

    An engine whose model learnt from the shared photos (:data:`TRAINED_ON_SHARED`) reads its
    training photos surely: fitted on them, its certain threshold would be flattered. It is
    calibrated ``held_out_only``, unless ``all_photos`` says no photo of ``folder`` was among
    those it learnt from."""
    if engine in TRAINED_ON_SHARED and not (held_out_only or all_photos):
        raise ValueError(
            f"{engine} learnt from the shared photos' training part: calibrate it with "
            "--held-out, or with --all-photos when it never saw a photo of this folder"
        )
    if reads:
        rows = [json.loads(line) for f in reads for line in Path(f).read_text().splitlines()]
        # Saved runs may overlap (each holds the clean reads): one read per photo variant.
        unique = {(r["file"], r["condition"], r["seed"]): r for r in rows}
        rows = [
            r
            for r in unique.values()
            if r.get("engine", engine) == engine
            and (not held_out_only or unseen(r["file"], r["kind"]))
        ]
    else:
        rows = collect_reads(
            folder, engine, CONDITIONS, seeds, seed_start, limit, workers, progress, held_out_only
        )
    if not rows:
        raise ValueError("no reads to calibrate on")
    if save_reads is not None:
        with Path(save_reads).open("w", encoding="utf-8") as fh:
            for r in rows:
                line = {k: r[k] for k in _SAVED_FIELDS} | {"engine": engine}
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    raw = [float(r["raw_score"]) for r in rows]
    exact = [bool(r["exact"]) for r in rows]
    wrong = [bool(r["wrong_valid"]) for r in rows]
    knots = calibration.fit_isotonic(raw, exact)
    cal = calibration.Calibrator(tuple(k[0] for k in knots), tuple(k[1] for k in knots))
    scores = [cal(s) for s in raw]
    table = calibration.reliability_table(scores, exact, wrong)
    # Small plates are never certain: the threshold is chosen on the reads that can be (a read
    # saved without its size counts as one).
    small = [calibration.is_small_plate(r.get("plate_px")) for r in rows]
    choice = calibration.choose_threshold(
        [s for s, sm in zip(scores, small, strict=True) if not sm],
        [w for w, sm in zip(wrong, small, strict=True) if not sm],
    )
    scores = [
        calibration.capped(s, r.get("plate_px"), choice["threshold"])
        for s, r in zip(scores, rows, strict=True)
    ]
    by_condition: dict[str, dict[str, Any]] = {}
    for condition in sorted({r["condition"] for r in rows}, key=_condition_order):
        idx = [i for i, r in enumerate(rows) if r["condition"] == condition]
        c_scores = [scores[i] for i in idx]
        c_exact = [exact[i] for i in idx]
        ece = calibration.expected_calibration_error(c_scores, c_exact) or 0.0
        ece_raw = calibration.expected_calibration_error([raw[i] for i in idx], c_exact) or 0.0
        by_condition[condition] = {
            "reads": len(idx),
            "exact": sum(c_exact) / len(idx),
            "wrong_valid": sum(wrong[i] for i in idx),
            "ece": round(ece, 4),
            "ece_uncalibrated": round(ece_raw, 4),
            "above_certain": sum(s >= choice["threshold"] for s in c_scores),
            "wrong_valid_above_certain": sum(
                wrong[i] for i in idx if scores[i] >= choice["threshold"]
            ),
        }
    fitted_on = {
        "reads": len(rows),
        "photos": len({r["file"] for r in rows}),
        "conditions": sorted({r["condition"] for r in rows}, key=_condition_order),
        "seeds": sorted({r["seed"] for r in rows if r["condition"] != CLEAN}),
        "exact": sum(exact) / len(rows),
        "wrong_valid": sum(wrong),
    }
    entry = {
        "knots": [list(k) for k in knots],
        "certain_threshold": choice["threshold"],
        "threshold": choice,
        "fitted_on": fitted_on,
        "reliability": table,
    }
    if out is not None:
        path = Path(out)
        data = calibration.load_table(path)
        data["engines"][engine] = entry
        data["certain_threshold"] = data["engines"].get(DEFAULT_ENGINE, entry)["certain_threshold"]
        path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        calibration.calibrator.cache_clear()
        calibration.certain_threshold.cache_clear()
    return {
        "engine": engine,
        "mode": "calibrate",
        "reads": len(rows),
        "fitted_on": fitted_on,
        "reliability": table,
        "certain_threshold": choice["threshold"],
        "threshold": choice,
        "by_condition": by_condition,
        "knots": len(knots),
        "written_to": str(out) if out is not None else None,
    }


def _condition_order(condition: str) -> int:
    return CONDITIONS.index(condition) if condition in CONDITIONS else len(CONDITIONS)


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
    held_out_only: bool = False,
) -> dict[str, Any]:
    """Plates per second on ``kind`` images, one process per worker (one core each)."""
    samples = load_samples(folder, held_out_only)
    paths = [str(s.path) for s in samples if s.kind == kind][:200]
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
    parser.add_argument(
        "--calibrate", action="store_true", help="fit the score calibration and threshold"
    )
    parser.add_argument(
        "--conditions",
        default=None,
        help="all (default without a condition column), gate, or a comma list of "
        + ", ".join(CONDITIONS),
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="degraded copies per photo and condition"
    )
    parser.add_argument("--seed-start", type=int, default=0, help="first seed (held-out runs)")
    parser.add_argument(
        "--held-out",
        action="store_true",
        help="only photos no shipped model learnt from (plate_recognition/holdout.py)",
    )
    parser.add_argument(
        "--all-photos",
        action="store_true",
        help="calibrate a trained engine on every photo (none of them among its training's)",
    )
    parser.add_argument("--reads", action="append", default=[], help="calibrate on saved reads")
    parser.add_argument("--save-reads", default=None, help="write the reads (JSON lines) here")
    parser.add_argument(
        "--out",
        default=str(calibration.TABLE_PATH),
        help="calibration table to write ('-' prints only)",
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--kind", default="crop", choices=("crop", "scene"))
    args = parser.parse_args(argv)
    try:
        conditions = parse_conditions(args.conditions) if args.conditions else None
    except ValueError as exc:
        parser.error(str(exc))
    result: dict[str, Any]
    if args.bench:
        result = bench(args.path, args.engine, args.seconds, args.workers, args.kind, args.held_out)
    elif args.calibrate:
        try:
            result = calibrate(
                args.path,
                args.engine,
                seeds=args.seeds or 8,
                seed_start=args.seed_start,
                limit=args.limit,
                workers=args.workers,
                reads=args.reads,
                save_reads=args.save_reads,
                out=None if args.out == "-" else args.out,
                held_out_only=args.held_out,
                all_photos=args.all_photos,
            )
        except ValueError as exc:
            parser.error(str(exc))
    else:
        result = evaluate(
            args.path,
            args.engine,
            args.limit,
            conditions=conditions,
            seeds=args.seeds or 1,
            seed_start=args.seed_start,
            workers=args.workers,
            held_out_only=args.held_out,
        )
    if not args.json:
        for key, value in result.items():
            if key not in ("errors", "reliability"):
                print(f"{key}: {value}")
        for row in result.get("reliability", []):
            print(row)
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
