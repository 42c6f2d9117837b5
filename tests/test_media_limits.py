"""Small requests that decode into something huge are refused before the memory or CPU is spent.

Each hostile file is a request measured to cost a worker dearly, built here (tests/media_files.py) in
milliseconds. Where "before" is the point, the decode runs in a fresh process and its peak RSS
is measured: the typed error alone would not tell an up-front refusal from a late one.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import pytest
from aiokafka import TopicPartition
from PIL import Image

from bench.procstats import peak_rss_mib
from schemas import Modality
from schemas.errors import InferenceError
from tests.media_files import (
    black_png,
    encode_audio,
    ico_holding,
    png_mov,
    progressive_jpeg,
    vorbis_claiming,
    webm_growing,
)
from tests.test_hardening import b64, intake, request
from worker.errors import PayloadTooLarge, UndecodableInput
from worker.intake import Intake
from worker.kafka.messages import Origin, Outgoing
from worker.serving.decoding import decode_audio, decode_image, decode_inputs, decode_video
from worker.serving.media_limits import MediaLimits

__all__ = ["intake"]  # the worker's intake, a fixture of tests/test_hardening.py


def _peak_growth(decode: Callable[[bytes, MediaLimits], Any], data: bytes) -> tuple[str, float]:
    """In a fresh process: the decode's outcome (an error code or "ok") and how far it raised peak RSS, in MiB.

    VmHWM, not ru_maxrss: a spawned child's ru_maxrss starts at its parent's RSS (kept across fork and exec).
    """
    before = peak_rss_mib(os.getpid())
    try:
        decode(data, MediaLimits())
        outcome = "ok"
    except InferenceError as exc:
        outcome = exc.code.value
    return outcome, peak_rss_mib(os.getpid()) - before


def peak_growth(decode: Callable[[bytes, MediaLimits], Any], data: bytes) -> tuple[str, float]:
    """``_peak_growth`` in a spawned process of its own (ru_maxrss is a peak over a process's life)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        pool.submit(_peak_growth, decode_image, b"").exception()  # imports done before the measured call
        return pool.submit(_peak_growth, decode, data).result(timeout=120)


def png(width: int, height: int, mode: str = "1") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_frames_list_is_held_to_the_video_pixel_limit_not_the_image_one() -> None:
    # The first request: 32 frames of 4096x4096 1-bit PNG (2 KB each) took 2.4 GB.
    frame = png(4096, 4096)
    video = request(Modality.VIDEO, {"frames": [b64(frame)] * 32})
    with pytest.raises(PayloadTooLarge, match=r"frame 0 is 4096x4096 pixels; the limit is 2088960"):
        decode_inputs(video, MediaLimits())
    within = request(Modality.VIDEO, {"frames": [b64(png(1920, 1088))] * 2})
    assert [f.size for f in decode_inputs(within, MediaLimits()).frames] == [(1920, 1088)] * 2  # type: ignore[union-attr]


def test_a_jpeg_of_thousands_of_scans_is_refused_before_it_is_decoded() -> None:
    # The second request repeated one scan 3,000 times (about 5.6 ms of CPU each at 4096x4096).
    # Pillow writes 10 scans; 1,000 more make 1,010.
    with pytest.raises(PayloadTooLarge, match="JPEG of 1010 scans; the limit is 64"):
        decode_image(progressive_jpeg(256, 1000), MediaLimits())
    assert decode_image(progressive_jpeg(256, 0), MediaLimits()).size == (256, 256)  # Pillow's own: 10 scans


def test_a_vorbis_header_claiming_2_ghz_is_refused_not_taken_for_milliseconds() -> None:
    # 300 s of real audio at 8 kHz; the old code divided 2.4 M samples by the claimed rate: 1.2 ms.
    with pytest.raises(PayloadTooLarge, match="2000000000 Hz; accepted: 1000 to 384000 Hz"):
        decode_audio(vorbis_claiming(300, 2_000_000_000), MediaLimits())
    with pytest.raises(PayloadTooLarge, match="more than 60 s"):
        decode_audio(vorbis_claiming(300, 8000), MediaLimits())  # the same audio, honest: counted as decoded


def test_an_ico_is_checked_on_the_image_it_holds_before_pillow_decodes_it() -> None:
    # The fourth request: Pillow decodes an ICO's image inside Image.open (2 GB for 12000x12000).
    bomb = ico_holding(black_png(12000, 12000))
    with pytest.raises(PayloadTooLarge, match="holds a 12000x12000 image"):
        decode_image(bomb, MediaLimits())
    outcome, growth = peak_growth(decode_image, bomb)
    assert outcome == "payload_too_large"
    assert growth < 50, f"peak RSS grew {growth:.0f} MiB"
    assert decode_image(ico_holding(black_png(48, 32)), MediaLimits()).size == (48, 32)


def test_a_video_whose_first_frame_is_12000x12000_is_not_decoded_by_probing() -> None:
    # The fifth request: FFmpeg's stream probing decoded the 864 MB first frame before any check.
    video = png_mov([black_png(12000, 12000, depth=16), black_png(64, 64, depth=16)], (12000, 12000))
    outcome, growth = peak_growth(decode_video, video)
    assert outcome in ("payload_too_large", "undecodable_input")
    assert growth < 50, f"peak RSS grew {growth:.0f} MiB"


def test_only_the_codecs_the_readme_names_are_decoded() -> None:
    # PNG-in-MOV is a real format FFmpeg decodes; the README's video codecs are H.264, H.265, VP8, VP9, AV1.
    with pytest.raises(UndecodableInput, match="'png' codec is not accepted"):
        decode_video(png_mov([black_png(64, 64, depth=16)], (64, 64)), MediaLimits())


@pytest.mark.parametrize(
    ("modality", "model", "inputs", "code"),
    [
        (Modality.VIDEO, "videomae", lambda: {"frames": [b64(png(4096, 4096))] * 32}, "payload_too_large"),
        (Modality.VISION, "vit", lambda: {"image": b64(progressive_jpeg(1024, 3000))}, "payload_too_large"),
        (
            Modality.AUDIO,
            "wav2vec2",
            lambda: {"audio": b64(vorbis_claiming(300, 2_000_000_000))},
            "payload_too_large",
        ),
        (
            Modality.VISION,
            "vit",
            lambda: {"image": b64(ico_holding(black_png(12000, 12000)))},
            "payload_too_large",
        ),
        (
            Modality.VIDEO,
            "videomae",
            lambda: {"video": b64(png_mov([black_png(12000, 12000, depth=16)], (12000, 12000)))},
            "undecodable_input",  # PNG is no codec the README names; probing does not decode the frame
        ),
    ],
    ids=["frames", "jpeg-scans", "vorbis-2ghz", "ico", "mov"],
)
def test_each_hostile_request_is_answered_with_a_typed_error_within_5_s(
    intake: Intake, modality: Modality, model: str, inputs: Callable[[], dict[str, Any]], code: str
) -> None:
    """The worker's own intake, its media decoded in decoder processes (the default)."""
    body = json.dumps({"id": "hostile", "model": model, "inputs": inputs()}).encode()
    topic = f"inference.{modality.value}.requests"
    origin = Origin(
        modality, TopicPartition(topic, 0), 0, f"inference.{modality.value}.results", "c", body, 0
    )
    start = time.monotonic()
    outcome = intake.prepare(origin)
    assert time.monotonic() - start < 5
    assert isinstance(outcome, Outgoing) and outcome.error is not None
    assert outcome.error.code.value == code, outcome.error.message


def test_audio_that_changes_format_mid_stream_is_undecodable_not_internal() -> None:
    # Two FLAC files back to back: the second's frames come at another rate and layout (a ValueError before).
    data = encode_audio("flac", 44_100, 2, seconds=0.5) + encode_audio("flac", 22_050, 1, seconds=0.5)
    with pytest.raises(UndecodableInput, match="changes format mid-stream"):
        decode_audio(data, MediaLimits())


def test_a_later_frame_larger_than_the_header_says_is_refused_by_the_decoder_itself() -> None:
    # VP8 keyframes carry their own size: a 64x64 header, then 640x480 frames. FFmpeg's max_pixels refuses
    # them before allocating; before, the frame was decoded and only then compared with the limit.
    video = decode_video(webm_growing((64, 64), (640, 480)), MediaLimits(max_video_pixels=64 * 64 * 2))
    assert video.clip.total_frames == 4
    with pytest.raises(UndecodableInput, match="holds a frame over 8192 pixels"):
        video.clip.frames([0, 1, 2, 3])
