"""Model folders at start-up: a bad one fails fast with its name, or is skipped on request."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.references import ROOT, TINY
from worker.metadata import MetadataError
from worker.registry import load_models


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(TINY / "bert", root / "bert")
    broken = root / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"this is not a protobuf")
    return root


def test_a_corrupt_model_fails_fast_naming_its_folder(models_dir: Path) -> None:
    with pytest.raises(MetadataError, match="broken"):
        load_models(models_dir)


def test_a_corrupt_model_is_skipped_when_asked_and_the_others_serve(
    models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        models = load_models(models_dir, skip_bad=True)
    assert list(models) == ["bert"]
    assert any("broken" in record.getMessage() for record in caplog.records)


def test_run_exits_with_a_one_line_error_for_a_bad_folder(models_dir: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run", str(models_dir), "--bootstrap-servers", "127.0.0.1:9"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "broken" in result.stderr
    assert "Traceback" not in result.stderr
