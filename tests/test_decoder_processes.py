"""Decoder processes: a decode over its CPU or memory budget costs only itself, never the worker."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from tests.media_files import encode_audio, mp4_clip, progressive_jpeg
from worker.errors import PayloadTooLarge, UndecodableInput
from worker.serving.decoding import InProcess
from worker.serving.media_limits import MediaLimits
from worker.serving.sandbox import Budget, DecoderPool
from worker.serving.video_files import read_frames


def photo(width: int, height: int) -> bytes:
    """A PNG of noise: it compresses badly, so Pillow really allocates its pixels."""
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


@pytest.fixture
def pool() -> Iterator[DecoderPool]:
    limits = MediaLimits(max_jpeg_scans=100_000)  # the scan count alone would refuse the CPU test's file
    pool = DecoderPool(limits, processes=1, budget=Budget(cpu_seconds=1.0, memory_mib=96))
    yield pool
    pool.close()


def test_a_decoder_process_answers_what_decoding_in_process_answers(pool: DecoderPool) -> None:
    here = InProcess(pool.limits)
    image = photo(64, 48)
    assert np.array_equal(
        np.asarray(pool.image(image, "image", 10_000)), np.asarray(here.image(image, "image", 10_000))
    )
    mp3 = encode_audio("mp3", 44_100, 2, seconds=0.5)
    (got, got_rate), (want, want_rate) = pool.audio(mp3), here.audio(mp3)
    assert got_rate == want_rate == 44_100
    assert np.array_equal(got, want)
    clip = pool.video(mp4_clip(frames=6))
    assert (clip.total_frames, clip.width, clip.height) == (6, 64, 48)
    with pytest.raises(PayloadTooLarge, match="64x48 pixels; the limit is 100"):
        pool.image(image, "image", 100)  # a typed error crosses the pipe as its code and message


def test_a_decode_over_its_cpu_budget_is_stopped_and_the_next_one_is_answered(pool: DecoderPool) -> None:
    # 1024x1024 with 6,000 scans: about 3.4 s of CPU (0.57 ms a scan measured here), over the 1 s budget
    # even as RLIMIT_CPU rounds it up to the next whole second (at most 2 s after what the process used).
    # Killed by the kernel at that second, or by the pool after 3 s of wall time on a loaded machine.
    with pytest.raises(PayloadTooLarge, match=r"more than (its 1 CPU seconds|3 s)"):
        pool.image(progressive_jpeg(1024, 6000), "image", 1024 * 1024)
    assert pool.breaches == 1
    assert pool.image(photo(8, 8), "image", 64).size == (8, 8)  # a fresh process took its place


def test_a_decode_over_its_memory_budget_is_refused_and_the_next_one_is_answered(pool: DecoderPool) -> None:
    # 4096x4096 RGB is 48 MiB decoded, and as much again converted and copied out: over 96 MiB.
    with pytest.raises((PayloadTooLarge, UndecodableInput), match=r"96 MiB budget|corrupt"):
        pool.image(photo(4096, 4096), "image", 4096 * 4096)
    assert pool.image(photo(8, 8), "image", 64).size == (8, 8)


def test_a_video_files_frames_are_decoded_in_the_decoder_process_as_here(pool: DecoderPool) -> None:
    data = mp4_clip(frames=12)
    clip = pool.video(data)
    assert clip.reader is not None
    got = [np.asarray(frame) for frame in clip.frames([0, 5, 11, 20])]
    want = [np.asarray(frame) for frame in read_frames(data, [0, 5, 11, 20], pool.limits.av)]
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    assert np.array_equal(got[2], got[3])  # past the end: the last frame
