"""Task heads answer as the matching transformers pipeline does, for every tiny model and stored call.

The stored outputs were made by ``python -m models build tiny``; ``pipeline_source`` in each
reference.json says how: the transformers 5 pipeline for most tasks, a step-by-step replay on
PyTorch of the 4.57 QuestionAnsweringPipeline (removed in 5) for bert-qa, and
VideoClassificationPipeline.postprocess on PyTorch logits for videomae (the pipeline needs PyAV
and a video file). These tests need no torch.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import numpy as np
import pytest

from tests.references import (
    ALL_TINY_MODELS,
    TINY,
    assert_pipeline_equal,
    load_samples,
    pipeline_call,
    reference_task,
)
from worker import pipeline
from worker.errors import InvalidRequest
from worker.inprocess import Pipeline
from worker.serving.inputs import TensorInput


@functools.cache
def served(name: str) -> Pipeline:
    """One in-process pipeline per tiny model for the whole module."""
    return pipeline(model=TINY / name)


def call_ours(name: str, raw: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """Our pipeline called as the transformers pipeline was on a stored sample."""
    pipe = served(name)
    inputs, keywords = pipeline_call(reference_task(name), raw)
    # A model that declares pooling answers with one vector; the pipeline's token vectors need "none".
    raw_vectors = {"pooling": "none"} if pipe.model.metadata.pooling is not None else {}
    return pipe(inputs, **keywords, **raw_vectors, **kwargs)


def stored_calls() -> list[Any]:
    """(model, sample index, call index) for every stored pipeline call."""
    cases = []
    for name in ALL_TINY_MODELS:
        samples, _ = load_samples(name)
        for i, sample in enumerate(samples):
            for j, call in enumerate(sample.calls):
                label = ",".join(f"{k}={v}" for k, v in call.kwargs.items()) or "defaults"
                cases.append(pytest.param(name, i, j, id=f"{name}-{i}-{label}"))
    return cases


@pytest.mark.parametrize(("name", "sample_index", "call_index"), stored_calls())
def test_result_equals_the_stored_pipeline_output(name: str, sample_index: int, call_index: int) -> None:
    samples, tolerance = load_samples(name)
    sample = samples[sample_index]
    call = sample.calls[call_index]
    assert_pipeline_equal(call_ours(name, sample.raw, call.kwargs), call.outputs, tolerance)


def test_every_tiny_model_has_stored_pipeline_calls() -> None:
    for name in ALL_TINY_MODELS:
        samples, _ = load_samples(name)
        assert samples and all(sample.calls for sample in samples), name


def test_declared_mean_pooling_gives_the_sentence_transformers_embedding() -> None:
    embed = served("bert-embed")
    assert (embed.model.metadata.pooling, embed.model.metadata.normalize) == ("mean", True)
    samples, tolerance = load_samples("bert-embed")
    for sample in samples:
        assert sample.sentence_embedding is not None
        vector = embed(sample.raw["text"])
        assert_pipeline_equal(vector, sample.sentence_embedding, tolerance)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)


def test_raw_token_vectors_cover_special_tokens_and_no_padding() -> None:
    embed = served("bert-embed")
    [tokens] = embed("Great movie!", pooling="none")
    # [CLS] great movie ! [SEP]: five rows, although the request ran in the 16-token bucket.
    assert len(tokens) == 5 and {len(row) for row in tokens} == {32}


def test_answers_lie_inside_the_context() -> None:
    qa = served("bert-qa")
    for sample in load_samples("bert-qa")[0]:
        context = sample.raw["text_pair"]
        answers = qa(question=sample.raw["text"], context=context, top_k=10, max_answer_len=4)
        assert len(answers) == 10
        for answer in answers:
            assert 0 <= answer["start"] < answer["end"] <= len(context)
            assert context[answer["start"] : answer["end"]] == answer["answer"]
            # Aligned to whole words: "work" of "working" is never an answer on its own.
            for edge in (answer["start"], answer["end"]):
                assert not context[max(edge - 1, 0) : edge + 1].isalnum() or edge in (0, len(context))
            assert len(answer["answer"].split()) <= 4 + answer["answer"].count(",")
        assert [a["score"] for a in answers] == sorted((a["score"] for a in answers), reverse=True)


def test_question_answering_takes_the_pipeline_call_forms() -> None:
    qa = served("bert-qa")
    [sample, other] = load_samples("bert-qa")[0][:2]
    question, context = sample.raw["text"], sample.raw["text_pair"]
    one = qa(question=question, context=context)
    other_one = qa(question=other.raw["text"], context=other.raw["text_pair"])
    assert qa({"question": question, "context": context}) == one
    # A batch runs in a larger bucket: the same answers, scores equal within float noise.
    assert_pipeline_equal(qa(question=[question, question], context=context), [one, one], 1e-6)
    both = qa(question=[question, other.raw["text"]], context=[context, other.raw["text_pair"]])
    assert_pipeline_equal(both, [one, other_one], 1e-6)
    with pytest.raises(InvalidRequest):
        qa(question=question)


def test_a_lone_text_lists_its_label_and_a_batch_does_not() -> None:
    clf = served("bert")
    samples, tolerance = load_samples("bert")
    texts = [sample.raw["text"] for sample in samples if "text_pair" not in sample.raw]
    defaults = [sample.calls[0].outputs for sample in samples if "text_pair" not in sample.raw]
    # transformers: clf("a") -> [{...}], clf(["a", "b"]) -> [{...}, {...}].
    assert_pipeline_equal(clf(texts), [expected[0] for expected in defaults], tolerance)
    ranked = [sample.calls[1].outputs for sample in samples if "text_pair" not in sample.raw]
    assert_pipeline_equal(clf(texts, top_k=None), ranked, tolerance)


def test_ner_groups_word_pieces_and_shows_unknown_words_as_written() -> None:
    ner = served("bert-ner")
    text = "My friends walked their dogs slowly in the park near Paris yesterday."
    groups = ner(text, aggregation_strategy="simple")
    words = [group["word"] for group in groups]
    assert "walked" in words and "Paris" in words
    for group in groups:  # the span covers the group's word (case and spaces aside)
        covered = text[group["start"] : group["end"]].lower().replace(" ", "")
        assert covered == group["word"].removeprefix("##").lower().replace(" ", "")
    tokens = ner(text)
    assert len(tokens) > len(groups) and all(token["entity"] != "O" for token in tokens)
    assert ner(text, ignore_labels=[]) != tokens, "without the O filter the O tokens come back"


def test_an_unknown_aggregation_strategy_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="aggregation_strategy"):
        served("bert-ner")("Great movie!", aggregation_strategy="first")


@pytest.mark.parametrize("name", ["bert-ner", "bert-qa", "clip"])
def test_heads_that_need_the_request_refuse_raw_tensors(name: str) -> None:
    ids = np.zeros((1, 16), dtype=np.int64)
    tensors = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if name == "clip":
        tensors["pixel_values"] = np.zeros((1, 3, 32, 32), dtype=np.float32)
    else:
        tensors["token_type_ids"] = ids
    with pytest.raises(InvalidRequest, match="raw tensors"):
        served(name).model.infer([TensorInput(tensors)])


def _distinct_words(count: int) -> list[str]:
    """``count`` different whole words of bert-qa's own vocabulary (one token each), in a fixed order."""
    vocab = (TINY / "bert-qa" / "vocab.txt").read_text(encoding="utf-8").split()
    words = [word for word in vocab if word.isalpha() and word.islower() and len(word) > 3]
    return words[100 : 100 + count]


def test_every_word_span_is_an_answer_when_top_k_and_max_answer_len_allow_all() -> None:
    # 30 different words: the context's spans are its 30 * 31 / 2 runs of whole words, each once.
    words = _distinct_words(30)
    context = " ".join(words)
    answers = served("bert-qa")(question="which word?", context=context, top_k=10_000, max_answer_len=10_000)
    expected = {" ".join(words[i:j]) for i in range(30) for j in range(i + 1, 31)}
    assert len(answers) == 465 and {answer["answer"] for answer in answers} == expected
    assert [a["score"] for a in answers] == sorted((a["score"] for a in answers), reverse=True)


def test_a_million_top_k_and_max_answer_len_answer_quickly() -> None:
    # A 110-word context with both at 1,000,000: a quadratic head takes 3.5-4.2 s of Python here.
    qa = served("bert-qa")
    context = " ".join(_distinct_words(110))
    qa(question="which word?", context=context)  # warm: the session's first run is not the head's cost
    started = time.perf_counter()
    answers = qa(question="which word?", context=context, top_k=1_000_000, max_answer_len=1_000_000)
    assert time.perf_counter() - started < 1.0
    # The context is cut to the model's 128 tokens: every run of the words that fit, and no more.
    kept = {word for answer in answers for word in answer["answer"].split()}
    assert len(answers) == len(kept) * (len(kept) + 1) // 2


def _bert_tensors(**arrays: Any) -> TensorInput:
    """bert's three inputs, eight tokens (its shortest bucket), with ``arrays`` replacing some of them."""
    ids = np.array([[2, 10, 11, 12, 13, 14, 15, 3]], dtype=np.int64)
    tensors = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return TensorInput({**tensors, **arrays})


def test_raw_tensors_hold_values_the_model_accepts() -> None:
    # float64 data is never cast to int64 ids, and ids are range-checked.
    bert = served("bert").model
    vocab = json.loads((TINY / "bert" / "config.json").read_text())["vocab_size"]
    ids = np.array([[2, 5, vocab - 1, 6, 7, 8, 9, 3]], dtype=np.int64)
    assert bert.infer([_bert_tensors(input_ids=ids)]), "ids up to vocab_size - 1 run"
    refusals = {
        "unsafe cast": _bert_tensors(input_ids=ids.astype(np.float64)),
        "id past the vocabulary": _bert_tensors(input_ids=np.array([[2, vocab, 5, 6, 7, 8, 9, 3]])),
        "negative id": _bert_tensors(input_ids=np.array([[2, -1, 5, 6, 7, 8, 9, 3]])),
        "token type 2": _bert_tensors(token_type_ids=np.array([[0, 0, 2, 0, 0, 0, 0, 0]])),
        "mask of 3": _bert_tensors(attention_mask=np.array([[1, 1, 3, 1, 1, 1, 1, 1]])),
    }
    for why, tensors in refusals.items():
        with pytest.raises(InvalidRequest):
            bert.infer([tensors])
            pytest.fail(f"{why} was accepted")
