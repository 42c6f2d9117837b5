"""The wire format: request, result and error models, and the JSON Schemas made from them."""

from schemas.codes import ErrorCode
from schemas.errors import InferenceError
from schemas.limits import MAX_REQUEST_BYTES
from schemas.replies import ErrorDetail, ErrorReply, Result, Timing
from schemas.requests import (
    REQUEST_TYPES,
    AudioArrayInputs,
    AudioFileInputs,
    AudioRequest,
    BaseRequest,
    ImageInputs,
    ImageTextInputs,
    Modality,
    MultimodalRequest,
    Request,
    RequestRejected,
    TextInputs,
    TextRequest,
    VideoFileInputs,
    VideoInputs,
    VideoRequest,
    VisionRequest,
    ZeroShotImageInputs,
    parse_request,
)
from schemas.tensors import Datatype, InferTensor

__all__ = [
    "MAX_REQUEST_BYTES",
    "REQUEST_TYPES",
    "AudioArrayInputs",
    "AudioFileInputs",
    "AudioRequest",
    "BaseRequest",
    "Datatype",
    "ErrorCode",
    "ErrorDetail",
    "ErrorReply",
    "ImageInputs",
    "ImageTextInputs",
    "InferTensor",
    "InferenceError",
    "Modality",
    "MultimodalRequest",
    "Request",
    "RequestRejected",
    "Result",
    "TextInputs",
    "TextRequest",
    "Timing",
    "VideoFileInputs",
    "VideoInputs",
    "VideoRequest",
    "VisionRequest",
    "ZeroShotImageInputs",
    "parse_request",
]
