"""``from worker import pipeline``: the in-process path takes what transformers pipelines take."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.references import (
    MANY_LABELS,
    ROOT,
    TINY,
    assert_pipeline_equal,
    load_samples,
    zero_shot_by_raw_onnx,
)
from worker import pipeline
from worker.serving.decoding import decode_audio
from worker.serving.media_limits import MediaLimits

IMAGE = ROOT / "models" / "samples" / "image.png"
WAV = ROOT / "models" / "samples" / "audio.wav"
FRAMES = sorted((ROOT / "models" / "samples" / "video").glob("frame_*.png"))


def test_text_classification_takes_a_string_or_a_list() -> None:
    """Reference: the stored transformers pipeline outputs (models/tiny/bert/reference.json)."""
    clf = pipeline(model=TINY / "bert")
    samples, tolerance = load_samples("bert")
    texts = [s.raw["text"] for s in samples if "text_pair" not in s.raw]
    default, top_all = (
        [next(c.outputs for c in s.calls if c.kwargs == kwargs) for s in samples if "text_pair" not in s.raw]
        for kwargs in ({}, {"top_k": None})
    )
    for text, want in zip(texts, default, strict=True):
        assert_pipeline_equal(clf(text), want, tolerance)
    # In a list each text's top label comes bare, as the pipeline returns them; top_k=None ranks all.
    assert_pipeline_equal(clf(texts), [want[0] for want in default], tolerance)
    assert_pipeline_equal(clf(texts, top_k=None), top_all, tolerance)


def test_an_image_path_and_a_pil_image_give_the_same_answer() -> None:
    """Reference: the stored image-classification pipeline outputs (models/tiny/vit/reference.json)."""
    clf = pipeline("image-classification", model=TINY / "vit")
    [sample], tolerance = load_samples("vit")
    outputs = {json.dumps(c.kwargs): c.outputs for c in sample.calls}
    for image in (str(IMAGE), IMAGE, Image.open(IMAGE)):
        assert_pipeline_equal(clf(image), outputs["{}"], tolerance)
        assert_pipeline_equal(clf(image, top_k=2), outputs['{"top_k": 2}'], tolerance)


def test_audio_takes_a_file_an_array_or_a_raw_dict() -> None:
    clf = pipeline(model=TINY / "wav2vec2")
    array, rate = decode_audio(WAV.read_bytes(), MediaLimits())
    from_file = clf(str(WAV))
    assert clf(array) == from_file
    assert clf({"raw": array, "sampling_rate": rate}) == from_file
    # Reference: the stored audio-classification pipeline output (models/tiny/wav2vec2/reference.json).
    [sample], tolerance = load_samples("wav2vec2")
    assert_pipeline_equal(from_file, sample.calls[0].outputs, tolerance)


def test_a_list_of_frames_is_one_video() -> None:
    clf = pipeline(model=TINY / "videomae")
    # Reference: VideoClassificationPipeline.postprocess on the PyTorch logits of these frames
    # (models/tiny/videomae/reference.json; the pipeline itself needs PyAV and a video file).
    [sample], tolerance = load_samples("videomae")
    assert [str(ROOT / f) for f in sample.raw["frames"]] == [str(f) for f in FRAMES]
    result = clf([str(f) for f in FRAMES])
    assert_pipeline_equal(result, sample.calls[0].outputs, tolerance)
    batched = clf([[str(f) for f in FRAMES]] * 2)  # a batch of two runs in another bucket
    assert_pipeline_equal(batched, [sample.calls[0].outputs] * 2, tolerance)


def test_zero_shot_takes_candidate_labels() -> None:
    """Reference: the stored zero-shot pipeline output (models/tiny/clip/reference.json)."""
    clf = pipeline(model=TINY / "clip")
    [sample], tolerance = load_samples("clip")
    keywords = {k: sample.raw[k] for k in ("candidate_labels", "hypothesis_template")}
    assert_pipeline_equal(clf(IMAGE, **keywords), sample.calls[0].outputs, tolerance)


def test_zero_shot_ranks_more_labels_than_one_run_holds() -> None:
    """40 labels (CLIP runs 32 text rows at most) are split across runs and the
    softmax spans all 40, as transformers' pipeline does. Reference: the folder's processor and a bare
    ONNX session in one run of 40 rows (tests/references.py), which agrees with the stored pipeline."""
    clf = pipeline(model=TINY / "clip")
    template = "This is a photo of {}."
    got = clf(IMAGE, candidate_labels=list(MANY_LABELS), hypothesis_template=template)
    expected = zero_shot_by_raw_onnx(Image.open(IMAGE).convert("RGB"), list(MANY_LABELS), template)
    assert_pipeline_equal(got, expected, 1e-5)


def test_a_task_that_contradicts_nothing_loads_and_a_missing_model_is_refused() -> None:
    assert pipeline("text-classification", model=TINY / "bert").task == "text-classification"
    with pytest.raises(ValueError, match="model="):
        pipeline("text-classification")
    assert np.isfinite(pipeline(model=TINY / "bert")("x")[0]["score"])


def test_a_task_that_contradicts_the_model_is_refused_naming_both() -> None:
    """transformers refuses a task the model has no head for; so do we."""
    with pytest.raises(ValueError, match=r"'image-classification'.*'text-classification'"):
        pipeline("image-classification", model=TINY / "bert")
    with pytest.raises(ValueError, match=r"'text-classification'.*'zero-shot-image-classification'"):
        pipeline("text-classification", model=TINY / "clip")


def test_a_task_alias_the_pipeline_accepts_loads() -> None:
    """transformers' TASK_ALIASES: sentiment-analysis is text-classification, ner token-classification."""
    assert pipeline("sentiment-analysis", model=TINY / "bert").task == "text-classification"
    assert pipeline("ner", model=TINY / "bert-ner").task == "token-classification"
