"""``python -m worker inspect``: run for real, as a user would, on the six tiny models."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.documented import BATCH_SIZES, SEQUENCE_LENGTHS
from tests.onnx_graphs import Pooled, write_onnx

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "tiny"


@dataclass(frozen=True)
class Expected:
    """What inspect must report for one tiny model."""

    modality: str
    processor: str
    task: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dims: dict[str, tuple[int, ...]]


BATCH = BATCH_SIZES
EXPECTED = {
    "bert": Expected(
        "text",
        "tokenizer",
        "text-classification",
        ("input_ids", "attention_mask", "token_type_ids"),
        ("logits",),
        {"batch": BATCH, "sequence": SEQUENCE_LENGTHS},
    ),
    "vit": Expected(
        "vision", "image processor", "image-classification", ("pixel_values",), ("logits",), {"batch": BATCH}
    ),
    "wav2vec2": Expected(
        "audio",
        "feature extractor",
        "audio-classification",
        ("input_values", "attention_mask"),
        ("logits",),
        {"batch": BATCH, "samples": (16000, 80000, 160000)},
    ),
    "whisper-encoder": Expected(
        "audio",
        "feature extractor",
        "audio-classification",
        ("input_features",),
        ("logits",),
        {"batch": BATCH},
    ),
    "videomae": Expected(
        "video", "video processor", "video-classification", ("pixel_values",), ("logits",), {"batch": BATCH}
    ),
    "clip": Expected(
        "multimodal",
        "multimodal processor",
        "zero-shot-image-classification",
        ("input_ids", "attention_mask", "pixel_values"),
        ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"),
        # the tiny CLIP tokenizer stops at 32 tokens, so the default buckets stop there too
        {"text_batch": BATCH, "image_batch": BATCH, "sequence": (8, 16, 24, 32)},
    ),
}


def inspect(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m worker inspect ARGS`` from the repository root, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "worker", "inspect", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def inspect_json(*args: str | Path) -> dict[str, Any]:
    result = inspect(*args, "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def every_bucket(dims: dict[str, tuple[int, ...]]) -> list[dict[str, int]]:
    names = sorted(dims)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(dims[n] for n in names))]


def as_set(buckets: list[dict[str, int]]) -> set[frozenset[tuple[str, int]]]:
    return {frozenset(bucket.items()) for bucket in buckets}


@pytest.mark.parametrize("name", EXPECTED)
def test_inspect_table_shows_modality_and_processor(name: str) -> None:
    expected = EXPECTED[name]

    result = inspect(f"models/tiny/{name}")

    assert result.returncode == 0, result.stderr
    assert re.search(rf"^modality\s+{expected.modality}\s+<- inferred from graph$", result.stdout, re.M)
    assert re.search(rf"^processor\s+{expected.processor}\s+<- inferred from graph", result.stdout, re.M)
    assert re.search(rf"^task\s+{expected.task}\s+<- hf config$", result.stdout, re.M)
    buckets = len(every_bucket(expected.dims))
    assert re.search(rf"^buckets\s+{buckets} ", result.stdout, re.M)


@pytest.mark.parametrize("name", EXPECTED)
def test_inspect_json_reports_what_the_worker_resolved(name: str) -> None:
    expected = EXPECTED[name]

    data = inspect_json(f"models/tiny/{name}")

    assert data["modality"] == expected.modality
    assert data["processor"] == expected.processor
    assert data["task"] == expected.task
    assert [spec["name"] for spec in data["inputs"]] == list(expected.inputs)
    assert [spec["name"] for spec in data["outputs"]] == list(expected.outputs)
    assert {dim: tuple(entry["values"]) for dim, entry in data["dims"].items()} == expected.dims
    assert as_set(data["buckets"]) == as_set(every_bucket(expected.dims))
    assert len(data["buckets"]) == len(every_bucket(expected.dims))
    assert data["sources"]["modality"] == "inferred from graph"
    assert data["sources"]["processor"] == "inferred from graph"
    assert data["sources"]["task"] == "hf config"


def test_inspect_json_carries_shapes_dtypes_and_sources_of_dims() -> None:
    data = inspect_json("models/tiny/whisper-encoder")

    assert data["inputs"] == [{"name": "input_features", "dtype": "float32", "shape": ["batch", 80, 3000]}]
    assert data["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 3]}]
    assert data["audio_frames"] == 3000
    assert data["sources"]["audio_frames"] == "inferred from graph"
    assert data["sources"]["sampling_rate"] == "hf config"
    assert data["sources"]["batch_sizes"] == "default"
    assert data["labels"] == ["speech", "music", "noise"]


def test_inspect_on_a_bare_onnx_file_reads_the_files_beside_it() -> None:
    data = inspect_json("models/tiny/vit/model.onnx")

    assert data["path"] == "models/tiny/vit/model.onnx"
    assert data["modality"] == "vision"
    assert data["processor"] == "image processor"
    assert data["labels"] == ["circle", "square", "triangle", "line"]


def test_inspect_on_a_bare_onnx_file_declaring_itself_in_metadata_props(tmp_path: Path) -> None:
    onnx_file = write_onnx(
        tmp_path / "encoder.onnx",
        {"input_values": ("batch", "samples")},
        {"logits": Pooled(2)},
        props={"inference.task": "audio-classification", "inference.audio_samples": "16000"},
    )
    (tmp_path / "preprocessor_config.json").write_text('{"sampling_rate": 16000}', encoding="utf-8")

    data = inspect_json(onnx_file)

    assert data["name"] == "encoder"
    assert data["modality"] == "audio"
    assert data["sources"]["task"] == "onnx metadata"
    assert data["dims"]["samples"] == {"role": "samples", "values": [16000]}


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_inspect_on_a_missing_path_fails_with_the_error_on_stderr(tmp_path: Path, as_json: bool) -> None:
    missing = tmp_path / "no-such-model"

    result = inspect(missing, *(["--json"] if as_json else []))

    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_inspect_on_a_corrupt_model_fails_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\x00garbage, not protobuf\xff" * 4)

    result = inspect(tmp_path)

    assert result.returncode != 0
    assert result.stdout == ""
    assert str(tmp_path / "model.onnx") in result.stderr
    assert "Traceback" not in result.stderr
