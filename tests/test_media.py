"""Files people have: audio in any format FFmpeg reads, video files, images in every Pillow mode.

Media are made by the tests (tests/media_files.py), so every expected value is known by
construction: a 440 Hz tone of amplitude 0.5, frame i of a clip painted grey level 4*i, image
colours chosen here. Model answers are compared with an independent path (see each test).
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.signal
from PIL import Image
from transformers.image_utils import load_image

from schemas import Modality, RequestRejected, parse_request
from schemas.errors import InferenceError
from tests.kafka_support import b64, request_bytes
from tests.media_files import (
    AUDIO_FORMATS,
    CLIP_FPS,
    TONE_AMPLITUDE,
    TONE_HZ,
    audio_read_directly,
    encode_audio,
    frames_read_directly,
    mp4_clip,
    tone,
    webm_clip,
)
from tests.references import TINY
from worker import pipeline
from worker.errors import PayloadTooLarge, UndecodableInput
from worker.serving.audio_files import resample
from worker.serving.decoding import decode_audio, decode_image, decode_inputs, decode_video
from worker.serving.frame_sampling import pipeline_indices, uniform_indices
from worker.serving.inputs import AudioInput
from worker.serving.media_limits import MediaLimits
from worker.serving.preprocessors.video import VideoPreprocessor
from worker.serving.registry import load_model

RATES = (8_000, 16_000, 22_050, 44_100, 48_000)
#: Opus exists only at 8/12/16/24/48 kHz (the codec's own rates) and always decodes at 48 kHz;
#: the Vorbis encoder in PyAV's FFmpeg takes stereo only. Other combinations cannot be made.
AUDIO_CASES = [
    (name, rate, channels)
    for name, (_, codec) in AUDIO_FORMATS.items()
    for rate in RATES
    for channels in (1, 2)
    if not ("opus" in codec and rate in (22_050, 44_100)) and not (codec == "vorbis" and channels == 1)
]


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


@pytest.mark.parametrize(("name", "rate", "channels"), AUDIO_CASES, ids=lambda v: str(v))
def test_a_tone_in_each_audio_format_decodes_and_resamples_to_440_hz(
    name: str, rate: int, channels: int
) -> None:
    array, decoded_rate = decode_audio(encode_audio(name, rate, channels), MediaLimits())
    assert decoded_rate == (48_000 if "opus" in name else rate)
    # Lossy encoders add priming/padding: AAC up to 2048 samples at 8 kHz, hence the loose bound.
    assert 0.95 <= len(array) / decoded_rate <= 1.3
    at_16k = resample(array, decoded_rate, 16_000)
    assert len(at_16k) == pytest.approx(len(array) * 16_000 / decoded_rate, abs=2)
    middle = at_16k[len(at_16k) // 4 : 3 * len(at_16k) // 4]  # clear of encoder fades and filter edges
    assert dominant_hz(middle, 16_000) == pytest.approx(TONE_HZ, abs=4)
    rms = float(np.sqrt(np.mean(middle**2)))
    assert rms == pytest.approx(TONE_AMPLITUDE / np.sqrt(2), rel=0.15)


def test_an_array_at_another_rate_is_resampled_not_refused() -> None:
    model = load_model(TINY / "wav2vec2")
    prepared = model.prepare(AudioInput(tone(8_000)[0, :800], 8_000))  # 0.1 s at 8 kHz
    assert int(prepared.arrays["attention_mask"].sum()) == 1_600  # 0.1 s at the model's 16 kHz


def test_audio_shorter_than_one_sample_at_the_model_rate_is_undecodable() -> None:
    with pytest.raises(UndecodableInput, match="shorter"):
        load_model(TINY / "wav2vec2").prepare(AudioInput(np.ones(1, dtype=np.float32), 48_000))


def test_audio_over_the_duration_limit_is_payload_too_large_once_decoded() -> None:
    mp3 = encode_audio("mp3", 44_100, 2, seconds=2.0)
    with pytest.raises(PayloadTooLarge, match="limit"):
        decode_audio(mp3, MediaLimits(max_audio_seconds=1.5))
    assert len(decode_audio(mp3, MediaLimits(max_audio_seconds=2.5))[0]) >= 2 * 44_100


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00" * 300, "container"),
        (b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n", "container"),  # a playlist never opens what it names
        (b"OggS" + bytes(200), "container"),
        ("mp4", "no audio stream"),  # an MP4 clip with video only
        ("unknown codec", "codec"),  # a WAV whose format tag names no codec FFmpeg knows
    ],
)
def test_unreadable_audio_is_undecodable_naming_why(data: bytes | str, reason: str) -> None:
    if data == "mp4":
        data = mp4_clip(frames=4)
    elif data == "unknown codec":
        wav = bytearray(encode_audio("wav", 16_000, 1))
        wav[20:22] = (0x1234).to_bytes(2, "little")  # the fmt chunk's format tag (1 = PCM)
        data = bytes(wav)
    assert isinstance(data, bytes)
    with pytest.raises(UndecodableInput, match=reason):
        decode_audio(data, MediaLimits())


def test_a_truncated_audio_file_answers_with_a_typed_error_or_its_readable_part() -> None:
    flac = encode_audio("flac", 16_000, 1)
    for cut in (10, 100, len(flac) // 2):
        try:
            array, _ = decode_audio(flac[:cut], MediaLimits())
        except InferenceError as error:
            assert isinstance(error, UndecodableInput)
        else:
            assert 0 < len(array) < 16_000


def resampled_independently(data: bytes, target: int) -> np.ndarray:
    """The reference input: decoded and averaged here, resampled with scipy's polyphase filter (not soxr)."""
    samples, rate = audio_read_directly(data)
    assert rate == 44_100
    return scipy.signal.resample_poly(samples, target // 100, rate // 100).astype(np.float32)


@pytest.mark.parametrize("name", ["wav2vec2", "whisper-encoder"])
def test_a_44k_stereo_mp3_answers_like_the_same_audio_resampled_by_scipy(name: str) -> None:
    """Parity: the worker's decode (worker/serving/media.py) and soxr resampling vs the test's own decode and
    scipy's resample_poly, both fed to the same model; the ONNX model's answers on arrays at 16 kHz are
    pinned against PyTorch elsewhere (tests/test_reference_live.py) and live in test_media_live.py."""
    mp3 = encode_audio("mp3", 44_100, 2)
    classify = pipeline(model=TINY / name)
    got = classify(mp3, top_k=None)
    want = classify({"array": resampled_independently(mp3, 16_000), "sampling_rate": 16_000}, top_k=None)
    assert [r["label"] for r in got] == [r["label"] for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=1e-3)


# --- video --------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [mp4_clip, webm_clip], ids=["mp4-h264", "webm-vp9"])
def test_a_2_s_clip_is_probed_without_decoding_and_frames_come_by_index(make: Any) -> None:
    video = decode_video(make(), MediaLimits())
    assert (video.clip.total_frames, video.clip.fps) == (2 * CLIP_FPS, CLIP_FPS)
    assert (video.clip.width, video.clip.height) == (64, 48)
    frames = video.clip.frames([0, 30, 59, 75])  # past the end: the last frame again
    levels = [float(np.asarray(frame).mean()) for frame in frames]
    assert levels == pytest.approx([0, 120, 236, 236], abs=4)  # frame i is grey 4*i (lossy: +-4)


def test_frame_sampling_follows_transformers() -> None:
    # VideoClassificationPipeline.preprocess: np.linspace(0, n * rate - 1, num=n, dtype=np.int64).
    assert pipeline_indices(4) == [0, 1, 2, 3]
    assert pipeline_indices(4, frame_sampling_rate=2) == [0, 2, 4, 7]
    # BaseVideoProcessor's default_sample_indices_fn: np.arange(n) * total // n.
    assert uniform_indices(60, 4) == [0, 15, 30, 45]
    assert uniform_indices(3, 4) == [0, 1, 2, 2]  # transformers refuses this; the worker repeats the last


def test_videomae_reads_a_file_as_the_transformers_pipeline_does() -> None:
    """VideoMAE has an image processor only, so the pipeline reads the clip's first num_frames frames."""
    model = load_model(TINY / "videomae")
    processor = model.preprocessor
    assert isinstance(processor, VideoPreprocessor)
    assert processor.clip_indices(decode_video(mp4_clip(), MediaLimits()).clip) == [0, 1, 2, 3]


@pytest.mark.parametrize("make", [mp4_clip, webm_clip], ids=["mp4-h264", "webm-vp9"])
def test_a_video_file_answers_like_its_frames_read_by_the_test(make: Any) -> None:
    """The frames path is pinned against PyTorch (tests/test_reference_live.py); here the file path must
    give the same answer as the four frames the pipeline would read, decoded by the test with PyAV."""
    clip = make()
    classify = pipeline(model=TINY / "videomae")
    frames = [Image.fromarray(array) for array in frames_read_directly(clip, 4)]
    got, want = classify(clip, top_k=None), classify(frames, top_k=None)
    assert [r["label"] for r in got] == [r["label"] for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=1e-6)


def test_video_limits_are_checked_from_the_container_before_decoding() -> None:
    clip = mp4_clip()
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode_video(clip, MediaLimits(max_video_pixels=64 * 47))
    with pytest.raises(PayloadTooLarge, match="s; the limit"):
        decode_video(clip, MediaLimits(max_video_seconds=1.5))
    with pytest.raises(PayloadTooLarge, match="frames"):
        decode_video(clip, MediaLimits(max_video_frames_decoded=59))
    assert decode_video(clip, MediaLimits(max_video_frames_decoded=60)).clip.total_frames == 60


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00" * 300, "container"),
        (b"#EXTM3U\n#EXTINF:1,\nclip.mp4\n", "container"),
        ("m4a", "no video stream"),  # an MP4 container holding audio only
        ("half", "container|corrupt|no frames|no decodable"),
    ],
)
def test_unreadable_video_is_undecodable_naming_why(data: bytes | str, reason: str) -> None:
    if data == "m4a":
        data = encode_audio("m4a-aac", 16_000, 1)
    elif data == "half":
        clip = mp4_clip()
        data = clip[: len(clip) // 2]  # the MP4 index (moov) is written last: gone
    assert isinstance(data, bytes)
    with pytest.raises(UndecodableInput, match=reason):
        video = decode_video(data, MediaLimits())
        video.clip.frames([0, 1, 2, 3])


# --- images -------------------------------------------------------------------------------


def encoded(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def palette_image() -> Image.Image:
    image = Image.new("P", (6, 4))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    image.paste(1, (3, 0, 6, 4))  # left half red (index 0), right half blue (index 1)
    image.info["transparency"] = 1
    return image


IMAGE_MODES = {
    "palette+transparency": lambda: encoded(palette_image()),
    "rgba": lambda: encoded(Image.new("RGBA", (6, 4), (10, 200, 30, 90))),
    "greyscale": lambda: encoded(Image.new("L", (6, 4), 77)),
    "greyscale+alpha": lambda: encoded(Image.new("LA", (6, 4), (77, 10))),
    "1-bit": lambda: encoded(Image.new("1", (6, 4), 1)),
    "16-bit greyscale": lambda: encoded(Image.new("I;16", (6, 4), 40_000)),
    "cmyk-jpeg": lambda: encoded(Image.new("CMYK", (6, 4), (0, 255, 255, 0)), "JPEG", quality=100),
    "cmyk-tiff": lambda: encoded(Image.new("CMYK", (6, 4), (0, 255, 255, 0)), "TIFF"),
    "bmp": lambda: encoded(Image.new("RGB", (6, 4), (1, 2, 3)), "BMP"),
    "webp": lambda: encoded(Image.new("RGB", (6, 4), (1, 2, 3)), "WEBP", lossless=True),
}


@pytest.mark.parametrize("make", list(IMAGE_MODES.values()), ids=list(IMAGE_MODES))
def test_each_image_mode_converts_as_transformers_load_image(make: Any) -> None:
    data = make()
    got = decode_image(data, MediaLimits())
    want = load_image(Image.open(io.BytesIO(data)))  # transformers.image_utils: the pipelines' loader
    assert got.mode == "RGB"
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (4, 2), (255, 0, 0))
    image.paste((0, 0, 255), (2, 0, 4, 2))  # stored: left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    got = decode_image(encoded(image, exif=exif), MediaLimits())
    assert got.size == (2, 4)
    pixels = np.asarray(got)
    assert tuple(pixels[0, 0]) == (255, 0, 0) and tuple(pixels[3, 0]) == (0, 0, 255)  # red on top


@pytest.mark.parametrize(("fmt", "options"), [("GIF", {}), ("WEBP", {"lossless": True})])
def test_an_animated_image_gives_its_first_frame(fmt: str, options: dict[str, Any]) -> None:
    first, second = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    data = encoded(first, fmt, save_all=True, append_images=[second], duration=100, loop=0, **options)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    got = np.asarray(decode_image(data, MediaLimits()))
    assert {tuple(p) for p in got.reshape(-1, 3)} == {(255, 0, 0)}


# --- the wire format and the in-process entry point -----------------------------------------


@pytest.mark.parametrize(
    ("modality", "inputs"),
    [
        (Modality.AUDIO, {"audio": b64(encode_audio("opus", 48_000, 2))}),
        (Modality.AUDIO, {"array": tone(44_100)[0, :441].tolist(), "sampling_rate": 44_100}),
        (Modality.VIDEO, {"video": b64(mp4_clip(frames=8))}),
        (Modality.VISION, {"image": b64(IMAGE_MODES["webp"]())}),
        (Modality.VISION, {"image": b64(encoded(Image.new("RGB", (2, 2)), "GIF"))}),
    ],
)
def test_the_new_inputs_parse_and_decode(modality: Modality, inputs: dict[str, Any]) -> None:
    request = parse_request(request_bytes("r1", "m", inputs), modality)
    assert decode_inputs(request, MediaLimits()) is not None


def test_an_empty_video_file_is_undecodable_on_the_wire() -> None:
    with pytest.raises(RequestRejected) as caught:
        parse_request(request_bytes("r1", "m", {"video": ""}), Modality.VIDEO)
    assert caught.value.code.value == "undecodable_input"


def test_pipeline_takes_a_path_bytes_or_an_array_and_rate(tmp_path: Any) -> None:
    mp3 = encode_audio("mp3", 44_100, 2)
    (tmp_path / "tone.mp3").write_bytes(mp3)
    classify = pipeline(model=TINY / "wav2vec2")
    from_path, from_bytes = classify(str(tmp_path / "tone.mp3")), classify(mp3)
    assert from_path == from_bytes
    array, rate = decode_audio(mp3, MediaLimits())
    assert classify({"array": array, "sampling_rate": rate}) == from_bytes
    assert classify(array, sampling_rate=rate) == from_bytes
    clip = mp4_clip(frames=8)
    (tmp_path / "clip.mp4").write_bytes(clip)
    video = pipeline(model=TINY / "videomae")
    assert video(tmp_path / "clip.mp4") == video(clip)
    assert len(video([clip, clip])) == 2  # a list of files is a batch


def test_the_exported_json_schemas_describe_the_file_inputs() -> None:
    folder = Path(__file__).resolve().parent.parent / "schemas" / "json"
    video = json.loads((folder / "request.video.schema.json").read_text())
    audio = json.loads((folder / "request.audio.schema.json").read_text())
    video_file = video["$defs"]["VideoFileInputs"]["properties"]["video"]
    assert video_file["contentMediaType"] == "video/*" and video_file["contentEncoding"] == "base64"
    assert audio["$defs"]["AudioFileInputs"]["properties"]["audio"]["contentMediaType"] == "audio/*"
    assert '"VideoFileInputs"' in (folder / "asyncapi.json").read_text()


def test_a_folder_with_a_video_processor_samples_across_the_whole_clip(tmp_path: Path) -> None:
    """Which rule applies follows the folder, as in transformers: a video_preprocessor_config.json means a
    video processor, which samples arange(n) * total // n. (Video processors need torch and torchvision,
    so the worker's torch-free runtime cannot load one; the rule is pinned here with the image processor.)"""
    folder = tmp_path / "videomae"
    shutil.copytree(TINY / "videomae", folder)
    (folder / "video_preprocessor_config.json").write_text("{}")
    original = load_model(TINY / "videomae").preprocessor
    assert isinstance(original, VideoPreprocessor)
    metadata = dataclasses.replace(original.metadata, folder=folder)
    processor = VideoPreprocessor(metadata, original.video_processor)
    assert processor.clip_indices(decode_video(mp4_clip(), MediaLimits()).clip) == [0, 15, 30, 45]
