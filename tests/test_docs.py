"""The README and deployment files stay true to the code."""

from __future__ import annotations

from pathlib import Path

import yaml

from worker.cli import settings_table
from worker.serving.metadata import Declared

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_settings_table_is_generated_from_the_settings() -> None:
    start = README.index("<!-- settings-table:start -->") + len("<!-- settings-table:start -->")
    end = README.index("<!-- settings-table:end -->")
    assert README[start:end].strip() == settings_table().strip(), "run `python -m worker settings`"


def test_readme_documents_every_metadata_key() -> None:
    for key in Declared.model_fields:
        assert f"`inference.{key}`" in README, key


def test_readme_has_exactly_the_two_setup_commands_ci_runs() -> None:
    setup = README.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in setup.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_compose_runs_kafka_in_kraft_mode_and_scaled_workers() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    kafka = compose["services"]["kafka"]["environment"]
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"]
    worker = compose["services"]["worker"]
    assert worker["command"][0] == "run"
    assert worker["deploy"]["replicas"] > 1
    host = worker["environment"]["KAFKA_BOOTSTRAP_SERVERS"]
    assert host in kafka["KAFKA_ADVERTISED_LISTENERS"]
