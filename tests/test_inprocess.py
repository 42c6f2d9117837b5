"""``from worker import pipeline``: the in-process path takes what transformers pipelines take."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.references import ROOT, TINY
from worker import pipeline
from worker.decoding import MediaLimits, decode_audio
from worker.processors import ImageInput, MultimodalInput, TextInput
from worker.registry import load_model

IMAGE = ROOT / "models" / "samples" / "image.png"
WAV = ROOT / "models" / "samples" / "audio.wav"
FRAMES = sorted((ROOT / "models" / "samples" / "video").glob("frame_*.png"))


def assert_same_ranking(got: list[dict[str, object]], want: list[dict[str, object]]) -> None:
    """Same labels in the same order, scores equal within float tolerance (another session's run)."""
    assert [r["label"] for r in got] == [r["label"] for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=1e-6)


def test_text_classification_takes_a_string_or_a_list() -> None:
    clf = pipeline(model=TINY / "bert")
    one = clf("some text")
    assert isinstance(one, list) and one[0].keys() == {"label", "score"}
    many = clf(["some text", "another one"], top_k=None)
    assert len(many) == 2 and len(many[1]) == 3
    assert many[0][0]["label"] == one[0]["label"]
    assert many[0][0]["score"] == pytest.approx(one[0]["score"], abs=1e-6)
    [expected] = load_model(TINY / "bert").infer([TextInput("some text")])[0]
    assert one[0]["label"] == expected["label"]
    assert one[0]["score"] == pytest.approx(expected["score"], abs=1e-6)


def test_an_image_path_and_a_pil_image_give_the_same_answer() -> None:
    clf = pipeline("image-classification", model=TINY / "vit")
    from_path = clf(str(IMAGE))
    from_pil = clf(Image.open(IMAGE))
    assert from_path == from_pil
    assert_same_ranking(
        from_path, load_model(TINY / "vit").infer([ImageInput(Image.open(IMAGE).convert("RGB"))])[0]
    )
    assert len(clf(IMAGE, top_k=2)) == 2


def test_audio_takes_a_file_an_array_or_a_raw_dict() -> None:
    clf = pipeline(model=TINY / "wav2vec2")
    array, rate = decode_audio(WAV.read_bytes(), MediaLimits())
    from_file = clf(str(WAV))
    assert clf(array) == from_file
    assert clf({"raw": array, "sampling_rate": rate}) == from_file


def test_a_list_of_frames_is_one_video() -> None:
    clf = pipeline(model=TINY / "videomae")
    result = clf([str(f) for f in FRAMES])
    assert isinstance(result[0], dict)
    batched = clf([[str(f) for f in FRAMES]] * 2)
    assert len(batched) == 2
    for answer in batched:  # a batch of two runs in another bucket: equal within float tolerance
        assert [r["label"] for r in answer] == [r["label"] for r in result]
        assert [r["score"] for r in answer] == pytest.approx([r["score"] for r in result], abs=1e-6)


def test_zero_shot_takes_candidate_labels() -> None:
    clf = pipeline(model=TINY / "clip")
    result = clf(IMAGE, candidate_labels=["cat", "dog", "car"])
    assert sorted(r["label"] for r in result) == ["car", "cat", "dog"]
    assert sum(r["score"] for r in result) == pytest.approx(1.0)
    image = Image.open(IMAGE).convert("RGB")
    assert_same_ranking(
        result, load_model(TINY / "clip").infer([MultimodalInput(image, ("cat", "dog", "car"))])[0]
    )


def test_a_task_that_contradicts_nothing_loads_and_a_missing_model_is_refused() -> None:
    assert pipeline("text-classification", model=TINY / "bert").task == "text-classification"
    with pytest.raises(ValueError, match="model="):
        pipeline("text-classification")
    assert np.isfinite(pipeline(model=TINY / "bert")("x")[0]["score"])
