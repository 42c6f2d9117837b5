"""Token classification: a label per token, or entity groups, like TokenClassificationPipeline."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from worker.errors import InvalidRequest
from worker.serving.heads.outputs import (
    Outputs,
    alignment_of,
    label_of,
    softmax,
)
from worker.serving.inputs import Prepared
from worker.serving.metadata import ModelMetadata


def token_classification(
    metadata: ModelMetadata, outputs: Outputs, prepared: Prepared, parameters: Mapping[str, Any]
) -> Any:
    """Like TokenClassificationPipeline: an entry per token ("none") or per entity group ("simple")."""
    alignment = alignment_of(prepared, metadata.task)
    strategy = str(parameters.get("aggregation_strategy", "none")).lower()
    if strategy not in ("none", "simple"):
        raise InvalidRequest("parameter 'aggregation_strategy' must be 'none' or 'simple'")
    ignore = parameters.get("ignore_labels", ["O"])
    if not isinstance(ignore, list):
        raise InvalidRequest("parameter 'ignore_labels' must be a list of labels")
    text = prepared.context["text"]
    scores = softmax(outputs["logits"][0][: len(alignment.ids)])
    entities: list[dict[str, Any]] = []
    for index, token_scores in enumerate(scores):
        if alignment.special[index]:
            continue
        best = int(token_scores.argmax())
        start, end = alignment.offsets[index]
        # An unknown token says nothing about its text; the pipeline shows the text it covers.
        unknown = alignment.ids[index] == alignment.unk_id
        entities.append(
            {
                "entity": label_of(metadata, best),
                "score": float(token_scores[best]),
                "index": index,
                "word": text[start:end] if unknown else alignment.tokens[index],
                "start": start,
                "end": end,
            }
        )
    if strategy == "simple":
        entities = _group_entities(entities, alignment.detokenize)
    return [e for e in entities if e.get("entity", e.get("entity_group")) not in ignore]


def _tag(label: str) -> tuple[str, str]:
    """("B" or "I", entity type); a label without a B-/I- prefix continues like an I- tag."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _group_entities(
    entities: list[dict[str, Any]], detokenize: Callable[[list[str]], str]
) -> list[dict[str, Any]]:
    """Adjacent tokens of one entity type, each run starting afresh at a B- tag, as one group."""
    groups: list[list[dict[str, Any]]] = []
    for entity in entities:
        bi, tag = _tag(entity["entity"])
        if groups and bi != "B" and tag == _tag(groups[-1][-1]["entity"])[1]:
            groups[-1].append(entity)
        else:
            groups.append([entity])
    return [
        {
            "entity_group": group[0]["entity"].split("-", 1)[-1],
            "score": float(np.mean([entity["score"] for entity in group])),
            "word": detokenize([entity["word"] for entity in group]),
            "start": group[0]["start"],
            "end": group[-1]["end"],
        }
        for group in groups
    ]
