"""What decoding in a decoder process costs beside decoding in process, per file.

``python -m bench.isolation``: each file decoded ``--rounds`` times both ways, in turns, one at a time;
prints the median wall time of each, the difference, and the idle RSS of one decoder process.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import statistics
import time
from collections.abc import Callable

import av
import numpy as np
from PIL import Image

from bench.procstats import rss_mib
from worker.serving.decoding import InProcess, MediaDecoder
from worker.serving.media_limits import MediaLimits
from worker.serving.sandbox import Budget, DecoderPool


def _jpeg(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    # A smooth gradient with noise: a photo's size on disk, not a flat colour's.
    base = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _mp3(seconds: float, rate: int = 44_100) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=rate, layout="stereo")
        t = np.arange(int(rate * seconds)) / rate
        wave = np.tile((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), (2, 1))
        frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = rate, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()


def _medians_ms(calls: tuple[Callable[[], object], ...], rounds: int) -> list[float]:
    """Median wall time of each call, the calls taking turns so that load from elsewhere falls on each alike."""
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for call, spent in zip(calls, times, strict=True):
            start = time.perf_counter()
            call()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) * 1000 for spent in times]


def _decode(where: MediaDecoder, kind: str, data: bytes, limits: MediaLimits) -> Callable[[], object]:
    if kind == "image":
        return lambda: where.image(data, "image", limits.max_image_pixels)
    return lambda: where.audio(data)


def main() -> None:
    """Print one row per file: in-process and decoder-process medians (ms) and the difference."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    rounds = parser.parse_args().rounds
    limits = MediaLimits()
    here = InProcess(limits)
    pool = DecoderPool(limits, processes=1, budget=Budget(cpu_seconds=5.0, memory_mib=768))
    files: dict[str, tuple[str, bytes]] = {
        "JPEG 224x224": ("image", _jpeg(224, 224)),
        "JPEG 640x480": ("image", _jpeg(640, 480)),
        "JPEG 1920x1080": ("image", _jpeg(1920, 1080)),
        "MP3 5 s 44.1 kHz stereo": ("audio", _mp3(5.0)),
        "MP3 30 s 44.1 kHz stereo": ("audio", _mp3(30.0)),
    }
    pool.image(files["JPEG 224x224"][1], "image", limits.max_image_pixels)  # started and warm
    (decoder,) = [child for child in multiprocessing.active_children() if child.name == "decoder"]
    print(f"decoder process RSS after one decode: {rss_mib(decoder.pid or 0):.0f} MiB")
    print(
        "| file | bytes | in process (ms) | decoder process (ms) | difference (ms) |\n|---|---|---|---|---|"
    )
    for name, (kind, data) in files.items():
        local, remote = _medians_ms(
            (_decode(here, kind, data, limits), _decode(pool, kind, data, limits)), rounds
        )
        print(f"| {name} | {len(data)} | {local:.2f} | {remote:.2f} | {remote - local:+.2f} |")
    pool.close()


if __name__ == "__main__":
    main()
