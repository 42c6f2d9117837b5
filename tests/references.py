"""The tiny models' stored references: raw sample inputs and the PyTorch outputs for them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from worker.decoding import MediaLimits, decode_wav
from worker.processors import AudioInput, ImageInput, ModelInput, MultimodalInput, TextInput, VideoInput

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "tiny"
TINY_MODELS = ("bert", "vit", "wav2vec2", "whisper-encoder", "videomae", "clip")


@dataclass(frozen=True)
class Sample:
    """One stored sample: its raw request inputs, the HF processor's arrays, the PyTorch outputs."""

    raw: dict[str, Any]
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


def load_samples(name: str) -> tuple[list[Sample], float]:
    """Samples of a tiny model and the tolerance its reference was stored with."""
    folder = TINY / name
    spec = json.loads((folder / "reference.json").read_text())
    arrays = np.load(folder / "reference.npz")
    samples = []
    for i, sample in enumerate(spec["samples"]):
        inputs = {k.split("/", 2)[2]: arrays[k] for k in arrays.files if k.startswith(f"{i}/input/")}
        outputs = {k.split("/", 2)[2]: arrays[k] for k in arrays.files if k.startswith(f"{i}/output/")}
        samples.append(Sample(sample["inputs"], inputs, outputs))
    return samples, float(spec["tolerance"])


def _image(path: str) -> Image.Image:
    return Image.open(ROOT / path).convert("RGB")


def to_model_input(raw: dict[str, Any]) -> ModelInput:
    """A stored raw sample (file paths) as the decoded input the processors take."""
    if "candidate_labels" in raw:
        return MultimodalInput(
            _image(raw["image"]),
            tuple(raw["candidate_labels"]),
            hypothesis_template=raw.get("hypothesis_template", "This is a photo of {}."),
        )
    if "text" in raw:
        return TextInput(raw["text"], raw.get("text_pair"))
    if "image" in raw:
        return ImageInput(_image(raw["image"]))
    if "audio" in raw:
        array, rate = decode_wav((ROOT / raw["audio"]).read_bytes(), MediaLimits())
        return AudioInput(array, rate)
    if "frames" in raw:
        return VideoInput([_image(f) for f in raw["frames"]])
    raise ValueError(f"unknown sample inputs {sorted(raw)}")
