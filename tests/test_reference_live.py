"""Live parity: the committed tiny-model references still match PyTorch and ONNX Runtime.

Reloads each folder's weights with transformers and its model.onnx with onnxruntime, runs both on
the stored processor outputs and compares them with the stored model outputs.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import transformers

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch

TINY_DIR = Path(__file__).resolve().parent.parent / "models" / "tiny"
FOLDERS = ["bert", "vit", "wav2vec2", "whisper-encoder", "videomae", "clip"]
TORCH_ATOL = 1e-5

Arrays = dict[str, np.ndarray]


def load_references(folder: Path) -> list[tuple[Arrays, Arrays]]:
    """Per sample, the stored (inputs, outputs), each keyed by ONNX name."""
    count = len(json.loads((folder / "reference.json").read_text())["samples"])
    with np.load(folder / "reference.npz") as stored:
        arrays = dict(stored)
    samples = []
    for index in range(count):
        inputs = {k.split("/")[2]: v for k, v in arrays.items() if k.startswith(f"{index}/input/")}
        outputs = {k.split("/")[2]: v for k, v in arrays.items() if k.startswith(f"{index}/output/")}
        assert inputs and outputs, f"{folder.name}: sample {index} missing from reference.npz"
        samples.append((inputs, outputs))
    assert len(arrays) == sum(len(i) + len(o) for i, o in samples), "stray reference arrays"
    return samples


def load_torch_model(folder: Path) -> torch.nn.Module:
    """The folder's model class, from its config's architectures, with its saved weights."""
    config = transformers.AutoConfig.from_pretrained(folder)
    model_class = getattr(transformers, config.architectures[0])
    return model_class.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", FOLDERS)
def test_torch_reproduces_stored_outputs(name: str) -> None:
    folder = TINY_DIR / name
    model = load_torch_model(folder)
    for inputs, expected in load_references(folder):
        with torch.inference_mode():
            outputs = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
        for output_name, want in expected.items():
            np.testing.assert_allclose(
                outputs[output_name].numpy(), want, rtol=0, atol=TORCH_ATOL, err_msg=output_name
            )


@pytest.mark.parametrize("name", FOLDERS)
def test_onnx_reproduces_stored_outputs(name: str) -> None:
    folder = TINY_DIR / name
    tolerance = json.loads((folder / "reference.json").read_text())["tolerance"]
    session = ort.InferenceSession(folder / "model.onnx", providers=["CPUExecutionProvider"])
    for inputs, expected in load_references(folder):
        actual = session.run(list(expected), inputs)
        for (output_name, want), got in zip(expected.items(), actual, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=tolerance, err_msg=output_name)
