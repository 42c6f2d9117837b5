"""Reading an ONNX graph: where it is in a folder, its inputs and outputs, its ``inference.*`` keys."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import onnxruntime as ort

from worker.serving.metadata.keys import METADATA_PREFIX, ONNX_FILES, Declared, MetadataError
from worker.serving.metadata.record import TensorSpec

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _spec(arg: Any) -> TensorSpec:
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise MetadataError(f"tensor {arg.name!r} has unsupported type {arg.type}")
    shape = tuple(d if isinstance(d, int) and d > 0 else (d or None) for d in arg.shape)
    return TensorSpec(arg.name, dtype, tuple(None if d == 0 else d for d in shape))


def read_graph(onnx_path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], dict[str, str]]:
    """Inputs, outputs and metadata_props of an ONNX file, read with ONNX Runtime itself."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several unrelated types for a bad file
        raise MetadataError(f"{onnx_path}: not a loadable ONNX model ({exc})") from exc
    inputs = tuple(_spec(arg) for arg in session.get_inputs())
    outputs = tuple(_spec(arg) for arg in session.get_outputs())
    return inputs, outputs, dict(session.get_modelmeta().custom_metadata_map)


def locate(path: Path) -> tuple[Path, Path]:
    """The model folder and its ONNX file, for a folder or a bare ``.onnx`` file."""
    if path.is_file() and path.suffix == ".onnx":
        return path.parent, path
    if not path.is_dir():
        raise MetadataError(f"{path}: no such model folder or .onnx file")
    for name in ONNX_FILES:
        if (path / name).is_file():
            return path, path / name
    candidates = sorted(path.glob("*.onnx"))
    if len(candidates) == 1:
        return path, candidates[0]
    if not candidates:
        raise MetadataError(f"{path}: no .onnx file in the folder")
    names = ", ".join(c.name for c in candidates)
    raise MetadataError(f"{path}: several .onnx files ({names}); name one or keep model.onnx")


def declared_props(props: Mapping[str, str], onnx_path: Path) -> dict[str, Any]:
    """``inference.*`` metadata_props, JSON-decoded where the value is JSON."""
    out: dict[str, Any] = {}
    for key, raw in props.items():
        if not key.startswith(METADATA_PREFIX):
            continue
        try:
            out[key.removeprefix(METADATA_PREFIX)] = json.loads(raw)
        except ValueError:
            out[key.removeprefix(METADATA_PREFIX)] = raw
    unknown = set(out) - set(Declared.model_fields)
    if unknown:
        raise MetadataError(
            f"{onnx_path}: unknown metadata keys {sorted(METADATA_PREFIX + k for k in unknown)}"
        )
    return out


def iter_model_folders(models_dir: Path) -> Iterator[Path]:
    """Folders under ``models_dir`` that hold an ONNX file (one level deep, sorted)."""
    for child in sorted(models_dir.iterdir()):
        if child.is_dir() and any(child.glob("*.onnx")):
            yield child
