"""The ``inspect`` text: what the worker worked out about a model, and where each part came from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.serving.metadata.record import ModelMetadata


def _format_shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def render_metadata(meta: ModelMetadata) -> str:
    """Human-readable form of what the worker worked out about a model."""
    src = meta.sources
    lines = [
        f"model       {meta.name}  ({meta.onnx_path})",
        f"modality    {meta.modality.value:<22} <- {src.get('modality', '-')}",
        f"processor   {meta.processor.value:<22} <- {src.get('processor', '-')}"
        + (f"  class {meta.processor_class}" if meta.processor_class else ""),
        f"task        {meta.task:<22} <- {src.get('task', '-')}",
    ]
    if meta.labels is not None:
        shown = ", ".join(meta.labels[:10]) + (" ..." if len(meta.labels) > 10 else "")
        lines.append(f"labels      {len(meta.labels)}: {shown}  <- {src.get('labels', '-')}")
    lines.append("inputs")
    lines += [f"  {s.name:<20} {s.dtype:<8} {_format_shape(s.shape)}" for s in meta.inputs]
    lines.append("outputs")
    lines += [f"  {s.name:<20} {s.dtype:<8} {_format_shape(s.shape)}" for s in meta.outputs]
    lines.append("dynamic dims (one value per bucket)")
    for dim, values in meta.dims.items():
        lines.append(f"  {dim:<20} {meta.dim_roles[dim].value:<12} {list(values)}")
    for field in ("image_size", "audio_frames", "video_frames", "sampling_rate"):
        if field in src:
            lines.append(f"{field:<11} {getattr(meta, field)}  <- {src[field]}")
    if meta.sequence_lengths is not None:
        lines.append(
            f"sequence    up to {meta.sequence_lengths[-1]} tokens  <- {src.get('sequence_lengths', '-')}"
        )
    lines += _embedding_lines(meta)
    lines.append(f"buckets     {len(meta.buckets())} (fixed batch shapes, one ONNX Runtime session)")
    return "\n".join(lines)


def _embedding_lines(meta: ModelMetadata) -> list[str]:
    """How a feature extractor turns token vectors into one embedding, and where each part came from."""
    if meta.task != "feature-extraction":
        return []
    src = meta.sources
    pooling = meta.pooling or "none"
    if meta.pooled_output is not None:
        pooling = f"in the graph ({meta.pooled_output}); declared {pooling}"
    lines = [
        f"pooling     {pooling}  <- {src.get('pooling', '-')}",
        f"normalize   {meta.normalize}  <- {src.get('normalize', '-')}",
    ]
    if "include_prompt" in src and not meta.include_prompt:
        lines.append(f"prompt      left out of pooling  <- {src['include_prompt']}")
    if meta.prompts:
        lines.append(f"prompts     {dict(meta.prompts)}  <- {src.get('prompts', '-')}")
    if meta.default_prompt_name is not None:
        lines.append(
            f"default     prompt {meta.default_prompt_name!r}  <- {src.get('default_prompt_name', '-')}"
        )
    return lines
