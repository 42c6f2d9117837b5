"""Fuzzing the media decoders over mutated real files.

Seeds are real files of each format the worker reads (WAV, MP3, FLAC, Ogg, MP4, WebM, PNG, JPEG,
GIF, ICO, TIFF), made here with PyAV and Pillow. Hypothesis flips, inserts, deletes, duplicates
and cuts their bytes; each mutant is decoded as the worker does it, in a decoder process under a
CPU and memory cap (2 CPU s, 256 MiB), then a video's frames in process. Invariant: an answer
within the limits or one of the project's typed errors, never another exception, never a cap hit.

``make test`` runs MEDIA_FUZZ_EXAMPLES examples (default 300: about 4 s here, 5,000 about 15 s); a longer run:
``MEDIA_FUZZ_EXAMPLES=20000 python -m pytest tests/test_media_fuzz.py -q -s`` (figures printed).
"""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from schemas.errors import InferenceError
from tests.media_files import encode_audio, encode_clip, mp4_clip
from worker.serving.frame_sampling import uniform_indices
from worker.serving.media_limits import MediaLimits
from worker.serving.sandbox import Budget, DecoderPool

EXAMPLES = int(os.environ.get("MEDIA_FUZZ_EXAMPLES", "300"))
#: Wall time one mutant may take, decode and frames together (the decoder's own cap is 2 CPU s).
MAX_SECONDS = 10.0


def _image(fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image = Image.linear_gradient("L").resize((40, 30)).convert("RGB")
    if fmt == "GIF":
        frames = [image, image.rotate(90)]
        frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=40)
    else:
        image.save(buffer, format=fmt, **options)  # type: ignore[arg-type]
    return buffer.getvalue()


def _seeds() -> dict[str, tuple[str, bytes]]:
    """Each format's seed: (what decodes it, the file). Encoders: those of the installed PyAV wheel."""
    return {
        "wav": ("audio", encode_audio("wav", 16_000, 1, seconds=0.2)),
        "mp3": ("audio", encode_audio("mp3", 44_100, 2, seconds=0.2)),
        "flac": ("audio", encode_audio("flac", 16_000, 1, seconds=0.2)),
        "ogg": ("audio", encode_audio("ogg-vorbis", 44_100, 2, seconds=0.2)),
        "mp4": ("video", mp4_clip(frames=4)),
        "webm": ("video", encode_clip("webm", "libvpx-vp9", 4)),
        "png": ("image", _image("PNG")),
        "jpeg": ("image", _image("JPEG", progressive=True)),
        "gif": ("image", _image("GIF")),
        "ico": ("image", _image("ICO", sizes=[(16, 16), (32, 32)])),
        "tiff": ("image", _image("TIFF", compression="tiff_lzw")),
    }


SEEDS = _seeds()
LIMITS = MediaLimits()
OUTCOMES: Counter[str] = Counter()


@pytest.fixture(scope="module")
def pool() -> Iterator[DecoderPool]:
    pool = DecoderPool(LIMITS, processes=1, budget=Budget(cpu_seconds=2.0, memory_mib=256))
    yield pool
    pool.close()
    total = sum(OUTCOMES.values())
    print(f"\nmedia fuzz: {total} mutants, {dict(sorted(OUTCOMES.items()))}, cap hits {pool.breaches}")


@st.composite
def mutants(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """A seed with one to four mutations: byte flips, inserts, deletions, a duplicated span, a cut."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    kind, data = SEEDS[name]
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "duplicate", "cut"]))
        if op == "flip" and at < len(raw):
            raw[at] = draw(st.integers(0, 255))
        elif op == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del raw[at : at + draw(st.integers(1, 64))]
        elif op == "duplicate":
            span = bytes(raw[at : at + draw(st.integers(1, 256))])
            raw[at:at] = span * draw(st.integers(1, 8))
        elif op == "cut":
            del raw[at:]
    return name, kind, bytes(raw)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(mutants())
def test_a_mutated_media_file_decodes_within_the_limits_or_is_a_typed_error(
    pool: DecoderPool, mutant: tuple[str, str, bytes]
) -> None:
    name, kind, raw = mutant
    breaches = pool.breaches
    start = time.monotonic()
    try:
        if kind == "image":
            image = pool.image(raw, "image", LIMITS.max_image_pixels)
            assert image.mode == "RGB"
            assert image.width * image.height <= LIMITS.max_image_pixels
        elif kind == "audio":
            array, rate = pool.audio(raw)
            assert array.ndim == 1 and array.dtype.name == "float32"
            assert array.size / rate <= LIMITS.max_audio_seconds
        else:
            clip = pool.video(raw)
            assert 0 < clip.total_frames <= LIMITS.max_video_frames_decoded
            frames = clip.frames(uniform_indices(clip.total_frames, 4))
            assert all(f.width * f.height <= LIMITS.max_video_pixels for f in frames)
        OUTCOMES[f"{name} ok"] += 1
    except InferenceError as exc:
        OUTCOMES[f"{name} {exc.code.value}"] += 1
    assert pool.breaches == breaches, f"a {name} mutant hit the decoder's CPU or memory cap"
    assert time.monotonic() - start < MAX_SECONDS
