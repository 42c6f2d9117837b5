"""The installed package runs on its own: a wheel, a fresh venv, then `inspect` and `demo` from an empty folder.

Exactly what a new user does: build the wheel from the repository's files, `pip install` it
(dependencies from PyPI) into a venv that sees nothing of the repository, and run the
commands from a folder that holds nothing. Minutes (a venv's worth of wheels): marked slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _run(command: list[str], cwd: Path, timeout: float = 900, **env: str) -> str:
    """Run ``command``; its output, or a failure that shows it."""
    environment = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    environment |= {"HF_HUB_OFFLINE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **env}
    done = subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{output[-6000:]}"
    return output


def _checkout(into: Path) -> Path:
    """The repository's files (tracked and new, not ignored; links kept) without build leftovers."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source, target = ROOT / name, into / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    return into


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = _checkout(tmp_path_factory.mktemp("source"))
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)], dist)
    (built,) = dist.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", str(root)], root)
    _run([str(root / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], root)
    return root


def test_the_wheel_holds_the_runtime_and_the_demo_data_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"worker", "schemas"}, "no top-level models/ (the builders), bench/ or tests/"
    assert "worker/demo_models/tiny/bert/model.onnx" in names
    assert "worker/demo_models/samples/image.png" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "onnx-kafka-worker = worker.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_inspect_and_demo_run_from_an_empty_folder(venv: Path, tmp_path: Path) -> None:
    python = str(venv / "bin" / "python")
    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run(
        [python, "-c", "from importlib.resources import files; print(files('worker') / 'demo_models')"], empty
    )
    shipped = Path(where.strip().splitlines()[-1])
    assert shipped.is_relative_to(venv), f"the installed package's own copy, not the repository's: {shipped}"

    shown = _run([python, "-m", "worker", "inspect", str(shipped / "tiny" / "bert")], empty)
    assert "text-classification" in shown
    assert "bert" in _run(
        [str(venv / "bin" / "onnx-kafka-worker"), "inspect", str(shipped / "tiny" / "bert")], empty
    )

    demo = _run([python, "-m", "worker", "demo", "--burst", "20"], empty, timeout=600)
    for modality, model in (
        ("text", "bert"),
        ("vision", "vit"),
        ("audio", "wav2vec2"),
        ("video", "videomae"),
    ):
        assert f"[{modality}/{model}]" in demo, f"no {model} request shown:\n{demo[-4000:]}"
    assert "-> error unknown_model" in demo, "the one typed error the demo sends"
    assert "20 requests to 'bert' answered" in demo
    assert list(empty.iterdir()) == [], "the demo writes nothing into the folder it runs from"
