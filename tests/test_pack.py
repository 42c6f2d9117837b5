"""``python -m models pack``: the tiny model folders become self-describing ones that answer the same."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import pytest

from models.__main__ import main
from tests.references import assert_pipeline_equal, load_samples, to_model_input
from worker.serving.metadata import METADATA_PREFIX, Source, iter_model_folders, load_metadata
from worker.serving.processors import ProcessorFactory
from worker.serving.registry import ServedModel, load_model

TINY = Path(__file__).resolve().parent.parent / "models" / "tiny"
NAMES = [folder.name for folder in iter_model_folders(TINY)]
# Small batch buckets keep every load quick (wav2vec2's 32 x 10 s bucket alone takes seconds);
# two rows, because CLIP needs one text row per candidate label.
SMALL_BATCHES = {"batch_sizes": [1, 2]}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def pack(source: Path, out: Path, *flags: str) -> int:
    """Run ``python -m models pack`` in this process."""
    return main(["pack", str(source), "--out", str(out), *flags])


def fresh(folder: Path, overrides: dict[str, Any] | None = None) -> ServedModel:
    """The folder loaded with its own processor, as the worker would."""
    return load_model(folder, overrides=overrides, factory=ProcessorFactory())


def copy_files(source: Path, target: Path, names: tuple[str, ...]) -> Path:
    """A new folder holding copies of some of source's files."""
    target.mkdir()
    for name in names:
        shutil.copyfile(source / name, target / name)
    return target


@dataclass(frozen=True)
class Packed:
    """One tiny model packed: the original as loaded, and the packed folder."""

    original: ServedModel
    folder: Path


@pytest.fixture(scope="module", params=NAMES)
def packed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Packed:
    name = request.param
    out = tmp_path_factory.mktemp("packed") / name
    assert pack(TINY / name, out, "--set", "batch_sizes=1,2") == 0
    return Packed(fresh(TINY / name, SMALL_BATCHES), out)


def test_packed_graph_carries_the_inference_keys(packed: Packed) -> None:
    props = {p.key: p.value for p in onnx.load(packed.folder / "model.onnx").metadata_props}
    meta = packed.original.metadata
    assert props[METADATA_PREFIX + "modality"] == meta.modality.value
    assert props[METADATA_PREFIX + "processor"] == meta.processor.value
    assert props[METADATA_PREFIX + "task"] == meta.task
    assert json.loads(props[METADATA_PREFIX + "batch_sizes"]) == [1, 2]
    if meta.labels is not None:
        assert json.loads(props[METADATA_PREFIX + "labels"]) == list(meta.labels)


def test_packed_folder_describes_itself_from_the_graph(packed: Packed) -> None:
    meta = load_metadata(packed.folder)
    original = packed.original.metadata
    for field in ("modality", "processor", "task", "labels", "batch_sizes"):
        assert getattr(meta, field) == getattr(original, field), field
        if getattr(meta, field) is not None:
            assert meta.sources[field] is Source.ONNX, field


def assert_answers_as_stored(model: ServedModel, name: str) -> None:
    """Every stored sample and call of tiny model ``name`` answered as its stored pipeline output
    (models/tiny/<name>/reference.json; raw token vectors where the model declares pooling)."""
    samples, tolerance = load_samples(name)
    raw_vectors = {"pooling": "none"} if model.metadata.pooling is not None else {}
    for sample in samples:
        for call in sample.calls:
            [answer] = model.infer([to_model_input(sample.raw)], {**raw_vectors, **call.kwargs})
            assert_pipeline_equal(answer, call.outputs, tolerance, f"{name} {call.kwargs}")


def test_packed_folder_answers_as_the_stored_pipeline(packed: Packed) -> None:
    assert_answers_as_stored(fresh(packed.folder), packed.folder.name)


def test_pack_prints_what_inspect_shows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pack(TINY / "vit", tmp_path / "vit") == 0
    printed = capsys.readouterr().out
    assert "task        image-classification   <- onnx metadata" in printed
    assert "answers a dummy vision request" in printed


def test_remote_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = shutil.copytree(TINY / "bert", tmp_path / "bert")
    config = json.loads((source / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (source / "config.json").write_text(json.dumps(config))
    assert pack(source, tmp_path / "out") == 2
    assert "auto_map" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_text_model_without_tokenizer_files_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = copy_files(TINY / "bert", tmp_path / "bert", ("model.onnx",))
    (source / "config.json").write_text(json.dumps({"_name_or_path": "bert-base-uncased"}))
    assert pack(source, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "needs tokenizer files" in error
    assert "'bert-base-uncased' on the Hugging Face Hub" in error
    assert not (tmp_path / "out").exists()


def test_bare_onnx_file_takes_its_metadata_from_flags(tmp_path: Path) -> None:
    source = copy_files(TINY / "bert", tmp_path / "src", TOKENIZER_FILES)
    shutil.copyfile(TINY / "bert" / "model.onnx", source / "classifier.onnx")
    flags = ["--task", "text-classification", "--modality", "text"]
    flags += ["--set", 'labels=["bad", "meh", "good"]', "--set", "batch_sizes=1,4"]
    assert pack(source / "classifier.onnx", tmp_path / "out", *flags) == 0
    meta = load_metadata(tmp_path / "out")
    assert meta.onnx_path.name == "model.onnx"
    assert (meta.task, meta.labels, meta.batch_sizes) == (
        "text-classification",
        ("bad", "meh", "good"),
        (1, 4),
    )
    assert {meta.sources[f] for f in ("task", "modality", "labels", "batch_sizes")} == {Source.ONNX}


def test_external_data_files_travel_with_the_graph(tmp_path: Path) -> None:
    source = copy_files(TINY / "bert", tmp_path / "src", ("config.json", *TOKENIZER_FILES))
    graph = onnx.load(TINY / "bert" / "model.onnx")
    onnx.save(
        graph, source / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    assert pack(source, tmp_path / "out", "--set", "batch_sizes=1,2") == 0
    assert (tmp_path / "out" / "weights.bin").is_file()
    assert_answers_as_stored(fresh(tmp_path / "out"), "bert")


def test_a_non_empty_out_folder_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert pack(TINY / "vit", out) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").is_file()
    assert pack(TINY / "vit", out, "--force") == 0
    assert not (out / "keep.txt").exists()


def test_packing_onto_the_source_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = shutil.copytree(TINY / "vit", tmp_path / "vit")
    assert pack(source, source, "--force") == 2
    assert "source folder" in capsys.readouterr().err
    assert (source / "model.safetensors").is_file()
