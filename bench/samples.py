"""The tiny models' stored samples as requests on the wire (base64 media), for the soak run and the tests."""

from __future__ import annotations

import base64
import json
from typing import Any

from bench.plan import ROOT
from worker.serving.decoding import decode_audio
from worker.serving.media_limits import MediaLimits

TINY = ROOT / "models" / "tiny"
#: The tiny models with stored samples of every modality (the text-task ones are bert-ner, -qa, -embed).
TINY_MODELS = ("bert", "vit", "wav2vec2", "whisper-encoder", "videomae", "clip")


def stored_inputs(model: str) -> list[dict[str, Any]]:
    """The raw request inputs (file paths under the repository) of a tiny model's stored samples."""
    spec = json.loads((TINY / model / "reference.json").read_text())
    return [sample["inputs"] for sample in spec["samples"]]


def b64(data: bytes) -> str:
    """Bytes as standard base64 text, as requests carry media."""
    return base64.b64encode(data).decode("ascii")


def b64_file(path: str) -> str:
    """A file under the repository root as standard base64."""
    return b64((ROOT / path).read_bytes())


def wire_inputs(raw: dict[str, Any], *, audio_as_array: bool = False) -> dict[str, Any]:
    """A stored raw sample (file paths) as the JSON ``inputs`` of a request (base64 media).

    ``audio_as_array`` sends the WAV's decoded samples as ``{"array", "sampling_rate"}``.
    """
    inputs = dict(raw)
    for key in ("image", "audio"):
        if key in inputs:
            inputs[key] = b64_file(inputs[key])
    if "frames" in inputs:
        inputs["frames"] = [b64_file(frame) for frame in inputs["frames"]]
    if audio_as_array and "audio" in raw:
        array, rate = decode_audio((ROOT / raw["audio"]).read_bytes(), MediaLimits())
        del inputs["audio"]
        inputs.update(array=array.tolist(), sampling_rate=rate)
    return inputs


def request_bytes(request_id: str, model: str, inputs: Any, **fields: Any) -> bytes:
    """One request message body as the worker reads it."""
    return json.dumps({"id": request_id, "model": model, "inputs": inputs, **fields}).encode()
