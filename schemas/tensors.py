"""Open Inference Protocol (KServe V2) input tensors: `{"name", "shape", "datatype", "data"}`."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated, Any, Final

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from schemas.limits import MAX_TENSOR_ELEMENTS, MAX_TENSOR_NAME_CHARS, MAX_TENSOR_RANK


class Datatype(StrEnum):
    """Element types accepted in tensor form (the OIP set without BYTES)."""

    BOOL = "BOOL"
    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT64 = "UINT64"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"


_INT_RANGES: Final[dict[Datatype, tuple[int, int]]] = {
    Datatype.UINT8: (0, 2**8 - 1),
    Datatype.UINT16: (0, 2**16 - 1),
    Datatype.UINT32: (0, 2**32 - 1),
    Datatype.UINT64: (0, 2**64 - 1),
    Datatype.INT8: (-(2**7), 2**7 - 1),
    Datatype.INT16: (-(2**15), 2**15 - 1),
    Datatype.INT32: (-(2**31), 2**31 - 1),
    Datatype.INT64: (-(2**63), 2**63 - 1),
}


def _too_many_elements(count: int) -> PydanticCustomError:
    return PydanticCustomError(
        "payload_too_large",
        "tensor has {count} elements, the limit is {limit}",
        {"count": count, "limit": MAX_TENSOR_ELEMENTS},
    )


def _flatten(value: Any) -> Any:
    """Nested row-major lists -> one flat list, bounded in depth and length."""
    if not isinstance(value, list):
        return value  # pydantic reports the type error
    flat: list[Any] = []
    # An explicit stack of iterators keeps the depth bound independent of Python's
    # recursion limit and never copies a row.
    stack: list[tuple[Iterator[Any], int]] = [(iter(value), 1)]
    while stack:
        items, depth = stack[-1]
        for item in items:
            if isinstance(item, list):
                if depth >= MAX_TENSOR_RANK:
                    raise PydanticCustomError(
                        "invalid_tensor", "data is nested deeper than {rank}", {"rank": depth}
                    )
                stack.append((iter(item), depth + 1))
                break
            flat.append(item)
        else:
            stack.pop()
        if len(flat) > MAX_TENSOR_ELEMENTS:
            raise _too_many_elements(len(flat))
    return flat


#: The largest finite value of each float type: a number beyond it would become infinite when cast.
_FLOAT_LIMITS: Final[dict[Datatype, float]] = {
    Datatype.FP16: 65504.0,
    Datatype.FP32: 3.4028234663852886e38,
    Datatype.FP64: sys.float_info.max,
}


def _finite(data: list[float | int]) -> bool:
    """No NaN, no infinity: a finite sum proves it at once; only a sum that overflowed is looked into."""
    return math.isfinite(sum(data)) or not any(x != x or abs(x) == math.inf for x in data)


def _check_elements(datatype: Datatype, data: list[Any]) -> None:
    if datatype is Datatype.BOOL:
        ok = all(type(x) is bool for x in data)
    elif datatype in _INT_RANGES:
        low, high = _INT_RANGES[datatype]
        ok = all(type(x) is int for x in data) and (not data or low <= min(data) <= max(data) <= high)
    else:
        ok = all(type(x) is float or type(x) is int for x in data)
        # NaN and infinities (JSON's NaN/Infinity, or 1e999) poison every score they touch, and a
        # number too large for the type becomes one when cast: both are refused here, typed.
        limit = _FLOAT_LIMITS[datatype]
        if ok and data and not (_finite(data) and -limit <= min(data) and max(data) <= limit):
            raise PydanticCustomError(
                "invalid_tensor",
                "data holds NaN, infinite or out-of-range values for {datatype}",
                {"datatype": datatype.value},
            )
    if not ok:
        raise PydanticCustomError(
            "invalid_tensor",
            "data holds values that are not {datatype}",
            {"datatype": datatype.value},
        )


class InferTensor(BaseModel):
    """One named input tensor; `data` is validated against shape/datatype and stored flat."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=MAX_TENSOR_NAME_CHARS)
    # The rank bound is checked below, not as max_length: too many dimensions is a
    # malformed tensor (invalid_request), not an oversize payload.
    shape: list[Annotated[int, Field(ge=0)]] = Field(json_schema_extra={"maxItems": MAX_TENSOR_RANK})
    datatype: Datatype
    # list[Any] on purpose: a typed union list costs ~0.65 s per million floats in
    # pydantic-core (measured), the explicit element check below ~0.06 s.
    data: Annotated[
        list[Any],
        BeforeValidator(_flatten),
        WithJsonSchema(
            {
                "type": "array",
                "items": {"anyOf": [{"type": "number"}, {"type": "boolean"}, {"type": "array"}]},
                "description": "Row-major elements, flat or nested like `shape`.",
            }
        ),
    ]

    @model_validator(mode="after")
    def _data_matches_shape(self) -> InferTensor:
        if len(self.shape) > MAX_TENSOR_RANK:
            raise PydanticCustomError(
                "invalid_tensor",
                "shape has {rank} dimensions, the limit is {limit}",
                {"rank": len(self.shape), "limit": MAX_TENSOR_RANK},
            )
        expected = math.prod(self.shape)
        if expected > MAX_TENSOR_ELEMENTS:
            raise _too_many_elements(expected)
        if expected != len(self.data):
            raise PydanticCustomError(
                "invalid_tensor",
                "shape {shape} needs {expected} elements, data has {actual}",
                {"shape": self.shape, "expected": expected, "actual": len(self.data)},
            )
        _check_elements(self.datatype, self.data)
        return self
