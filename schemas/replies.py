"""Reply wire format: the result of a request, or the typed error that replaced it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from schemas.codes import ErrorCode
from schemas.limits import MAX_ID_CHARS, MAX_MODEL_CHARS


class Timing(BaseModel):
    """Where the time of one request went, as measured by the worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue_ms: float = Field(ge=0, description="From broker timestamp to the start of its batch.")
    inference_ms: float = Field(ge=0, description="Pre/post-processing and ONNX run of its batch.")
    batch_size: int = Field(ge=1, description="Real requests in the batch (padding excluded).")


class Result(BaseModel):
    """A successful answer; `outputs` is shaped like the matching transformers pipeline output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    task: str = Field(description="Task head that produced `outputs`, e.g. text-classification.")
    outputs: JsonValue
    truncated: bool = Field(
        default=False, description="True when the input was cut to the model's fixed length."
    )
    timing: Timing


class ErrorDetail(BaseModel):
    """Why a request got no result: a stable code and a human-readable message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: ErrorCode
    message: str


class ErrorReply(BaseModel):
    """An error answer; `id`/`model` are null when they could not be read from the message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None
    model: str | None
    error: ErrorDetail
