"""Command line for the offline model builders: ``python -m models build tiny [--out DIR]``."""

import argparse
from collections.abc import Sequence
from pathlib import Path

DEFAULT_TINY_OUT = Path(__file__).resolve().parent / "tiny"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``build <target> [options]``; each target is its own sub-command."""
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build model folders offline")
    targets = build.add_subparsers(dest="target", required=True)
    tiny = targets.add_parser("tiny", help="six tiny random-weight models exported to ONNX, with references")
    tiny.add_argument("--out", type=Path, default=DEFAULT_TINY_OUT, help="parent folder of the model folders")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the chosen builder."""
    args = parse_args(argv)
    if args.command == "build" and args.target == "tiny":
        # Imported here: torch exists only in the export environment, and --help must work anywhere.
        from models.tiny import build_tiny

        build_tiny(args.out)


if __name__ == "__main__":
    main()
