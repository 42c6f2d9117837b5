"""Build the committed sentence-transformers fixtures in models/sentence/: tiny folders saved by the
``sentence-transformers`` package itself, each with an exported ``model.onnx`` and its references.

Every folder is ``SentenceTransformer(modules=[Transformer, Pooling, (Normalize)]).save(...)`` over
one seeded random-weight BERT (hidden 16, one layer, a few hundred English words): mean, CLS and max
pooling, each with and without Normalize, and one folder whose graph does the pooling itself (outputs
``token_embeddings`` and ``sentence_embedding``, as Optimum's sentence-transformers export names them).
The ONNX files carry no worker metadata: the worker reads pooling, normalisation, the longest sequence
and the prompts from the sentence-transformers files alone. ``reference.json`` holds what
``SentenceTransformer(folder).encode`` returns for SENTENCES (and the token vectors of the first).
Needs the export extra: ``.venv-export/bin/python -m models build sentence`` (``make models``); with
sentence-transformers 6.2.0 and torch 2.13.0 a rebuild is byte-identical.
"""

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.models import Normalize, Pooling, Transformer
from transformers import BertConfig, BertModel

from models.pack import staged
from models.tiny import INITIALIZER_RANGE, SEED, Signature, bert_tokenizer, export_onnx

DEFAULT_OUT = Path(__file__).resolve().parent / "sentence"
#: sentence_bert_config.json's max_seq_length: below the position table (128), so it must be read.
MAX_SEQ_LENGTH = 64
TOWER = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
PROMPTS = {"question": "question: ", "story": "story: "}
SENTENCES = [
    "Great movie!",
    "The food was cold and the service was slow, but the staff were kind to us.",
    "I have been thinking about this book for a long time, and I still believe it is one of the most "
    "beautiful and important stories about family, work and love that anyone could ever hope to read "
    "in a single life, because it tells the truth about people and the world they live in every day.",
]
TEXT_AXES = {0: "batch", 1: "sequence"}
INPUTS = {name: TEXT_AXES for name in ("input_ids", "attention_mask", "token_type_ids")}


@dataclass(frozen=True)
class Variant:
    """One folder: its pooling mode, whether it normalises, its prompts, whether the graph pools."""

    pooling: str
    normalize: bool
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    include_prompt: bool = True
    pooled_graph: bool = False


VARIANTS = {
    # A default prompt, pooled over like the text (include_prompt stays true).
    "mean": Variant("mean", normalize=False, prompts=PROMPTS, default_prompt_name="story"),
    "mean-normalize": Variant("mean", normalize=True),
    "cls": Variant("cls", normalize=False),
    "cls-normalize": Variant("cls", normalize=True),
    # A default prompt left out of the pooling, as INSTRUCTOR-style models do.
    "max": Variant(
        "max", normalize=False, prompts=PROMPTS, default_prompt_name="question", include_prompt=False
    ),
    "max-normalize": Variant("max", normalize=True),
    "mean-normalize-pooled": Variant("mean", normalize=True, pooled_graph=True),
}


class SentenceEncoder(torch.nn.Module):
    """The whole SentenceTransformer as one module: token inputs in, its features dict out."""

    def __init__(self, model: SentenceTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, **features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token vectors and the pooled (and normalised) sentence embedding."""
        out: dict[str, torch.Tensor] = self.model(dict(features))
        return out


def sentence_model(variant: Variant, scratch: Path) -> SentenceTransformer:
    """The variant's SentenceTransformer over the seeded tiny BERT saved in scratch."""
    tokenizer = bert_tokenizer(scratch)
    config = BertConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        initializer_range=INITIALIZER_RANGE,
        pad_token_id=tokenizer.pad_token_id,
        **TOWER,
    )
    torch.manual_seed(SEED)
    BertModel(config).save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    transformer = Transformer(str(scratch), max_seq_length=MAX_SEQ_LENGTH)
    pooling = Pooling(
        transformer.get_embedding_dimension(),
        pooling_mode=variant.pooling,
        include_prompt=variant.include_prompt,
    )
    modules: list[torch.nn.Module] = [transformer, pooling, *([Normalize()] if variant.normalize else [])]
    return SentenceTransformer(
        modules=modules, prompts=variant.prompts or None, default_prompt_name=variant.default_prompt_name
    ).eval()


def export(model: SentenceTransformer, variant: Variant, path: Path) -> None:
    """The transformer alone (last_hidden_state), or the whole model when the graph pools."""
    # Eager attention traces to plain ops whatever the sequence length (as models/tiny exports).
    model[0].auto_model.set_attn_implementation("eager")
    examples = model.tokenize(SENTENCES[:2])
    inputs = {name: examples[name].numpy() for name in INPUTS}
    if variant.pooled_graph:
        outputs = {"token_embeddings": TEXT_AXES, "sentence_embedding": {0: "batch"}}
        export_onnx(SentenceEncoder(model).eval(), Signature(INPUTS, outputs), inputs, path)
    else:
        bert = model[0].auto_model.eval()
        export_onnx(bert, Signature(INPUTS, {"last_hidden_state": TEXT_AXES}), inputs, path)


def references(folder: Path) -> dict[str, Any]:
    """What sentence-transformers itself returns from the saved folder, loaded afresh."""
    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    embeddings = model.encode(SENTENCES, convert_to_numpy=True)
    [tokens] = model.encode(SENTENCES[:1], output_value="token_embeddings")
    return {
        "source": "SentenceTransformer(folder).encode(sentences), sentence-transformers "
        + __import__("sentence_transformers").__version__,
        "sentences": SENTENCES,
        "embeddings": np.asarray(embeddings, dtype=np.float64).tolist(),
        "token_embeddings_of_first": np.asarray(tokens, dtype=np.float64).tolist(),
    }


def build_sentence(out: Path = DEFAULT_OUT) -> None:
    """Every variant folder under out, each staged and renamed into place."""
    for name, variant in VARIANTS.items():
        with tempfile.TemporaryDirectory() as scratch, staged(out / name, replace=True) as folder:
            model = sentence_model(variant, Path(scratch))
            model.save(str(folder))
            # The model card names temporary paths and dates: not part of the fixture.
            (folder / "README.md").unlink(missing_ok=True)
            export(model, variant, folder / "model.onnx")
            (folder / "reference.json").write_text(json.dumps(references(folder), indent=1) + "\n")
            for empty in [p for p in folder.iterdir() if p.is_dir() and not any(p.iterdir())]:
                shutil.rmtree(empty)
        size = sum(path.stat().st_size for path in (out / name).rglob("*") if path.is_file())
        print(f"{name:24} {size / 1024:7.1f} KiB")
