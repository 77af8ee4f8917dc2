"""The `parking-dev` command's own choices."""

from pathlib import Path

import pytest

from parking.settings import Settings
from parking_dev.cli import BENCH_DATA_DIR, use_bench_data_dir


def test_a_bench_keeps_its_embedded_servers_apart_from_the_demos(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PARKING_DATA_DIR", raising=False)
    demo = Settings(_env_file=None)  # type: ignore[call-arg]
    bench = Settings(_env_file=None)  # type: ignore[call-arg]
    use_bench_data_dir(bench)
    assert bench.data_dir == BENCH_DATA_DIR
    assert bench.data_dir.resolve() != demo.data_dir.resolve()
    # A folder the developer chose is theirs to share.
    monkeypatch.setenv("PARKING_DATA_DIR", str(tmp_path))
    chosen = Settings(_env_file=None)  # type: ignore[call-arg]
    use_bench_data_dir(chosen)
    assert chosen.data_dir == tmp_path
