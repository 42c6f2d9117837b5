"""Command line for the offline model builders and packer: ``python -m models build|pack ...``."""

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_TINY_OUT = Path(__file__).resolve().parent / "tiny"
DEFAULT_MINILM_OUT = Path(__file__).resolve().parent / "minilm"
DEFAULT_SENTENCE_OUT = Path(__file__).resolve().parent / "sentence"


def assignment(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as JSON when it parses, else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``build <target> [options]`` (each target is its own sub-command) or ``pack``."""
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build model folders offline")
    targets = build.add_subparsers(dest="target", required=True)
    tiny = targets.add_parser("tiny", help="nine tiny random-weight models exported to ONNX, with references")
    tiny.add_argument("--out", type=Path, default=DEFAULT_TINY_OUT, help="parent folder of the model folders")
    minilm = targets.add_parser("minilm", help="all-MiniLM-L6-v2 embeddings, checked against PyTorch")
    minilm.add_argument("--out", type=Path, default=DEFAULT_MINILM_OUT, help="the model folder")
    minilm.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    sentence = targets.add_parser(
        "sentence", help="tiny sentence-transformers folders (mean, CLS, max pooling) with references"
    )
    sentence.add_argument("--out", type=Path, default=DEFAULT_SENTENCE_OUT, help="parent of the folders")
    pack = commands.add_parser("pack", help="make a self-describing, offline model folder")
    pack.add_argument("source", type=Path, metavar="HF_DIR_OR_ONNX", help="model folder or .onnx file")
    pack.add_argument("--out", type=Path, required=True, help="the packed model folder")
    pack.add_argument("--task", help="pipeline task, e.g. text-classification")
    pack.add_argument("--modality", help="text | vision | audio | video | multimodal")
    pack.add_argument(
        "--set",
        dest="fields",
        type=assignment,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other metadata key (repeatable); VALUE is JSON when it parses, else a string",
    )
    pack.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen builder or the packer; the exit status."""
    args = parse_args(argv)
    # Imported per command: torch exists only in the export environment, and --help must work anywhere.
    if args.command == "pack":
        from models.pack import pack_command

        overrides = dict(args.fields) | {k: v for k in ("task", "modality") if (v := getattr(args, k))}
        return pack_command(args.source, args.out, overrides, force=args.force)
    if args.target == "tiny":
        from models.tiny import build_tiny

        build_tiny(args.out)
    elif args.target == "minilm":
        from models.minilm import build_minilm

        build_minilm(args.out, force=args.force)
    elif args.target == "sentence":
        from models.sentence_fixture import build_sentence

        build_sentence(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
