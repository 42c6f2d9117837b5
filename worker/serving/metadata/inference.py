"""Inference from the graph alone: modality, task, what each dynamic dim stands for, what it fixes."""

from __future__ import annotations

from typing import Any

from schemas.requests import Modality
from worker.serving.metadata.keys import MetadataError
from worker.serving.metadata.record import DimRole, TensorSpec

_TEXT_INPUTS = {"input_ids", "inputs_embeds"}
_VIDEO_INPUTS = {"pixel_values_videos"}


def infer_modality(inputs: tuple[TensorSpec, ...]) -> Modality:
    """Modality from input names and ranks, where name matching alone goes wrong."""
    by_name = {spec.name: spec for spec in inputs}
    pixels = next((by_name[n] for n in ("pixel_values", "pixel_values_videos") if n in by_name), None)
    has_text = bool(_TEXT_INPUTS & by_name.keys())
    if pixels is not None and has_text:
        return Modality.MULTIMODAL
    if pixels is not None:
        # [B, T, C, H, W] is a clip of frames (VideoMAE); [B, C, H, W] one image (ViT).
        return Modality.VIDEO if len(pixels.shape) == 5 or pixels.name in _VIDEO_INPUTS else Modality.VISION
    # Wav2Vec2 has an attention_mask too: the waveform/feature input decides, not the mask.
    if "input_values" in by_name or "input_features" in by_name:
        return Modality.AUDIO
    if has_text:
        return Modality.TEXT  # a LayoutLM `bbox` [B, S, 4] rides along with the tokens
    names = ", ".join(by_name) or "none"
    raise MetadataError(f"cannot infer the modality from the graph inputs ({names}): declare 'modality'")


def infer_task(modality: Modality, outputs: tuple[TensorSpec, ...]) -> str:
    """Task from output names, when neither metadata nor config.json says."""
    names = {spec.name: spec for spec in outputs}
    if "logits_per_image" in names:
        return "zero-shot-image-classification"
    if {"start_logits", "end_logits"} <= names.keys():
        return "question-answering"
    if "logits" in names:
        if modality is Modality.TEXT and len(names["logits"].shape) == 3:
            return "token-classification"
        return _CLASSIFICATION_TASKS[modality]
    if names.keys() & {"last_hidden_state", "sentence_embedding", "token_embeddings", "text_embeds"}:
        return "feature-extraction"
    raise MetadataError(f"cannot infer the task from the graph outputs ({', '.join(names)}): declare 'task'")


_CLASSIFICATION_TASKS = {
    Modality.TEXT: "text-classification",
    Modality.VISION: "image-classification",
    Modality.AUDIO: "audio-classification",
    Modality.VIDEO: "video-classification",
    Modality.MULTIMODAL: "zero-shot-image-classification",
}


def resolve_task(task: str, modality: Modality) -> str:
    """Map transformers' generic 'sequence-classification' onto the modality's pipeline task."""
    if task == "sequence-classification":
        return _CLASSIFICATION_TASKS[modality]
    return task


def dim_roles(inputs: tuple[TensorSpec, ...]) -> dict[str, DimRole]:
    """Role of every named dynamic dim, decided by the input that owns it and its axis."""
    roles: dict[str, DimRole] = {}
    by_axis: dict[str, dict[int, DimRole]] = {
        "input_ids": {1: DimRole.SEQUENCE},
        "inputs_embeds": {1: DimRole.SEQUENCE},
        "input_values": {1: DimRole.SAMPLES},
        "input_features": {1: DimRole.MEL_BINS, 2: DimRole.FRAMES},
    }
    for spec in inputs:
        if spec.name in ("pixel_values", "pixel_values_videos"):
            if len(spec.shape) == 5:
                axes = {1: DimRole.VIDEO_FRAMES, 2: DimRole.CHANNELS, 3: DimRole.HEIGHT, 4: DimRole.WIDTH}
            else:
                axes = {1: DimRole.CHANNELS, 2: DimRole.HEIGHT, 3: DimRole.WIDTH}
            by_axis[spec.name] = axes
    # Primary inputs first, so a mask or bbox inherits the role of the dim it shares.
    ordered = sorted(inputs, key=lambda spec: spec.name not in by_axis)
    for spec in ordered:
        for axis, dim in enumerate(spec.shape):
            if not isinstance(dim, str) or dim in roles:
                continue
            if axis == 0:
                roles[dim] = DimRole.BATCH
            elif axis in by_axis.get(spec.name, {}):
                roles[dim] = by_axis[spec.name][axis]
            elif axis == 1 and spec.name in ("attention_mask", "token_type_ids", "position_ids", "bbox"):
                roles[dim] = DimRole.SEQUENCE
            else:
                raise MetadataError(
                    f"input {spec.name!r} axis {axis} is a dynamic dim {dim!r} the worker cannot "
                    "pin: export it with a fixed size or declare its value"
                )
    for spec in inputs:
        for axis, dim in enumerate(spec.shape):
            if dim is None:
                raise MetadataError(
                    f"input {spec.name!r} axis {axis} is dynamic but unnamed: buckets need a "
                    "name to know what it stands for (export with named dynamic axes)"
                )
    return roles


def fixed_dims(inputs: tuple[TensorSpec, ...]) -> dict[str, Any]:
    """Values the graph fixes for fields the metadata can also declare (to detect conflicts)."""
    found: dict[str, Any] = {}
    for spec in inputs:
        shape = spec.shape
        if spec.name in ("pixel_values", "pixel_values_videos") and len(shape) in (4, 5):
            h, w = shape[-2], shape[-1]
            if isinstance(h, int) and isinstance(w, int):
                found["image_size"] = (h, w)
            if len(shape) == 5 and isinstance(shape[1], int):
                found["video_frames"] = shape[1]
        if spec.name == "input_features" and len(shape) == 3 and isinstance(shape[2], int):
            found["audio_frames"] = shape[2]
        if spec.name == "input_ids" and len(shape) == 2 and isinstance(shape[1], int):
            found["sequence_lengths"] = (shape[1],)
        if spec.name == "input_values" and len(shape) == 2 and isinstance(shape[1], int):
            found["audio_samples"] = (shape[1],)
        if shape and isinstance(shape[0], int):
            found["batch_sizes"] = (shape[0],)
    return found
