"""In-process entry point over the worker's own stack, called like ``transformers.pipeline``.

``pipeline(model="models/tiny/bert")("some text")`` runs the same metadata, processor,
engine and task head the Kafka worker runs, without Kafka, and accepts what the matching
``transformers`` pipeline accepts for the task.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from schemas.requests import Modality
from worker.errors import InvalidRequest
from worker.serving.decoding import decode_audio, decode_image, decode_video, to_rgb
from worker.serving.engine import EngineOptions
from worker.serving.inputs import (
    DEFAULT_HYPOTHESIS_TEMPLATE,
    AudioInput,
    ImageInput,
    ModelInput,
    MultimodalInput,
    TextInput,
    VideoFileInput,
    VideoInput,
)
from worker.serving.media_limits import MediaLimits
from worker.serving.registry import ServedModel, load_model


def _file_bytes(value: Any) -> bytes | None:
    """A path's or a bytes object's content; None for anything else (an array, an image, a dict)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str | Path):
        return Path(value).read_bytes()
    return None


def _image(value: Any) -> Image.Image:
    """A PIL image, an image path or image file bytes, converted as transformers' ``load_image`` does."""
    if isinstance(value, Image.Image):
        return to_rgb(value)
    raw = _file_bytes(value)
    if raw is not None:
        return decode_image(raw, MediaLimits())
    raise InvalidRequest(f"expected a PIL image, an image path or image bytes, got {type(value).__name__}")


def _is_frame(value: Any) -> bool:
    """A video frame rather than a video file: a PIL image, or a path with an image suffix."""
    if isinstance(value, Image.Image):
        return True
    return isinstance(value, str | Path) and Path(value).suffix.lower() in Image.registered_extensions()


class Pipeline:
    """A loaded model answering calls the way the matching transformers pipeline does."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self.task = model.metadata.task

    def __call__(self, inputs: Any = None, **parameters: Any) -> Any:
        """One input gives one result; a list of inputs gives a list of results.

        Question answering also takes ``question=..., context=...`` (strings, or lists of equal length).
        """
        if inputs is None:
            inputs = self._question_and_context(parameters)
        batched = isinstance(inputs, list) and not self._is_one_video(inputs)
        items = inputs if batched else [inputs]
        decoded = [self._decode(item, parameters) for item in items]
        extra = {k: v for k, v in parameters.items() if k not in _INPUT_KEYWORDS}
        results = self.model.infer(decoded, extra)
        if batched and self.task == "text-classification" and "top_k" not in extra:
            # The pipeline lists the top label of a lone string only; in a batch each comes bare.
            results = [result[0] if isinstance(result, list) else result for result in results]
        return results if batched else results[0]

    @staticmethod
    def _question_and_context(parameters: dict[str, Any]) -> Any:
        """``question=`` and ``context=`` keywords as question-answering inputs, as the QA pipeline took them."""
        question, context = parameters.get("question"), parameters.get("context")
        if isinstance(question, str) and isinstance(context, str):
            return {"question": question, "context": context}
        if isinstance(question, list) and isinstance(context, str):
            return [{"question": q, "context": context} for q in question]
        if isinstance(question, list) and isinstance(context, list) and len(question) == len(context):
            return [{"question": q, "context": c} for q, c in zip(question, context, strict=True)]
        raise InvalidRequest(
            "no inputs: pass them first, or question= and context= (strings, or lists of equal length)"
        )

    def _is_one_video(self, inputs: list[Any]) -> bool:
        """A list of frames is one video; a list of frame lists or of video files is a batch."""
        modality = self.model.metadata.modality
        return modality is Modality.VIDEO and bool(inputs) and _is_frame(inputs[0])

    def _decode(self, item: Any, parameters: dict[str, Any]) -> ModelInput:
        modality = self.model.metadata.modality
        if modality is Modality.TEXT:
            if isinstance(item, dict) and "question" in item:
                return TextInput(item["question"], item["context"])
            if isinstance(item, dict):
                return TextInput(item["text"], item.get("text_pair"))
            return TextInput(str(item), parameters.get("text_pair"))
        if modality is Modality.VISION:
            return ImageInput(_image(item))
        if modality is Modality.AUDIO:
            return self._audio(item, parameters)
        if modality is Modality.VIDEO:
            return self._video(item)
        labels = parameters.get("candidate_labels")
        template = parameters.get("hypothesis_template") or DEFAULT_HYPOTHESIS_TEMPLATE
        if labels is not None:
            return MultimodalInput(_image(item), tuple(labels), hypothesis_template=template)
        return MultimodalInput(_image(item), text=parameters.get("text"))

    @staticmethod
    def _video(item: Any) -> VideoInput | VideoFileInput:
        """A video file (path or bytes), or its frames (PIL images or image paths)."""
        raw = _file_bytes(item)
        if raw is not None:
            return decode_video(raw, MediaLimits())
        return VideoInput([_image(frame) for frame in item])

    def _audio(self, item: Any, parameters: dict[str, Any]) -> AudioInput:
        """An audio file (path or bytes), a ``{"raw"|"array", "sampling_rate"}`` dict, or bare samples."""
        raw = _file_bytes(item)
        if raw is not None:
            array, rate = decode_audio(raw, MediaLimits())
            return AudioInput(array, rate)
        if isinstance(item, dict):
            return AudioInput(
                np.asarray(item["raw"] if "raw" in item else item["array"]), item["sampling_rate"]
            )
        rate = parameters.get("sampling_rate", self.model.metadata.sampling_rate or 16_000)
        return AudioInput(np.asarray(item, dtype=np.float32), int(rate))


_INPUT_KEYWORDS = frozenset(
    {"candidate_labels", "hypothesis_template", "text", "text_pair", "sampling_rate", "question", "context"}
)


def pipeline(
    task: str | None = None,
    model: str | Path | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    intra_op_threads: int = 0,
    provider: str = "auto",
) -> Pipeline:
    """Load a model folder for in-process use; ``task`` must agree with its metadata if given.

    As transformers refuses a task the model has no head for, a ``task`` that contradicts the
    folder's (after transformers' aliases, e.g. sentiment-analysis) is a ValueError naming both;
    to change what a folder says, use ``overrides={"task": ...}``.
    """
    if model is None:
        raise ValueError("pipeline() needs model=<path to a model folder or .onnx file>")
    # The caller runs one batch at a time: all the cores go to it (the worker runs two, sharing them).
    options = EngineOptions(intra_op_threads=intra_op_threads, provider=provider, batches_in_flight=1)
    served = load_model(model, overrides=overrides, engine_options=options)
    if task is not None and _TASK_ALIASES.get(task, task) != served.metadata.task:
        raise ValueError(
            f"task {task!r} contradicts model {served.name!r} ({model}), whose task is "
            f"{served.metadata.task!r} ({served.metadata.sources.get('task', 'metadata')})"
        )
    return Pipeline(served)


#: transformers.pipelines.TASK_ALIASES for the tasks served here.
_TASK_ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}


__all__: Sequence[str] = ("Pipeline", "pipeline")
