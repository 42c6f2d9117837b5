"""Processor + engine against the PyTorch references, and the batch invariants (3 and 4)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.references import (
    MANY_LABELS,
    TINY,
    TINY_MODELS,
    assert_pipeline_equal,
    clip_by_raw_onnx,
    load_samples,
    to_model_input,
)
from worker.errors import InvalidRequest
from worker.serving.assembly import group_by_shape
from worker.serving.budget import batch_length, merge_rank
from worker.serving.engine import EngineOptions, RunPlan, usable_cores
from worker.serving.frame_sampling import sample_frames
from worker.serving.inputs import (
    AudioInput,
    ImageInput,
    ModelInput,
    MultimodalInput,
    Prepared,
    TextInput,
    VideoInput,
)
from worker.serving.metadata import load_metadata
from worker.serving.processors import ProcessorFactory
from worker.serving.registry import ServedModel, load_model

SENTENCES = [
    "A short one.",
    "The cat sat on the mat.",
    "Rain again today.",
    "We walked home after dinner.",
    "Good book.",
    "It was fine.",
]


@pytest.fixture(scope="module", params=["longest", "buckets"])
def models(request: pytest.FixtureRequest) -> dict[str, ServedModel]:
    """Every tiny model, run at each batch shape policy (longest is the CPU default, buckets CUDA's)."""
    options = EngineOptions(batch_shapes=request.param)
    return {name: load_model(TINY / name, engine_options=options) for name in TINY_MODELS}


def _random_image(rng: np.random.Generator, size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def other_inputs(name: str, count: int, seed: int = 0) -> list[ModelInput]:
    """Distinct inputs of the same shape class as the model's first reference sample."""
    rng = np.random.default_rng(seed)
    makers: dict[str, Callable[[int], ModelInput]] = {
        "bert": lambda i: TextInput(SENTENCES[i % len(SENTENCES)]),
        "vit": lambda i: ImageInput(_random_image(rng)),
        "wav2vec2": lambda i: AudioInput(rng.uniform(-0.5, 0.5, 12_000 + 100 * i).astype(np.float32), 16_000),
        "whisper-encoder": lambda i: AudioInput(rng.uniform(-0.5, 0.5, 16_000).astype(np.float32), 16_000),
        "videomae": lambda i: VideoInput([_random_image(rng) for _ in range(4)]),
        "clip": lambda i: MultimodalInput(_random_image(rng), ("cat", "dog", "car")),
    }
    return [makers[name](i) for i in range(count)]


def _close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=atol, rtol=0, err_msg=key)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_processor_emits_hf_arrays_padded_to_a_bucket(models: dict[str, ServedModel], name: str) -> None:
    model = models[name]
    samples, _ = load_samples(name)
    for sample in samples:
        prepared = model.prepare(to_model_input(sample.raw))
        assert set(prepared.arrays) == {spec.name for spec in model.metadata.inputs}
        for key, expected in sample.inputs.items():
            got = prepared.arrays[key]
            assert got.dtype == expected.dtype
            real = tuple(slice(0, n) for n in expected.shape)
            # Whisper's numpy STFT differs from torch's by ~1e-5; everything else is exact.
            np.testing.assert_allclose(got[real], expected, atol=5e-5, rtol=0, err_msg=key)
            if got.shape != expected.shape and key == "attention_mask":
                assert not got[:, expected.shape[1] :].any(), "padding must be masked out"
        for dim, value in prepared.shape_key:
            assert value in model.metadata.dims[dim]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_engine_matches_the_pytorch_model(models: dict[str, ServedModel], name: str) -> None:
    model = models[name]
    samples, tolerance = load_samples(name)
    for sample in samples:
        [outputs] = model.run([model.prepare(to_model_input(sample.raw))])
        for key, expected in sample.outputs.items():
            assert outputs[key].shape == expected.shape, key
            np.testing.assert_allclose(outputs[key], expected, atol=tolerance, rtol=0, err_msg=key)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_a_batch_never_changes_an_answer(models: dict[str, ServedModel], name: str) -> None:
    model = models[name]
    samples, _ = load_samples(name)
    target = model.prepare(to_model_input(samples[0].raw))
    others = [p for p in map(model.prepare, other_inputs(name, 12)) if p.shape_key == target.shape_key]
    assert len(others) >= 4, "the fillers should share the target's shape bucket"
    [alone] = model.run([target])
    # Position 2 of 5: bucket 8, so three padding rows; and among real neighbours.
    batch = [*others[:2], target, *others[2:4]]
    results = model.run(batch)
    assert len(results) == len(batch)
    _close(results[2], alone, atol=1e-5)
    for other, result in zip(batch, results, strict=True):
        [single] = model.run([other])
        _close(result, single, atol=1e-5)


def test_padding_rows_never_leak(models: dict[str, ServedModel]) -> None:
    model = models["bert"]
    prepared = [model.prepare(TextInput(f"{SENTENCES[0]} {i}")) for i in range(3)]
    assert len({p.shape_key for p in prepared}) == 1
    bucket = (("batch", 4), *prepared[0].shape_key)
    before = model.engine.runs[bucket]
    results = model.run(prepared)
    assert [r["logits"].shape for r in results] == [(1, 3)] * 3
    assert model.engine.runs[bucket] == before + 1, "three requests run in the bucket of 4: one padding row"


LENGTHS = ("Hi.", "A sentence of a dozen or so tokens, give or take.", " ".join(["long"] * 40))


@pytest.mark.parametrize("name", ["bert", "bert-ner", "bert-qa", "bert-embed", "clip"])
def test_shorter_requests_ride_in_a_longer_bucket_with_the_same_answers(
    models: dict[str, ServedModel], name: str
) -> None:
    model = (
        models[name]
        if name in models
        else load_model(TINY / name, engine_options=models["bert"].engine.options)
    )
    rng = np.random.default_rng(5)
    make: Callable[[str], ModelInput] = {
        "bert-qa": lambda text: TextInput("What is it?", text),
        "clip": lambda text: MultimodalInput(_random_image(rng), (text, "a dog")),
    }.get(name, TextInput)
    prepared = [model.prepare(make(text)) for text in LENGTHS]
    keys = [p.shape_key for p in prepared]
    assert len(set(keys)) >= 2, "requests of different buckets"
    longest = max(keys, key=lambda k: dict(k)["sequence"])
    # The batcher merges buckets only at fixed shapes; the engine runs such a batch at either policy.
    ranks = [dict(k)["sequence"] if model.engine.fixed_shapes else None for k in keys]
    assert [merge_rank(model, k) for k in keys] == ranks
    together = model.run(prepared, longest)
    for item, result in zip(prepared, together, strict=True):
        [alone] = model.run([item])
        assert {k: v.shape for k, v in result.items()} == {k: v.shape for k, v in alone.items()}, "own length"
        _close(_real_tokens(result, item), _real_tokens(alone, item), atol=1e-5)


def _real_tokens(outputs: dict[str, np.ndarray], item: Prepared) -> dict[str, np.ndarray]:
    """Outputs along the token axis cut to the request's real tokens: what follows is padding, which
    the heads never read (a bucket run leaves the model's outputs there, a longest-length run zeros)."""
    mask = item.arrays["attention_mask"]
    real = int(np.flatnonzero(mask.any(axis=0))[-1]) + 1
    return {k: v[:, :real] if v.ndim >= 2 and v.shape[1] == mask.shape[1] else v for k, v in outputs.items()}


def test_a_longer_request_never_fits_a_shorter_bucket(models: dict[str, ServedModel]) -> None:
    model = models["bert"]
    short, long = (model.prepare(TextInput(text)) for text in LENGTHS[::2])
    with pytest.raises(ValueError, match="cannot run in a batch"):
        model.run([short, long], short.shape_key)
    with pytest.raises(ValueError, match="pad_values"):
        model.engine.run([short, long], long.shape_key)  # the engine alone does not know the padding


@pytest.mark.parametrize("name", ["vit", "wav2vec2", "whisper-encoder", "videomae"])
def test_only_masked_token_inputs_change_bucket(models: dict[str, ServedModel], name: str) -> None:
    model = models[name]
    assert model.preprocessor.pad_values == {}
    assert all(
        merge_rank(model, bucket) is None
        for bucket in {p.shape_key for p in map(model.prepare, other_inputs(name, 2))}
    )


def test_an_overfull_batch_is_split_not_truncated(models: dict[str, ServedModel]) -> None:
    model = models["bert"]
    inputs = [TextInput(f"{SENTENCES[0]} {i}") for i in range(45)]
    prepared = [model.prepare(item) for item in inputs]
    key = prepared[0].shape_key
    prepared = [p for p in prepared if p.shape_key == key]
    assert len(prepared) > max(model.metadata.batch_sizes)
    results = model.run(prepared)
    assert len(results) == len(prepared)
    for item, result in zip(prepared, results, strict=True):
        _close(result, model.run([item])[0], atol=1e-5)


def test_multimodal_rows_split_across_runs(models: dict[str, ServedModel]) -> None:
    model = models["clip"]
    items = other_inputs("clip", 14, seed=3)  # 14 images x 3 labels = 42 text rows > 32
    prepared = [model.prepare(item) for item in items]
    results = model.run(prepared)
    assert [r["logits_per_image"].shape for r in results] == [(1, 3)] * 14
    for item, result in zip(prepared, results, strict=True):
        _close(result, model.run([item])[0], atol=1e-5)


def test_a_request_larger_than_the_largest_bucket_is_split_and_merged(models: dict[str, ServedModel]) -> None:
    """40 candidate labels, 32 text rows per run at most: two runs, one answer over all 40 rows.
    Reference: the bare ONNX session fed all 40 texts at once by the folder's CLIP processor."""
    model = models["clip"]
    image = _random_image(np.random.default_rng(1))
    texts = [f"This is a photo of {label}." for label in MANY_LABELS]
    prepared = model.prepare(MultimodalInput(image, MANY_LABELS))
    assert prepared.arrays["input_ids"].shape[0] > max(model.metadata.dims["text_batch"])
    [result] = model.run([prepared])
    reference = clip_by_raw_onnx(image, texts)
    assert result["logits_per_image"].shape == (1, 40)
    assert result["text_embeds"].shape == (40, 16) and result["image_embeds"].shape == (1, 16)
    for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        np.testing.assert_allclose(result[name], reference[name], atol=1e-5, rtol=0, err_msg=name)
    # Beside other requests in one batch, the split request still gets its own rows only.
    others = [model.prepare(item) for item in other_inputs("clip", 3, seed=4)]
    batched = model.run([others[0], prepared, *others[1:]])
    np.testing.assert_allclose(batched[1]["logits_per_image"], reference["logits_per_image"], atol=1e-5)
    assert [b["logits_per_image"].shape for b in batched] == [(1, 3), (1, 40), (1, 3), (1, 3)]


def test_input_buffers_are_preallocated_and_reused(models: dict[str, ServedModel]) -> None:
    model = models["bert"]
    item = model.prepare(TextInput("Reuse me."))
    bucket = (("batch", 1), *item.shape_key)
    buffers = model.engine.buffers[bucket]
    before = {name: buffer.ctypes.data for name, buffer in buffers.items()}
    first = model.run([item])[0]["logits"].copy()
    model.run([model.prepare(TextInput("Something else entirely."))])
    np.testing.assert_array_equal(model.run([item])[0]["logits"], first)
    assert {name: buffer.ctypes.data for name, buffer in buffers.items()} == before


def test_batch_buckets_share_one_buffer_per_input_shape(models: dict[str, ServedModel]) -> None:
    engine = models["bert"].engine
    key = models["bert"].prepare(TextInput("Share me.")).shape_key
    sizes = models["bert"].metadata.batch_sizes
    views = [engine.buffers[(("batch", size), *key)]["input_ids"] for size in sizes]
    assert [view.shape[0] for view in views] == list(sizes)
    assert len({view.ctypes.data for view in views}) == 1, "each bucket is the first rows of one buffer"
    assert all(view.flags.c_contiguous for view in views)


def test_results_survive_the_next_run(models: dict[str, ServedModel]) -> None:
    model = models["vit"]
    a, b = (model.prepare(item) for item in other_inputs("vit", 2, seed=7))
    first = model.run([a])[0]["logits"]
    kept = first.copy()
    model.run([b])
    np.testing.assert_array_equal(first, kept)


def test_long_text_is_truncated_with_a_flag(models: dict[str, ServedModel]) -> None:
    model = models["bert"]
    longest = max(model.metadata.sequence_lengths or ())
    long = model.prepare(TextInput(" ".join(["word"] * (longest + 50))))
    assert long.truncated
    assert long.arrays["input_ids"].shape == (1, longest)
    short = model.prepare(TextInput("short"))
    assert not short.truncated
    assert short.arrays["input_ids"].shape[1] == min(model.metadata.sequence_lengths or ())


@pytest.mark.parametrize("name", ["bert", "clip"])
def test_texts_prepared_at_once_on_threads_are_each_cut_and_flagged_as_alone(
    models: dict[str, ServedModel], name: str
) -> None:
    """The intake prepares requests on several threads with one tokenizer per model. A fast
    tokenizer keeps its truncation setting in the tokenizer itself (each call sets it), so calls at
    once could tokenize a long text uncut (longer than every bucket: an internal error) or cut a
    text another call set no cut for, unflagged. Seen once in a full test run."""
    model = models[name]
    longest = max(model.metadata.sequence_lengths or ())

    def text_input(text: str) -> ModelInput:
        return MultimodalInput(Image.new("RGB", (8, 8)), (text,)) if name == "clip" else TextInput(text)

    long, short = " ".join(["word"] * (longest + 50)), "short"
    with ThreadPoolExecutor(4) as pool:
        prepared = list(
            pool.map(lambda i: (i, model.prepare(text_input(long if i % 2 else short))), range(400))
        )
    for i, item in prepared:
        assert item.truncated == bool(i % 2), i
        assert item.arrays["input_ids"].shape[-1] <= longest


def test_long_audio_is_truncated_with_a_flag(models: dict[str, ServedModel]) -> None:
    model = models["wav2vec2"]
    limit = max(model.metadata.audio_samples or ())
    prepared = model.prepare(AudioInput(np.zeros(limit + 10, dtype=np.float32), 16_000))
    assert prepared.truncated
    assert prepared.arrays["input_values"].shape == (1, limit)
    assert not model.prepare(AudioInput(np.zeros(100, dtype=np.float32), 16_000)).truncated


def test_wrong_input_kind_is_refused(models: dict[str, ServedModel]) -> None:
    with pytest.raises(InvalidRequest, match="takes text"):
        models["bert"].prepare(ImageInput(Image.new("RGB", (4, 4))))


def test_video_clips_are_sampled_or_padded_to_the_frame_count() -> None:
    frames = [Image.new("RGB", (2, 2), (i, 0, 0)) for i in range(10)]
    picked = sample_frames(frames, 4)
    assert [f.getpixel((0, 0))[0] for f in picked] == [0, 3, 6, 9]
    padded = sample_frames(frames[:2], 4)
    assert [f.getpixel((0, 0))[0] for f in padded] == [0, 1, 1, 1]


def test_the_processor_factory_shares_one_instance_per_folder_and_metadata() -> None:
    factory = ProcessorFactory()
    metadata = load_metadata(TINY / "bert")
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(factory.get(metadata))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(p) for p in got}) == 1
    assert factory.get(load_metadata(TINY / "bert")) is got[0]
    # Other buckets make other arrays: the same folder with overrides gets its own processor.
    narrower = load_metadata(TINY / "bert", {"sequence_lengths": [32, 64]})
    assert factory.get(narrower) is not got[0]
    assert factory.get(narrower).prepare(TextInput("Hi.")).shape_key == (("sequence", 32),)


def test_a_model_reloaded_with_other_buckets_answers_as_the_pipeline(models: dict[str, ServedModel]) -> None:
    """The shared factory hands a reload with sequence_lengths [32, 64] a processor of its own
    buckets, not the first load's (16-token buckets, which its engine does not have). Reference: the stored
    transformers pipeline outputs of the bert samples (models/tiny/bert/reference.json)."""
    assert models["bert"].prepare(TextInput("Hi.")).shape_key != (("sequence", 32),)
    reloaded = load_model(TINY / "bert", overrides={"sequence_lengths": [32, 64]})
    samples, tolerance = load_samples("bert")
    for sample in samples:
        for call in sample.calls:
            [got] = reloaded.infer([to_model_input(sample.raw)], call.kwargs)
            assert_pipeline_equal(got, call.outputs, tolerance)


def test_raw_tensors_bypass_the_processor(models: dict[str, ServedModel]) -> None:
    from worker.serving.inputs import TensorInput

    model = models["vit"]
    samples, tolerance = load_samples("vit")
    prepared: Prepared = model.prepare(TensorInput(samples[0].inputs))
    [outputs] = model.run([prepared])
    np.testing.assert_allclose(outputs["logits"], samples[0].outputs["logits"], atol=tolerance, rtol=0)
    with pytest.raises(InvalidRequest, match="fixes it at 32"):
        model.prepare(TensorInput({"pixel_values": np.zeros((1, 3, 16, 16), dtype=np.float32)}))


def test_requests_group_by_shape_in_order_of_first_appearance() -> None:
    # Hand-made shape keys: two of 16 tokens around one of 32 share a batch; the order is the requests'.
    def at(length: int) -> Prepared:
        return Prepared({"input_ids": np.zeros((1, length), dtype=np.int64)}, (("sequence", length),))

    assert group_by_shape([at(16), at(32), at(16)]) == [[0, 2], [1]]
    assert group_by_shape([]) == []


def test_the_run_plan_shares_the_cores_among_batches_on_cpu_and_keeps_fixed_shapes_on_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("worker.serving.engine.usable_cores", lambda: 8)
    assert RunPlan.of(EngineOptions(), on_cuda=False) == RunPlan(False, 2, 4)
    assert RunPlan.of(EngineOptions(batches_in_flight=4), on_cuda=False) == RunPlan(False, 4, 2)
    assert RunPlan.of(EngineOptions(intra_op_threads=3), on_cuda=False) == RunPlan(False, 2, 3)
    assert RunPlan.of(EngineOptions(), on_cuda=True) == RunPlan(True, 1, 0)
    # A bucket's buffers take one batch at a time, whatever was asked.
    assert RunPlan.of(EngineOptions(batch_shapes="buckets", batches_in_flight=3), on_cuda=False) == RunPlan(
        True, 1, 0
    )
    monkeypatch.setattr("worker.serving.engine.usable_cores", lambda: 1)
    assert RunPlan.of(EngineOptions(), on_cuda=False) == RunPlan(False, 1, 1)


def test_batches_in_flight_at_once_get_the_answers_they_get_alone() -> None:
    model = load_model(TINY / "bert-embed", engine_options=EngineOptions(batch_shapes="longest"))
    assert model.engine.batches_in_flight == min(2, usable_cores()) and not model.engine.fixed_shapes
    batches = [[model.prepare(TextInput(f"{text} {i}")) for text in SENTENCES[:5]] for i in range(8)] + [
        [model.prepare(TextInput(text)) for text in LENGTHS]
    ]

    def run(batch: list[Prepared]) -> list[dict[str, np.ndarray]]:
        return model.run(batch, max((p.shape_key for p in batch), key=lambda k: dict(k)["sequence"]))

    alone = [run(batch) for batch in batches]
    start = threading.Barrier(4)

    def together(batch: list[Prepared]) -> list[dict[str, np.ndarray]]:
        start.wait()
        return [run(batch) for _ in range(5)][-1]

    with ThreadPoolExecutor(4) as pool:
        for i in range(0, len(batches), 4):
            group = batches[i : i + 4]
            start = threading.Barrier(len(group))
            for got, want in zip(pool.map(together, group), alone[i : i + 4], strict=True):
                for a, b in zip(got, want, strict=True):
                    _close(a, b, atol=0)


def test_the_batcher_groups_by_real_length_only_where_a_batch_runs_at_its_longest(
    models: dict[str, ServedModel],
) -> None:
    bert = models["bert"]
    short, long = bert.prepare(TextInput("Good book.")), bert.prepare(TextInput(LENGTHS[-1]))
    if bert.engine.fixed_shapes:  # every request pads to its bucket: nothing to group by
        assert batch_length(bert, short) is None and batch_length(bert, long) is None
        return
    real = [int(item.arrays["attention_mask"].sum()) for item in (short, long)]
    assert [batch_length(bert, short), batch_length(bert, long)] == real and real[0] < real[1]
    vit = models["vit"]
    assert batch_length(vit, vit.prepare(other_inputs("vit", 1)[0])) is None, "no token sequence"
