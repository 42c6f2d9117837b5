"""Hostile input: every limit is a typed error, and fuzzed messages always get an answer."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import struct
import wave
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from aiokafka import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from schemas import Modality, RequestRejected, parse_request
from schemas.errors import InferenceError
from tests.media_files import encode_audio, mp4_clip
from tests.references import TINY
from worker.errors import PayloadTooLarge, UndecodableInput
from worker.intake import Intake, Job
from worker.kafka.messages import Origin, Outgoing
from worker.kafka.routing import ReplyPolicy
from worker.metrics import WorkerMetrics
from worker.serving.decoding import decode_audio, decode_image, decode_inputs
from worker.serving.media_limits import MediaLimits
from worker.serving.registry import ServedModel, load_model
from worker.settings import Settings

# Generous deadlines: the suite shares 2 cores with broker and worker processes.
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def png_bytes(width: int = 8, height: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims another size: a decompression bomb's calling card."""
    data = bytearray(png_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def wav_bytes(seconds: float, rate: int = 16_000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.zeros(int(seconds * rate), dtype="<i2").tobytes())
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def request(modality: Modality, inputs: Any, model: str = "m") -> Any:
    return parse_request(json.dumps({"id": "r", "model": model, "inputs": inputs}).encode(), modality)


# --- every limit -------------------------------------------------------------------------


def test_a_decompression_bomb_is_refused_before_it_is_inflated() -> None:
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode_image(png_claiming(100_000, 100_000), MediaLimits())


def test_image_pixels_are_bounded_by_the_setting() -> None:
    limits = MediaLimits(max_image_pixels=100)
    with pytest.raises(PayloadTooLarge):
        decode_inputs(request(Modality.VISION, {"image": b64(png_bytes(11, 10))}), limits)
    assert decode_inputs(request(Modality.VISION, {"image": b64(png_bytes(10, 10))}), limits)


def test_audio_seconds_are_bounded_for_files_and_arrays() -> None:
    limits = MediaLimits(max_audio_seconds=1.0)
    with pytest.raises(PayloadTooLarge, match="s; the limit"):
        decode_inputs(request(Modality.AUDIO, {"audio": b64(wav_bytes(1.5))}), limits)
    with pytest.raises(PayloadTooLarge):
        decode_inputs(request(Modality.AUDIO, {"array": [0.0] * 16_001, "sampling_rate": 16_000}), limits)
    assert decode_inputs(request(Modality.AUDIO, {"audio": b64(wav_bytes(1.0))}), limits)


def test_a_wav_header_claiming_hours_costs_only_what_the_file_holds() -> None:
    data = bytearray(wav_bytes(0.1))
    data[40:44] = struct.pack("<I", 0xFFFFFF00)  # the data chunk's size field
    array, rate = decode_audio(bytes(data), MediaLimits())  # samples are counted as decoded, not trusted
    assert (len(array), rate) == (1_600, 16_000)


def test_video_frames_are_bounded() -> None:
    frames = [b64(png_bytes())] * 5
    with pytest.raises(PayloadTooLarge, match="frames"):
        decode_inputs(request(Modality.VIDEO, {"frames": frames}), MediaLimits(max_video_frames=4))


def test_text_length_is_bounded() -> None:
    with pytest.raises(PayloadTooLarge, match="characters"):
        decode_inputs(request(Modality.TEXT, {"text": "x" * 11}), MediaLimits(max_text_chars=10))


def test_nan_audio_is_undecodable() -> None:
    raw = b'{"id": "r", "model": "m", "inputs": {"array": [0.1, NaN], "sampling_rate": 16000}}'
    try:
        parsed = parse_request(raw, Modality.AUDIO)
    except RequestRejected:
        return  # refused by the schema already: also an answer
    with pytest.raises(UndecodableInput):
        decode_inputs(parsed, MediaLimits())


# --- fuzzing ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_a_request_or_a_typed_rejection(raw: bytes) -> None:
    for modality in Modality:
        try:
            parse_request(raw, modality)
        except RequestRejected as rejection:
            assert rejection.code.value in {
                "invalid_json",
                "invalid_request",
                "payload_too_large",
                "undecodable_input",
            }


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["id", "model", "inputs", "parameters", "deadline_ms", "x"]), json_values)
)
def test_arbitrary_json_objects_are_a_request_or_a_typed_rejection(document: dict[str, Any]) -> None:
    raw = json.dumps(document).encode()
    for modality in Modality:
        with contextlib.suppress(RequestRejected):
            parse_request(raw, modality)


@FUZZ
@given(st.binary(max_size=400))
def test_image_decoder_answers_garbage_with_typed_errors(tail: bytes) -> None:
    for head in (b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", png_bytes()[:40]):
        with contextlib.suppress(InferenceError):
            decode_image(head + tail, MediaLimits(max_image_pixels=10_000))


@FUZZ
@given(st.binary(max_size=400))
def test_audio_decoder_answers_garbage_with_typed_errors(tail: bytes) -> None:
    for head in (b"", b"RIFF\x00\x00\x00\x00WAVE", wav_bytes(0.01)[:44], b"fLaC", b"ID3\x04", b"OggS"):
        with contextlib.suppress(InferenceError):
            decode_audio(head + tail, MediaLimits())


@pytest.fixture(scope="module")
def intake() -> Iterator[Intake]:
    """The worker's intake on its own (media decoded in its decoder processes): no broker needed."""
    names = ("bert", "vit", "wav2vec2", "videomae", "clip")
    models: dict[str, ServedModel] = {name: load_model(TINY / name) for name in names}
    settings = Settings(bootstrap_servers="127.0.0.1:9", max_text_chars=2_000)
    topics = {f"inference.{m.value}.requests": m for m in Modality}
    intake = Intake(settings, models, topics, ReplyPolicy("inference", re.compile(".*")), WorkerMetrics())
    yield intake
    intake.close()


_MP3 = encode_audio("mp3", 44_100, 2, seconds=0.2)
_MP4 = mp4_clip(frames=6)


def _media_file(whole: bytes) -> st.SearchStrategy[str]:
    """A real file, cut anywhere or followed by noise: decoders must answer each with a typed error or a result."""
    cut = st.integers(0, len(whole)).map(lambda n: whole[:n])
    noisy = st.binary(max_size=64).map(lambda tail: whole[: len(whole) // 2] + tail)
    return st.one_of(st.just(whole), cut, noisy, st.binary(max_size=200)).map(b64)


def _inputs(modality: Modality) -> st.SearchStrategy[Any]:
    image = st.sampled_from([b64(png_bytes()), b64(png_bytes(1, 300)), b64(png_claiming(9, 9)), "@@", ""])
    by_modality: dict[Modality, st.SearchStrategy[Any]] = {
        Modality.TEXT: st.fixed_dictionaries(
            {"text": st.text(max_size=3000)}, optional={"text_pair": st.text()}
        ),
        Modality.VISION: st.fixed_dictionaries({"image": image}),
        Modality.AUDIO: st.fixed_dictionaries(
            {
                "array": st.lists(st.floats(width=32, allow_nan=False), min_size=0, max_size=50),
                "sampling_rate": st.sampled_from([8_000, 16_000, 48_000, 0, -1]),
            }
        )
        | st.fixed_dictionaries({"audio": _media_file(_MP3)}),
        Modality.VIDEO: st.fixed_dictionaries({"frames": st.lists(image, max_size=6)})
        | st.fixed_dictionaries({"video": _media_file(_MP4)}),
        Modality.MULTIMODAL: st.fixed_dictionaries(
            {"image": image},
            optional={
                "candidate_labels": st.lists(st.text(max_size=30), max_size=40),
                "text": st.text(max_size=50),
            },
        ),
    }
    tensor = st.fixed_dictionaries(
        {
            "name": st.sampled_from(["input_ids", "pixel_values", "input_values", "x"]),
            "shape": st.lists(st.integers(0, 4), max_size=4),
            "datatype": st.sampled_from(["INT64", "FP32", "BOOL"]),
            "data": st.lists(st.integers(-3, 3), max_size=64),
        }
    )
    return by_modality[modality] | st.lists(tensor, min_size=1, max_size=3) | json_values


@FUZZ
@given(st.data())
def test_every_fuzzed_message_is_queued_or_answered(intake: Intake, data: st.DataObject) -> None:
    modality = data.draw(st.sampled_from(list(Modality)))
    model = data.draw(st.sampled_from(["bert", "vit", "wav2vec2", "videomae", "clip", "nope"]))
    body = {"id": "fuzz", "model": model, "inputs": data.draw(_inputs(modality))}
    raw = json.dumps(body).encode()
    topic = f"inference.{modality.value}.requests"
    origin = Origin(modality, TopicPartition(topic, 0), 0, f"inference.{modality.value}.results", "c", raw, 0)
    outcome = intake.prepare(origin)
    assert isinstance(outcome, Job | Outgoing)
    if isinstance(outcome, Outgoing):
        assert outcome.error is not None
        assert outcome.error.code.value != "internal", outcome.error.message
    else:
        assert outcome.model.engine.run([outcome.prepared]), "a queued request must run"
