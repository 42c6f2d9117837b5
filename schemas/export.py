"""JSON Schema export: one file per request modality, the result, the error reply, and AsyncAPI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas.asyncapi import asyncapi_json
from schemas.replies import ErrorReply, Result
from schemas.requests import REQUEST_TYPES

#: Where `python -m schemas` writes, and where the up-to-date test looks.
JSON_DIR = Path(__file__).parent / "json"


def _documents() -> dict[str, type[BaseModel]]:
    documents: dict[str, type[BaseModel]] = {
        f"request.{modality.value}.schema.json": model for modality, model in REQUEST_TYPES.items()
    }
    documents["result.schema.json"] = Result
    documents["error.schema.json"] = ErrorReply
    return documents


def render_schemas() -> dict[str, str]:
    """File name -> JSON Schema text (draft 2020-12), deterministic so it can be diffed."""
    rendered: dict[str, str] = {}
    for name, model in _documents().items():
        schema: dict[str, Any] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            **model.model_json_schema(mode="validation"),
        }
        rendered[name] = json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    asyncapi = json.loads(asyncapi_json())
    rendered["asyncapi.json"] = json.dumps(asyncapi, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return rendered


def write_schemas(directory: Path = JSON_DIR) -> list[Path]:
    """Write every schema file into `directory` and drop stale `*.schema.json` files there."""
    directory.mkdir(parents=True, exist_ok=True)
    rendered = render_schemas()
    for stale in directory.glob("*.schema.json"):
        if stale.name not in rendered:
            stale.unlink()
    written = []
    for name, text in rendered.items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
