"""Text: the tokenizer, padded to the smallest sequence bucket that holds the text."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from worker.errors import InvalidRequest
from worker.serving.inputs import (
    ModelInput,
    TextInput,
)
from worker.serving.metadata import MetadataError, ModelMetadata, ProcessorKind
from worker.serving.preprocessors.base import Preprocessor
from worker.serving.tokenizing import (
    ALIGNED_TASKS,
    pad_to_bucket,
    prompt_length,
    sequence_pad_values,
    token_alignment,
    tokenize_text,
)


class TextPreprocessor(Preprocessor):
    """Tokenizer padded to the smallest sequence bucket that holds the text."""

    kind = ProcessorKind.TOKENIZER

    def __init__(self, metadata: ModelMetadata, tokenizer: Any) -> None:
        super().__init__(metadata)
        self.tokenizer = tokenizer
        #: a fast tokenizer keeps its truncation setting in itself, set by each call: one call at a time
        self.tokenizing = threading.Lock()
        buckets = metadata.sequence_lengths
        if not buckets:
            raise MetadataError(f"{metadata.onnx_path}: a text model needs a sequence dim")
        self.buckets = buckets
        self.pad_values = sequence_pad_values(metadata, tokenizer)
        self.aligned = metadata.task in ALIGNED_TASKS
        # Token and answer-span heads map tokens back into the request's own text: no prompt before it.
        self.prompt = None if self.aligned else metadata.prompt
        self.prompt_tokens = prompt_length(tokenizer, self.prompt) if self.prompt else 0
        if self.aligned and not getattr(tokenizer, "is_fast", False):
            raise MetadataError(
                f"{metadata.folder}: {metadata.task} needs token offsets, which only a fast tokenizer "
                "(tokenizer.json) gives"
            )

    def _encode(self, item: ModelInput) -> tuple[dict[str, np.ndarray], bool, dict[str, Any]]:
        if not isinstance(item, TextInput):
            raise InvalidRequest(f"model {self.metadata.name!r} takes text")
        extra = {"return_offsets_mapping": True, "return_special_tokens_mask": True} if self.aligned else {}
        # A sentence-transformers default prompt goes before the text, as SentenceTransformer.encode puts it.
        text = (self.prompt or "") + item.text
        with self.tokenizing:
            encoding, truncated = tokenize_text(
                self.tokenizer, [(text, item.text_pair)], self.buckets, **extra
            )
        context: dict[str, Any] = {"text": item.text, "text_pair": item.text_pair}
        if self.prompt:
            context["prompt_tokens"] = self.prompt_tokens
        if self.aligned:
            context["alignment"] = token_alignment(self.tokenizer, encoding)
        return pad_to_bucket(self.tokenizer, encoding, self.buckets), truncated, context
