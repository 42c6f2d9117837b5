"""Reading the Hugging Face files of a model folder: config.json, the processor and tokenizer configs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.serving.metadata.keys import MetadataError


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MetadataError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise MetadataError(f"{path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class HFFiles:
    """The Hugging Face files found in a model folder."""

    config: dict[str, Any]
    preprocessor: dict[str, Any]
    processor: dict[str, Any]
    video_preprocessor: dict[str, Any]
    tokenizer: dict[str, Any]
    has_tokenizer: bool

    @classmethod
    def read(cls, folder: Path) -> HFFiles:
        """Read whichever of the known files exist; absent files read as empty."""

        def maybe(name: str) -> dict[str, Any]:
            path = folder / name
            return read_json(path) if path.is_file() else {}

        tokenizer_files = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")
        files = cls(
            config=maybe("config.json"),
            preprocessor=maybe("preprocessor_config.json"),
            processor=maybe("processor_config.json"),
            video_preprocessor=maybe("video_preprocessor_config.json"),
            tokenizer=maybe("tokenizer_config.json"),
            has_tokenizer=any((folder / f).is_file() for f in tokenizer_files),
        )
        files.refuse_remote_code(folder)
        return files

    def refuse_remote_code(self, folder: Path) -> None:
        """A folder whose files point at custom code (``auto_map``) would need trust_remote_code."""
        for name, data in (
            ("config.json", self.config),
            ("tokenizer_config.json", self.tokenizer),
            ("preprocessor_config.json", self.preprocessor),
            ("processor_config.json", self.processor),
            ("video_preprocessor_config.json", self.video_preprocessor),
        ):
            if "auto_map" in data:
                raise MetadataError(
                    f"{folder / name}: 'auto_map' names custom code, which needs trust_remote_code; "
                    "the worker never runs code from a model folder"
                )

    def text_config(self) -> dict[str, Any]:
        """The config block that describes the text tower (CLIP nests it)."""
        nested = self.config.get("text_config")
        return nested if isinstance(nested, dict) else self.config

    def processor_class(self) -> str | None:
        """The processor class the HF files name, most specific first."""
        for source, key in (
            (self.processor, "processor_class"),
            (self.video_preprocessor, "video_processor_type"),
            (self.preprocessor, "processor_class"),
            (self.preprocessor, "image_processor_type"),
            (self.preprocessor, "feature_extractor_type"),
            (self.tokenizer, "tokenizer_class"),
        ):
            value = source.get(key)
            if isinstance(value, str):
                return value
        return None

    def declared(self) -> dict[str, Any]:
        """Metadata fields the HF files state outright."""
        out: dict[str, Any] = {}
        id2label = self.config.get("id2label")
        if isinstance(id2label, dict) and id2label:
            out["labels"] = [id2label[k] for k in sorted(id2label, key=int)]
        size = _image_size(self.video_preprocessor or self.preprocessor or self._nested_image_processor())
        if size is not None:
            out["image_size"] = size
        if isinstance(self.preprocessor.get("sampling_rate"), int):
            out["sampling_rate"] = self.preprocessor["sampling_rate"]
        if isinstance(self.preprocessor.get("nb_max_frames"), int):
            out["audio_frames"] = self.preprocessor["nb_max_frames"]
        frames = self.config.get("num_frames")
        if isinstance(frames, int):
            out["video_frames"] = frames
        task = _task_from_architectures(self.config.get("architectures"))
        if task is not None:
            out["task"] = task
        return out

    def _nested_image_processor(self) -> dict[str, Any]:
        """transformers 5 saves CLIP-style processors as one processor_config.json with a nested block."""
        nested = self.processor.get("image_processor")
        return nested if isinstance(nested, dict) else {}

    def max_tokens(self) -> int | None:
        """The longest token sequence the tokenizer and position table allow."""
        limits = [
            value
            for value in (
                self.tokenizer.get("model_max_length"),
                self.text_config().get("max_position_embeddings"),
            )
            if isinstance(value, int) and 0 < value < 1_000_000
        ]
        return min(limits) if limits else None


def _image_size(pre: Mapping[str, Any]) -> tuple[int, int] | None:
    """The H×W an image processor produces: crop size wins over resize size."""
    for key in ("crop_size", "size"):
        size = pre.get(key)
        if key == "crop_size" and not pre.get("do_center_crop", key in pre):
            continue
        if isinstance(size, int):
            return (size, size)
        if isinstance(size, dict):
            if "height" in size and "width" in size:
                return (int(size["height"]), int(size["width"]))
            if "shortest_edge" in size and key == "crop_size":
                return (int(size["shortest_edge"]), int(size["shortest_edge"]))
    return None


_ARCHITECTURE_TASKS = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForImageClassification", "image-classification"),
    ("ForAudioClassification", "audio-classification"),
    ("ForVideoClassification", "video-classification"),
)
_ZERO_SHOT_IMAGE_ARCHITECTURES = {"CLIPModel", "SiglipModel", "Siglip2Model", "ChineseCLIPModel"}


def _task_from_architectures(architectures: Any) -> str | None:
    if not isinstance(architectures, list) or not architectures:
        return None
    arch = str(architectures[0])
    if arch in _ZERO_SHOT_IMAGE_ARCHITECTURES:
        return "zero-shot-image-classification"
    for suffix, task in _ARCHITECTURE_TASKS:
        if arch.endswith(suffix):
            return task
    if arch.endswith("Model"):
        return "feature-extraction"
    return None
