"""Every knob of the worker: one typed field, one default, one line of description.

Read from environment variables prefixed ``WORKER_`` (``WORKER_MAX_BATCH_SIZE=16``), from
CLI flags of ``python -m worker run`` (``--max-batch-size 16``), or from arguments. The
README's settings table is generated from this class (``python -m worker settings``). The fields
come in slices, one module each: ``worker/settings_kafka.py``, ``worker/settings_fetching.py``,
``worker/settings_batching.py``, ``worker/settings_media.py``, ``worker/settings_operations.py``.
"""

from __future__ import annotations

import re

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.settings_batching import BatchingAndEngine
from worker.settings_fetching import FetchingAndDelivery
from worker.settings_kafka import KafkaConnection
from worker.settings_media import IntakeAndMedia
from worker.settings_operations import Operations


# pydantic lists the fields of the last base first: --help and the README's table read Kafka, fetching and
# delivery, batching and the engine, intake and media, operations.
class Settings(
    Operations, IntakeAndMedia, BatchingAndEngine, FetchingAndDelivery, KafkaConnection, BaseSettings
):
    """Worker configuration, validated once at start-up and trusted inside."""

    model_config = SettingsConfigDict(env_prefix="WORKER_", extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _reply_to_default(self) -> Settings:
        if not self.reply_to_pattern:
            # Secure by default: a client may name only the replies namespace of this worker's prefix,
            # never another application's topic (the worker would write there with its own rights).
            object.__setattr__(self, "reply_to_pattern", default_reply_to_pattern(self.topic_prefix))
        try:
            re.compile(self.reply_to_pattern)
        except re.error as exc:
            raise ValueError(f"reply_to_pattern is not a regular expression: {exc}") from exc
        return self


def default_reply_to_pattern(prefix: str) -> str:
    """The reply_to topics allowed when the operator names none: ``<prefix>.replies.<anything>``."""
    return re.escape(prefix) + r"\.replies\..+"
