"""Reading a sentence-transformers folder: ``modules.json`` and the files its modules point at."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.serving.metadata.hf_files import HFFiles, read_json
from worker.serving.metadata.keys import DEFAULT_SEQUENCE_LENGTHS, MetadataError

_SENTENCE_MODULES = ("Transformer", "Pooling", "Normalize")
#: Pooling config keys of sentence-transformers before v5, in the order it concatenates their vectors.
_LEGACY_POOLING_KEYS = (
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_max_tokens", "max"),
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
    ("pooling_mode_weightedmean_tokens", "weightedmean"),
    ("pooling_mode_lasttoken", "lasttoken"),
)


@dataclass(frozen=True)
class SentenceTransformerFiles:
    """A sentence-transformers folder: ``modules.json`` and the files its modules point at.

    Pooling from the Pooling module's ``config.json`` (``1_Pooling/``), normalisation from a
    Normalize module, the longest sequence from ``sentence_bert_config.json`` and the prompts from
    ``config_sentence_transformers.json``: what ``SentenceTransformer.encode`` applies after the graph.
    """

    folder: Path
    #: (short type name, folder) per module, in order: ("Transformer", ""), ("Pooling", "1_Pooling"), ...
    modules: tuple[tuple[str, str], ...]
    pooling: dict[str, Any]
    transformer: dict[str, Any]
    settings: dict[str, Any]

    @classmethod
    def read(cls, folder: Path) -> SentenceTransformerFiles | None:
        """The folder's sentence-transformers files, or None when it has no ``modules.json``."""
        path = folder / "modules.json"
        if not path.is_file():
            return None
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MetadataError(f"{path}: unreadable JSON ({exc})") from exc
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "type" in e for e in entries):
            raise MetadataError(f"{path}: expected a list of modules, each with a 'type'")
        modules = tuple((str(e["type"]).rsplit(".", 1)[-1], str(e.get("path", ""))) for e in entries)

        def module_file(kind: str, name: str) -> dict[str, Any]:
            where = next((sub for module, sub in modules if module == kind), None)
            file = folder / where / name if where is not None else None
            return read_json(file) if file is not None and file.is_file() else {}

        settings_path = folder / "config_sentence_transformers.json"
        return cls(
            folder=folder,
            modules=modules,
            pooling=module_file("Pooling", "config.json"),
            transformer=module_file("Transformer", "sentence_bert_config.json"),
            settings=read_json(settings_path) if settings_path.is_file() else {},
        )

    @property
    def module_names(self) -> tuple[str, ...]:
        """The short type names of the modules, in order."""
        return tuple(kind for kind, _ in self.modules)

    def check_applicable(self, pooled_in_graph: bool) -> None:
        """Refuse modules the worker would skip: their output is only right when the graph holds them."""
        if pooled_in_graph:
            return
        others = [kind for kind in self.module_names if kind not in _SENTENCE_MODULES]
        if others:
            raise MetadataError(
                f"{self.folder / 'modules.json'}: module(s) {', '.join(others)} run after the transformer, "
                "which the worker does not apply: export the whole SentenceTransformer so that the graph "
                "has a 'sentence_embedding' output"
            )

    def pooling_modes(self) -> str | None:
        """The Pooling module's mode(s), comma-separated; None without a Pooling module."""
        if "Pooling" not in self.module_names:
            return None
        mode = self.pooling.get("pooling_mode")
        if isinstance(mode, str):
            return mode
        if isinstance(mode, list):
            return ",".join(str(m) for m in mode)
        legacy = [name for key, name in _LEGACY_POOLING_KEYS if self.pooling.get(key)]
        # sentence-transformers' own fallback when no legacy flag is set.
        return ",".join(legacy) or "mean"

    def max_seq_length(self, hf: HFFiles) -> int | None:
        """The longest token sequence sentence-transformers keeps, within the model's position table.

        ``max_seq_length`` in sentence_bert_config.json (before v6), else the tokenizer's
        ``model_max_length`` (v6 saves it there), as the Transformer module reads them.
        """
        limits = [
            value
            for value in (
                self.transformer.get("max_seq_length") or hf.tokenizer.get("model_max_length"),
                hf.text_config().get("max_position_embeddings"),
            )
            if isinstance(value, int) and 0 < value < 1_000_000
        ]
        return min(limits) if limits else None

    def declared(self, hf: HFFiles) -> dict[str, Any]:
        """Metadata fields these files state outright."""
        out: dict[str, Any] = {"normalize": "Normalize" in self.module_names}
        modes = self.pooling_modes()
        if modes is not None:
            out["pooling"] = modes
            out["include_prompt"] = bool(self.pooling.get("include_prompt", True))
        longest = self.max_seq_length(hf)
        if longest is not None:
            out["sequence_lengths"] = _buckets_up_to(longest)
        prompts = self.settings.get("prompts")
        if isinstance(prompts, dict) and prompts:
            out["prompts"] = {str(k): str(v) for k, v in prompts.items()}
        default_prompt = self.settings.get("default_prompt_name")
        if isinstance(default_prompt, str):
            out["default_prompt_name"] = default_prompt
        return out


def _buckets_up_to(longest: int) -> tuple[int, ...]:
    """Token buckets ending at ``longest``: the defaults below it, doubling past the last default."""
    buckets = [b for b in DEFAULT_SEQUENCE_LENGTHS if b < longest]
    while buckets and buckets[-1] * 2 < longest:
        buckets.append(buckets[-1] * 2)
    return (*buckets, longest)
