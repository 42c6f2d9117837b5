"""Metadata resolution: what the worker works out from a model folder, and where each field came from.

The six tiny models are real exports; every other folder is a small real ONNX graph written into
tmp_path with the input/output names and dims of a real export, plus the Hugging Face files the
case needs. ONNX Runtime itself reads every graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from schemas.requests import Modality
from tests.documented import BATCH_SIZES, SEQUENCE_LENGTHS
from tests.onnx_graphs import Cross, Dim, Output, PerToken, Pooled, write_onnx
from worker.serving.budget import batch_limit
from worker.serving.metadata import (
    DimRole,
    MetadataError,
    ProcessorKind,
    Source,
    load_metadata,
)

TINY = Path(__file__).resolve().parent.parent / "models" / "tiny"

TEXT_INPUTS: dict[str, tuple[Dim, ...]] = {
    "input_ids": ("batch", "sequence"),
    "attention_mask": ("batch", "sequence"),
    "token_type_ids": ("batch", "sequence"),
}
CLIP_INPUTS: dict[str, tuple[Dim, ...]] = {
    "input_ids": ("text_batch", "sequence"),
    "attention_mask": ("text_batch", "sequence"),
    "pixel_values": ("image_batch", 3, 224, 224),
}
CLIP_OUTPUTS: dict[str, Output] = {
    "logits_per_image": Cross(rows="pixel_values", cols="input_ids"),
    "logits_per_text": Cross(rows="input_ids", cols="pixel_values"),
    "text_embeds": Pooled(16, source="input_ids"),
    "image_embeds": Pooled(16, source="pixel_values"),
}


# --- folder builders ----------------------------------------------------------------------


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def add_tokenizer(folder: Path, **tokenizer_config: Any) -> None:
    """A WordPiece vocab (the file the worker looks for) and, if given, tokenizer_config.json."""
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\nworld\n", encoding="utf-8")
    if tokenizer_config:
        write_json(folder / "tokenizer_config.json", {"tokenizer_class": "BertTokenizer", **tokenizer_config})


def text_model(
    folder: Path,
    inputs: dict[str, tuple[Dim, ...]] = TEXT_INPUTS,
    outputs: dict[str, Output] | None = None,
    props: dict[str, str] | None = None,
) -> Path:
    """A BERT-shaped graph with a tokenizer beside it."""
    write_onnx(folder / "model.onnx", inputs, outputs or {"logits": Pooled(3)}, props)
    add_tokenizer(folder)
    return folder


def image_model(
    folder: Path, pixel_shape: tuple[Dim, ...], props: dict[str, str] | None = None, **preprocessor: Any
) -> Path:
    """A ViT/VideoMAE-shaped graph (``pixel_values`` of this shape) with its preprocessor_config.json."""
    write_onnx(folder / "model.onnx", {"pixel_values": pixel_shape}, {"logits": Pooled(3)}, props)
    write_json(folder / "preprocessor_config.json", {"do_resize": True, **preprocessor})
    return folder


def whisper_encoder(folder: Path, features_shape: tuple[Dim, ...]) -> Path:
    """A Whisper encoder + classification head with the real feature extractor settings."""
    write_onnx(folder / "model.onnx", {"input_features": features_shape}, {"logits": Pooled(3)})
    write_json(
        folder / "preprocessor_config.json",
        {
            "feature_extractor_type": "WhisperFeatureExtractor",
            "feature_size": 80,
            "nb_max_frames": 3000,
            "n_samples": 480000,
            "sampling_rate": 16000,
        },
    )
    return folder


def clip_model(folder: Path, inputs: dict[str, tuple[Dim, ...]] = CLIP_INPUTS) -> Path:
    """A CLIP-shaped graph with a tokenizer and a processor_config.json, as transformers v5 saves it."""
    write_onnx(folder / "model.onnx", inputs, CLIP_OUTPUTS)
    add_tokenizer(folder, model_max_length=77)
    write_json(
        folder / "processor_config.json",
        {
            "processor_class": "CLIPProcessor",
            "image_processor": {
                "image_processor_type": "CLIPImageProcessor",
                "crop_size": {"height": 224, "width": 224},
                "do_center_crop": True,
                "size": {"shortest_edge": 224},
            },
        },
    )
    return folder


def load_error(path: Path, overrides: dict[str, Any] | None = None) -> str:
    """The MetadataError message loading ``path`` raises."""
    with pytest.raises(MetadataError) as raised:
        load_metadata(path, overrides=overrides)
    return str(raised.value)


# --- 1. detection where name heuristics go wrong -------------------------------------------


@pytest.mark.parametrize(
    ("name", "modality", "processor"),
    [
        ("bert", Modality.TEXT, ProcessorKind.TOKENIZER),
        ("vit", Modality.VISION, ProcessorKind.IMAGE_PROCESSOR),
        ("wav2vec2", Modality.AUDIO, ProcessorKind.FEATURE_EXTRACTOR),
        ("whisper-encoder", Modality.AUDIO, ProcessorKind.FEATURE_EXTRACTOR),
        ("videomae", Modality.VIDEO, ProcessorKind.VIDEO_PROCESSOR),
        ("clip", Modality.MULTIMODAL, ProcessorKind.MULTIMODAL_PROCESSOR),
    ],
)
def test_each_tiny_model_resolves_to_its_modality_and_processor_from_the_graph(
    name: str, modality: Modality, processor: ProcessorKind
) -> None:
    meta = load_metadata(TINY / name)

    assert (meta.modality, meta.processor) == (modality, processor)
    assert meta.sources["modality"] is Source.GRAPH
    assert meta.sources["processor"] is Source.GRAPH


@pytest.mark.parametrize("build", ["tiny", "synthetic"])
def test_wav2vec2_waveform_with_attention_mask_is_audio_not_multimodal(tmp_path: Path, build: str) -> None:
    folder = TINY / "wav2vec2"
    if build == "synthetic":
        folder = tmp_path / "wav2vec2-base"
        write_onnx(
            folder / "model.onnx",
            {"input_values": ("batch", "samples"), "attention_mask": ("batch", "samples")},
            {"logits": Pooled(4)},
        )
        write_json(
            folder / "preprocessor_config.json",
            {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "sampling_rate": 16000},
        )

    meta = load_metadata(folder)

    assert meta.modality is Modality.AUDIO
    assert meta.processor is ProcessorKind.FEATURE_EXTRACTOR
    # The mask shares the waveform's dim, so it is samples too, not a token sequence.
    assert meta.dim_roles == {"batch": DimRole.BATCH, "samples": DimRole.SAMPLES}
    assert meta.sequence_lengths is None


@pytest.mark.parametrize("build", ["tiny", "real-size"])
def test_whisper_encoder_features_are_audio_frames_not_samples(tmp_path: Path, build: str) -> None:
    folder = (
        TINY / "whisper-encoder" if build == "tiny" else whisper_encoder(tmp_path / "w", ("batch", 80, 3000))
    )

    meta = load_metadata(folder)

    assert meta.modality is Modality.AUDIO
    assert meta.processor is ProcessorKind.FEATURE_EXTRACTOR
    assert meta.audio_frames == 3000
    assert meta.sources["audio_frames"] is Source.GRAPH
    assert meta.audio_samples is None
    assert DimRole.SAMPLES not in meta.dim_roles.values()
    assert dict(meta.dims) == {"batch": BATCH_SIZES}


def test_whisper_encoder_with_dynamic_mel_and_frame_dims_pins_them_from_the_feature_extractor(
    tmp_path: Path,
) -> None:
    folder = whisper_encoder(tmp_path / "w", ("batch", "feature_size", "encoder_sequence_length"))

    meta = load_metadata(folder)

    assert meta.modality is Modality.AUDIO
    assert meta.dim_roles == {
        "batch": DimRole.BATCH,
        "feature_size": DimRole.MEL_BINS,
        "encoder_sequence_length": DimRole.FRAMES,
    }
    assert meta.dims["feature_size"] == (80,)
    assert meta.dims["encoder_sequence_length"] == (3000,)
    assert (meta.audio_frames, meta.sources["audio_frames"]) == (3000, Source.HF)
    assert meta.audio_samples is None


@pytest.mark.parametrize("build", ["tiny", "real-size"])
def test_videomae_five_dim_pixels_are_video_not_vision(tmp_path: Path, build: str) -> None:
    folder = TINY / "videomae"
    frames, size = 4, (32, 32)
    if build == "real-size":
        folder = image_model(
            tmp_path / "videomae-base",
            ("batch", 16, 3, 224, 224),
            image_processor_type="VideoMAEImageProcessor",
            crop_size={"height": 224, "width": 224},
            size={"shortest_edge": 224},
        )
        frames, size = 16, (224, 224)

    meta = load_metadata(folder)

    assert meta.modality is Modality.VIDEO
    assert meta.processor is ProcessorKind.VIDEO_PROCESSOR
    assert meta.task == "video-classification"
    assert (meta.video_frames, meta.image_size) == (frames, size)


def test_video_with_dynamic_frames_takes_the_clip_length_from_config_json(tmp_path: Path) -> None:
    folder = tmp_path / "videomae"
    write_onnx(
        folder / "model.onnx",
        {"pixel_values_videos": ("batch", "frames", 3, 224, 224)},
        {"logits": Pooled(3)},
    )
    write_json(
        folder / "config.json", {"architectures": ["VideoMAEForVideoClassification"], "num_frames": 16}
    )
    write_json(folder / "video_preprocessor_config.json", {"video_processor_type": "VideoMAEVideoProcessor"})

    meta = load_metadata(folder)

    assert (meta.modality, meta.processor) == (Modality.VIDEO, ProcessorKind.VIDEO_PROCESSOR)
    assert meta.processor_class == "VideoMAEVideoProcessor"
    assert meta.dim_roles["frames"] is DimRole.VIDEO_FRAMES
    assert meta.dims["frames"] == (16,)
    assert (meta.video_frames, meta.sources["video_frames"]) == (16, Source.HF)


@pytest.mark.parametrize("build", ["tiny", "real-size"])
def test_clip_tokens_plus_pixels_are_multimodal_with_a_multimodal_processor(
    tmp_path: Path, build: str
) -> None:
    folder = TINY / "clip" if build == "tiny" else clip_model(tmp_path / "clip-vit-base")

    meta = load_metadata(folder)

    assert meta.modality is Modality.MULTIMODAL
    assert meta.processor is ProcessorKind.MULTIMODAL_PROCESSOR
    assert meta.processor_class == "CLIPProcessor"
    assert meta.task == "zero-shot-image-classification"
    # Texts and images batch independently: two batch dims, each bucketed.
    assert set(meta.batch_dims) == {"text_batch", "image_batch"}


@pytest.mark.parametrize("build", ["tiny", "real-size"])
def test_vit_four_dim_pixels_are_vision_with_an_image_processor(tmp_path: Path, build: str) -> None:
    folder = TINY / "vit"
    size = (32, 32)
    if build == "real-size":
        folder = image_model(
            tmp_path / "vit-base", ("batch", 3, 224, 224), image_processor_type="ViTImageProcessor"
        )
        size = (224, 224)

    meta = load_metadata(folder)

    assert meta.modality is Modality.VISION
    assert meta.processor is ProcessorKind.IMAGE_PROCESSOR
    assert meta.task == "image-classification"
    assert meta.image_size == size
    assert meta.video_frames is None


@pytest.mark.parametrize("build", ["tiny", "synthetic"])
def test_bert_tokens_are_text_with_a_tokenizer(tmp_path: Path, build: str) -> None:
    folder = TINY / "bert" if build == "tiny" else text_model(tmp_path / "bert-base")

    meta = load_metadata(folder)

    assert meta.modality is Modality.TEXT
    assert meta.processor is ProcessorKind.TOKENIZER
    assert meta.task == "text-classification"
    assert meta.dim_roles == {"batch": DimRole.BATCH, "sequence": DimRole.SEQUENCE}


def test_layoutlm_bbox_rides_with_the_tokens_so_the_model_is_text_not_audio(tmp_path: Path) -> None:
    folder = text_model(
        tmp_path / "layoutlm",
        inputs={
            "input_ids": ("batch", "sequence"),
            "bbox": ("batch", "sequence", 4),
            "attention_mask": ("batch", "sequence"),
            "token_type_ids": ("batch", "sequence"),
        },
        outputs={"logits": PerToken(7)},
    )

    meta = load_metadata(folder)

    assert meta.modality is Modality.TEXT
    assert meta.processor is ProcessorKind.TOKENIZER
    assert meta.task == "token-classification"
    assert meta.dim_roles == {"batch": DimRole.BATCH, "sequence": DimRole.SEQUENCE}
    assert meta.audio_samples is None


# --- 2. every source, and the precedence between them ---------------------------------------

LAYERS = ("override", "onnx", "companion", "hf", "bottom")
SOURCE_OF_LAYER: dict[str, Source] = {
    "override": Source.OVERRIDE,
    "onnx": Source.ONNX,
    "companion": Source.COMPANION,
    "hf": Source.HF,
}


@dataclass(frozen=True)
class Layered:
    """One field declared with a different value in every source that can hold it."""

    name: str
    override: Any
    onnx: str  # metadata_props values are strings, as ONNX stores them
    companion: Any
    hf_files: dict[str, dict[str, Any]] | None  # file name -> content; None: no HF file declares it
    expected: dict[str, Any]  # the resolved value when this layer is the highest present
    bottom_source: Source | None  # the source recorded when no layer declares it
    always: dict[str, dict[str, Any]] = field(default_factory=dict)  # files every variant needs


LAYERED = (
    Layered(
        name="task",
        override="fill-mask",
        onnx="token-classification",
        companion="question-answering",
        hf_files={"config.json": {"architectures": ["BertForSequenceClassification"]}},
        expected={
            "override": "fill-mask",
            "onnx": "token-classification",
            "companion": "question-answering",
            "hf": "text-classification",
            "bottom": "feature-extraction",  # the graph's last_hidden_state
        },
        bottom_source=Source.GRAPH,
    ),
    Layered(
        name="labels",
        override=["o0", "o1"],
        onnx='["m0", "m1"]',
        companion={"0": "c0", "1": "c1"},
        hf_files={"config.json": {"id2label": {"1": "h1", "0": "h0"}}},
        expected={
            "override": ("o0", "o1"),
            "onnx": ("m0", "m1"),
            "companion": ("c0", "c1"),
            "hf": ("h0", "h1"),
            "bottom": None,
        },
        bottom_source=None,
    ),
    Layered(
        name="modality",
        override="audio",
        onnx="vision",
        companion="video",
        hf_files=None,
        expected={
            "override": Modality.AUDIO,
            "onnx": Modality.VISION,
            "companion": Modality.VIDEO,
            "bottom": Modality.TEXT,
        },
        bottom_source=Source.GRAPH,
        always={"preprocessor_config.json": {"do_normalize": True}},
    ),
    Layered(
        name="sequence_lengths",
        override=[8],
        onnx="16,32",
        companion=[24, 48],
        hf_files={"tokenizer_config.json": {"model_max_length": 40}},
        expected={
            "override": (8,),
            "onnx": (16, 32),
            "companion": (24, 48),
            "hf": (8, 16, 24, 32, 40),  # the default buckets, capped at the tokenizer's limit
            "bottom": SEQUENCE_LENGTHS,
        },
        bottom_source=Source.DEFAULT,
    ),
    Layered(
        name="batch_sizes",
        override=2,
        onnx="1,4",
        companion=[16, 8],
        hf_files=None,
        expected={"override": (2,), "onnx": (1, 4), "companion": (8, 16), "bottom": BATCH_SIZES},
        bottom_source=Source.DEFAULT,
    ),
)


def folder_declaring(root: Path, case: Layered, present: tuple[str, ...]) -> tuple[Path, dict[str, Any]]:
    """A text model folder where each ``present`` layer declares ``case.name``; returns the overrides."""
    folder = root / f"{case.name}-{present[0]}"
    props = {f"inference.{case.name}": case.onnx} if "onnx" in present else None
    text_model(folder, outputs={"last_hidden_state": PerToken(8)}, props=props)
    for file_name, content in case.always.items():
        write_json(folder / file_name, content)
    if "companion" in present:
        write_json(folder / "inference.json", {case.name: case.companion})
    if "hf" in present and case.hf_files:
        for file_name, content in case.hf_files.items():
            write_json(folder / file_name, content)
    return folder, ({case.name: case.override} if "override" in present else {})


PRECEDENCE_CASES = [
    pytest.param(case, top, id=f"{case.name}-from-{top}")
    for case in LAYERED
    for top in LAYERS
    if top in case.expected
]


@pytest.mark.parametrize(("case", "top"), PRECEDENCE_CASES)
def test_the_highest_source_that_declares_a_field_wins_and_is_recorded(
    tmp_path: Path, case: Layered, top: str
) -> None:
    present = LAYERS[LAYERS.index(top) :]  # this layer and every one below it
    folder, overrides = folder_declaring(tmp_path, case, present)

    meta = load_metadata(folder, overrides=overrides)

    assert getattr(meta, case.name) == case.expected[top]
    expected_source = SOURCE_OF_LAYER.get(top, case.bottom_source)
    assert meta.sources.get(case.name) is expected_source


def test_a_declared_modality_brings_its_processor_kind(tmp_path: Path) -> None:
    folder = text_model(tmp_path / "m", outputs={"last_hidden_state": PerToken(8)})
    write_json(folder / "preprocessor_config.json", {"do_normalize": True})

    meta = load_metadata(folder, overrides={"modality": "audio"})

    assert meta.processor is ProcessorKind.FEATURE_EXTRACTOR


def test_a_dim_the_graph_fixes_beats_the_resize_in_preprocessor_config(tmp_path: Path) -> None:
    folder = image_model(tmp_path / "vit", ("batch", 3, 32, 32), size={"height": 224, "width": 224})

    meta = load_metadata(folder)

    assert meta.image_size == (32, 32)
    assert meta.sources["image_size"] is Source.GRAPH


@pytest.mark.parametrize(
    ("key", "raw", "attribute", "expected"),
    [
        ("batch_sizes", "1,4", "batch_sizes", (1, 4)),
        ("batch_sizes", " 4, 1 ", "batch_sizes", (1, 4)),
        ("batch_sizes", "[4, 1]", "batch_sizes", (1, 4)),
        ("batch_sizes", "8", "batch_sizes", (8,)),
        ("sequence_lengths", "64,16", "sequence_lengths", (16, 64)),
        ("labels", '{"1": "dog", "0": "cat"}', "labels", ("cat", "dog")),
        ("normalize", "true", "normalize", True),
        ("task", "feature-extraction", "task", "feature-extraction"),
    ],
)
def test_metadata_props_strings_decode_as_json_or_comma_lists(
    tmp_path: Path, key: str, raw: str, attribute: str, expected: Any
) -> None:
    folder = text_model(tmp_path / "m", props={f"inference.{key}": raw})

    meta = load_metadata(folder)

    assert getattr(meta, attribute) == expected
    assert meta.sources[key] is Source.ONNX
    assert meta.onnx_metadata == {f"inference.{key}": raw}


@pytest.mark.parametrize(
    ("raw", "expected"), [("224", (224, 224)), ("224x160", (224, 160)), ("[224, 160]", (224, 160))]
)
def test_declared_image_size_pins_dynamic_height_and_width(
    tmp_path: Path, raw: str, expected: tuple[int, int]
) -> None:
    folder = image_model(
        tmp_path / "vit", ("batch", 3, "height", "width"), props={"inference.image_size": raw}
    )

    meta = load_metadata(folder)

    assert meta.image_size == expected
    assert (meta.dims["height"], meta.dims["width"]) == ((expected[0],), (expected[1],))


def test_preprocessor_size_pins_dynamic_height_and_width(tmp_path: Path) -> None:
    folder = image_model(
        tmp_path / "vit", ("batch", 3, "height", "width"), crop_size={"height": 224, "width": 224}, size=256
    )

    meta = load_metadata(folder)

    assert (meta.image_size, meta.sources["image_size"]) == ((224, 224), Source.HF)
    assert (meta.dims["height"], meta.dims["width"]) == ((224,), (224,))


def test_image_size_nested_in_processor_config_pins_dynamic_pixels(tmp_path: Path) -> None:
    inputs = {**CLIP_INPUTS, "pixel_values": ("image_batch", 3, "height", "width")}
    folder = clip_model(tmp_path / "clip", inputs)

    meta = load_metadata(folder)

    assert meta.image_size == (224, 224)
    assert (meta.dims["height"], meta.dims["width"]) == ((224,), (224,))


# --- 3. dynamic dims become buckets --------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "tokenizer_config", "expected", "source"),
    [
        ({}, {}, SEQUENCE_LENGTHS, Source.DEFAULT),
        ({}, {"model_max_length": 40}, (8, 16, 24, 32, 40), Source.HF),
        ({"max_position_embeddings": 20}, {"model_max_length": 512}, (8, 16, 20), Source.HF),
        ({"max_position_embeddings": 512}, {"model_max_length": 512}, SEQUENCE_LENGTHS, Source.HF),
        ({}, {"model_max_length": 6}, (6,), Source.HF),
        # transformers writes VERY_LARGE_INTEGER when a tokenizer has no limit of its own
        ({}, {"model_max_length": 1000000000000000019884624838656}, SEQUENCE_LENGTHS, Source.DEFAULT),
    ],
    ids=["no-limit", "tokenizer-40", "positions-20", "limit-512", "tokenizer-6", "very-large-integer"],
)
def test_dynamic_sequence_gets_default_buckets_capped_by_the_model_limit(
    tmp_path: Path,
    config: dict[str, Any],
    tokenizer_config: dict[str, Any],
    expected: tuple[int, ...],
    source: Source,
) -> None:
    folder = text_model(tmp_path / "m")
    if config:
        write_json(folder / "config.json", config)
    if tokenizer_config:
        write_json(folder / "tokenizer_config.json", tokenizer_config)

    meta = load_metadata(folder)

    assert meta.dims["sequence"] == expected
    assert meta.sequence_lengths == expected
    assert meta.sources["sequence_lengths"] is source
    assert meta.dims["batch"] == BATCH_SIZES


@pytest.mark.parametrize(
    ("sequence", "max_rows", "max_tokens", "expected"),
    [
        (16, 32, 2048, 32),  # 512 tokens: within the budget
        (128, 32, 2048, 16),  # 4,096 tokens: cut to 16 rows
        (128, 32, 1000, 4),  # 7 rows fit: rounded down to the bucket of 4, not padded up to 8
        (128, 20, 4096, 20),  # the budget does not bite: max_rows stands, bucket or not
        (128, 32, 100, 1),  # not even one row fits: still one
    ],
)
def test_the_token_budget_caps_rows_per_sequence_bucket(
    tmp_path: Path, sequence: int, max_rows: int, max_tokens: int, expected: int
) -> None:
    meta = load_metadata(text_model(tmp_path / "m"))
    assert meta.batch_sizes == BATCH_SIZES
    assert batch_limit(meta, (("sequence", sequence),), max_rows, max_tokens) == expected


def test_a_shape_key_without_a_sequence_keeps_max_rows(tmp_path: Path) -> None:
    meta = load_metadata(text_model(tmp_path / "m"))
    assert batch_limit(meta, (), 32, 1) == 32


def test_clip_text_sequence_is_capped_by_the_nested_text_config(tmp_path: Path) -> None:
    folder = clip_model(tmp_path / "clip")
    (folder / "tokenizer_config.json").unlink()
    write_json(
        folder / "config.json",
        {"architectures": ["CLIPModel"], "text_config": {"max_position_embeddings": 40}},
    )

    meta = load_metadata(folder)

    assert meta.sequence_lengths == (8, 16, 24, 32, 40)


def test_declared_sequence_lengths_replace_the_default_buckets(tmp_path: Path) -> None:
    folder = text_model(tmp_path / "m")
    add_tokenizer(folder, model_max_length=512)
    write_json(folder / "inference.json", {"sequence_lengths": [96, 24]})

    meta = load_metadata(folder)

    assert meta.dims["sequence"] == (24, 96)
    assert meta.sources["sequence_lengths"] is Source.COMPANION


def test_buckets_are_the_cartesian_product_of_every_dynamic_dim(tmp_path: Path) -> None:
    folder = text_model(
        tmp_path / "m", props={"inference.batch_sizes": "1,4", "inference.sequence_lengths": "16,32"}
    )

    meta = load_metadata(folder)

    assert meta.buckets() == [
        (("batch", 1), ("sequence", 16)),
        (("batch", 1), ("sequence", 32)),
        (("batch", 4), ("sequence", 16)),
        (("batch", 4), ("sequence", 32)),
    ]


def test_clip_buckets_cover_text_batch_image_batch_and_sequence(tmp_path: Path) -> None:
    folder = clip_model(tmp_path / "clip")
    write_json(folder / "inference.json", {"batch_sizes": [1, 2], "sequence_lengths": [77]})

    meta = load_metadata(folder)

    assert sorted(meta.buckets()) == [
        (("image_batch", i), ("sequence", 77), ("text_batch", t)) for i in (1, 2) for t in (1, 2)
    ]


def test_waveform_samples_get_second_buckets_at_the_declared_sampling_rate(tmp_path: Path) -> None:
    folder = tmp_path / "wav2vec2"
    write_onnx(folder / "model.onnx", {"input_values": ("batch", "samples")}, {"logits": Pooled(4)})
    write_json(folder / "preprocessor_config.json", {"sampling_rate": 8000})

    meta = load_metadata(folder)

    assert meta.audio_samples == (8000, 40000, 80000)  # 1 s, 5 s, 10 s
    assert meta.sampling_rate == 8000


def test_a_fixed_graph_has_one_bucket_and_no_dynamic_dims(tmp_path: Path) -> None:
    folder = text_model(tmp_path / "m", inputs={"input_ids": (1, 128), "attention_mask": (1, 128)})

    meta = load_metadata(folder)

    assert dict(meta.dims) == {}
    assert meta.buckets() == [()]
    assert meta.sequence_lengths is None


def test_a_graph_that_fixes_the_batch_reports_that_batch_size(tmp_path: Path) -> None:
    folder = text_model(
        tmp_path / "m", inputs={"input_ids": (4, "sequence"), "attention_mask": (4, "sequence")}
    )

    meta = load_metadata(folder)

    assert meta.batch_sizes == (4,)


def test_an_unnamed_dynamic_dim_is_refused_naming_the_input(tmp_path: Path) -> None:
    folder = text_model(
        tmp_path / "m", inputs={"input_ids": ("batch", "sequence"), "attention_mask": ("batch", None)}
    )

    message = load_error(folder)

    assert "'attention_mask'" in message
    assert "axis 1" in message
    assert "unnamed" in message


def test_a_named_dim_on_an_axis_the_worker_does_not_know_is_refused_naming_the_input(tmp_path: Path) -> None:
    folder = text_model(
        tmp_path / "m",
        inputs={"input_ids": ("batch", "sequence"), "entity_ids": ("batch", "entity_length")},
    )

    message = load_error(folder)

    assert "'entity_ids'" in message
    assert "'entity_length'" in message


def test_a_dynamic_image_size_with_no_value_anywhere_is_refused_naming_the_dim(tmp_path: Path) -> None:
    folder = image_model(tmp_path / "vit", ("batch", 3, "height", "width"))

    message = load_error(folder)

    assert str(folder / "model.onnx") in message
    assert "'height'" in message


# --- 4. bad folders ----------------------------------------------------------------------


def test_a_folder_without_an_onnx_file_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    write_json(folder / "config.json", {"architectures": ["BertModel"]})

    message = load_error(folder)

    assert str(folder) in message
    assert ".onnx" in message


def test_a_missing_path_is_refused_naming_it(tmp_path: Path) -> None:
    message = load_error(tmp_path / "nowhere")

    assert str(tmp_path / "nowhere") in message


def test_several_onnx_files_without_a_model_onnx_are_refused_naming_them(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    write_onnx(folder / "encoder.onnx", TEXT_INPUTS, {"logits": Pooled(3)})
    write_onnx(folder / "decoder.onnx", TEXT_INPUTS, {"logits": Pooled(3)})
    add_tokenizer(folder)

    message = load_error(folder)

    assert "encoder.onnx" in message
    assert "decoder.onnx" in message


def test_a_single_onnx_file_with_any_name_is_found(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    write_onnx(folder / "encoder.onnx", TEXT_INPUTS, {"logits": Pooled(3)})
    add_tokenizer(folder)

    meta = load_metadata(folder)

    assert meta.onnx_path == folder / "encoder.onnx"
    assert meta.name == "m"


def test_a_corrupt_onnx_file_is_refused_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"\x08\x07not a protobuf at all\xff\xfe" * 8)
    add_tokenizer(folder)

    message = load_error(folder)

    assert str(folder / "model.onnx") in message
    assert "not a loadable ONNX model" in message


def test_unreadable_config_json_is_refused_naming_it(tmp_path: Path) -> None:
    folder = text_model(tmp_path / "m")
    (folder / "config.json").write_text('{"architectures": [', encoding="utf-8")

    message = load_error(folder)

    assert str(folder / "config.json") in message


def test_a_text_model_without_tokenizer_files_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    write_onnx(folder / "model.onnx", TEXT_INPUTS, {"logits": Pooled(3)})
    write_json(folder / "config.json", {"architectures": ["BertForSequenceClassification"]})

    message = load_error(folder)

    assert str(folder) in message
    assert "tokenizer" in message


def test_a_vision_model_without_preprocessor_config_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    write_onnx(folder / "model.onnx", {"pixel_values": ("batch", 3, 224, 224)}, {"logits": Pooled(3)})

    message = load_error(folder)

    assert str(folder) in message
    assert "preprocessor_config.json" in message


def test_an_image_size_that_contradicts_the_graph_is_refused(tmp_path: Path) -> None:
    folder = image_model(tmp_path / "vit", ("batch", 3, 32, 32))
    companion = write_json(folder / "inference.json", {"image_size": 224})

    message = load_error(folder)

    assert str(companion) in message
    assert "'image_size'" in message
    assert "[224, 224]" in message
    assert "[32, 32]" in message


def test_batch_sizes_that_contradict_a_fixed_batch_are_refused(tmp_path: Path) -> None:
    folder = text_model(
        tmp_path / "m",
        inputs={"input_ids": (1, "sequence"), "attention_mask": (1, "sequence")},
        props={"inference.batch_sizes": "8"},
    )

    message = load_error(folder)

    assert str(folder / "model.onnx") in message
    assert "'batch_sizes'" in message
    assert "[8]" in message


def test_an_override_that_contradicts_the_graph_is_refused(tmp_path: Path) -> None:
    folder = whisper_encoder(tmp_path / "w", ("batch", 80, 3000))

    message = load_error(folder, overrides={"audio_frames": 1500})

    assert "overrides" in message
    assert "'audio_frames'" in message


def test_an_unknown_inference_key_in_metadata_props_is_refused(tmp_path: Path) -> None:
    folder = text_model(tmp_path / "m", props={"inference.colour": "blue", "producer.note": "ignored"})

    message = load_error(folder)

    assert str(folder / "model.onnx") in message
    assert "inference.colour" in message
    assert "producer.note" not in message  # keys outside the namespace are not ours to judge


def test_an_unknown_key_in_inference_json_is_refused(tmp_path: Path) -> None:
    folder = text_model(tmp_path / "m")
    companion = write_json(folder / "inference.json", {"batch_size": [1, 8]})

    message = load_error(folder)

    assert str(companion) in message
    assert "batch_size" in message


@pytest.mark.parametrize("raw", ["0", "1,0", "-4", "[]", "many"])
def test_an_invalid_batch_sizes_value_is_refused_naming_the_field(tmp_path: Path, raw: str) -> None:
    folder = text_model(tmp_path / "m", props={"inference.batch_sizes": raw})

    message = load_error(folder)

    assert str(folder / "model.onnx") in message
    assert "batch_sizes" in message


def test_an_unknown_modality_override_is_refused_naming_the_field(tmp_path: Path) -> None:
    folder = text_model(tmp_path / "m")

    message = load_error(folder, overrides={"modality": "smell"})

    assert "overrides" in message
    assert "modality" in message


def test_a_config_with_auto_map_is_refused_because_it_needs_remote_code(tmp_path: Path) -> None:
    folder = text_model(tmp_path / "m")
    write_json(
        folder / "config.json",
        {
            "architectures": ["MyBertForSequenceClassification"],
            "auto_map": {
                "AutoModelForSequenceClassification": "modeling_my_bert.MyBertForSequenceClassification"
            },
        },
    )

    message = load_error(folder)

    assert str(folder / "config.json") in message
    assert "auto_map" in message
