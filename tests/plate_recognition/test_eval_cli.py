"""`parking plates eval --json` and `parking plates calibrate --json` print their keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parking.cli import main
from plate_recognition.conditions import CONDITIONS
from plate_recognition.engines import DEFAULT_ENGINE
from plate_recognition.holdout import held_out


def _last_json(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    out = capsys.readouterr().out.strip().splitlines()
    result: dict[str, object] = json.loads(out[-1])
    return result


def test_eval_prints_conditions_latency_and_wrong_valid_plates(
    plate_data: Path, plate_rows: list[dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["plates", "eval", str(plate_data), "--limit", "20", "--json", "--workers", "1"]
    assert main(argv) == 0
    result = _last_json(capsys)
    for key in ("exact", "by_condition", "ms_p50", "ms_p99", "cpu_ms_per_plate"):
        assert key in result
    by_condition = result["by_condition"]
    assert isinstance(by_condition, dict) and list(by_condition) == list(CONDITIONS)
    for stats in by_condition.values():
        assert {"n", "exact", "ece", "ece_uncalibrated", "wrong_valid"} <= set(stats)
        assert stats["n"] == 20
    wrong = result["wrong_valid_above"]
    assert isinstance(wrong, dict) and {"0.8", "0.9", "0.99", "certain"} <= set(wrong)
    assert result["n"] == 20 * len(CONDITIONS)


def test_eval_uses_a_labelled_condition_column(
    plate_data: Path,
    plate_rows: list[dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    crops = [r for r in plate_rows if r["kind"] == "crop"][:3]
    lines = ["file,plate,color,kind,corners,source,condition"]
    for row, condition in zip(crops, ["clean", "night", "night"], strict=True):
        path = plate_data / row["file"]
        lines.append(f"{path},{row['plate']},{row['color']},crop,,test,{condition}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["plates", "eval", str(tmp_path), "--json"]) == 0
    result = _last_json(capsys)
    by_condition = result["by_condition"]
    assert isinstance(by_condition, dict)
    assert {k: v["n"] for k, v in by_condition.items()} == {"clean": 1, "night": 2}


def test_calibrate_prints_the_reliability_table_and_threshold(
    plate_data: Path,
    plate_rows: list[dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "calibration.json"
    argv = ["plates", "calibrate", str(plate_data), "--limit", "20", "--seeds", "1", "--held-out"]
    assert main([*argv, "--out", str(out), "--json"]) == 0
    result = _last_json(capsys)
    assert {"reliability", "certain_threshold", "threshold", "by_condition"} <= set(result)
    table = result["reliability"]
    assert isinstance(table, list) and table
    assert {
        "bin",
        "reads",
        "exact",
        "wrong_valid",
        "precision",
        "wrong_valid_upper95",
    } <= set(table[0])
    assert sum(row["reads"] for row in table) == 20 * len(CONDITIONS)
    written = json.loads(out.read_text(encoding="utf-8"))
    entry = written["engines"][DEFAULT_ENGINE]
    assert entry["certain_threshold"] == result["certain_threshold"]
    assert written["certain_threshold"] == result["certain_threshold"]
    assert entry["knots"] == sorted(entry["knots"])


def test_eval_held_out_counts_only_photos_no_model_learnt_from(
    plate_data: Path, plate_rows: list[dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["plates", "eval", str(plate_data), "--conditions", "clean", "--held-out", "--json"]
    assert main([*argv, "--engine", "platenet"]) == 0
    result = _last_json(capsys)
    unseen = [r for r in plate_rows if r["kind"] == "scene" or held_out(r["file"])]
    assert result["n"] == len(unseen) < len(plate_rows)
    assert result["held_out_only"] is True


def test_a_trained_engine_is_not_calibrated_on_its_training_photos(
    plate_data: Path, plate_rows: list[dict[str, str]], tmp_path: Path
) -> None:
    """PlateNet reads the photos it learnt from surely: a table fitted on them would put the
    certain threshold too low. Without --held-out (or --all-photos) nothing is written."""
    out = tmp_path / "calibration.json"
    argv = ["plates", "calibrate", str(plate_data), "--limit", "5", "--seeds", "1"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", str(out), "--json"])
    assert exit_.value.code == 2
    assert not out.exists()
    assert main([*argv, "--engine", "rapidocr", "--out", str(out), "--json"]) == 0
