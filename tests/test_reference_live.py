"""Live parity: the committed tiny-model references still match PyTorch, ONNX Runtime and the pipelines.

Reloads each folder's weights with transformers and its model.onnx with onnxruntime, runs both on
the stored processor outputs and compares them with the stored model outputs; then runs the
transformers pipeline for each stored call and compares it with the stored output and with ours.
"""

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers

# The builder holds the pipeline calls, and the replicas where a pipeline cannot run here.
from models import tiny
from tests.references import (
    ALL_TINY_MODELS,
    MANY_LABELS,
    TINY,
    assert_pipeline_equal,
    load_samples,
    pipeline_call,
    reference_task,
)
from worker import pipeline
from worker.inprocess import Pipeline

pytestmark = pytest.mark.torch

TINY_DIR = TINY
FOLDERS = list(ALL_TINY_MODELS)
TORCH_ATOL = 1e-5

Arrays = dict[str, np.ndarray]


def load_references(folder: Path) -> list[tuple[Arrays, Arrays]]:
    """Per sample, the stored (inputs, outputs), each keyed by ONNX name."""
    count = len(json.loads((folder / "reference.json").read_text())["samples"])
    with np.load(folder / "reference.npz") as stored:
        arrays = dict(stored)
    samples = []
    for index in range(count):
        inputs = {k.split("/")[2]: v for k, v in arrays.items() if k.startswith(f"{index}/input/")}
        outputs = {k.split("/")[2]: v for k, v in arrays.items() if k.startswith(f"{index}/output/")}
        assert inputs and outputs, f"{folder.name}: sample {index} missing from reference.npz"
        samples.append((inputs, outputs))
    assert len(arrays) == sum(len(i) + len(o) for i, o in samples), "stray reference arrays"
    return samples


def load_torch_model(folder: Path) -> torch.nn.Module:
    """The folder's model class, from its config's architectures, with its saved weights."""
    config = transformers.AutoConfig.from_pretrained(folder)
    model_class = getattr(transformers, config.architectures[0])
    return model_class.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", FOLDERS)
def test_torch_reproduces_stored_outputs(name: str) -> None:
    folder = TINY_DIR / name
    model = load_torch_model(folder)
    for inputs, expected in load_references(folder):
        with torch.inference_mode():
            outputs = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
        for output_name, want in expected.items():
            np.testing.assert_allclose(
                outputs[output_name].numpy(), want, rtol=0, atol=TORCH_ATOL, err_msg=output_name
            )


@pytest.mark.parametrize("name", FOLDERS)
def test_onnx_reproduces_stored_outputs(name: str) -> None:
    folder = TINY_DIR / name
    tolerance = json.loads((folder / "reference.json").read_text())["tolerance"]
    session = ort.InferenceSession(folder / "model.onnx", providers=["CPUExecutionProvider"])
    for inputs, expected in load_references(folder):
        actual = session.run(list(expected), inputs)
        for (output_name, want), got in zip(expected.items(), actual, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=tolerance, err_msg=output_name)


@functools.cache
def served(name: str) -> Pipeline:
    """One in-process pipeline per tiny model for the whole module."""
    return pipeline(model=TINY / name)


@pytest.mark.parametrize("name", FOLDERS)
def test_ours_matches_the_live_pipeline(name: str) -> None:
    """transformers.pipeline (or, for QA and video, its logic on PyTorch logits) vs ours and the store."""
    task = reference_task(name)
    ours = served(name)
    # A model that declares pooling answers with one vector; the pipeline's token vectors need "none".
    raw_vectors: dict[str, Any] = {"pooling": "none"} if ours.model.metadata.pooling is not None else {}
    samples, tolerance = load_samples(name)
    for sample in samples:
        inputs, keywords = pipeline_call(task, sample.raw)
        for call in sample.calls:
            live = tiny.pipeline_output(task, TINY / name, sample.raw, call.kwargs)
            assert_pipeline_equal(live, call.outputs, tolerance, where="stored")
            assert_pipeline_equal(ours(inputs, **keywords, **raw_vectors, **call.kwargs), live, tolerance)


def test_a_batch_of_texts_is_shaped_like_the_live_pipeline() -> None:
    texts = ["Great movie!", "The food was cold and the service was slow."]
    live = tiny.live_pipeline("text-classification", TINY / "bert")
    for kwargs in ({}, {"top_k": None}, {"top_k": 1}):
        expected = tiny.plain(live(texts, **kwargs))
        assert_pipeline_equal(served("bert")(texts, **kwargs), expected, 1e-4, where=str(kwargs))
    ner = tiny.live_pipeline("token-classification", TINY / "bert-ner")
    expected = tiny.plain(ner(texts, aggregation_strategy="simple"))
    assert_pipeline_equal(served("bert-ner")(texts, aggregation_strategy="simple"), expected, 1e-4)


def test_sentence_embedding_matches_live_mean_pooling() -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY / "bert-embed")
    model = load_torch_model(TINY / "bert-embed")
    for sample in load_samples("bert-embed")[0]:
        encoded = tokenizer(sample.raw["text"], return_tensors="np")
        with torch.inference_mode():
            hidden = model(**{k: torch.from_numpy(v) for k, v in encoded.items()}).last_hidden_state.numpy()
        expected = tiny.sentence_embedding(hidden, encoded["attention_mask"])
        assert_pipeline_equal(served("bert-embed")(sample.raw["text"]), expected, 1e-4)


def test_zero_shot_over_more_labels_than_one_run_matches_the_live_pipeline() -> None:
    """More labels than one run holds, against transformers itself: 40 labels, where the worker runs 32
    text rows at most."""
    image = str(TINY.parent / "samples" / "image.png")
    live = tiny.live_pipeline("zero-shot-image-classification", TINY / "clip")
    expected = tiny.plain(live(image, candidate_labels=list(MANY_LABELS)))
    assert_pipeline_equal(served("clip")(image, candidate_labels=list(MANY_LABELS)), expected, 1e-4)
