"""Build nine tiny random-weight Hugging Face models, export each to ONNX and record references.

Everything is made from configs with a fixed seed (no hub access), so a rebuild gives the same
folders. Each folder holds model.onnx, the transformers weights/config, the processor files and
reference.json/.npz: raw sample requests, the processor's encoding, the PyTorch outputs and, per
sample and parameter set, what the matching ``transformers.pipeline`` returns for that request.

A request becomes a pipeline call as follows: ``text`` alone is the string, ``text`` with
``text_pair`` is ``{"text", "text_pair"}`` (question answering: ``question=text, context=text_pair``),
``image`` is the path, ``audio`` is ``{"raw": waveform, "sampling_rate": 16000}``,
``candidate_labels``/``hypothesis_template`` are keywords, and the stored ``kwargs`` are added.
"""

import functools
import json
import wave
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from PIL import Image, ImageDraw
from tokenizers import pre_tokenizers
from transformers import (
    AutoImageProcessor,
    AutoModelForQuestionAnswering,
    AutoModelForVideoClassification,
    AutoTokenizer,
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BertTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    PreTrainedModel,
    VideoMAEConfig,
    VideoMAEForVideoClassification,
    VideoMAEImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForSequenceClassification,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForAudioClassification,
)
from transformers.pipelines.video_classification import VideoClassificationPipeline

from models.pack import staged

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO_ROOT / "models" / "samples"
SEED = 0
OPSET = 17
SAMPLING_RATE = 16_000
# ONNX must reproduce PyTorch this closely here; consumers get the looser REFERENCE_TOLERANCE.
EXPORT_TOLERANCE = 1e-5
REFERENCE_TOLERANCE = 1e-4
# Wider than the usual 0.02 so random logits are spread apart and top labels are not near-ties.
INITIALIZER_RANGE = 0.2
# Small enough to keep every folder well under a megabyte.
TOWER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}

BERT_WORDS = """
the a an and or but if then so because of to in on at by for with from about into over after
before under between through during without against among i you he she it we they me him her us
them my your his its our their this that these those what which who when where why how all any
both each few more most other some such no not only own same than too very can will just should
now is are was were be been being have has had do does did say said get got make made go went
gone know knew think thought take took see saw come came want look use find give tell work call
try ask need feel become leave put mean keep let begin seem help talk turn start show hear play
run move like live believe hold bring happen write provide sit stand lose pay meet include
continue set learn change lead understand watch follow stop create speak read spend grow open
walk win offer remember love consider appear buy wait serve die send expect build stay fall cut
reach kill remain time year people way day man woman child world life hand part place case week
company system program question government number night point home water room mother area money
story fact month lot right study book eye job word business issue side kind head house service
friend father power hour game line end member law car city community name team minute idea kid
body information back parent face others level office door health person art war history party
result morning reason research girl guy moment air teacher force education food movie film music
weather park dog cat bird photo picture good new first last long great little old big high
different small large next early young important public bad able nice happy sad cold hot slow
fast kind terrible awesome boring funny beautiful today tomorrow yesterday really well also still
never always again here there one family anyone could ever hope single
"""
WORDPIECES = ["##s", "##ed", "##ing", "##ly", "##er", "##est", "##ness", "##y"]
PUNCTUATION = [".", ",", "!", "?", "'", "-", ":", ";"]
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

CLIP_WORDS = ["this", "is", "a", "photo", "of", "cat", "dog", "car", "bird", "picture", "an"]
CLIP_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
CLIP_LABELS = ["cat", "dog", "car"]
CLIP_TEMPLATE = "This is a photo of {}."

TEXT_REQUESTS: list[dict[str, Any]] = [
    {"text": "Great movie!"},
    {"text": "The food was cold and the service was slow, but the staff were kind to us."},
    {
        "text": "I have been thinking about this book for a long time, and I still believe it "
        "is one of the most beautiful and important stories about family, work and love that "
        "anyone could ever hope to read in a single life."
    },
    {"text": "The weather is nice today.", "text_pair": "I want to walk in the park."},
]
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
# Out-of-vocabulary words (Anna, Paris, near, slept) become [UNK], whose word is the text it covers;
# walked, dogs and kids split into word pieces, so entity words are joined from pieces.
NER_REQUESTS: list[dict[str, Any]] = [
    {"text": "My friend Anna was walking with her father in the park near Paris yesterday."},
    {"text": "My friends walked their dogs slowly in the park near Paris yesterday."},
    {"text": "The kids were playing in the park while the dogs slept."},
    {"text": "Great movie!"},
]
# Added to the random tagger's logits so tags vary (B-/I- runs, O gaps) instead of B-LOC nearly everywhere.
NER_BIAS = [0.3, 0.3, 1.2, -1.2, 0.0]
# Contexts long enough that every answer candidate the pipeline weighs has a non-zero score.
QA_REQUESTS: list[dict[str, Any]] = [
    {
        "text": "Where did the family go after the movie?",
        "text_pair": "After the movie the family went home to the park, because the weather was "
        "nice and the kids were happy to play with the dog.",
    },
    {
        "text": "Who is the teacher?",
        "text_pair": "The teacher is my mother, and she has been working in the city for a long time.",
    },
]

IMAGE_PATH = SAMPLES_DIR / "image.png"
AUDIO_PATH = SAMPLES_DIR / "audio.wav"
FRAME_PATHS = [SAMPLES_DIR / "video" / f"frame_{i}.png" for i in range(4)]
# Image, audio and video classification: the pipeline's default top_k (5), and fewer.
TOP_K_CALLS: tuple[dict[str, Any], ...] = ({}, {"top_k": 2})

Arrays = dict[str, np.ndarray]
Axes = dict[str, dict[int, str]]


@dataclass(frozen=True)
class Signature:
    """ONNX input and output names in graph order, each with its named dynamic axes."""

    inputs: Axes
    outputs: Axes


@dataclass(frozen=True)
class Sample:
    """One reference request: raw worker inputs and the processor's encoding of them alone."""

    request: dict[str, Any]
    encoded: Arrays
    # Pipeline parameter sets; each is stored with what the pipeline returns for this request.
    calls: tuple[dict[str, Any], ...] = ({},)


@dataclass(frozen=True)
class Built:
    """What a builder hands to the shared export step."""

    model: PreTrainedModel
    processor: Any
    task: str
    signature: Signature
    samples: list[Sample]
    # A batch of another shape than the samples, so baked-in shapes would be caught.
    export_inputs: Arrays
    # ONNX metadata_props (inference.* keys) for what the HF files cannot declare, e.g. pooling.
    metadata: dict[str, str] = field(default_factory=dict)


# --- samples -----------------------------------------------------------------------------------


def write_samples() -> None:
    """Write the deterministic image, audio and video frames that the references use."""
    IMAGE_PATH.parent.mkdir(parents=True, exist_ok=True)
    draw_image().save(IMAGE_PATH)
    write_wav(AUDIO_PATH, make_audio())
    FRAME_PATHS[0].parent.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(FRAME_PATHS):
        draw_frame(index).save(path)


def draw_image() -> Image.Image:
    """A 64x48 RGB scene of simple shapes; not square, so resizing is exercised."""
    image = Image.new("RGB", (64, 48), (200, 220, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 34, 63, 47), fill=(60, 140, 60))
    draw.ellipse((4, 4, 20, 20), fill=(250, 210, 40))
    draw.rectangle((30, 18, 54, 38), fill=(180, 40, 40))
    draw.polygon([(28, 18), (42, 6), (56, 18)], fill=(90, 50, 30))
    draw.line((0, 47, 63, 30), fill=(20, 20, 20), width=2)
    return image


def make_audio() -> np.ndarray:
    """One second of two tones, a slow chirp and a little seeded noise, as 16-bit PCM."""
    t = np.arange(SAMPLING_RATE) / SAMPLING_RATE
    signal = (
        0.3 * np.sin(2 * np.pi * 440 * t)
        + 0.2 * np.sin(2 * np.pi * 1000 * t) * (t > 0.5)
        + 0.1 * np.sin(2 * np.pi * (200 + 600 * t) * t)
        + 0.02 * np.random.default_rng(SEED).standard_normal(t.size)
    )
    return np.round(np.clip(signal, -1, 1) * 32767).astype(np.int16)


def write_wav(path: Path, pcm: np.ndarray) -> None:
    """Write mono 16-bit PCM at SAMPLING_RATE."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLING_RATE)
        out.writeframes(pcm.tobytes())


def draw_frame(index: int) -> Image.Image:
    """A 40x40 frame with a square that moves right and down as the index grows."""
    frame = Image.new("RGB", (40, 40), (30, 30, 60))
    draw = ImageDraw.Draw(frame)
    x, y = 4 + 8 * index, 6 + 4 * index
    draw.rectangle((x, y, x + 10, y + 10), fill=(240, 120, 20))
    return frame


def read_image(path: Path) -> Image.Image:
    """Decode an image file to RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")


def read_wav(path: Path) -> np.ndarray:
    """Decode mono 16-bit PCM to float32 in [-1, 1)."""
    with wave.open(str(path), "rb") as audio:
        pcm = np.frombuffer(audio.readframes(audio.getnframes()), dtype=np.int16)
    return pcm.astype(np.float32) / 32768.0


def relative(path: Path) -> str:
    """A sample path as requests carry it: relative to the repository root."""
    return path.relative_to(REPO_ROOT).as_posix()


# --- one small function per model --------------------------------------------------------------


def bert_tokenizer(folder: Path) -> Any:
    """A WordPiece tokenizer over a few hundred English words, its vocab.txt written to folder."""
    vocab = [*BERT_SPECIAL, *PUNCTUATION, *BERT_WORDS.split(), *WORDPIECES]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    # transformers 5 ignores vocab_file=; the vocabulary goes in positionally.
    return BertTokenizer(str(vocab_file), model_max_length=128)


def bert_config(tokenizer: Any, labels: list[str] | None = None) -> BertConfig:
    """The small BERT tower every tiny BERT shares, with a label head when labels are given."""
    return BertConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        initializer_range=INITIALIZER_RANGE,
        pad_token_id=tokenizer.pad_token_id,
        **TOWER,
        **(label_maps(labels) if labels is not None else {}),
    )


def text_signature(outputs: Axes) -> Signature:
    """BERT's three token inputs, dynamic in batch and sequence, with the given outputs."""
    names = ("input_ids", "attention_mask", "token_type_ids")
    return Signature(inputs={name: {0: "batch", 1: "sequence"} for name in names}, outputs=outputs)


def text_samples(
    tokenizer: Any, requests: list[dict[str, Any]], calls: tuple[dict[str, Any], ...]
) -> list[Sample]:
    """Each request tokenized alone, to be called with each parameter set."""
    return [Sample(request, tokenizer(**request, return_tensors="np"), calls) for request in requests]


def text_export_inputs(tokenizer: Any, requests: list[dict[str, Any]]) -> Arrays:
    """The first two requests as one padded batch."""
    return tokenizer(
        [request["text"] for request in requests[:2]],
        [request["text_pair"] for request in requests[:2]] if "text_pair" in requests[0] else None,
        padding=True,
        return_tensors="np",
    )


def build_bert(folder: Path) -> Built:
    """Text classification: BERT with a WordPiece vocabulary of a few hundred English words."""
    tokenizer = bert_tokenizer(folder)
    model = seeded_model(
        BertForSequenceClassification, bert_config(tokenizer, ["negative", "neutral", "positive"])
    )
    signature = text_signature({"logits": {0: "batch"}})
    samples = text_samples(tokenizer, TEXT_REQUESTS, ({}, {"top_k": None}))
    export_inputs = text_export_inputs(tokenizer, TEXT_REQUESTS)
    return Built(model, tokenizer, "text-classification", signature, samples, export_inputs)


def build_bert_ner(folder: Path) -> Built:
    """Token classification: the tiny BERT tagging people and places in BIO style."""
    tokenizer = bert_tokenizer(folder)
    model = seeded_model(BertForTokenClassification, bert_config(tokenizer, NER_LABELS))
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor(NER_BIAS))
    signature = text_signature({"logits": {0: "batch", 1: "sequence"}})
    calls = ({}, {"aggregation_strategy": "none"}, {"aggregation_strategy": "simple"})
    samples = text_samples(tokenizer, NER_REQUESTS, calls)
    export_inputs = text_export_inputs(tokenizer, NER_REQUESTS)
    return Built(model, tokenizer, "token-classification", signature, samples, export_inputs)


def build_bert_qa(folder: Path) -> Built:
    """Extractive question answering: the tiny BERT scoring answer starts and ends."""
    tokenizer = bert_tokenizer(folder)
    model = seeded_model(BertForQuestionAnswering, bert_config(tokenizer))
    axes = {0: "batch", 1: "sequence"}
    signature = text_signature({"start_logits": axes, "end_logits": axes})
    calls = ({}, {"top_k": 3}, {"max_answer_len": 2, "handle_impossible_answer": True})
    samples = text_samples(tokenizer, QA_REQUESTS, calls)
    export_inputs = text_export_inputs(tokenizer, QA_REQUESTS)
    return Built(model, tokenizer, "question-answering", signature, samples, export_inputs)


def build_bert_embed(folder: Path) -> Built:
    """Sentence embeddings: the tiny BERT's token vectors, mean-pooled and L2-normalised."""
    tokenizer = bert_tokenizer(folder)
    model = seeded_model(BertModel, bert_config(tokenizer))
    signature = text_signature({"last_hidden_state": {0: "batch", 1: "sequence"}})
    # Two texts in different sequence buckets keep the stored token vectors small.
    singles = TEXT_REQUESTS[:2]
    samples = text_samples(tokenizer, singles, ({},))
    export_inputs = text_export_inputs(tokenizer, singles)
    # Declared in the ONNX file itself, so the folder needs no extra file to say how to pool.
    metadata = {"inference.pooling": "mean", "inference.normalize": "true"}
    return Built(model, tokenizer, "feature-extraction", signature, samples, export_inputs, metadata)


def build_vit(folder: Path) -> Built:
    """Image classification: ViT on 32x32 images in 8x8 patches."""
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        initializer_range=INITIALIZER_RANGE,
        **TOWER,
        **label_maps(["circle", "square", "triangle", "line"]),
    )
    model = seeded_model(ViTForImageClassification, config)
    signature = Signature(inputs={"pixel_values": {0: "batch"}}, outputs={"logits": {0: "batch"}})
    encoded = processor(read_image(IMAGE_PATH), return_tensors="np")
    sample = Sample({"image": relative(IMAGE_PATH)}, encoded, TOP_K_CALLS)
    return Built(model, processor, "image-classification", signature, [sample], batch_of_two(encoded))


def build_wav2vec2(folder: Path) -> Built:
    """Audio classification: Wav2Vec2 with a three-layer conv front end and stable layer norm."""
    processor = Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLING_RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    )
    config = Wav2Vec2Config(
        conv_dim=(16, 16, 16),
        conv_stride=(5, 4, 4),
        conv_kernel=(10, 8, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        classifier_proj_size=16,
        vocab_size=8,
        initializer_range=INITIALIZER_RANGE,
        **TOWER,
        **label_maps(["yes", "no", "up", "down"]),
    )
    model = seeded_model(Wav2Vec2ForSequenceClassification, config)
    signature = Signature(
        inputs={
            "input_values": {0: "batch", 1: "samples"},
            "attention_mask": {0: "batch", 1: "samples"},
        },
        outputs={"logits": {0: "batch"}},
    )
    audio = read_wav(AUDIO_PATH)
    encoded = processor(audio, sampling_rate=SAMPLING_RATE, return_tensors="np")
    sample = Sample({"audio": relative(AUDIO_PATH)}, encoded, TOP_K_CALLS)
    # Two clips of different lengths, so the padded row's mask matters.
    export_inputs = processor(
        [audio, audio[: SAMPLING_RATE // 2]],
        sampling_rate=SAMPLING_RATE,
        padding=True,
        return_tensors="np",
    )
    return Built(model, processor, "audio-classification", signature, [sample], export_inputs)


def build_whisper_encoder(folder: Path) -> Built:
    """Audio classification: a Whisper encoder over 80 mel bins x 3000 frames (30 s)."""
    processor = WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLING_RATE)
    config = WhisperConfig(
        num_mel_bins=80,
        max_source_positions=1500,
        d_model=16,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        classifier_proj_size=16,
        init_std=INITIALIZER_RANGE,
        **label_maps(["speech", "music", "noise"]),
    )
    model = seeded_model(WhisperForAudioClassification, config)
    signature = Signature(inputs={"input_features": {0: "batch"}}, outputs={"logits": {0: "batch"}})
    # With torch installed the extractor takes torch's STFT path; the numpy path that runs
    # without torch gives features within 1e-5 of these (measured 8e-6).
    encoded = processor(read_wav(AUDIO_PATH), sampling_rate=SAMPLING_RATE, return_tensors="np")
    sample = Sample({"audio": relative(AUDIO_PATH)}, encoded, TOP_K_CALLS)
    return Built(model, processor, "audio-classification", signature, [sample], batch_of_two(encoded))


def build_videomae(folder: Path) -> Built:
    """Video classification: VideoMAE over 4 frames of 32x32 in 2x8x8 tubelets."""
    processor = VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = VideoMAEConfig(
        image_size=32,
        patch_size=8,
        num_frames=4,
        tubelet_size=2,
        initializer_range=INITIALIZER_RANGE,
        **TOWER,
        **label_maps(["waving", "jumping", "running"]),
    )
    model = seeded_model(VideoMAEForVideoClassification, config)
    signature = Signature(inputs={"pixel_values": {0: "batch"}}, outputs={"logits": {0: "batch"}})
    frames = [read_image(path) for path in FRAME_PATHS]
    encoded = processor(frames, return_tensors="np")
    sample = Sample({"frames": [relative(path) for path in FRAME_PATHS]}, encoded, TOP_K_CALLS)
    return Built(model, processor, "video-classification", signature, [sample], batch_of_two(encoded))


def build_clip(folder: Path) -> Built:
    """Zero-shot image classification: CLIP with a byte-level BPE vocabulary of a few words."""
    vocab, merges = clip_bpe(CLIP_WORDS)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # transformers 5 ignores vocab_file=/merges_file=; the files go in positionally.
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "max_position_embeddings": 32} | TOWER | special_ids,
        vision_config={"image_size": 32, "patch_size": 8} | TOWER,
        projection_dim=16,
        initializer_range=INITIALIZER_RANGE,
    )
    model = seeded_model(CLIPModel, config)
    signature = Signature(
        inputs={
            "input_ids": {0: "text_batch", 1: "sequence"},
            "attention_mask": {0: "text_batch", 1: "sequence"},
            "pixel_values": {0: "image_batch"},
        },
        outputs={
            "logits_per_image": {0: "image_batch", 1: "text_batch"},
            "logits_per_text": {0: "text_batch", 1: "image_batch"},
            "text_embeds": {0: "text_batch"},
            "image_embeds": {0: "image_batch"},
        },
    )
    request = {
        "image": relative(IMAGE_PATH),
        "candidate_labels": CLIP_LABELS,
        "hypothesis_template": CLIP_TEMPLATE,
    }
    image = read_image(IMAGE_PATH)
    texts = [CLIP_TEMPLATE.format(label) for label in CLIP_LABELS]
    encoded = processor(text=texts, images=image, padding=True, return_tensors="np")
    # Text and image batches of different sizes, so the two batch dims stay apart in the trace.
    export_inputs = processor(
        text=[*texts, "a picture of an bird"],
        images=[image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)],
        padding=True,
        return_tensors="np",
    )
    return Built(
        model,
        processor,
        "zero-shot-image-classification",
        signature,
        [Sample(request, encoded)],
        export_inputs,
    )


BUILDERS: dict[str, Callable[[Path], Built]] = {
    "bert": build_bert,
    "bert-ner": build_bert_ner,
    "bert-qa": build_bert_qa,
    "bert-embed": build_bert_embed,
    "vit": build_vit,
    "wav2vec2": build_wav2vec2,
    "whisper-encoder": build_whisper_encoder,
    "videomae": build_videomae,
    "clip": build_clip,
}


# --- shared steps ------------------------------------------------------------------------------


def label_maps(labels: list[str]) -> dict[str, Any]:
    """The id2label/label2id config fields for these labels."""
    return {
        "id2label": dict(enumerate(labels)),
        "label2id": {label: index for index, label in enumerate(labels)},
    }


def seeded_model(cls: type[PreTrainedModel], config: Any) -> PreTrainedModel:
    """Instantiate cls with seeded random weights and eager attention, in eval mode."""
    torch.manual_seed(SEED)
    model = cls(config)
    model.set_attn_implementation("eager")
    return model.eval()


def batch_of_two(encoded: Mapping[str, np.ndarray]) -> Arrays:
    """The sample twice over, the second copy reversed along the last axis to differ."""
    return {name: np.concatenate([value, value[..., ::-1]]) for name, value in encoded.items()}


def clip_bpe(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary and merges that spell each word as one token."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*byte_chars, *(char + "</w>" for char in byte_chars)]
    merges: list[str] = []
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            merge = f"{symbols[0]} {symbols[1]}"
            if merge not in merges:
                merges.append(merge)
                tokens.append(symbols[0] + symbols[1])
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
    vocab = {token: index for index, token in enumerate(dict.fromkeys([*tokens, *CLIP_SPECIAL]))}
    return vocab, merges


def onnx_inputs(encoded: Mapping[str, np.ndarray], signature: Signature) -> Arrays:
    """The arrays the graph takes, by name, as int64 or float32."""
    return {
        name: encoded[name].astype(np.int64 if np.issubdtype(encoded[name].dtype, np.integer) else np.float32)
        for name in signature.inputs
    }


class OutputsByName(torch.nn.Module):
    """Positional tensors in, the named outputs as a tuple out: the shape the exporter traces."""

    def __init__(self, model: PreTrainedModel, signature: Signature) -> None:
        super().__init__()
        self.model = model
        self.signature = signature

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the model on the inputs in signature order."""
        outputs = self.model(**dict(zip(self.signature.inputs, tensors, strict=True)))
        return tuple(outputs[name] for name in self.signature.outputs)


def run_torch(model: PreTrainedModel, inputs: Arrays, signature: Signature) -> Arrays:
    """The PyTorch outputs named in the signature."""
    with torch.inference_mode():
        outputs = OutputsByName(model, signature)(*(torch.from_numpy(v) for v in inputs.values()))
    return {name: out.numpy() for name, out in zip(signature.outputs, outputs, strict=True)}


def export_onnx(model: PreTrainedModel, signature: Signature, inputs: Arrays, path: Path) -> None:
    """Trace the model with the legacy exporter, which names dynamic dims as given."""
    # eval() on the wrapper too: the exporter restores the wrapper's training flag afterwards,
    # recursively, which would otherwise switch dropout on in the wrapped model.
    torch.onnx.export(
        OutputsByName(model, signature).eval(),
        tuple(torch.from_numpy(value) for value in inputs.values()),
        str(path),
        input_names=list(signature.inputs),
        output_names=list(signature.outputs),
        dynamic_axes={**signature.inputs, **signature.outputs},
        opset_version=OPSET,
        dynamo=False,
    )


def torch_vs_onnx(
    model: PreTrainedModel, session: ort.InferenceSession, inputs: Arrays, signature: Signature
) -> tuple[Arrays, float]:
    """The PyTorch outputs, and the largest absolute difference of ONNX Runtime's from them."""
    expected = run_torch(model, inputs, signature)
    actual = session.run(list(expected), inputs)
    diffs = []
    for (name, want), got in zip(expected.items(), actual, strict=True):
        if got.shape != want.shape:
            raise AssertionError(f"{name}: ONNX shape {got.shape} != PyTorch {want.shape}")
        diffs.append(float(np.max(np.abs(got - want))))
    return expected, max(diffs)


def write_npz(path: Path, arrays: Arrays) -> None:
    """Like np.savez_compressed, but with fixed timestamps so rebuilds are byte-identical."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array))


def add_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """Write metadata_props into an exported ONNX file."""
    model = onnx.load(path)
    onnx.helper.set_model_props(model, dict(metadata))
    onnx.save(model, path)


def finish(built: Built, folder: Path) -> float:
    """Save, export, check ONNX against PyTorch and write references; return the max diff."""
    built.model.save_pretrained(folder)
    built.processor.save_pretrained(folder)
    export_inputs = onnx_inputs(built.export_inputs, built.signature)
    export_onnx(built.model, built.signature, export_inputs, folder / "model.onnx")
    if built.metadata:
        add_metadata(folder / "model.onnx", built.metadata)
    session = ort.InferenceSession(folder / "model.onnx", providers=["CPUExecutionProvider"])

    _, worst = torch_vs_onnx(built.model, session, export_inputs, built.signature)
    references: Arrays = {}
    samples: list[dict[str, Any]] = []
    for index, sample in enumerate(built.samples):
        inputs = onnx_inputs(sample.encoded, built.signature)
        outputs, diff = torch_vs_onnx(built.model, session, inputs, built.signature)
        worst = max(worst, diff)
        references |= {f"{index}/input/{name}": value for name, value in inputs.items()}
        references |= {f"{index}/output/{name}": value for name, value in outputs.items()}
        calls = [
            {"kwargs": kwargs, "outputs": pipeline_output(built.task, folder, sample.request, kwargs)}
            for kwargs in sample.calls
        ]
        entry = {"inputs": sample.request, "pipeline": calls}
        if "inference.pooling" in built.metadata:
            entry["sentence_embedding"] = sentence_embedding(
                outputs["last_hidden_state"], inputs["attention_mask"]
            )
        samples.append(entry)
    if worst > EXPORT_TOLERANCE:
        raise AssertionError(f"{folder.name}: ONNX differs from PyTorch by {worst:.3g}")

    write_npz(folder / "reference.npz", references)
    reference = {
        "task": built.task,
        "pipeline_source": pipeline_source(built.task),
        "samples": samples,
        "tolerance": REFERENCE_TOLERANCE,
    }
    (folder / "reference.json").write_text(json.dumps(reference, indent=2) + "\n")
    return worst


# --- what the transformers pipelines return ----------------------------------------------------


def pipeline_output(task: str, folder: Path, request: Mapping[str, Any], kwargs: Mapping[str, Any]) -> Any:
    """What the task's transformers pipeline returns for a request and parameters, as plain JSON values."""
    replica = REPLICAS.get(task)
    if replica is not None:
        return plain(replica(folder, request, kwargs))
    inputs, keywords = pipeline_call(request)
    return plain(live_pipeline(task, folder)(inputs, **keywords, **kwargs))


def pipeline_source(task: str) -> str:
    """Where a task's stored pipeline outputs come from."""
    if task == "question-answering":
        return "transformers 4.57 QuestionAnsweringPipeline (removed in 5), replayed step for step on PyTorch"
    if task == "video-classification":
        return (
            f"transformers {transformers.__version__} VideoClassificationPipeline.postprocess on PyTorch "
            "logits (the pipeline itself needs PyAV and a video file)"
        )
    return f"transformers {transformers.__version__} pipeline"


@functools.cache
def live_pipeline(task: str, folder: Path) -> Any:
    """The transformers pipeline for a model folder, loaded once."""
    return transformers.pipeline(task, model=str(folder))


def pipeline_call(request: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A worker request as the pipeline's input and keywords (see the module docstring)."""
    if "candidate_labels" in request:
        keywords = {key: request[key] for key in ("candidate_labels", "hypothesis_template")}
        return str(REPO_ROOT / request["image"]), keywords
    if "text_pair" in request:
        return {"text": request["text"], "text_pair": request["text_pair"]}, {}
    if "text" in request:
        return request["text"], {}
    if "image" in request:
        return str(REPO_ROOT / request["image"]), {}
    if "audio" in request:
        return {"raw": read_wav(REPO_ROOT / request["audio"]), "sampling_rate": SAMPLING_RATE}, {}
    raise ValueError(f"no pipeline call for request keys {sorted(request)}")


def plain(value: Any) -> Any:
    """A pipeline result with numpy scalars and tuples turned into plain JSON values."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def answer_question(folder: Path, request: Mapping[str, Any], kwargs: Mapping[str, Any]) -> Any:
    """transformers 4.57's QuestionAnsweringPipeline (removed in 5) step for step, quirks included,
    for a fast right-padded tokenizer and a question and context that fit one span."""
    top_k = kwargs.get("top_k", 1)
    max_answer_len = kwargs.get("max_answer_len", 15)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForQuestionAnswering.from_pretrained(folder).eval()
    context = request["text_pair"]
    encoded = tokenizer(
        text=request["text"],
        text_pair=context,
        return_token_type_ids=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    if len(encoded["input_ids"]) > min(tokenizer.model_max_length, 384):
        raise ValueError("the replica covers one span: shorten the context")
    encoding = encoded.encodings[0]
    ids = np.asarray(encoded["input_ids"])
    # p_mask: 1 where a token cannot be in the answer (all but the context), CLS kept unmasked.
    p_mask = np.asarray([sequence != 1 for sequence in encoded.sequence_ids(0)], dtype=np.int64)
    p_mask[ids == tokenizer.cls_token_id] = 0
    with torch.inference_mode():
        tensors = {name: torch.tensor([encoded[name]]) for name in tokenizer.model_input_names}
        output = model(**tensors)
    start, end = output.start_logits.numpy(), output.end_logits.numpy()

    # select_starts_ends: mask, softmax each row, note the null score, zero position 0.
    possible = np.abs(p_mask - 1)[None] & np.asarray(encoded["attention_mask"])[None]
    start = np.where(possible == 0, -10000.0, start)
    end = np.where(possible == 0, -10000.0, end)
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()
    null_score = min(1000000, (start[0, 0] * end[0, 0]).item())
    start[0, 0] = end[0, 0] = 0.0

    # decode_spans: the top_k * 2 + 10 best spans (align_to_words may merge some), then the allowed ones.
    candidates = np.tril(np.triu(np.matmul(start[..., None], end[:, None])), max_answer_len - 1)
    flat = candidates.flatten()
    wanted = top_k * 2 + 10
    if len(flat) < wanted:
        order = np.argsort(-flat)
    else:
        best = np.argpartition(-flat, wanted)[:wanted]
        order = best[np.argsort(-flat[best])]
    starts, ends = np.unravel_index(order, candidates.shape)[1:]
    # As in the pipeline, isin() over nonzero()'s (rows, columns) pair: row index 0 counts as allowed too.
    allowed = possible.nonzero()
    keep = np.isin(starts, allowed) & np.isin(ends, allowed)
    starts, ends = starts[keep], ends[keep]
    scores = candidates[0, starts, ends]

    answers: list[dict[str, Any]] = []
    for first, last, score in zip(starts, ends, scores, strict=True):
        try:
            start_char = encoding.word_to_chars(encoding.token_to_word(first), sequence_index=1)[0]
            end_char = encoding.word_to_chars(encoding.token_to_word(last), sequence_index=1)[1]
        except Exception:  # as the pipeline: a token without a word falls back to its own offsets
            start_char, end_char = encoding.offsets[first][0], encoding.offsets[last][1]
        text = context[start_char:end_char]
        same = next((answer for answer in answers if answer["answer"].lower() == text.lower()), None)
        if same is not None:
            same["score"] += score.item()
        else:
            answers.append({"score": score.item(), "start": start_char, "end": end_char, "answer": text})
    if kwargs.get("handle_impossible_answer", False):
        answers.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda answer: answer["score"], reverse=True)[:top_k]
    return answers[0] if len(answers) == 1 else answers


def classify_video(folder: Path, request: Mapping[str, Any], kwargs: Mapping[str, Any]) -> Any:
    """The video pipeline's own parameter handling and postprocess on PyTorch logits of the frames."""
    # The pipeline itself needs PyAV and a video file; its PyAV path hands the decoded frames to
    # the image processor, as this does with the sample frames.
    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModelForVideoClassification.from_pretrained(folder).eval()
    frames = [read_image(REPO_ROOT / path) for path in request["frames"]]
    with torch.inference_mode():
        outputs = model(**processor(frames, return_tensors="pt"))
    # Both methods read nothing from the pipeline but its model.
    stand_in = SimpleNamespace(model=model, framework="pt")  # transformers 4.57 reads .framework
    _, _, options = VideoClassificationPipeline._sanitize_parameters(stand_in, **kwargs)
    return VideoClassificationPipeline.postprocess(stand_in, outputs, **options)


REPLICAS: dict[str, Callable[[Path, Mapping[str, Any], Mapping[str, Any]], Any]] = {
    "question-answering": answer_question,
    "video-classification": classify_video,
}


def sentence_embedding(hidden: np.ndarray, mask: np.ndarray) -> list[float]:
    """sentence-transformers' mean pooling over the real tokens, then L2 normalisation."""
    tokens = torch.from_numpy(hidden)
    weights = torch.from_numpy(mask).unsqueeze(-1).to(tokens.dtype)
    pooled = (tokens * weights).sum(1) / torch.clamp(weights.sum(1), min=1e-9)
    embedding: list[float] = torch.nn.functional.normalize(pooled, p=2, dim=1)[0].tolist()
    return embedding


def build_tiny(out: Path) -> None:
    """Write the samples, then every tiny model folder under out."""
    write_samples()
    for name, builder in BUILDERS.items():
        # Built beside the old folder and renamed into place: a reader never sees half a model.
        with staged(out / name, replace=True) as folder:
            worst = finish(builder(folder), folder)
            size = sum(path.stat().st_size for path in folder.iterdir())
        print(f"{name:16} {size / 1024:8.1f} KiB   max |onnx - torch| = {worst:.2e}")
