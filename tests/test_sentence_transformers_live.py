"""Live parity: the sentence-transformers folders' stored references are what ``encode`` returns today,
and the worker matches ``SentenceTransformer(folder).encode`` in process and over Kafka.

Needs the export extra (torch, sentence-transformers): a missing package fails these tests.
"""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.kafka_support import serving
from tests.test_sentence_transformers import FOLDERS, MIN_COSINE, SENTENCE, cosines, fresh, reference
from worker import pipeline
from worker.client import InferenceClient

pytestmark = pytest.mark.torch


@functools.cache
def live(name: str) -> Any:
    """The folder loaded by sentence-transformers itself, offline."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(SENTENCE / name), device="cpu", local_files_only=True)


def encode(name: str, sentences: list[str], **kwargs: Any) -> np.ndarray:
    embeddings: np.ndarray = np.asarray(live(name).encode(sentences, convert_to_numpy=True, **kwargs))
    return embeddings


@pytest.mark.parametrize("name", FOLDERS)
def test_encode_reproduces_the_stored_reference(name: str) -> None:
    stored = reference(name)
    np.testing.assert_allclose(encode(name, stored["sentences"]), stored["embeddings"], atol=1e-5, rtol=0)
    [tokens] = live(name).encode(stored["sentences"][:1], output_value="token_embeddings")
    np.testing.assert_allclose(tokens.numpy(), stored["token_embeddings_of_first"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FOLDERS)
def test_in_process_matches_live_encode(name: str) -> None:
    sentences = [*reference(name)["sentences"], "Why do kids love the park?", "story: a long day"]
    similarity = cosines(pipeline(model=SENTENCE / name)(sentences), encode(name, sentences))
    assert min(similarity) >= MIN_COSINE, similarity


@pytest.mark.kafka
async def test_over_kafka_matches_live_encode(kafka_bootstrap: str) -> None:
    sentences = reference("mean")["sentences"]
    models = {name: fresh(SENTENCE / name) for name in FOLDERS}
    async with (
        serving(kafka_bootstrap, models) as worker,
        InferenceClient(kafka_bootstrap, topic_prefix=worker.settings.topic_prefix) as client,
    ):
        replies = await asyncio.gather(
            *(client.request("text", name, {"text": s}, timeout=60) for name in FOLDERS for s in sentences)
        )
    got = iter(replies)
    for name in FOLDERS:
        answers = [next(got)["outputs"] for _ in sentences]
        assert min(cosines(answers, encode(name, sentences))) >= MIN_COSINE, name


@pytest.mark.parametrize(
    "mode", ["weightedmean", "lasttoken", "mean_sqrt_len_tokens", "cls", "mean", ["cls", "max"]]
)
def test_every_pooling_mode_matches_live_encode_with_the_prompt_left_out(tmp_path: Path, mode: Any) -> None:
    """The "max" folder (a default prompt, include_prompt false) with its Pooling module switched."""
    from sentence_transformers import SentenceTransformer

    folder = shutil.copytree(SENTENCE / "max", tmp_path / "folder")
    config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config | {"pooling_mode": mode}))
    sentences = reference("max")["sentences"]
    expected = SentenceTransformer(str(folder), device="cpu", local_files_only=True).encode(sentences)
    assert min(cosines(pipeline(model=folder)(sentences), expected)) >= MIN_COSINE
