"""Request wire format per modality, and `parse_request`, the one way raw bytes become a request.

`deadline_ms` is an absolute Unix epoch time in milliseconds (UTC) after which the answer is
useless to the client; a worker that picks the request up later answers `deadline_exceeded`
instead of running it. Omit it to wait as long as it takes.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar, Final, Generic, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
)
from pydantic_core import ErrorDetails, from_json

from schemas.codes import ErrorCode
from schemas.errors import InferenceError
from schemas.limits import (
    MAX_AUDIO_SAMPLES,
    MAX_CANDIDATE_LABELS,
    MAX_ID_CHARS,
    MAX_LABEL_CHARS,
    MAX_MODEL_CHARS,
    MAX_PARAMETER_LIST_ITEMS,
    MAX_PARAMETER_NAME_CHARS,
    MAX_PARAMETER_STRING_CHARS,
    MAX_PARAMETERS,
    MAX_REQUEST_BYTES,
    MAX_SAMPLING_RATE,
    MAX_TENSORS,
    MAX_TEXT_CHARS,
    MAX_VIDEO_FRAMES,
    MIN_SAMPLING_RATE,
)
from schemas.media import AudioB64, ImageB64, VideoB64
from schemas.tensors import InferTensor


class Modality(StrEnum):
    """Kind of input; each has its own request topic `<prefix>.<modality>.requests`."""

    TEXT = "text"
    VISION = "vision"
    AUDIO = "audio"
    VIDEO = "video"
    MULTIMODAL = "multimodal"


_FROZEN = ConfigDict(extra="forbid", frozen=True)

Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL_CHARS)]
# Model names are registry keys, never paths: no separators, no leading dot.
ModelName = Annotated[
    str,
    StringConstraints(max_length=MAX_MODEL_CHARS, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"),
]
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
Scalar = Annotated[str, StringConstraints(max_length=MAX_PARAMETER_STRING_CHARS)] | int | float | bool | None
ParameterValue = Scalar | Annotated[list[Scalar], Field(max_length=MAX_PARAMETER_LIST_ITEMS)]
Parameters = Annotated[
    dict[
        Annotated[str, StringConstraints(min_length=1, max_length=MAX_PARAMETER_NAME_CHARS)], ParameterValue
    ],
    Field(max_length=MAX_PARAMETERS),
]
TensorInputs = Annotated[list[InferTensor], Field(min_length=1, max_length=MAX_TENSORS)]
NamedInputs = TypeVar("NamedInputs")


class TextInputs(BaseModel):
    """A text, or a pair of texts for pair classification (NLI, reranking)."""

    model_config = _FROZEN

    text: Text
    text_pair: Text | None = None


class ImageInputs(BaseModel):
    """One image file (PNG, JPEG, GIF, WebP, BMP, TIFF, ...)."""

    model_config = _FROZEN

    image: ImageB64


class AudioFileInputs(BaseModel):
    """One audio file in any container and codec FFmpeg decodes (WAV, FLAC, MP3, Ogg, M4A, WebM, ...)."""

    model_config = _FROZEN

    audio: AudioB64


class AudioArrayInputs(BaseModel):
    """Mono samples as floats, with their sampling rate in Hz (resampled to the model's rate)."""

    model_config = _FROZEN

    array: list[float] = Field(min_length=1, max_length=MAX_AUDIO_SAMPLES)
    sampling_rate: int = Field(ge=MIN_SAMPLING_RATE, le=MAX_SAMPLING_RATE)


class VideoInputs(BaseModel):
    """Video as an ordered list of image frames."""

    model_config = _FROZEN

    frames: list[ImageB64] = Field(min_length=1, max_length=MAX_VIDEO_FRAMES)


class VideoFileInputs(BaseModel):
    """One video file in any container and codec FFmpeg decodes (MP4, MOV, WebM, MKV, AVI, ...)."""

    model_config = _FROZEN

    video: VideoB64


class ZeroShotImageInputs(BaseModel):
    """An image scored against candidate labels (CLIP-style zero-shot classification)."""

    model_config = _FROZEN

    image: ImageB64
    candidate_labels: list[Label] = Field(min_length=1, max_length=MAX_CANDIDATE_LABELS)
    hypothesis_template: str | None = Field(
        default=None,
        max_length=MAX_LABEL_CHARS,
        description='Sentence with exactly one "{}" for the label, e.g. "a photo of {}."',
    )

    @field_validator("hypothesis_template")
    @classmethod
    def _one_placeholder(cls, value: str | None) -> str | None:
        # The worker calls template.format(label): any other brace could reach
        # attributes ("{0.__class__}"), so only a single bare "{}" is allowed.
        if value is not None and (value.count("{") != 1 or value.count("}") != 1 or "{}" not in value):
            raise ValueError('hypothesis_template must contain exactly one "{}" and no other braces')
        return value


class ImageTextInputs(BaseModel):
    """An image with a text about it (image-text matching, visual question answering)."""

    model_config = _FROZEN

    image: ImageB64
    text: Text


def _tensor_or_named(value: Any) -> str:
    # Routing on the JSON shape keeps validation errors about the branch the client meant.
    return "tensors" if isinstance(value, list) else "named"


def _audio_form(value: Any) -> str:
    return "samples" if isinstance(value, dict) and "array" in value else "file"


def _video_form(value: Any) -> str:
    return "file" if isinstance(value, dict) and "video" in value else "frames"


def _multimodal_form(value: Any) -> str:
    return "zero_shot" if isinstance(value, dict) and "candidate_labels" in value else "image_text"


AudioInputs = Annotated[
    Annotated[AudioFileInputs, Tag("file")] | Annotated[AudioArrayInputs, Tag("samples")],
    Discriminator(_audio_form),
]
VideoNamedInputs = Annotated[
    Annotated[VideoInputs, Tag("frames")] | Annotated[VideoFileInputs, Tag("file")],
    Discriminator(_video_form),
]
MultimodalInputs = Annotated[
    Annotated[ZeroShotImageInputs, Tag("zero_shot")] | Annotated[ImageTextInputs, Tag("image_text")],
    Discriminator(_multimodal_form),
]


class BaseRequest(BaseModel, Generic[NamedInputs]):
    """Fields every request carries; `inputs` are the modality's named inputs or OIP tensors."""

    model_config = _FROZEN
    modality: ClassVar[Modality]

    id: RequestId = Field(description="Client-chosen id, echoed in the reply and used as the key.")
    model: ModelName
    inputs: Annotated[
        Annotated[NamedInputs, Tag("named")] | Annotated[TensorInputs, Tag("tensors")],
        Discriminator(_tensor_or_named),
    ]
    parameters: Parameters = Field(
        default_factory=dict, description="Task options such as top_k; JSON scalars or lists."
    )
    deadline_ms: int | None = Field(
        default=None,
        ge=0,
        description="Unix epoch milliseconds after which the worker answers deadline_exceeded.",
    )


class TextRequest(BaseRequest[TextInputs]):
    """A request on `<prefix>.text.requests`."""

    modality: ClassVar[Modality] = Modality.TEXT


class VisionRequest(BaseRequest[ImageInputs]):
    """A request on `<prefix>.vision.requests`."""

    modality: ClassVar[Modality] = Modality.VISION


class AudioRequest(BaseRequest[AudioInputs]):
    """A request on `<prefix>.audio.requests`."""

    modality: ClassVar[Modality] = Modality.AUDIO


class VideoRequest(BaseRequest[VideoNamedInputs]):
    """A request on `<prefix>.video.requests`."""

    modality: ClassVar[Modality] = Modality.VIDEO


class MultimodalRequest(BaseRequest[MultimodalInputs]):
    """A request on `<prefix>.multimodal.requests`."""

    modality: ClassVar[Modality] = Modality.MULTIMODAL


Request = TextRequest | VisionRequest | AudioRequest | VideoRequest | MultimodalRequest

REQUEST_TYPES: Final[dict[Modality, type[Request]]] = {
    cls.modality: cls for cls in (TextRequest, VisionRequest, AudioRequest, VideoRequest, MultimodalRequest)
}


class RequestRejected(InferenceError, ValueError):
    """Raised by `parse_request`: why the bytes are no valid request, with the id/model it could read."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        request_id: str | None = None,
        model: str | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id, model=model)
        self.code = code


def parse_request(raw: bytes, modality: Modality, *, max_bytes: int = MAX_REQUEST_BYTES) -> Request:
    """Validate one raw message as a request of `modality`; raise `RequestRejected` if it is not."""
    if len(raw) > max_bytes:
        raise RequestRejected(
            ErrorCode.PAYLOAD_TOO_LARGE, f"message is {len(raw)} bytes, the limit is {max_bytes}"
        )
    try:
        return REQUEST_TYPES[Modality(modality)].model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        request_id, model = _readable_id_and_model(raw)
        raise RequestRejected(
            _code_for(errors), _describe(errors), request_id=request_id, model=model
        ) from None


_SIZE_ERRORS: Final = frozenset({"string_too_long", "too_long"})
_MAX_REPORTED_ERRORS: Final = 3


def _code_for(errors: list[ErrorDetails]) -> ErrorCode:
    """The most specific code among pydantic's errors: a client fixes that one first."""
    types = {e["type"] for e in errors}
    if "json_invalid" in types:
        return ErrorCode.INVALID_JSON
    if "undecodable_input" in types:
        return ErrorCode.UNDECODABLE_INPUT
    # Oversize content is payload_too_large; an oversize id or model name is just invalid.
    if "payload_too_large" in types or any(
        e["type"] in _SIZE_ERRORS and e["loc"][:1] in (("inputs",), ("parameters",)) for e in errors
    ):
        return ErrorCode.PAYLOAD_TOO_LARGE
    return ErrorCode.INVALID_REQUEST


def _describe(errors: list[ErrorDetails]) -> str:
    parts = [
        f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}"
        for e in errors[:_MAX_REPORTED_ERRORS]
    ]
    if len(errors) > _MAX_REPORTED_ERRORS:
        parts.append(f"and {len(errors) - _MAX_REPORTED_ERRORS} more")
    return "; ".join(parts)


def _readable_id_and_model(raw: bytes) -> tuple[str | None, str | None]:
    """Best effort, for the error reply: id and model if the JSON has them as sane strings."""
    try:
        document = from_json(raw)
    except ValueError:
        return None, None
    if not isinstance(document, dict):
        return None, None
    request_id, model = document.get("id"), document.get("model")
    return (
        request_id if isinstance(request_id, str) and 0 < len(request_id) <= MAX_ID_CHARS else None,
        model if isinstance(model, str) and 0 < len(model) <= MAX_MODEL_CHARS else None,
    )
