"""Work out, from a model folder alone, what a model eats and what it returns.

One job a module: ``keys`` (the documented key set), ``record`` (``ModelMetadata`` and its
buckets), ``graph`` (the ONNX file), ``hf_files`` and ``sentence_transformers`` (the folder's
files), ``inference`` (what the graph alone says), ``precedence`` (which source wins, and the
record of where each field came from), ``render`` (the ``inspect`` text).
"""

from worker.serving.metadata.graph import iter_model_folders, read_graph
from worker.serving.metadata.hf_files import HFFiles
from worker.serving.metadata.inference import infer_modality, infer_task
from worker.serving.metadata.keys import (
    COMPANION_FILE,
    DEFAULT_AUDIO_SECONDS,
    DEFAULT_BATCH_SIZES,
    DEFAULT_SEQUENCE_LENGTHS,
    METADATA_PREFIX,
    ONNX_FILES,
    POOLED_OUTPUTS,
    POOLING_MODES,
    PROCESSOR_FOR_MODALITY,
    TOKEN_OUTPUTS,
    Declared,
    MetadataError,
    ProcessorKind,
    Source,
)
from worker.serving.metadata.precedence import load_metadata
from worker.serving.metadata.record import Bucket, DimRole, ModelMetadata, TensorSpec
from worker.serving.metadata.sentence_transformers import SentenceTransformerFiles

__all__ = [
    "COMPANION_FILE",
    "DEFAULT_AUDIO_SECONDS",
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_SEQUENCE_LENGTHS",
    "METADATA_PREFIX",
    "ONNX_FILES",
    "POOLED_OUTPUTS",
    "POOLING_MODES",
    "PROCESSOR_FOR_MODALITY",
    "TOKEN_OUTPUTS",
    "Bucket",
    "Declared",
    "DimRole",
    "HFFiles",
    "MetadataError",
    "ModelMetadata",
    "ProcessorKind",
    "SentenceTransformerFiles",
    "Source",
    "TensorSpec",
    "infer_modality",
    "infer_task",
    "iter_model_folders",
    "load_metadata",
    "read_graph",
]
