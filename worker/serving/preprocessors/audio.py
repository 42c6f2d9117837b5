"""Audio: the feature extractor, padded or cut to a sample bucket or the model's feature frames."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.errors import InvalidRequest, UndecodableInput
from worker.serving.audio_files import resample
from worker.serving.inputs import (
    AudioInput,
    ModelInput,
)
from worker.serving.metadata import ModelMetadata, ProcessorKind
from worker.serving.preprocessors.base import Preprocessor
from worker.serving.tokenizing import (
    bucket_for,
)


class AudioPreprocessor(Preprocessor):
    """Feature extractor padded/cut to a sample bucket or to the model's feature frames."""

    kind = ProcessorKind.FEATURE_EXTRACTOR

    def __init__(self, metadata: ModelMetadata, feature_extractor: Any) -> None:
        super().__init__(metadata)
        self.feature_extractor = feature_extractor
        self.sampling_rate = int(metadata.sampling_rate or feature_extractor.sampling_rate)
        self.sample_buckets = metadata.audio_samples

    def _encode(self, item: ModelInput) -> tuple[dict[str, np.ndarray], bool, dict[str, Any]]:
        if not isinstance(item, AudioInput):
            raise InvalidRequest(f"model {self.metadata.name!r} takes audio")
        audio = resample(np.asarray(item.array, dtype=np.float32), item.sampling_rate, self.sampling_rate)
        if audio.size == 0:
            raise UndecodableInput(f"audio is shorter than one sample at the model's {self.sampling_rate} Hz")
        if self.sample_buckets:
            return self._encode_samples(audio, self.sample_buckets)
        return self._encode_features(audio)

    def _encode_samples(
        self, audio: np.ndarray, buckets: Sequence[int]
    ) -> tuple[dict[str, np.ndarray], bool, dict[str, Any]]:
        truncated = len(audio) > buckets[-1]
        audio = audio[: buckets[-1]]
        length = bucket_for(len(audio), buckets)
        features = self.feature_extractor(
            audio,
            sampling_rate=self.sampling_rate,
            padding="max_length",
            max_length=length,
            truncation=True,
            return_attention_mask=True,
            return_tensors="np",
        )
        return {k: np.asarray(v) for k, v in features.items()}, truncated, {}

    def _encode_features(self, audio: np.ndarray) -> tuple[dict[str, np.ndarray], bool, dict[str, Any]]:
        # Whisper-style extractors always pad/cut to a fixed window (n_samples = 30 s).
        limit = getattr(self.feature_extractor, "n_samples", None)
        truncated = limit is not None and len(audio) > limit
        features = self.feature_extractor(audio, sampling_rate=self.sampling_rate, return_tensors="np")
        return {k: np.asarray(v) for k, v in features.items()}, bool(truncated), {}
