"""`import worker.cli` is cheap: each command loads ONNX Runtime, transformers and the Kafka clients itself."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("onnxruntime", "aiokafka", "faststream", "transformers")


def _loaded_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


def test_importing_the_cli_loads_no_runtime_or_kafka_client() -> None:
    assert _loaded_after("import worker.cli") == []


def test_building_the_parser_and_the_settings_table_load_nothing_heavy() -> None:
    code = "from worker import cli\ncli.build_parser()\ncli.settings_table()"
    assert _loaded_after(code) == []


def test_inspect_loads_onnx_runtime_but_no_kafka_client() -> None:
    code = "from worker import cli\ncli.main(['inspect', 'models/tiny/bert', '--json'])"
    loaded = _loaded_after(code)
    assert "onnxruntime" in loaded, "the probe must see a command's imports"
    assert "aiokafka" not in loaded and "faststream" not in loaded
