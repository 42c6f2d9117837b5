"""Build the committed Optimum fixtures: tiny folders written by Optimum's ONNX exporter, unchanged.

Each fixture is a seeded random-weight Hugging Face model saved to a temporary folder, exported
with ``optimum.exporters.onnx.main_export`` (the code behind ``optimum-cli export onnx``) into
``models/optimum/<name>/``. The exporter's files are left exactly as it writes them; only
``reference.json`` and ``reference.npz`` are added beside them: raw sample requests, the
processor's encoding of each alone, the logits of the plain transformers PyTorch model (never
Optimum's ORTModel) and what ``transformers.pipeline`` returns, in the layout of models/tiny.

Optimum needs transformers < 4.58, so this runs in its own venv; the worker never imports Optimum::

    python3 -m venv .venv-optimum
    .venv-optimum/bin/pip install torch==2.13.0
    .venv-optimum/bin/pip install optimum-onnx==0.1.0 'transformers>=4.57,<4.58' onnxruntime-gpu pillow
    HF_HUB_OFFLINE=1 .venv-optimum/bin/python -m models.optimum_fixture

A rebuild with those versions is byte-identical.
"""

import argparse
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optimum.exporters.onnx
import torch
import transformers
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoProcessor,
    BertForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from models.tiny import (
    IMAGE_PATH,
    INITIALIZER_RANGE,
    OPSET,
    REFERENCE_TOLERANCE,
    REPO_ROOT,
    TEXT_REQUESTS,
    TOP_K_CALLS,
    TOWER,
    bert_config,
    bert_tokenizer,
    label_maps,
    pipeline_call,
    plain,
    read_image,
    relative,
    seeded_model,
    write_npz,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "optimum"


@dataclass(frozen=True)
class Fixture:
    """One Optimum folder: its source model, the task Optimum exports it for, and the samples."""

    task: str
    save_source: Callable[[Path], None]
    model_class: Any
    requests: list[dict[str, Any]]
    # Pipeline parameter sets; each sample stores what the pipeline returns for each.
    calls: tuple[dict[str, Any], ...]


def save_bert(source: Path) -> None:
    """A two-layer, hidden-32 BERT text classifier over a few hundred English words, seeded."""
    tokenizer = bert_tokenizer(source)
    config = bert_config(tokenizer, ["anger", "joy", "surprise"])
    seeded_model(BertForSequenceClassification, config).save_pretrained(source)
    tokenizer.save_pretrained(source)


def save_vit(source: Path) -> None:
    """A two-layer, hidden-32 ViT image classifier on 32x32 images in 8x8 patches, seeded."""
    labels = label_maps(["sky", "grass", "house", "sun"])
    config = ViTConfig(image_size=32, patch_size=8, initializer_range=INITIALIZER_RANGE, **TOWER, **labels)
    seeded_model(ViTForImageClassification, config).save_pretrained(source)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(source)


FIXTURES: dict[str, Fixture] = {
    "bert-sequence-classification": Fixture(
        "text-classification",
        save_bert,
        AutoModelForSequenceClassification,
        TEXT_REQUESTS,
        ({}, {"top_k": None}),
    ),
    "vit-image-classification": Fixture(
        "image-classification",
        save_vit,
        AutoModelForImageClassification,
        [{"image": relative(IMAGE_PATH)}],
        TOP_K_CALLS,
    ),
}


def export(source: Path, folder: Path, task: str) -> None:
    """What ``optimum-cli export onnx --task TASK --opset 17 SOURCE FOLDER`` does, no optimisation."""
    optimum.exporters.onnx.main_export(
        str(source),
        output=folder,
        task=task,
        opset=OPSET,
        device="cpu",
        optimize=None,
        local_files_only=True,
        do_validation=True,
    )


def encode(processor: Any, request: dict[str, Any]) -> Any:
    """The processor's PyTorch tensors for one raw request alone."""
    if "image" in request:
        return processor(read_image(REPO_ROOT / request["image"]), return_tensors="pt")
    return processor(**request, return_tensors="pt")


def references(source: Path, fixture: Fixture) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """reference.json's content and reference.npz's arrays, from the PyTorch model in source."""
    processor = AutoProcessor.from_pretrained(source)
    model = fixture.model_class.from_pretrained(source).eval()
    pipe = transformers.pipeline(fixture.task, model=str(source))
    arrays: dict[str, np.ndarray] = {}
    samples = []
    for index, request in enumerate(fixture.requests):
        encoded = encode(processor, request)
        with torch.inference_mode():
            logits = model(**encoded).logits
        arrays |= {f"{index}/input/{name}": value.numpy() for name, value in encoded.items()}
        arrays[f"{index}/output/logits"] = logits.numpy()
        pipe_input, keywords = pipeline_call(request)
        calls = [
            {"kwargs": kwargs, "outputs": plain(pipe(pipe_input, **keywords, **kwargs))}
            for kwargs in fixture.calls
        ]
        samples.append({"inputs": request, "pipeline": calls})
    reference = {
        "task": fixture.task,
        "source": f"transformers {transformers.__version__} PyTorch model and pipeline (not ORTModel)",
        "samples": samples,
        "tolerance": REFERENCE_TOLERANCE,
    }
    return reference, arrays


def build(name: str, fixture: Fixture, out: Path) -> list[str]:
    """Export one fixture into out/name and write its references; the files Optimum wrote."""
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        source = Path(tmp)
        fixture.save_source(source)
        export(source, folder, fixture.task)
        written = sorted(path.name for path in folder.iterdir())
        reference, arrays = references(source, fixture)
    (folder / "reference.json").write_text(json.dumps(reference, indent=2) + "\n")
    write_npz(folder / "reference.npz", arrays)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Build every fixture (or the named ones) and print what Optimum wrote."""
    parser = argparse.ArgumentParser(prog="python -m models.optimum_fixture", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"any of {', '.join(FIXTURES)} (default: all)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="parent folder of the fixtures")
    args = parser.parse_args(argv)
    if unknown := set(args.names) - FIXTURES.keys():
        parser.error(f"unknown fixtures: {', '.join(sorted(unknown))}")
    for name in args.names or FIXTURES:
        written = build(name, FIXTURES[name], args.out)
        size = sum(path.stat().st_size for path in (args.out / name).iterdir())
        print(f"{name}: {size / 1024:.1f} KiB; Optimum wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
