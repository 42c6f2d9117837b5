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
from worker.demo import load_with_progress
from worker.serving.engine import EngineOptions
from worker.serving.metadata import MetadataError
from worker.serving.registry import load_models
from worker.settings import Settings


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


def test_the_demo_loads_models_with_the_settings_as_run_does(models_dir: Path) -> None:
    """The demo honours --provider, --intra-op-threads, spinning, --skip-bad-models and the
    overrides, as run does."""
    settings = Settings(
        provider="cpu",
        intra_op_threads=1,
        intra_op_spinning=False,
        skip_bad_models=True,
        model_overrides={"bert": {"sequence_lengths": [32, 64], "max_wait_ms": 5}},
    )
    models = load_with_progress([models_dir], settings)
    assert list(models) == ["bert"], "the broken folder is skipped, not fatal"
    bert = models["bert"]
    assert bert.engine.options == EngineOptions(intra_op_threads=1, provider="cpu", spin=False)
    session = bert.engine.session.get_session_options()
    assert session.intra_op_num_threads == 1
    assert session.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert bert.metadata.sequence_lengths == (32, 64)
    # A model folder itself is a path too, as the demo always took it.
    assert list(load_with_progress([models_dir / "bert"], settings)) == ["bert"]


@pytest.mark.parametrize("processes", [1, 2])
def test_run_exits_2_with_a_one_line_error_for_a_bad_folder(models_dir: Path, processes: int) -> None:
    """One process or a supervisor of several: a configuration error ends the run, never a restart loop."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "worker", "run", str(models_dir), "--bootstrap-servers", "127.0.0.1:9"]
    result = subprocess.run(
        [*command, "--processes", str(processes)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        # Loading the models takes a few seconds; a supervisor that restarts its children never exits.
        timeout=60,
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "broken" in result.stderr
    assert "Traceback" not in result.stderr
