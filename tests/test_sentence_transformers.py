"""sentence-transformers folders serve sentence embeddings with no configuration, as ``encode`` gives them.

The folders in models/sentence/ were saved by the sentence-transformers package itself
(``python -m models build sentence``): a tiny random BERT exported to ONNX with no worker metadata,
beside modules.json, 1_Pooling/config.json, Normalize, the tokenizer's 64-token limit and prompts.
Each folder's reference.json is what ``SentenceTransformer(folder).encode`` returned (recomputed live
by tests/test_sentence_transformers_live.py in the torch job).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from models.__main__ import main as models_main
from tests.kafka_support import serving
from tests.references import ROOT
from worker import pipeline
from worker.client import InferenceClient
from worker.serving.inputs import TextInput
from worker.serving.metadata import METADATA_PREFIX, MetadataError, Source, load_metadata
from worker.serving.metadata.render import render_metadata
from worker.serving.processors import ProcessorFactory
from worker.serving.registry import ServedModel, load_model

SENTENCE = ROOT / "models" / "sentence"
#: name -> (pooling, normalize), as the builder made them.
FOLDERS = {
    "mean": ("mean", False),
    "mean-normalize": ("mean", True),
    "cls": ("cls", False),
    "cls-normalize": ("cls", True),
    "max": ("max", False),
    "max-normalize": ("max", True),
    "mean-normalize-pooled": ("mean", True),
}
MIN_COSINE = 0.99999
ST = Source.SENTENCE_TRANSFORMERS


def reference(name: str) -> dict[str, Any]:
    """The stored encode() output of a folder."""
    data: dict[str, Any] = json.loads((SENTENCE / name / "reference.json").read_text())
    return data


def cosines(got: Any, want: Any) -> np.ndarray:
    """Row-wise cosine similarity."""
    a, b = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    similarity: np.ndarray = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return similarity


def fresh(folder: Path, overrides: dict[str, Any] | None = None) -> ServedModel:
    return load_model(folder, overrides=overrides, factory=ProcessorFactory())


@pytest.mark.parametrize("name", FOLDERS)
def test_the_folder_resolves_from_its_sentence_transformers_files(name: str) -> None:
    meta = load_metadata(SENTENCE / name)
    pooling, normalize = FOLDERS[name]
    assert (meta.task, meta.pooling, meta.normalize) == ("feature-extraction", pooling, normalize)
    # The tokenizer saved by sentence-transformers 6 holds max_seq_length (64); the position table is 128.
    assert meta.sequence_lengths == (8, 16, 24, 32, 48, 64)
    for field in ("pooling", "normalize", "sequence_lengths"):
        assert meta.sources[field] is ST, field
    assert meta.onnx_metadata == {}, "zero configuration: the graph carries no worker keys"


def test_prompts_and_their_pooling_come_from_the_folder() -> None:
    mean, maximum = load_metadata(SENTENCE / "mean"), load_metadata(SENTENCE / "max")
    assert (mean.prompt, mean.include_prompt) == ("story: ", True)
    assert (maximum.prompt, maximum.include_prompt) == ("question: ", False)
    assert maximum.prompts is not None and maximum.prompts["story"] == "story: "
    assert {maximum.sources[f] for f in ("prompts", "default_prompt_name", "include_prompt")} == {ST}
    assert load_metadata(SENTENCE / "cls").prompt is None


@pytest.mark.parametrize("name", FOLDERS)
def test_in_process_embeddings_match_sentence_transformers_encode(name: str) -> None:
    stored = reference(name)
    embed = pipeline(model=SENTENCE / name)
    got = embed(stored["sentences"])
    assert min(cosines(got, stored["embeddings"])) >= MIN_COSINE
    if FOLDERS[name][1]:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    # One at a time as in a batch: the sentences sit in different token buckets.
    singles = [embed(sentence) for sentence in stored["sentences"]]
    assert min(cosines(singles, stored["embeddings"])) >= MIN_COSINE


@pytest.mark.parametrize("name", FOLDERS)
def test_pooling_none_still_gives_the_token_vectors(name: str) -> None:
    stored = reference(name)
    [tokens] = pipeline(model=SENTENCE / name)(stored["sentences"][0], pooling="none")
    np.testing.assert_allclose(tokens, stored["token_embeddings_of_first"], atol=1e-5, rtol=0)


def test_a_graph_that_pools_is_served_as_it_is() -> None:
    model = fresh(SENTENCE / "mean-normalize-pooled")
    assert model.metadata.pooled_output == "sentence_embedding"
    assert model.metadata.token_output == "token_embeddings"
    stored = reference("mean-normalize-pooled")
    [outputs] = model.run([model.prepare(TextInput(stored["sentences"][1]))])
    # The reply is the graph's own vector, not a second pooling of it.
    [reply] = model.infer([TextInput(stored["sentences"][1])])
    np.testing.assert_allclose(reply, outputs["sentence_embedding"][0], atol=1e-6, rtol=0)
    assert min(cosines([reply], stored["embeddings"][1:2])) >= MIN_COSINE


def test_a_long_text_is_cut_where_sentence_transformers_cuts_it() -> None:
    model = fresh(SENTENCE / "cls")
    prepared = model.prepare(TextInput(reference("cls")["sentences"][-1]))
    assert prepared.truncated
    assert prepared.shape_key == (("sequence", 64),)


def test_a_module_the_worker_cannot_apply_is_refused(tmp_path: Path) -> None:
    folder = shutil.copytree(SENTENCE / "mean-normalize", tmp_path / "dense")
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(
        2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    )
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(MetadataError, match=r"modules\.json: module\(s\) Dense"):
        load_metadata(folder)


def test_legacy_pooling_flags_and_max_seq_length_are_read(tmp_path: Path) -> None:
    """Folders saved before sentence-transformers 5 (all-MiniLM-L6-v2's): pooling_mode_* flags,
    max_seq_length in sentence_bert_config.json."""
    folder = shutil.copytree(SENTENCE / "cls", tmp_path / "legacy")
    legacy = {
        "word_embedding_dimension": 16,
        "pooling_mode_cls_token": False,
        "pooling_mode_max_tokens": True,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(legacy))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 40}))
    meta = load_metadata(folder)
    assert (meta.pooling, meta.sequence_lengths) == ("max", (8, 16, 24, 32, 40))
    # No flag set: sentence-transformers falls back to mean.
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16}))
    assert load_metadata(folder).pooling == "mean"


def test_declared_keys_still_beat_the_sentence_transformers_files() -> None:
    meta = load_metadata(SENTENCE / "mean", {"pooling": "cls", "normalize": True})
    assert (meta.pooling, meta.normalize) == ("cls", True)
    assert meta.sources["pooling"] is Source.OVERRIDE
    with pytest.raises(MetadataError, match="pooling"):
        load_metadata(SENTENCE / "mean", {"pooling": "median"})


def test_inspect_shows_each_setting_with_its_source() -> None:
    shown = render_metadata(load_metadata(SENTENCE / "max"))
    assert "sequence    up to 64 tokens  <- sentence-transformers files" in shown
    assert "pooling     max  <- sentence-transformers files" in shown
    assert "normalize   False  <- sentence-transformers files" in shown
    assert "prompt      left out of pooling  <- sentence-transformers files" in shown
    assert "default     prompt 'question'  <- sentence-transformers files" in shown
    pooled = render_metadata(load_metadata(SENTENCE / "mean-normalize-pooled"))
    assert "pooling     in the graph (sentence_embedding); declared mean" in pooled


def test_pack_carries_the_files_and_writes_the_resolved_keys(tmp_path: Path) -> None:
    out = tmp_path / "packed"
    assert models_main(["pack", str(SENTENCE / "max"), "--out", str(out), "--set", "batch_sizes=1,2"]) == 0
    for name in ("modules.json", "1_Pooling/config.json", "config_sentence_transformers.json"):
        assert (out / name).is_file(), name
    props = {p.key: p.value for p in onnx.load(out / "model.onnx").metadata_props}
    assert props[METADATA_PREFIX + "pooling"] == "max"
    assert json.loads(props[METADATA_PREFIX + "normalize"]) is False
    assert json.loads(props[METADATA_PREFIX + "include_prompt"]) is False
    assert props[METADATA_PREFIX + "default_prompt_name"] == "question"
    assert json.loads(props[METADATA_PREFIX + "sequence_lengths"]) == [8, 16, 24, 32, 48, 64]
    meta = load_metadata(out)
    assert meta.sources["pooling"] is Source.ONNX
    stored = reference("max")
    assert min(cosines(pipeline(model=out)(stored["sentences"]), stored["embeddings"])) >= MIN_COSINE


@pytest.mark.kafka
async def test_over_kafka_each_folder_answers_as_encode_does(kafka_bootstrap: str) -> None:
    models = {name: fresh(SENTENCE / name) for name in FOLDERS}
    cases = [
        (name, i, sentence) for name in FOLDERS for i, sentence in enumerate(reference(name)["sentences"])
    ]
    async with (
        serving(kafka_bootstrap, models) as worker,
        InferenceClient(kafka_bootstrap, topic_prefix=worker.settings.topic_prefix) as client,
    ):
        replies = await asyncio.gather(
            *(client.request("text", name, {"text": text}, timeout=60) for name, _, text in cases)
        )
        first = reference("mean")["sentences"][0]
        tokens = await client.request(
            "text", "mean", {"text": first}, parameters={"pooling": "none"}, timeout=60
        )
    for (name, index, _), reply in zip(cases, replies, strict=True):
        assert "error" not in reply, (name, reply)
        assert reply["task"] == "feature-extraction"
        assert cosines([reply["outputs"]], [reference(name)["embeddings"][index]])[0] >= MIN_COSINE, name
    np.testing.assert_allclose(
        tokens["outputs"][0], reference("mean")["token_embeddings_of_first"], atol=1e-5, rtol=0
    )
