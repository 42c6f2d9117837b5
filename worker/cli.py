"""Command line: ``python -m worker inspect | run | demo | broker | settings``.

Each command imports what it needs when it runs: ``import worker.cli`` (and ``--help``,
``settings``) loads neither ONNX Runtime, transformers, FastStream nor aiokafka.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_origin

from pydantic import ValidationError

from worker.settings import Settings

if TYPE_CHECKING:
    from worker.serving.registry import ServedModel

log = logging.getLogger("worker")

#: Exit status of a run that cannot start as configured (a bad model folder, a setting the broker refuses).
CONFIGURATION_ERROR = 2


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print what the worker works out from a model folder."""
    from worker.serving.metadata import MetadataError, load_metadata
    from worker.serving.metadata.render import render_metadata

    try:
        meta = load_metadata(args.path)
    except MetadataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(meta.to_json(), indent=2) if args.json else render_metadata(meta))
    return 0


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per Settings field; unset flags fall back to env vars, then defaults."""
    group = parser.add_argument_group("settings (each also read from WORKER_<NAME> env vars)")
    for name, field in Settings.model_fields.items():
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=f"setting_{name}",
            metavar=name.upper(),
            default=None,
            help=f"{field.description} (default: {field.get_default(call_default_factory=True)!r})",
        )


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from flags over env vars over defaults; exits with a readable message if invalid."""
    given: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        raw = getattr(args, f"setting_{name}", None)
        if raw is None:
            continue
        given[name] = json.loads(raw) if get_origin(field.annotation) is dict else raw
    if getattr(args, "verbose", False):
        given.setdefault("log_level", "DEBUG")
    try:
        return Settings(**given)
    except (ValidationError, ValueError) as exc:
        raise SystemExit(f"invalid settings: {exc}") from exc


def configure_logging(level: str | int) -> None:
    """One line per event; Kafka client chatter only from warnings up."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def prepare_process(models_dir: str, settings: Settings) -> dict[str, ServedModel]:
    """What a worker process does before it serves: logging, glibc's mmap threshold, the models, then
    the freeze of all it loaded (worker/serving/collector.py)."""
    # Imported here: only serving pays for Kafka and ONNX Runtime (and a spawned child imports it anew).
    from worker.loading import load_configured
    from worker.serving.allocator import fix_mmap_threshold
    from worker.serving.collector import freeze_loaded

    configure_logging(settings.log_level)
    fix_mmap_threshold()
    models = load_configured([models_dir], settings)
    freeze_loaded()
    return models


def _serve(models_dir: str, settings: Settings) -> None:
    """One worker process: load the models, serve until SIGTERM/SIGINT."""
    from worker.app import Worker

    models = prepare_process(models_dir, settings)

    async def main() -> None:
        await Worker(settings, models).serve()

    asyncio.run(main())


def cmd_run(args: argparse.Namespace) -> int:
    """Serve every model folder under MODELS_DIR until SIGTERM."""
    settings = settings_from(args)
    if not settings.bootstrap_servers:
        print("error: set --bootstrap-servers or KAFKA_BOOTSTRAP_SERVERS (or use `demo`)", file=sys.stderr)
        return 2
    if args.processes <= 1:
        return _serve_or_refuse(args.models_dir, settings)
    return _run_processes(args.models_dir, settings, args.processes)


def _serve_or_refuse(models_dir: str, settings: Settings) -> int:
    """Serve; a configuration error (a bad model folder, transactions refused) is one line and exit 2."""
    from worker.kafka.transactions import TransactionsRefused
    from worker.serving.metadata import MetadataError

    try:
        _serve(models_dir, settings)
    except (MetadataError, TransactionsRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return CONFIGURATION_ERROR
    return 0


def _child(models_dir: str, settings: Settings) -> None:
    """A supervised worker process: its exit status is _serve_or_refuse's."""
    sys.exit(_serve_or_refuse(models_dir, settings))


def _run_processes(models_dir: str, settings: Settings, count: int) -> int:
    """Supervise N worker processes in one consumer group.

    A child that dies unasked (OOM, SIGKILL) is restarted after a short pause; its
    unanswered messages are redelivered to the group meanwhile. A child that exits with
    CONFIGURATION_ERROR would fail again on every restart: every child is stopped and the run
    exits with it. SIGTERM/SIGINT is passed on to every child, which drains; the exit status is
    0 only if every child exited 0.
    """
    context = multiprocessing.get_context("spawn")
    stopping = False

    def spawn(index: int) -> multiprocessing.process.BaseProcess:
        port = settings.metrics_port
        mine = settings if not port else settings.model_copy(update={"metrics_port": port + index})
        child = context.Process(target=_child, args=(models_dir, mine), name=f"worker-{index}")
        child.start()
        return child

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.is_alive():
                child.terminate()

    children = [spawn(i) for i in range(count)]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed = False
    while not stopping:
        for index, child in enumerate(children):
            child.join(timeout=0.5 / count)
            if child.exitcode == CONFIGURATION_ERROR:
                stop(signal.SIGTERM, None)
                for other in children:
                    other.join()
                return CONFIGURATION_ERROR
            if child.exitcode is not None and not stopping:
                failed = failed or child.exitcode != 0
                log.warning("%s exited with %s; restarting it", child.name, child.exitcode)
                time.sleep(1.0)  # no tight crash loop
                children[index] = spawn(index)
    for child in children:
        child.join()
    return 1 if failed or any(child.exitcode != 0 for child in children) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Broker + worker + client in one process: a few requests per modality and a burst."""
    from worker.demo import TINY_MODELS, run_demo
    from worker.serving.metadata import MetadataError

    settings = settings_from(args)
    configure_logging(logging.WARNING if not args.verbose else logging.DEBUG)
    logging.getLogger("worker").setLevel(logging.WARNING if not args.verbose else logging.DEBUG)
    try:
        paths = [Path(p) for p in args.models] or [TINY_MODELS]
        return asyncio.run(run_demo(paths, settings, burst=args.burst))
    except MetadataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cmd_broker(args: argparse.Namespace) -> int:
    """Run the embedded Kafka-API broker (or Apache Kafka from `make kafka`'s jars) in the foreground."""
    if args.apache:
        from worker.kafka import apache_broker

        apache_broker.serve_forever(args.nodes, args.port)
        return 0
    if args.nodes != 1:
        print("error: --nodes needs --apache (tansu runs one node)", file=sys.stderr)
        return 2
    from worker.kafka.embedded_broker import serve_forever

    serve_forever(args.port)
    return 0


def settings_table() -> str:
    """The README's settings table, generated from the Settings class."""
    rows = ["| setting | env var | default | description |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        rows.append(
            f"| `--{name.replace('_', '-')}` | `WORKER_{name.upper()}` | `{default!r}` | {field.description} |"
        )
    return "\n".join(rows)


def cmd_settings(args: argparse.Namespace) -> int:
    """Print the settings table (markdown)."""
    print(settings_table())
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

    run = sub.add_parser("run", help="serve every model folder under MODELS_DIR over Kafka")
    run.add_argument("models_dir", help="folder of model folders; a request's `model` is the folder name")
    run.add_argument("--processes", type=int, default=1, help="worker processes on this machine (one group)")
    add_settings_flags(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="embedded broker + worker + client: answers shown, then a burst")
    demo.add_argument(
        "models",
        nargs="*",
        default=[],
        help="model folders, or folders of model folders (default: the tiny models shipped with the worker)",
    )
    demo.add_argument("--burst", type=int, default=300, help="text requests in the throughput burst")
    add_settings_flags(demo)
    demo.set_defaults(func=cmd_demo)

    broker = sub.add_parser("broker", help="run the embedded Kafka-API broker (tansu) for local use")
    broker.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    broker.add_argument(
        "--apache",
        action="store_true",
        help="Apache Kafka 4 (KRaft) from the jars `make kafka` caches, instead of tansu",
    )
    broker.add_argument("--nodes", type=int, default=1, help="Apache Kafka nodes (3: replication 3)")
    broker.set_defaults(func=cmd_broker)

    settings = sub.add_parser("settings", help="print the settings table (markdown)")
    settings.set_defaults(func=cmd_settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m worker``."""
    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    result: int = args.func(args)
    return result
