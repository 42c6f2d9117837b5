"""The wire format: what parse_request accepts, how it refuses, and the exported JSON Schemas."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from schemas import (
    AudioArrayInputs,
    AudioFileInputs,
    ErrorCode,
    ErrorReply,
    ImageInputs,
    ImageTextInputs,
    InferTensor,
    Modality,
    RequestRejected,
    Result,
    TextInputs,
    VideoInputs,
    ZeroShotImageInputs,
    parse_request,
)
from schemas.errors import InferenceError
from schemas.export import JSON_DIR, render_schemas
from schemas.limits import MAX_MEDIA_B64_CHARS, MAX_TENSOR_ELEMENTS, MAX_TEXT_CHARS

SAMPLES = Path(__file__).resolve().parent.parent / "models" / "samples"
PNG = (SAMPLES / "image.png").read_bytes()
WAV = (SAMPLES / "audio.wav").read_bytes()
PNG_B64 = base64.b64encode(PNG).decode()
WAV_B64 = base64.b64encode(WAV).decode()


def raw(inputs: Any, **fields: Any) -> bytes:
    return json.dumps({"id": "r-1", "model": "tiny", "inputs": inputs, **fields}).encode()


def rejected(message: bytes, modality: Modality = Modality.TEXT, **kwargs: Any) -> RequestRejected:
    with pytest.raises(RequestRejected) as info:
        parse_request(message, modality, **kwargs)
    return info.value


# -- what is accepted ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("modality", "inputs", "expected"),
    [
        (Modality.TEXT, {"text": "hello"}, TextInputs),
        (Modality.TEXT, {"text": "a man sleeps", "text_pair": "a person rests"}, TextInputs),
        (Modality.VISION, {"image": PNG_B64}, ImageInputs),
        (Modality.AUDIO, {"audio": WAV_B64}, AudioFileInputs),
        (Modality.AUDIO, {"array": [0.0, 0.5, -0.5], "sampling_rate": 16000}, AudioArrayInputs),
        (Modality.VIDEO, {"frames": [PNG_B64, PNG_B64]}, VideoInputs),
        (Modality.MULTIMODAL, {"image": PNG_B64, "candidate_labels": ["cat"]}, ZeroShotImageInputs),
        (Modality.MULTIMODAL, {"image": PNG_B64, "text": "a cat"}, ImageTextInputs),
    ],
)
def test_each_modality_parses_its_named_inputs(
    modality: Modality, inputs: dict[str, Any], expected: type
) -> None:
    request = parse_request(raw(inputs), modality)
    assert request.modality is modality
    assert isinstance(request.inputs, expected)
    assert (request.id, request.model, request.parameters, request.deadline_ms) == (
        "r-1",
        "tiny",
        {},
        None,
    )


def test_media_arrive_as_decoded_file_bytes() -> None:
    request = parse_request(raw({"image": PNG_B64}), Modality.VISION)
    assert isinstance(request.inputs, ImageInputs)
    assert request.inputs.image == PNG
    audio = parse_request(raw({"audio": WAV_B64}), Modality.AUDIO)
    assert isinstance(audio.inputs, AudioFileInputs)
    assert audio.inputs.audio == WAV


def test_a_data_url_is_accepted_for_media() -> None:
    request = parse_request(raw({"image": "data:image/png;base64," + PNG_B64}), Modality.VISION)
    assert isinstance(request.inputs, ImageInputs)
    assert request.inputs.image == PNG


def test_a_request_serializes_back_to_the_same_wire_form() -> None:
    message = raw({"image": PNG_B64}, parameters={"top_k": 2}, deadline_ms=1_700_000_000_000)
    request = parse_request(message, Modality.VISION)
    assert json.loads(request.model_dump_json()) == json.loads(message)


def test_parameters_take_json_scalars_and_lists() -> None:
    parameters = {"top_k": 3, "threshold": 0.5, "flag": True, "label": "x", "none": None}
    parameters["labels"] = ["a", 1, 2.5, False, None]
    request = parse_request(raw({"text": "hi"}, parameters=parameters), Modality.TEXT)
    assert request.parameters == parameters
    assert type(request.parameters["flag"]) is bool
    assert type(request.parameters["top_k"]) is int


def test_tensor_inputs_are_flattened_row_major() -> None:
    tensor = {"name": "input_ids", "shape": [2, 3], "datatype": "INT64", "data": [[1, 2, 3], [4, 5, 6]]}
    request = parse_request(raw([tensor]), Modality.TEXT)
    assert isinstance(request.inputs, list)
    assert request.inputs[0].data == [1, 2, 3, 4, 5, 6]
    assert request.inputs[0].shape == [2, 3]


def test_deeply_nested_tensor_data_keeps_its_order() -> None:
    data = [[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]
    tensor = InferTensor.model_validate({"name": "x", "shape": [2, 2, 2], "datatype": "FP32", "data": data})
    assert tensor.data == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]


@pytest.mark.parametrize(
    ("datatype", "data"),
    [("BOOL", [True, False]), ("UINT8", [0, 255]), ("INT8", [-128, 127]), ("FP16", [1, 0.5])],
)
def test_tensor_datatypes_accept_their_values(datatype: str, data: list[Any]) -> None:
    tensor = InferTensor.model_validate({"name": "x", "shape": [2], "datatype": datatype, "data": data})
    assert tensor.data == data


# -- how it refuses -----------------------------------------------------------------


@pytest.mark.parametrize("message", [b'{"id": "r-1", "model": ', b"\xff\xfe", b""])
def test_malformed_json_is_invalid_json_without_id(message: bytes) -> None:
    error = rejected(message)
    assert error.code is ErrorCode.INVALID_JSON
    assert (error.request_id, error.model) == (None, None)


def test_json_that_is_not_an_object_is_an_invalid_request() -> None:
    assert rejected(b"[1, 2]").code is ErrorCode.INVALID_REQUEST


def test_a_schema_error_keeps_the_readable_id_and_model() -> None:
    error = rejected(raw({"txt": "typo"}))
    assert error.code is ErrorCode.INVALID_REQUEST
    assert (error.request_id, error.model) == ("r-1", "tiny")
    assert "inputs" in error.message


@pytest.mark.parametrize(
    "message",
    [
        raw({"text": "hi"}, extra="field"),
        raw({"text": "hi"}, deadline_ms=-1),
        raw({"text": ""}),
        json.dumps({"model": "tiny", "inputs": {"text": "hi"}}).encode(),
        json.dumps({"id": "", "model": "tiny", "inputs": {"text": "hi"}}).encode(),
        json.dumps({"id": 7, "model": "tiny", "inputs": {"text": "hi"}}).encode(),
    ],
)
def test_structural_mistakes_are_invalid_requests(message: bytes) -> None:
    assert rejected(message).code is ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("model", ["../etc", "a/b", ".hidden", "", "x" * 129])
def test_model_names_are_never_paths(model: str) -> None:
    message = json.dumps({"id": "r-1", "model": model, "inputs": {"text": "hi"}}).encode()
    assert rejected(message).code is ErrorCode.INVALID_REQUEST


def test_an_oversize_id_is_invalid_and_not_echoed() -> None:
    message = json.dumps({"id": "x" * 257, "model": "tiny", "inputs": {"text": "hi"}}).encode()
    error = rejected(message)
    assert error.code is ErrorCode.INVALID_REQUEST
    assert error.request_id is None
    assert error.model == "tiny"


def test_a_message_over_the_byte_limit_is_refused_before_parsing() -> None:
    error = rejected(raw({"text": "hi"}), max_bytes=10)
    assert error.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert error.request_id is None  # not parsed at all


@pytest.mark.parametrize(
    ("modality", "inputs"),
    [
        (Modality.TEXT, {"text": "x" * (MAX_TEXT_CHARS + 1)}),
        (Modality.VISION, {"image": "A" * (MAX_MEDIA_B64_CHARS + 4)}),
        (Modality.VIDEO, {"frames": [PNG_B64] * 65}),
        (Modality.MULTIMODAL, {"image": PNG_B64, "candidate_labels": ["x"] * 65}),
    ],
)
def test_oversize_content_is_payload_too_large(modality: Modality, inputs: dict[str, Any]) -> None:
    error = rejected(raw(inputs), modality)
    assert error.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert error.request_id == "r-1"


def test_too_many_parameters_are_payload_too_large() -> None:
    parameters = {f"p{i}": i for i in range(33)}
    assert rejected(raw({"text": "hi"}, parameters=parameters)).code is ErrorCode.PAYLOAD_TOO_LARGE


def test_nested_objects_are_not_parameters() -> None:
    message = raw({"text": "hi"}, parameters={"x": {"nested": 1}})
    assert rejected(message).code is ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize(
    ("modality", "inputs"),
    [
        (Modality.VISION, {"image": "not base64!"}),
        (Modality.VISION, {"image": PNG_B64 + "\n"}),
        (Modality.VISION, {"image": WAV_B64}),  # a WAV is no image
        (Modality.AUDIO, {"audio": ""}),  # audio and video files: FFmpeg judges any non-empty bytes
        (Modality.VIDEO, {"video": ""}),
        (Modality.VIDEO, {"frames": [PNG_B64, WAV_B64]}),
    ],
)
def test_bad_media_is_undecodable_input(modality: Modality, inputs: dict[str, Any]) -> None:
    error = rejected(raw(inputs), modality)
    assert error.code is ErrorCode.UNDECODABLE_INPUT
    assert (error.request_id, error.model) == ("r-1", "tiny")


def test_audio_array_needs_its_sampling_rate() -> None:
    error = rejected(raw({"array": [0.1, 0.2]}), Modality.AUDIO)
    assert error.code is ErrorCode.INVALID_REQUEST
    assert "sampling_rate" in error.message


@pytest.mark.parametrize("template", ["{0.__class__}", "{label}", "a {} and {}", "no placeholder", "{} }"])
def test_hypothesis_templates_allow_one_bare_placeholder_only(template: str) -> None:
    inputs = {"image": PNG_B64, "candidate_labels": ["cat"], "hypothesis_template": template}
    assert rejected(raw(inputs), Modality.MULTIMODAL).code is ErrorCode.INVALID_REQUEST


def test_a_proper_hypothesis_template_is_kept() -> None:
    inputs = {"image": PNG_B64, "candidate_labels": ["cat"], "hypothesis_template": "a photo of {}."}
    request = parse_request(raw(inputs), Modality.MULTIMODAL)
    assert isinstance(request.inputs, ZeroShotImageInputs)
    assert request.inputs.hypothesis_template == "a photo of {}."


@pytest.mark.parametrize(
    "tensor",
    [
        {"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [[1, 2, 3]]},
        {"name": "x", "shape": [2], "datatype": "UINT8", "data": [1, 256]},
        {"name": "x", "shape": [2], "datatype": "INT32", "data": [1, 2.5]},
        {"name": "x", "shape": [1], "datatype": "BOOL", "data": [1]},
        {"name": "x", "shape": [1], "datatype": "FP32", "data": ["1.0"]},
        {"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]},
        {"name": "x", "shape": [-1], "datatype": "FP32", "data": [1.0]},
        {"name": "x", "shape": [1] * 9, "datatype": "FP32", "data": [1.0]},
        {"name": "x", "shape": [1], "datatype": "FP32", "data": [[[[[[[[[1.0]]]]]]]]]},
    ],
)
def test_inconsistent_tensors_are_invalid_requests(tensor: dict[str, Any]) -> None:
    assert rejected(raw([tensor])).code is ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        ("FP32", float("nan")),
        ("FP32", float("inf")),
        ("FP64", float("-inf")),
        ("FP16", 65520.0),
        ("FP32", 1e39),
    ],
)
def test_nan_infinite_and_out_of_range_floats_are_invalid_requests(datatype: str, value: float) -> None:
    # JSON's NaN/Infinity (json.dumps writes them) are refused; 65520 is infinite as FP16.
    tensor = {"name": "pixel_values", "shape": [2], "datatype": datatype, "data": [0.5, value]}
    error = rejected(raw([tensor]), Modality.VISION)
    assert error.code is ErrorCode.INVALID_REQUEST and "NaN" in error.message


def test_a_huge_tensor_is_payload_too_large_before_its_data_is_read() -> None:
    tensor = {"name": "x", "shape": [MAX_TENSOR_ELEMENTS + 1], "datatype": "FP32", "data": [0.0]}
    assert rejected(raw([tensor])).code is ErrorCode.PAYLOAD_TOO_LARGE


def test_an_unknown_modality_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="is not a valid Modality"):
        parse_request(raw({"text": "hi"}), "smell")  # type: ignore[arg-type]


# -- replies and error codes -----------------------------------------------------------


def test_result_and_error_replies_round_trip() -> None:
    result = Result.model_validate(
        {
            "id": "r-1",
            "model": "tiny",
            "task": "text-classification",
            "outputs": [{"label": "POSITIVE", "score": 0.9}],
            "timing": {"queue_ms": 1.5, "inference_ms": 3.0, "batch_size": 4},
        }
    )
    assert result.truncated is False
    assert Result.model_validate_json(result.model_dump_json()) == result
    error = ErrorReply.model_validate(
        {"id": None, "model": None, "error": {"code": "invalid_json", "message": "x"}}
    )
    assert error.error.code is ErrorCode.INVALID_JSON
    assert json.loads(error.model_dump_json())["id"] is None


def test_every_error_code_has_exactly_one_exception() -> None:
    # One hierarchy: the worker's failures one class per code, a parse rejection (the only source of
    # invalid_json) a RequestRejected carrying the code parse_request chose, the base itself internal.
    worker_classes = [cls for cls in InferenceError.__subclasses__() if cls is not RequestRejected]
    codes = [cls.code for cls in worker_classes]
    assert issubclass(RequestRejected, InferenceError)
    assert sorted([*codes, ErrorCode.INVALID_JSON, InferenceError.code]) == sorted(ErrorCode)


# -- JSON Schema export -------------------------------------------------------------


def test_committed_json_schemas_are_up_to_date() -> None:
    rendered = render_schemas()
    on_disk = {path.name: path.read_text(encoding="utf-8") for path in JSON_DIR.glob("*.json")}
    assert on_disk == rendered, "run `python -m schemas` and commit schemas/json/"


def test_there_is_a_request_schema_per_modality() -> None:
    names = set(render_schemas())
    assert {f"request.{m.value}.schema.json" for m in Modality} <= names
    assert {"result.schema.json", "error.schema.json"} <= names
