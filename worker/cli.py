"""Command line: ``python -m worker inspect | run | demo | broker``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from worker.metadata import MetadataError, ModelMetadata


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
    lines.append("dynamic dims (pinned per bucket)")
    for dim, values in meta.dims.items():
        lines.append(f"  {dim:<20} {meta.dim_roles[dim].value:<12} {list(values)}")
    for field in ("image_size", "audio_frames", "video_frames", "sampling_rate", "sequence_lengths"):
        if field in src and field != "sequence_lengths":
            lines.append(f"{field:<11} {getattr(meta, field)}  <- {src[field]}")
    lines.append(f"buckets     {len(meta.buckets())} (one ONNX Runtime session each)")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print what the worker works out from a model folder."""
    try:
        meta = ModelMetadata.load(args.path)
    except MetadataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(meta.to_json(), indent=2) if args.json else render_metadata(meta))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="show what the worker works out from a model folder")
    inspect.add_argument("path", help="model folder or .onnx file")
    inspect.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    inspect.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m worker``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result: int = args.func(args)
    return result
