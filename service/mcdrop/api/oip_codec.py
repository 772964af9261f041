"""Open Inference Protocol v2 (REST) bodies <-> numpy: JSON and the binary tensor extension.

Pure bytes in, bytes out; the router adds HTTP. Binary tensors are little-endian, row-major,
concatenated after a JSON header whose length the `Inference-Header-Content-Length` header gives.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
from numpy.typing import NDArray

from mcdrop.errors import InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"

# The OIP tensor datatypes this service speaks, with their wire (little-endian) numpy dtypes.
_WIRE = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
         "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
         "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}  # fmt: skip
DATATYPES: dict[str, np.dtype[Any]] = {name: np.dtype(code) for name, code in _WIRE.items()}
_BY_KIND = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items()}
_UNSUPPORTED = ("BYTES",)
BF16 = "BF16"  # no numpy dtype: read as float32 (its high 16 bits), exact
MAX_DIMS = 64  # numpy's limit on an array's dimensions
_WIDEST = max(dt.itemsize for dt in DATATYPES.values())  # what a tensor may be cast to later
# The JSON scalars each kind of datatype accepts (JSON gives exactly these types, no subclasses).
_JSON_SCALARS: dict[str, set[type]] = {"b": {bool}, "i": {int}, "u": {int}, "f": {int, float}}


def datatype_of(array: NDArray[Any]) -> str:
    """The OIP datatype of a numpy array (any byte order); TypeError for other dtypes."""
    name = _BY_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if name is None:
        raise TypeError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")
    return name


@dataclass(frozen=True)
class InputTensor:
    """One request input; `data` is a writable native-endian array already shaped to `shape`."""

    name: str
    datatype: str
    shape: list[int]
    data: NDArray[Any]


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for; `binary` is resolved against `binary_data_output`."""

    name: str
    binary: bool
    parameters: dict[str, Any]


@dataclass(frozen=True)
class InferRequest:
    """A parsed inference request; `outputs` empty means every output."""

    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput]
    parameters: dict[str, Any]
    binary_output_default: bool


@dataclass(frozen=True)
class OutputTensor:
    """One response output; `data` is cast to `datatype` on the wire."""

    name: str
    datatype: str
    data: NDArray[Any]


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _flag(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}: must be true or false, got {_short(value)}")
    return value


def _object(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: must be a JSON object, got {_short(value)}")
    return value


def _load_json(header: bytes | memoryview) -> Any:
    try:
        return json.loads(bytes(header))
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except RecursionError as exc:
        raise InvalidInput("malformed JSON: nested too deeply") from exc
    except ValueError as exc:  # invalid UTF-8, integers with too many digits
        raise InvalidInput(f"malformed JSON: {exc}") from exc


def _header_and_tail(body: bytes, header_length: int | None) -> tuple[memoryview, memoryview]:
    """The JSON header and the binary tail of a body."""
    view = memoryview(body)
    if header_length is None:
        return view, view[len(view) :]
    if header_length < 0:
        raise InvalidInput(f"{HEADER_LENGTH} {header_length} must not be negative")
    if header_length > len(body):
        raise InvalidInput(
            f"{HEADER_LENGTH} {header_length} is larger than the body ({len(body)} bytes)"
        )
    return view[:header_length], view[header_length:]


def _leaves(data: list[Any], label: str) -> tuple[list[Any], set[type]]:
    """The scalars of rectangular nested lists in row-major order, and their Python types.

    Walks level by level in C-speed builtins; numpy's own inference is not used because it
    turns one long string among many into a fixed-width string array far larger than the body.
    """
    level: list[list[Any]] = [data]
    while True:
        if len(set(map(len, level))) > 1:
            raise InvalidInput(f"{label}: nested data must be rectangular (row-major)")
        items = list(chain.from_iterable(level))
        kinds = set(map(type, items))
        if list not in kinds:
            return items, kinds
        if kinds != {list}:
            raise InvalidInput(f"{label}: nested data must be rectangular (row-major)")
        level = items


def _from_json(data: Any, datatype: str, shape: list[int], label: str) -> NDArray[Any]:
    """Flat or nested JSON `data` -> a flat array of `datatype`, checking values and count."""
    if not isinstance(data, list):
        raise InvalidInput(f"{label}: data must be a list, got {_short(data)}")
    values, kinds = _leaves(data, label)
    wire = DATATYPES[datatype]
    native = wire.newbyteorder("=")
    if not kinds <= _JSON_SCALARS[wire.kind]:
        if wire.kind == "b":
            raise InvalidInput(f"{label}: BOOL data must be true/false values")
        if wire.kind == "f":
            raise InvalidInput(f"{label}: {datatype} data must hold only numbers")
    if wire.kind in "iu":
        info = np.iinfo(wire)
        if not kinds <= {int} or (values and (min(values) < info.min or max(values) > info.max)):
            raise InvalidInput(
                f"{label}: {datatype} data must be integers in [{info.min}, {info.max}]"
            )
    if len(values) != math.prod(shape):
        raise InvalidInput(
            f"{label}: shape {shape} needs {math.prod(shape)} values, got {len(values)}"
        )
    if wire.kind != "f":
        return np.array(values, dtype=native)
    try:
        wide = np.array(values, dtype=np.float64)
    except OverflowError as exc:  # an integer beyond float64's range
        raise InvalidInput(f"{label}: {datatype} data must be numbers within float range") from exc
    with np.errstate(over="ignore", invalid="ignore"):  # overflow gives inf, refused later
        return wide.astype(native)


def _bf16_as_float32(values: NDArray[Any]) -> NDArray[Any]:
    """BF16 values as float32 (a bfloat16 is a float32's high half, so this is exact): binary
    halves as sent (uint16), JSON numbers (read as float32) rounded to the nearest bfloat16."""
    if values.dtype == np.uint16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # to nearest, ties to even
    return rounded.astype(np.uint32).view(np.float32)


def _from_binary(
    tail: memoryview,
    offset: int,
    size: int,
    datatype: str,
    count: int,
    label: str,
    shown: str | None = None,
) -> NDArray[Any]:
    """`size` bytes at `offset` of the binary tail -> a flat array of `datatype` (named
    `shown` in errors, when it stands in for another, e.g. UINT16 for BF16)."""
    wire = DATATYPES[datatype]
    if size != count * wire.itemsize:
        raise InvalidInput(
            f"{label}: {count} {shown or datatype} values need {count * wire.itemsize} bytes, "
            f"binary_data_size is {size}"
        )
    remain = len(tail) - offset
    if size > remain:
        hint = "" if len(tail) else f" (is the {HEADER_LENGTH} header missing?)"
        raise InvalidInput(
            f"{label}: binary_data_size is {size} but only {remain} bytes remain{hint}"
        )
    if wire.kind == "b":
        flags: NDArray[np.bool_] = np.frombuffer(tail, np.uint8, count, offset) != 0
        return flags
    return np.frombuffer(tail, wire, count, offset).astype(wire.newbyteorder("="))


def _parse_input(raw: Any, index: int, tail: memoryview, offset: int) -> tuple[InputTensor, int]:
    """One entry of `inputs`; returns it and the offset of the next binary blob."""
    if not isinstance(raw, dict):
        raise InvalidInput(f"inputs[{index}]: must be an object with name, shape, datatype, data")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{index}].name: required (a non-empty string)")
    label = f"input {name!r}"
    datatype = raw.get("datatype")
    if datatype in _UNSUPPORTED:
        raise InvalidInput(f"{label}: datatype {datatype!r} is not supported; send numbers")
    if not isinstance(datatype, str) or (datatype not in DATATYPES and datatype != BF16):
        raise InvalidInput(
            f"{label}: datatype {_short(datatype)} is not a tensor datatype; "
            f"expected one of {', '.join(DATATYPES)}"
        )
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(f"{label}: shape must be a list of non-negative integers, got "
                           f"{_short(shape)}")  # fmt: skip
    if len(shape) > MAX_DIMS:
        raise InvalidInput(
            f"{label}: shape has {len(shape)} dimensions; at most {MAX_DIMS} are supported"
        )
    if math.prod(d for d in shape if d) * _WIDEST > sys.maxsize:
        # numpy cannot shape even an empty array past this (in any datatype the caller may cast
        # it to), and no body could hold the data
        raise InvalidInput(f"{label}: shape {_short(shape)} is too large for any tensor")
    parameters = _object(raw.get("parameters"), f"{label}: parameters")
    if "shared_memory_region" in parameters:
        raise InvalidInput(f"{label}: shared memory is not supported; send data or binary data")
    count = math.prod(shape)
    size = parameters.get("binary_data_size")
    read_as = datatype  # BF16 has no numpy dtype: read as float32 (JSON) or its halves
    if datatype == BF16:
        read_as = "FP32" if size is None else "UINT16"
    if size is None:
        if "data" not in raw:
            raise InvalidInput(f"{label}: data required (or parameters.binary_data_size)")
        data = _from_json(raw["data"], read_as, shape, label)
    else:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"{label}: binary_data_size must be a non-negative integer")
        if "data" in raw:
            raise InvalidInput(f"{label}: has both data and binary_data_size; send one")
        data = _from_binary(tail, offset, size, read_as, count, label, shown=datatype)
        offset += size
    if datatype == BF16:
        data = _bf16_as_float32(data)
    return InputTensor(name, datatype, shape, data.reshape(shape)), offset


def _parse_outputs(raw: Any, binary_default: bool) -> list[RequestedOutput]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidInput(f"outputs: must be a list of objects with a name, got {_short(raw)}")
    outputs: list[RequestedOutput] = []
    for index, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"outputs[{index}].name: required (a non-empty string)")
        if any(o.name == name for o in outputs):
            raise InvalidInput(f"output {name!r}: requested twice")
        parameters = _object(item.get("parameters"), f"output {name!r}: parameters")
        binary = parameters.get("binary_data", binary_default)
        binary = _flag(binary, f"output {name!r}: parameters.binary_data")
        outputs.append(RequestedOutput(name, binary, parameters))
    return outputs


def parse_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """Parse an infer body; `header_length` is Inference-Header-Content-Length (None: all JSON).

    Raises InvalidInput naming the input or field and the problem.
    """
    header, tail = _header_and_tail(body, header_length)
    doc = _load_json(header)
    if not isinstance(doc, dict):
        raise InvalidInput(f"request: must be a JSON object, got {_short(doc)}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"id: must be a string, got {_short(request_id)}")
    parameters = _object(doc.get("parameters"), "parameters")
    binary_default = _flag(
        parameters.get("binary_data_output", False), "parameters.binary_data_output"
    )
    raw_inputs = doc.get("inputs")
    if raw_inputs is None:
        raise InvalidInput("inputs: required")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput(f"inputs: must be a non-empty list of tensors, got {_short(raw_inputs)}")
    inputs: list[InputTensor] = []
    offset = 0
    for index, raw in enumerate(raw_inputs):
        tensor, offset = _parse_input(raw, index, tail, offset)
        if any(t.name == tensor.name for t in inputs):
            raise InvalidInput(f"input {tensor.name!r}: given twice")
        inputs.append(tensor)
    if offset != len(tail):
        raise InvalidInput(
            f"{len(tail) - offset} bytes after the JSON header belong to no input "
            f"(the inputs' binary_data_size add up to {offset})"
        )
    outputs = _parse_outputs(doc.get("outputs"), binary_default)
    return InferRequest(request_id, inputs, outputs, parameters, binary_default)


def _json_default(value: object) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: list[OutputTensor],
    parameters: dict[str, Any],
    binary: set[str],
) -> tuple[bytes, dict[str, str]]:
    """Encode an infer response; outputs named in `binary` go as raw bytes after the JSON.

    Returns the body and the headers to send with it (content type, and for a binary body
    Inference-Header-Content-Length).
    """
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in outputs:
        with np.errstate(over="ignore"):
            # np.require keeps a 0-d array 0-d (ascontiguousarray would make it [1])
            array = np.require(out.data, dtype=DATATYPES[out.datatype], requirements="C")
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype,
                                 "shape": list(array.shape)}  # fmt: skip
        if out.name in binary:
            blobs.append(array.tobytes())
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    doc["outputs"] = entries
    # allow_nan=False: bare NaN/Infinity is not JSON; a non-finite value raises, never goes out.
    header = json.dumps(doc, separators=(",", ":"), default=_json_default, allow_nan=False).encode()
    if not any(out.name in binary for out in outputs):
        return header, {"Content-Type": "application/json"}
    headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
    return header + b"".join(blobs), headers
