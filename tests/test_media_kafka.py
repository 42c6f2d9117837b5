"""Over a real broker: each new input kind answered end to end, each malformed file kind refused.

Expected answers come from the same model given inputs the test decoded itself (PyAV read here,
scipy resampling, frames and images built here), not from the worker's decoding code.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import numpy as np
import pytest
import scipy.signal
from PIL import Image

from schemas.topics import dlq_topic, requests_topic, results_topic
from tests.kafka_support import (
    TopicReader,
    b64,
    body_of,
    headers_of,
    raw_producer,
    request_bytes,
    serving,
)
from tests.media_files import audio_read_directly, encode_audio, frames_read_directly, mp4_clip, tone
from tests.references import TINY
from worker.client import InferenceClient
from worker.serving.inputs import AudioInput, ImageInput, ModelInput, VideoInput
from worker.serving.registry import ServedModel, load_model

pytestmark = pytest.mark.kafka

Models = dict[str, ServedModel]


@pytest.fixture(scope="module")
def models() -> Models:
    return {name: load_model(TINY / name) for name in ("wav2vec2", "videomae", "vit")}


def at_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    return scipy.signal.resample_poly(samples, 160, rate // 100).astype(np.float32)


def first_frame_gif() -> tuple[bytes, Image.Image]:
    first = Image.new("RGB", (40, 30), (200, 30, 60))
    buffer = io.BytesIO()
    first.save(buffer, "GIF", save_all=True, append_images=[Image.new("RGB", (40, 30), (0, 0, 255))])
    return buffer.getvalue(), first


def cases() -> list[tuple[str, str, dict[str, Any], ModelInput]]:
    """(modality, model, wire inputs, the independently decoded input the answer must match)."""
    mp3 = encode_audio("mp3", 44_100, 2)
    samples, rate = audio_read_directly(mp3)
    array = tone(44_100)[0, :22_050]  # 0.5 s at 44.1 kHz, sent as JSON floats
    clip = mp4_clip()
    frames = [Image.fromarray(f) for f in frames_read_directly(clip, 4)]  # the pipeline's first four
    gif, first = first_frame_gif()
    return [
        ("audio", "wav2vec2", {"audio": b64(mp3)}, AudioInput(at_16k(samples, rate), 16_000)),
        (
            "audio",
            "wav2vec2",
            {"array": array.tolist(), "sampling_rate": 44_100},
            AudioInput(at_16k(array, 44_100), 16_000),
        ),
        ("video", "videomae", {"video": b64(clip)}, VideoInput(frames)),
        ("vision", "vit", {"image": b64(gif)}, ImageInput(first)),
    ]


async def test_each_new_input_kind_is_answered_over_kafka(kafka_bootstrap: str, models: Models) -> None:
    sent = cases()
    expected = [models[name].infer([item], {"top_k": None})[0] for _, name, _, item in sent]
    async with (
        serving(kafka_bootstrap, models) as worker,
        InferenceClient(kafka_bootstrap, topic_prefix=worker.settings.topic_prefix) as client,
    ):
        replies = await asyncio.gather(
            *(
                client.request(modality, name, inputs, {"top_k": None}, timeout=30)
                for modality, name, inputs, _ in sent
            )
        )
    for reply, want in zip(replies, expected, strict=True):
        assert "error" not in reply, reply
        assert [r["label"] for r in reply["outputs"]] == [r["label"] for r in want]
        assert [r["score"] for r in reply["outputs"]] == pytest.approx([r["score"] for r in want], abs=1e-3)


MALFORMED = {
    "audio": ("wav2vec2", {"audio": b64(b"OggS" + bytes(300))}),
    "video": ("videomae", {"video": b64(mp4_clip(frames=8)[:600])}),
    "vision": ("vit", {"image": b64(b"GIF89a" + bytes(300))}),
}


@pytest.mark.parametrize("modality", list(MALFORMED))
async def test_a_malformed_file_is_undecodable_input_with_a_dlq_copy(
    kafka_bootstrap: str, models: Models, modality: str
) -> None:
    name, inputs = MALFORMED[modality]
    body = request_bytes("bad", name, inputs)
    async with serving(kafka_bootstrap, models) as worker:
        prefix = worker.settings.topic_prefix
        topic = requests_topic(modality, prefix)
        async with (
            TopicReader(kafka_bootstrap, results_topic(modality, prefix)) as replies,
            TopicReader(kafka_bootstrap, dlq_topic(prefix)) as dlq,
            raw_producer(kafka_bootstrap) as producer,
        ):
            sent = await producer.send_and_wait(topic, body, partition=0)
            [reply] = await replies.wait_for(1)
            [copy] = await dlq.wait_for(1)
    error = body_of(reply)["error"]
    assert error["code"] == "undecodable_input" and error["message"], error
    assert copy.value == body
    headers = headers_of(copy)
    assert headers["error_code"] == b"undecodable_input"
    assert headers["source_offset"] == str(sent.offset).encode()
