"""The tiny models' stored references: raw sample inputs, the PyTorch outputs and the pipeline outputs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.samples import TINY as TINY
from bench.samples import TINY_MODELS as TINY_MODELS
from worker.serving.decoding import decode_audio
from worker.serving.inputs import AudioInput, ImageInput, ModelInput, MultimodalInput, TextInput, VideoInput
from worker.serving.media_limits import MediaLimits

ROOT = Path(__file__).resolve().parent.parent
#: The text-task models that only the task-head tests and the live checks cover so far.
TEXT_TASK_MODELS = ("bert-ner", "bert-qa", "bert-embed")
ALL_TINY_MODELS = (*TINY_MODELS, *TEXT_TASK_MODELS)


@dataclass(frozen=True)
class PipelineCall:
    """Parameters a pipeline was called with on a sample, and what it returned."""

    kwargs: dict[str, Any]
    outputs: Any


@dataclass(frozen=True)
class Sample:
    """One stored sample: its raw request inputs, the HF processor's arrays, the PyTorch outputs."""

    raw: dict[str, Any]
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    calls: list[PipelineCall] = field(default_factory=list)
    #: Mean-pooled, L2-normalised token vectors (sentence-transformers style), where stored.
    sentence_embedding: list[float] | None = None


def load_samples(name: str) -> tuple[list[Sample], float]:
    """Samples of a tiny model and the tolerance its reference was stored with."""
    folder = TINY / name
    spec = json.loads((folder / "reference.json").read_text())
    arrays = np.load(folder / "reference.npz")
    samples = []
    for i, sample in enumerate(spec["samples"]):
        inputs = {k.split("/", 2)[2]: arrays[k] for k in arrays.files if k.startswith(f"{i}/input/")}
        outputs = {k.split("/", 2)[2]: arrays[k] for k in arrays.files if k.startswith(f"{i}/output/")}
        calls = [PipelineCall(call["kwargs"], call["outputs"]) for call in sample["pipeline"]]
        samples.append(Sample(sample["inputs"], inputs, outputs, calls, sample.get("sentence_embedding")))
    return samples, float(spec["tolerance"])


def reference_task(name: str) -> str:
    """The pipeline task a tiny model's references were made for."""
    task: str = json.loads((TINY / name / "reference.json").read_text())["task"]
    return task


def _image(path: str) -> Image.Image:
    return Image.open(ROOT / path).convert("RGB")


def to_model_input(raw: dict[str, Any]) -> ModelInput:
    """A stored raw sample (file paths) as the decoded input the processors take."""
    if "candidate_labels" in raw:
        return MultimodalInput(
            _image(raw["image"]),
            tuple(raw["candidate_labels"]),
            hypothesis_template=raw.get("hypothesis_template", "This is a photo of {}."),
        )
    if "text" in raw:
        return TextInput(raw["text"], raw.get("text_pair"))
    if "image" in raw:
        return ImageInput(_image(raw["image"]))
    if "audio" in raw:
        array, rate = decode_audio((ROOT / raw["audio"]).read_bytes(), MediaLimits())
        return AudioInput(array, rate)
    if "frames" in raw:
        return VideoInput([_image(f) for f in raw["frames"]])
    raise ValueError(f"unknown sample inputs {sorted(raw)}")


def pipeline_call(task: str, raw: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A stored raw sample as a pipeline call: the input (None for keywords only) and the keywords."""
    if task == "question-answering":
        return None, {"question": raw["text"], "context": raw["text_pair"]}
    if "candidate_labels" in raw:
        keywords = {
            "candidate_labels": raw["candidate_labels"],
            "hypothesis_template": raw["hypothesis_template"],
        }
        return str(ROOT / raw["image"]), keywords
    if "text_pair" in raw:
        return {"text": raw["text"], "text_pair": raw["text_pair"]}, {}
    if "text" in raw:
        return raw["text"], {}
    if "image" in raw:
        return str(ROOT / raw["image"]), {}
    if "audio" in raw:
        array, rate = decode_audio((ROOT / raw["audio"]).read_bytes(), MediaLimits())
        return {"raw": array, "sampling_rate": rate}, {}
    if "frames" in raw:
        return [str(ROOT / frame) for frame in raw["frames"]], {}
    raise ValueError(f"unknown sample inputs {sorted(raw)}")


def assert_pipeline_equal(actual: Any, expected: Any, tolerance: float, where: str = "result") -> float:
    """Same structure, keys (in order), labels, words and spans; floats within tolerance. The worst diff."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {type(actual).__name__} where a dict was expected"
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        return max(
            (assert_pipeline_equal(actual[k], v, tolerance, f"{where}.{k}") for k, v in expected.items()),
            default=0.0,
        )
    if isinstance(expected, list):
        assert isinstance(actual, list), f"{where}: {type(actual).__name__} where a list was expected"
        assert len(actual) == len(expected), f"{where}: {len(actual)} items != {len(expected)}"
        return max(
            (
                assert_pipeline_equal(a, e, tolerance, f"{where}[{i}]")
                for i, (a, e) in enumerate(zip(actual, expected, strict=True))
            ),
            default=0.0,
        )
    if isinstance(expected, float):
        assert isinstance(actual, float), f"{where}: {actual!r} is not a float"
        diff = abs(actual - expected)
        assert diff <= tolerance, f"{where}: {actual} differs from {expected} by {diff:.3g}"
        return diff
    assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} != {expected!r}"
    return 0.0


def clip_by_raw_onnx(image: Image.Image, texts: list[str]) -> dict[str, np.ndarray]:
    """CLIP's outputs computed without the worker: the folder's own processor (texts padded to the
    longest) and a bare ONNX Runtime session on ``model.onnx``, every text in one run (the graph's
    batch dims are dynamic, so no bucket limits it)."""
    import onnxruntime as ort
    import transformers

    folder = TINY / "clip"
    processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    encoded = processor(text=texts, images=[image], return_tensors="np", padding=True)
    session = ort.InferenceSession(folder / "model.onnx", providers=["CPUExecutionProvider"])
    feed = {i.name: np.asarray(encoded[i.name]) for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def zero_shot_by_raw_onnx(image: Image.Image, labels: list[str], template: str) -> list[dict[str, Any]]:
    """The zero-shot pipeline's steps on :func:`clip_by_raw_onnx`: a softmax over every label, best
    first. On the stored 3-label sample it matches the stored transformers pipeline output within 4e-7."""
    logits = clip_by_raw_onnx(image, [template.format(label) for label in labels])["logits_per_image"][0]
    scores = np.exp(logits.astype(np.float64) - logits.max())
    scores /= scores.sum()
    ranked = sorted(zip(scores.tolist(), labels, strict=True), key=lambda pair: -pair[0])
    return [{"score": score, "label": label} for score, label in ranked]


def text_classification_by_raw_onnx(name: str, texts: list[str]) -> list[list[dict[str, Any]]]:
    """The text-classification pipeline's default answer (top label, ``[{"label", "score"}]``) computed
    without the worker: the folder's tokenizer on each text alone (no padding), a bare ONNX Runtime
    session, a softmax and config.json's id2label. On the stored bert samples it matches the stored
    transformers pipeline outputs within 1e-6."""
    import onnxruntime as ort
    import transformers

    folder = TINY / name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    id2label = json.loads((folder / "config.json").read_text())["id2label"]
    session = ort.InferenceSession(folder / "model.onnx", providers=["CPUExecutionProvider"])
    answers = []
    for text in texts:
        encoded = tokenizer(text, return_tensors="np")
        [logits] = session.run(["logits"], {i.name: encoded[i.name] for i in session.get_inputs()})
        scores = np.exp(logits[0].astype(np.float64) - logits[0].max())
        scores /= scores.sum()
        best = int(scores.argmax())
        answers.append([{"label": id2label[str(best)], "score": float(scores[best])}])
    return answers


#: More candidate labels than CLIP's largest text batch (32) holds: one request, two runs.
MANY_LABELS = (
    "cat", "dog", "car", "tree", "house", "boat", "bird", "horse", "apple", "chair",
    "table", "lamp", "phone", "book", "cup", "shoe", "hat", "clock", "bicycle", "train",
    "plane", "flower", "river", "mountain", "beach", "road", "bridge", "cloud", "star", "moon",
    "triangle", "circle", "square", "line", "pencil", "guitar", "piano", "window", "door", "fish",
)  # fmt: skip
