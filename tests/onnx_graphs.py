"""Small real ONNX graphs for metadata tests: the input/output names and dims of a real export.

Each output is computed from the inputs (Cast, ReduceMean, MatMul), so ONNX Runtime loads and runs
the file like any exported model; only the shapes and names matter to the metadata resolver.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Dim = int | str | None
"""int: fixed; str: named dynamic dim (dim_param); None: dynamic and unnamed."""

OPSET = 17
#: Inputs that carry token ids (int64 in every Hugging Face export); the rest are float32.
INT64_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids", "bbox"})


@dataclass(frozen=True)
class Pooled:
    """An output [batch of ``source``, width], e.g. ``logits`` or ``text_embeds``."""

    width: int
    source: str | None = None  # default: the first input


@dataclass(frozen=True)
class PerToken:
    """An output [batch, sequence, width] from a 2-D ``source``, e.g. ``last_hidden_state``."""

    width: int
    source: str | None = None


@dataclass(frozen=True)
class Cross:
    """An output [batch of ``rows``, batch of ``cols``], e.g. CLIP's ``logits_per_image``."""

    rows: str
    cols: str


Output = Pooled | PerToken | Cross


def write_onnx(
    path: Path,
    inputs: Mapping[str, tuple[Dim, ...]],
    outputs: Mapping[str, Output],
    props: Mapping[str, str] | None = None,
) -> Path:
    """Write a graph with these inputs (name -> shape) and outputs, plus ``metadata_props``."""
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    first = next(iter(inputs))

    made: set[str] = set()  # several outputs may share one intermediate

    def add(op: str, ins: list[str], out: str, **attrs: object) -> str:
        if out not in made:
            made.add(out)
            nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    def as_float(name: str) -> str:
        if name not in INT64_INPUTS:
            return name
        return add("Cast", [name], f"{name}_f", to=TensorProto.FLOAT)

    def pooled(name: str) -> str:
        """[batch, 1]: the mean over every axis but the first."""
        axes = list(range(1, len(inputs[name])))
        mean = add("ReduceMean", [as_float(name)], f"{name}_mean", axes=axes)
        return add("Flatten", [mean], f"{name}_vec", axis=1)

    def weights(out: str, width: int) -> str:
        array = np.linspace(-1.0, 1.0, width, dtype=np.float32).reshape(1, width)
        initializers.append(numpy_helper.from_array(array, f"{out}_w"))
        return f"{out}_w"

    graph_outputs = []
    for out, spec in outputs.items():
        if isinstance(spec, Pooled):
            source = spec.source or first
            nodes.append(helper.make_node("MatMul", [pooled(source), weights(out, spec.width)], [out]))
            shape: tuple[Dim, ...] = (inputs[source][0], spec.width)
        elif isinstance(spec, PerToken):
            source = spec.source or first
            axes = f"{out}_axes"
            initializers.append(numpy_helper.from_array(np.array([2], dtype=np.int64), axes))
            nodes.append(helper.make_node("Unsqueeze", [as_float(source), axes], [f"{out}_col"]))
            nodes.append(helper.make_node("MatMul", [f"{out}_col", weights(out, spec.width)], [out]))
            shape = (*inputs[source][:2], spec.width)
        else:
            nodes.append(helper.make_node("Transpose", [pooled(spec.cols)], [f"{out}_t"]))
            nodes.append(helper.make_node("MatMul", [pooled(spec.rows), f"{out}_t"], [out]))
            shape = (inputs[spec.rows][0], inputs[spec.cols][0])
        graph_outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, list(shape)))

    graph_inputs = [
        helper.make_tensor_value_info(
            name, TensorProto.INT64 if name in INT64_INPUTS else TensorProto.FLOAT, list(shape)
        )
        for name, shape in inputs.items()
    ]
    graph = helper.make_graph(nodes, "synthetic", graph_inputs, graph_outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    if props:
        helper.set_model_props(model, dict(props))
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
