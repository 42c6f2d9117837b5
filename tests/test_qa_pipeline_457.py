"""The stored question-answering references against the real transformers 4.57 pipeline.

transformers 5 removed ``QuestionAnsweringPipeline``, so ``models/tiny.py`` stores the outputs of
a step-by-step replay of the 4.57 pipeline on PyTorch. Here the real 4.57 pipeline answers every
stored sample and call (``make test-compat``: transformers 4.57 with torch); it must agree with what
is stored, which is what the worker's own answers are compared with everywhere else.
"""

from __future__ import annotations

import pytest
import transformers

from tests.references import TINY, assert_pipeline_equal, load_samples

pytestmark = [pytest.mark.torch, pytest.mark.transformers457]


def test_stored_qa_references_are_what_the_real_457_pipeline_answers() -> None:
    # Hard requirements of this job: a missing torch or a transformers without the pipeline fails it.
    import torch  # noqa: F401

    assert transformers.__version__.startswith("4.57."), transformers.__version__
    from models.tiny import plain

    qa = transformers.pipeline("question-answering", model=str(TINY / "bert-qa"))
    assert type(qa).__name__ == "QuestionAnsweringPipeline"
    samples, _ = load_samples("bert-qa")
    for sample in samples:
        for call in sample.calls:
            live = plain(qa(question=sample.raw["text"], context=sample.raw["text_pair"], **call.kwargs))
            assert_pipeline_equal(live, call.outputs, 1e-6, where=f"{sample.raw['text']!r} {call.kwargs}")
