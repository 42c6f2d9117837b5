"""The README and deployment files stay true to the code.

Every default, limit and command the README states is checked twice against a value written
here by hand: the README says it, and the code has it. A value read from the code under test
could never catch the README and the code drifting apart together.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import shlex
from pathlib import Path

import pytest
import yaml

from schemas import limits
from tests.documented import BATCH_SIZES, SEQUENCE_LENGTHS
from worker import app, readiness
from worker.cli import build_parser, settings_table
from worker.serving.metadata import (
    DEFAULT_AUDIO_SECONDS,
    DEFAULT_BATCH_SIZES,
    DEFAULT_SEQUENCE_LENGTHS,
    Declared,
)
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

#: Every setting's default, as the README's settings table must state it.
SETTINGS_DEFAULTS: dict[str, object] = {
    "bootstrap_servers": None,
    "topic_prefix": "inference",
    "group_id": "inference-workers",
    "partitions": 4,
    "replication_factor": None,
    "max_batch_size": 32,
    "max_wait_ms": 10.0,
    "eager_when_idle": True,
    "max_batch_tokens": 2048,
    "model_overrides": {},
    "executor_threads": 0,
    "batches_in_flight": 0,
    "intra_op_threads": 0,
    "batch_shapes": "auto",
    "intra_op_spinning": True,
    "provider": "auto",
    "intake_concurrency": 4,
    "prepare_timeout_s": 10.0,
    "max_in_flight": 1024,
    "fetch_max_records": 256,
    "fetch_timeout_ms": 1000,
    "fetch_linger_ms": 0,
    "fetch_max_wait_ms": 20,
    "idle_fetch_max_wait_ms": 1000,
    "session_timeout_ms": 10_000,
    "heartbeat_interval_ms": 1000,
    "max_poll_interval_ms": 300_000,
    "drain_timeout_s": 30.0,
    "max_message_bytes": 16 * 1024 * 1024,
    "max_text_chars": 100_000,
    "max_image_pixels": 4096 * 4096,
    "max_audio_seconds": 60.0,
    "max_video_frames": 64,
    "max_video_seconds": 60.0,
    "max_video_frames_decoded": 1800,
    "max_video_pixels": 1920 * 1088,
    "max_jpeg_scans": 64,
    "decode_isolation": True,
    "decoder_processes": 2,
    "decode_cpu_seconds": 10.0,
    "decode_memory_mib": 768,
    "max_in_flight_bytes": 256 * 1024 * 1024,
    "fetch_max_bytes": 2 * 1024 * 1024,
    "max_decode_attempts": 3,
    "max_crash_attempts": 3,
    "create_topics": True,
    "reply_to_pattern": "",
    "max_header_bytes": 256,
    "dlq_payload": "body",
    # Apache Kafka's default max.message.bytes: 1 MiB plus a record batch's overhead.
    "max_publish_bytes": 1_048_588,
    "delivery": "at-least-once",
    "transaction_timeout_ms": 60_000,
    "compression_type": "none",
    "publish_retry_s": 60.0,
    "skip_bad_models": False,
    "log_level": "INFO",
    "tracing": False,
    "security_protocol": "PLAINTEXT",
    "sasl_mechanism": "PLAIN",
    "sasl_username": None,
    "sasl_password": None,
    "ssl_cafile": None,
    "ssl_certfile": None,
    "ssl_keyfile": None,
    "metrics_port": None,
}


def section(title: str) -> str:
    """The README's text under ``## title`` up to the next ``## `` heading."""
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else len(README)]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row in ``text`` (header and separator rows dropped)."""
    lines = text.splitlines()
    headers = {i - 1 for i, line in enumerate(lines) if line.startswith("|---")}
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for i, line in enumerate(lines)
        if line.startswith("|") and not line.startswith("|---") and i not in headers
    ]


def table_headed(text: str, header: str) -> list[list[str]]:
    """The rows of the table in ``text`` whose header row starts with ``header``."""
    rest = text.split("\n" + header, 1)[1].splitlines()
    return table_rows(
        "\n".join(line for line in itertools.takewhile(lambda line: line.startswith("|"), rest[1:]))
    )


def readme_key_default(key: str) -> str:
    """What the model-folder key table gives as the default of ``inference.<key>``."""
    for row in table_rows(section("Model folders")):
        if f"`inference.{key}`" in row[0]:
            found = re.search(r"default `?([^`)]+)`?", row[1])
            assert found, f"no default stated for {key}"
            return found.group(1)
    raise AssertionError(f"inference.{key} is not in the key table")


def test_readme_settings_table_is_generated_from_the_settings() -> None:
    start = README.index("<!-- settings-table:start -->") + len("<!-- settings-table:start -->")
    end = README.index("<!-- settings-table:end -->")
    assert README[start:end].strip() == settings_table().strip(), "run `python -m worker settings`"


def test_every_settings_default_is_the_documented_one() -> None:
    start = README.index("<!-- settings-table:start -->")
    end = README.index("<!-- settings-table:end -->")
    stated = {row[0].strip("`-").replace("-", "_"): row[2] for row in table_rows(README[start:end])}
    assert stated == {name: f"`{value!r}`" for name, value in SETTINGS_DEFAULTS.items()}
    code = {
        name: field.get_default(call_default_factory=True) for name, field in Settings.model_fields.items()
    }
    assert code == SETTINGS_DEFAULTS


def test_readme_bucket_defaults_are_the_metadata_defaults() -> None:
    assert readme_key_default("batch_sizes") == "1,2,4,8,16,32"
    assert DEFAULT_BATCH_SIZES == BATCH_SIZES
    assert readme_key_default("sequence_lengths") == "8,16,24,32,48,64,96,128"
    assert DEFAULT_SEQUENCE_LENGTHS == SEQUENCE_LENGTHS
    assert readme_key_default("audio_samples") == "1, 5 and 10 s at the sampling rate"
    assert DEFAULT_AUDIO_SECONDS == (1.0, 5.0, 10.0)


def test_readme_wire_format_caps_are_the_schemas_limits() -> None:
    stated = dict(table_headed(section("Sending a request"), "| wire-format cap |"))
    assert stated == {
        "one media file or video frame, base64": "8 MiB",
        "audio sampling rate": "1,000 to 384,000 Hz",
        "tensors": "16 a request, rank 8, 1,048,576 elements each",
        "candidate labels": "64 a request, 256 characters each",
    }
    assert limits.MAX_MEDIA_B64_CHARS == 8 * 1024 * 1024
    assert (limits.MIN_SAMPLING_RATE, limits.MAX_SAMPLING_RATE) == (1_000, 384_000)
    assert (limits.MAX_TENSORS, limits.MAX_TENSOR_RANK, limits.MAX_TENSOR_ELEMENTS) == (16, 8, 1_048_576)
    assert (limits.MAX_CANDIDATE_LABELS, limits.MAX_LABEL_CHARS) == (64, 256)


def test_the_limits_the_readme_names_are_settings() -> None:
    limits_text = (
        section("Sending a request").split("### Limits per request", 1)[1].split("| wire-format", 1)[0]
    )
    named = set(re.findall(r"`(\w+)`", limits_text)) - {"payload_too_large", "invalid_request"}
    assert named == {
        "max_message_bytes",
        "max_text_chars",
        "max_image_pixels",
        "max_jpeg_scans",
        "max_audio_seconds",
        "max_video_frames",
        "max_video_seconds",
        "max_video_frames_decoded",
        "max_video_pixels",
        "decode_cpu_seconds",
        "decode_memory_mib",
        "prepare_timeout_s",
    }
    assert named <= set(Settings.model_fields)


def test_readme_readiness_reasons_and_their_conditions_are_the_workers() -> None:
    stated = {row[0].strip("`"): row[1] for row in table_headed(section("Operations"), "| reason |")}
    assert stated == {
        "fetch_failing": "5 fetch rounds in a row failed",
        "publish_failing": (
            "a reply has been failing to publish for longer than half of `publish_retry_s`, and neither a"
            " reply nor, once none is failing, the broker has answered since"
        ),
        "model_loop_died": "a model's batch loop died (it is logged and restarted)",
        "fetch_loop_died": "the fetch loop died (it is logged and restarted from the committed offsets)",
        "broker_unreachable": "the broker has not answered the topic list, asked every 2 s, for 5 s",
    }
    assert set(readiness.NOT_READY_REASONS) == set(stated)
    assert readiness.FETCH_ERRORS_NOT_READY == 5
    assert (readiness.BROKER_CHECK_S, readiness.BROKER_UNREACHABLE_S) == (2.0, 5.0)
    assert "exits within 5 s more" in section("Operations")
    assert app.STOP_BUDGET_S == 5.0


def test_readme_reply_to_default_is_the_settings_default() -> None:
    assert r"(empty: `inference\.replies\..+`)" in section("Operations")
    assert Settings(reply_to_pattern="").reply_to_pattern == r"inference\.replies\..+"


def test_readme_transformers_range_is_the_one_tested() -> None:
    assert "the worker supports transformers 4.57 and 5.x" in README
    assert '"transformers>=4.57,<6"' in (ROOT / "pyproject.toml").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "'transformers>=4.57,<4.58'" in makefile
    assert re.search(r"^test: .*\btest-compat\b", makefile, re.MULTILINE)


def test_readme_versions_and_paths_are_the_builds() -> None:
    assert "on a fresh machine with Python 3.11 and `make`" in README
    assert 'requires-python = ">=3.11"' in (ROOT / "pyproject.toml").read_text()
    assert README.count("Apache Kafka 4.4") >= 2
    assert "<kafka.version>4.4.0</kafka.version>" in (ROOT / "kafka" / "pom.xml").read_text()
    assert "`~/.cache/onnx-worker/kafka-4.4.0`" in README
    assert "KAFKA_LIBS ?= $(HOME)/.cache/onnx-worker/kafka-4.4.0" in (ROOT / "Makefile").read_text()


def readme_commands(prefix: str) -> list[str]:
    """Every command starting with ``prefix`` in the README: code-block lines and inline code."""
    found = re.findall(rf"`({re.escape(prefix)}[^`]*)`", README)
    for block in re.findall(r"```bash\n(.*?)```", README, re.DOTALL):
        found += [line.split("#")[0].strip() for line in block.splitlines() if line.startswith(prefix)]
    return sorted(set(found))


def test_every_make_target_the_readme_names_exists() -> None:
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    named = {command.split()[1] for command in readme_commands("make ")}
    assert named >= {"demo", "test", "kafka", "lint", "test-fast", "test-slow", "models", "bench"}
    assert named <= targets


@pytest.mark.parametrize("command", readme_commands("python -m worker "))
def test_every_worker_command_the_readme_shows_parses(command: str) -> None:
    args = build_parser().parse_args(shlex.split(command)[3:])
    assert callable(args.func)


def test_every_other_module_the_readme_runs_exists() -> None:
    modules = {command.split()[2] for command in readme_commands("python -m ")} - {"worker"}
    assert modules == {"models", "schemas", "tests.sim"}
    for module in modules:
        assert importlib.util.find_spec(f"{module}.__main__") is not None, module


def test_readme_documents_every_metadata_key() -> None:
    for key in Declared.model_fields:
        assert f"`inference.{key}`" in README, key


def test_readme_layout_names_every_module_of_the_worker() -> None:
    """Each ``worker/**/*.py`` module on disk is in the Layout section, and nothing else is
    (a package's ``__init__`` only gathers its modules' names)."""
    on_disk = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "worker").rglob("*.py")
        if path.name != "__init__.py" and "demo_models" not in path.parts
    }
    named = set(re.findall(r"`(worker/[\w/]+\.py)`", section("Layout")))
    assert sorted(on_disk - named) == [], "modules missing from the README's Layout"
    assert sorted(named - on_disk) == [], "the README's Layout names modules that do not exist"


def test_readme_has_exactly_the_two_setup_commands_ci_runs() -> None:
    setup = README.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in setup.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_compose_runs_kafka_in_kraft_mode_and_the_three_workers_the_readme_says() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    kafka = compose["services"]["kafka"]["environment"]
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"]
    worker = compose["services"]["worker"]
    assert worker["command"][0] == "run"
    assert worker["deploy"]["replicas"] == 3
    assert "runs Apache Kafka and three worker replicas" in README
    host = worker["environment"]["KAFKA_BOOTSTRAP_SERVERS"]
    assert host in kafka["KAFKA_ADVERTISED_LISTENERS"]
