"""Folders written by Optimum's ONNX exporter are served unchanged and match the PyTorch model.

The fixtures in models/optimum/ are what ``main_export`` wrote (``python -m models.optimum_fixture``
in the Optimum venv), plus reference.json/.npz made with the plain transformers PyTorch model and
pipeline. Optimum names its dynamic dims ``batch_size``, ``sequence_length``, ``num_channels``,
``height`` and ``width``, and writes no worker metadata: everything comes from the graph and the
Hugging Face files it copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas.requests import Modality
from tests.documented import BATCH_SIZES, SEQUENCE_LENGTHS
from tests.references import ROOT, assert_pipeline_equal, pipeline_call, to_model_input
from worker import pipeline
from worker.serving.heads.outputs import softmax
from worker.serving.metadata import (
    DimRole,
    ProcessorKind,
    Source,
    load_metadata,
)
from worker.serving.registry import ServedModel, load_model

OPTIMUM = ROOT / "models" / "optimum"
BERT = "bert-sequence-classification"
VIT = "vit-image-classification"
FIXTURES = (BERT, VIT)
#: The files main_export wrote into each folder; the fixture script adds only the references.
OPTIMUM_FILES = {
    BERT: {
        "config.json",
        "model.onnx",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    },
    VIT: {"config.json", "model.onnx", "preprocessor_config.json"},
}
REFERENCE_FILES = {"reference.json", "reference.npz"}


@dataclass(frozen=True)
class Sample:
    """One stored request: raw inputs, the encoding and PyTorch logits of it alone, pipeline outputs."""

    raw: dict[str, Any]
    inputs: dict[str, np.ndarray]
    logits: np.ndarray
    calls: list[dict[str, Any]]


def load_reference(name: str) -> tuple[str, list[Sample], float]:
    """The task, samples and tolerance stored beside an Optimum fixture."""
    spec = json.loads((OPTIMUM / name / "reference.json").read_text())
    arrays = np.load(OPTIMUM / name / "reference.npz")
    samples = []
    for index, sample in enumerate(spec["samples"]):
        prefix = f"{index}/input/"
        inputs = {key.removeprefix(prefix): arrays[key] for key in arrays.files if key.startswith(prefix)}
        samples.append(Sample(sample["inputs"], inputs, arrays[f"{index}/output/logits"], sample["pipeline"]))
    return spec["task"], samples, float(spec["tolerance"])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file in a folder by name, with its content hash."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def served() -> dict[str, ServedModel]:
    return {name: load_model(OPTIMUM / name) for name in FIXTURES}


@pytest.mark.parametrize("name", FIXTURES)
def test_the_fixture_holds_only_what_optimum_wrote_and_the_references(name: str) -> None:
    files = set(snapshot(OPTIMUM / name))
    assert files == OPTIMUM_FILES[name] | REFERENCE_FILES
    assert "inference.json" not in files, "an Optimum folder carries no worker metadata"
    size = sum(path.stat().st_size for path in (OPTIMUM / name).iterdir())
    assert size < 1_000_000
    # Written by the transformers Optimum needs, whichever one serves it here.
    config = json.loads((OPTIMUM / name / "config.json").read_text())
    assert config["transformers_version"].startswith("4.57.")


def test_optimum_text_classifier_resolves_from_its_graph_and_hf_files() -> None:
    meta = load_metadata(OPTIMUM / BERT)
    assert meta.modality is Modality.TEXT
    assert meta.processor is ProcessorKind.TOKENIZER
    assert meta.task == "text-classification"
    assert meta.labels == ("anger", "joy", "surprise")
    assert [spec.name for spec in meta.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert dict(meta.dim_roles) == {"batch_size": DimRole.BATCH, "sequence_length": DimRole.SEQUENCE}
    # The default token buckets, capped by the 128 of model_max_length and max_position_embeddings.
    assert dict(meta.dims) == {"batch_size": BATCH_SIZES, "sequence_length": SEQUENCE_LENGTHS}
    assert len(meta.buckets()) == len(BATCH_SIZES) * len(SEQUENCE_LENGTHS)
    assert meta.sources["modality"] is Source.GRAPH
    assert meta.sources["task"] is Source.HF and meta.sources["labels"] is Source.HF
    assert meta.onnx_metadata == {}


def test_optimum_image_classifier_pins_its_dynamic_channels_height_and_width() -> None:
    meta = load_metadata(OPTIMUM / VIT)
    assert meta.modality is Modality.VISION
    assert meta.processor is ProcessorKind.IMAGE_PROCESSOR
    assert meta.task == "image-classification"
    assert meta.labels == ("sky", "grass", "house", "sun")
    assert [spec.shape for spec in meta.inputs] == [("batch_size", "num_channels", "height", "width")]
    assert dict(meta.dim_roles) == {
        "batch_size": DimRole.BATCH,
        "num_channels": DimRole.CHANNELS,
        "height": DimRole.HEIGHT,
        "width": DimRole.WIDTH,
    }
    assert dict(meta.dims) == {
        "batch_size": BATCH_SIZES,
        "num_channels": (3,),
        "height": (32,),
        "width": (32,),
    }
    assert meta.image_size == (32, 32) and meta.sources["image_size"] is Source.HF


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            BERT,
            {
                "modality": "text",
                "processor": "tokenizer",
                "task": "text-classification",
                "labels": ["anger", "joy", "surprise"],
            },
        ),
        (
            VIT,
            {
                "modality": "vision",
                "processor": "image processor",
                "task": "image-classification",
                "labels": ["sky", "grass", "house", "sun"],
            },
        ),
    ],
)
def test_inspect_reports_the_optimum_folder(name: str, expected: dict[str, object]) -> None:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "worker", "inspect", "--json", str(OPTIMUM / name)]
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {key: report[key] for key in expected} == expected
    assert report["dims"]["batch_size"] == {"role": "batch", "values": list(BATCH_SIZES)}


@pytest.mark.parametrize("name", FIXTURES)
def test_the_processor_encodes_each_sample_as_the_pytorch_reference_did(
    served: dict[str, ServedModel], name: str
) -> None:
    model = served[name]
    _, samples, _ = load_reference(name)
    for sample in samples:
        prepared = model.prepare(to_model_input(sample.raw))
        for key, expected in sample.inputs.items():
            real = tuple(slice(0, n) for n in expected.shape)
            np.testing.assert_allclose(prepared.arrays[key][real], expected, atol=1e-6, rtol=0, err_msg=key)


@pytest.mark.parametrize("name", FIXTURES)
def test_raw_logits_match_the_pytorch_model(served: dict[str, ServedModel], name: str) -> None:
    model = served[name]
    _, samples, tolerance = load_reference(name)
    for sample in samples:
        [outputs] = model.run([model.prepare(to_model_input(sample.raw))])
        assert outputs["logits"].shape == sample.logits.shape
        np.testing.assert_allclose(outputs["logits"], sample.logits, atol=tolerance, rtol=0)


@pytest.mark.parametrize("name", FIXTURES)
def test_head_output_is_the_softmax_of_the_stored_logits_and_the_pipelines_answer(
    served: dict[str, ServedModel], name: str
) -> None:
    model = served[name]
    _, samples, tolerance = load_reference(name)
    labels = model.metadata.labels or ()
    for sample in samples:
        probabilities = softmax(sample.logits[0])
        order = np.argsort(-probabilities, kind="stable")
        [everything] = model.infer([to_model_input(sample.raw)], {"top_k": None})
        assert [entry["label"] for entry in everything] == [labels[i] for i in order]
        np.testing.assert_allclose(
            [entry["score"] for entry in everything], probabilities[order], atol=tolerance, rtol=0
        )
        for call in sample.calls:
            [answer] = model.infer([to_model_input(sample.raw)], call["kwargs"])
            assert_pipeline_equal(answer, call["outputs"], tolerance, f"{name} {sample.raw} {call['kwargs']}")


def test_all_text_samples_in_one_batch_give_each_ones_answer(served: dict[str, ServedModel]) -> None:
    _, samples, tolerance = load_reference(BERT)
    answers = served[BERT].infer([to_model_input(sample.raw) for sample in samples], {"top_k": None})
    for sample, answer in zip(samples, answers, strict=True):
        assert_pipeline_equal(answer, sample.calls[1]["outputs"], tolerance, str(sample.raw))


@pytest.mark.parametrize("name", FIXTURES)
def test_the_in_process_pipeline_answers_as_transformers_did(name: str) -> None:
    task, samples, tolerance = load_reference(name)
    clf = pipeline(task, model=OPTIMUM / name)
    for sample in samples:
        inputs, keywords = pipeline_call(task, sample.raw)
        for call in sample.calls:
            answer = clf(inputs, **keywords, **call["kwargs"])
            assert_pipeline_equal(answer, call["outputs"], tolerance, f"{name} {sample.raw} {call['kwargs']}")


@pytest.mark.parametrize("name", FIXTURES)
def test_serving_leaves_the_optimum_folder_unchanged(name: str) -> None:
    folder = OPTIMUM / name
    before = snapshot(folder)
    task, samples, _ = load_reference(name)
    model = load_model(folder)
    model.infer([to_model_input(sample.raw) for sample in samples])
    inputs, keywords = pipeline_call(task, samples[0].raw)
    pipeline(model=folder)(inputs, **keywords)
    assert snapshot(folder) == before
