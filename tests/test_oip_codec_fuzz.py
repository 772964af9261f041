"""Property-based fuzz of the OIP v2 codec: exact round trips, and hostile bodies refused cheaply.

Bodies are built here from the protocol (a JSON header, `Inference-Header-Content-Length`,
raw little-endian tensors after it), not by the codec under test. Every hostile body must end in
the parsed request or in InvalidInput: never another exception, never work or memory in
proportion to what a header claims rather than to the bytes sent.
"""

from __future__ import annotations

import json
import math
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray
from tritonclient.http._utils import _get_inference_request

from mcdrop.api.oip_codec import (
    DATATYPES,
    HEADER_LENGTH,
    MAX_DIMS,
    InferRequest,
    OutputTensor,
    encode_infer_response,
    parse_infer_request,
)
from mcdrop.errors import InvalidInput

# Bounded and derandomized: the same examples on every run (CI is stable, failures reproduce),
# no example database written, and a per-example deadline far above the ~1 ms a parse takes, so
# a parse that does work in proportion to a claimed size (a hang) fails instead of passing.
FUZZ = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=False,
)
# Peak memory a parse may take: a multiple of the body (json.loads' own objects and a flat copy
# of the values cost at most a few tens of bytes per body byte) plus a fixed allowance.
BYTES_PER_BODY_BYTE = 128
FIXED_ALLOWANCE = 1 << 20
NAMES = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)
HUGE = (2**31, 2**32 + 1, 2**63 - 1, 2**63, 2**64, 10**12, 10**30, 10**400)


@contextmanager
def peak_memory() -> Iterator[Callable[[], int]]:
    """Trace allocations (numpy's included) inside the block; yields a reader of the peak."""
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def parse_bounded(body: bytes, header_length: int | None) -> InferRequest | None:
    """parse_infer_request, which must either succeed or raise InvalidInput, within memory."""
    with peak_memory() as peak:
        request: InferRequest | None = None
        message = "parsed"
        try:
            request = parse_infer_request(body, header_length)
        except InvalidInput as exc:
            message = str(exc)
        used = peak()
    assert message, "an InvalidInput must say what is wrong"
    limit = BYTES_PER_BODY_BYTE * len(body) + FIXED_ALLOWANCE
    assert used <= limit, f"parsing {len(body)} bytes took {used} bytes at peak"
    return request


# -- building bodies from the protocol ---------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """One input as a client holds it: name, OIP datatype, values, and how it goes on the wire."""

    name: str
    datatype: str
    array: NDArray[Any]
    binary: bool
    nested: bool  # JSON data as nested lists (row-major) rather than flat


def encode_request(
    tensors: list[Tensor], parameters: dict[str, Any] | None = None, request_id: str | None = None
) -> tuple[bytes, int | None]:
    """A body as tritonclient.http writes one; the header length is None without binary data."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for t in tensors:
        entry: dict[str, Any] = {"name": t.name, "shape": list(t.array.shape),
                                 "datatype": t.datatype}  # fmt: skip
        if t.binary:
            blob = np.ascontiguousarray(t.array, DATATYPES[t.datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            nested = t.nested and t.array.ndim > 0  # a 0-d tolist() is a scalar, not a list
            entry["data"] = t.array.tolist() if nested else t.array.reshape(-1).tolist()
        entries.append(entry)
    doc: dict[str, Any] = {"inputs": entries}
    if request_id is not None:
        doc["id"] = request_id
    if parameters is not None:
        doc["parameters"] = parameters
    header = json.dumps(doc).encode()
    if not any(t.binary for t in tensors):
        return header, None
    return header + b"".join(blobs), len(header)


def native(datatype: str) -> np.dtype[Any]:
    """The native-endian numpy dtype the codec hands out for an OIP datatype."""
    return DATATYPES[datatype].newbyteorder("=")


shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)


@st.composite
def tensors(draw: st.DrawFn, name: str | None = None) -> Tensor:
    """A random tensor of any supported datatype and shape, binary or JSON, flat or nested."""
    datatype = draw(st.sampled_from(sorted(DATATYPES)))
    binary = draw(st.booleans())
    dtype = native(datatype)
    # JSON cannot carry NaN or infinities in the protocol; the binary extension carries any bits.
    finite = dtype.kind == "f" and not binary
    elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False) if finite else None
    array = draw(hnp.arrays(dtype, draw(shapes), elements=elements))
    return Tensor(name or draw(NAMES), datatype, array, binary, draw(st.booleans()))


@st.composite
def tensor_lists(draw: st.DrawFn) -> list[Tensor]:
    """One to three tensors with distinct names, mixed binary and JSON."""
    names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    return [draw(tensors(name)) for name in names]


@st.composite
def output_lists(draw: st.DrawFn) -> list[Tensor]:
    """Output tensors as the service makes them: one to three, distinct names, at least 1-d."""
    names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    return [draw(tensors(name).filter(lambda t: t.array.ndim > 0)) for name in names]


def assert_same_values(got: NDArray[Any], want: NDArray[Any], binary: bool) -> None:
    """Binary tensors come back bit for bit; JSON ones equal in value (NaN-free by design)."""
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    if binary:
        assert got.tobytes() == want.tobytes()
    else:
        np.testing.assert_array_equal(got, want, strict=True)


# -- (a) round trips -----------------------------------------------------------------------------


@FUZZ
@given(
    inputs=tensor_lists(),
    request_id=st.none() | st.text(max_size=10),
    binary_output=st.none() | st.booleans(),
)
def test_requests_round_trip_exactly(
    inputs: list[Tensor], request_id: str | None, binary_output: bool | None
) -> None:
    parameters = None if binary_output is None else {"binary_data_output": binary_output}
    body, header_length = encode_request(inputs, parameters, request_id)
    request = parse_infer_request(body, header_length)
    assert request.id == request_id
    assert request.parameters == (parameters or {})
    assert request.binary_output_default is bool(binary_output)
    assert request.outputs == []
    assert [t.name for t in request.inputs] == [t.name for t in inputs]
    for got, sent in zip(request.inputs, inputs, strict=True):
        assert got.datatype == sent.datatype
        assert got.shape == list(sent.array.shape)
        assert got.data.flags.writeable
        assert_same_values(got.data, sent.array.astype(native(sent.datatype)), sent.binary)


@FUZZ
@given(inputs=tensor_lists())
def test_tritonclient_bodies_parse_like_ours(inputs: list[Tensor]) -> None:
    """The official client's encoder and the one above agree on what the body means."""
    wire = []
    for t in inputs:
        tensor = triton.InferInput(t.name, list(t.array.shape), t.datatype)
        tensor.set_data_from_numpy(t.array.astype(DATATYPES[t.datatype]), binary_data=t.binary)
        wire.append(tensor)
    body, header_length = _get_inference_request(
        inputs=wire, request_id="", outputs=None, sequence_id=0, sequence_start=False,
        sequence_end=False, priority=0, timeout=None, custom_parameters=None,
    )  # fmt: skip
    theirs = parse_infer_request(body, header_length)
    ours = parse_infer_request(*encode_request(inputs))
    for a, b, sent in zip(theirs.inputs, ours.inputs, inputs, strict=True):
        assert (a.name, a.datatype, a.shape) == (b.name, b.datatype, b.shape)
        assert_same_values(a.data, b.data, sent.binary)


def decode_response(body: bytes, headers: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A response body read from the protocol: the JSON document and the outputs by name."""
    length = headers.get(HEADER_LENGTH)
    split = len(body) if length is None else int(length)
    doc: dict[str, Any] = json.loads(body[:split])
    arrays: dict[str, Any] = {}
    offset = split
    for entry in doc["outputs"]:
        dtype = DATATYPES[entry["datatype"]]
        size = entry.get("parameters", {}).get("binary_data_size")
        if size is None:
            flat = np.asarray(entry["data"], dtype=dtype.newbyteorder("="))
        else:
            flat = np.frombuffer(body, dtype, size // dtype.itemsize, offset)
            offset += size
        arrays[entry["name"]] = flat.reshape(entry["shape"])
    assert offset == len(body), "bytes after the last binary output"
    return doc, arrays


@FUZZ
@given(outputs=output_lists(), version=st.none() | st.text(max_size=4), data=st.data())
def test_responses_round_trip_exactly(
    outputs: list[Tensor], version: str | None, data: st.DataObject
) -> None:
    binary = {t.name for t in outputs if t.binary}
    params = {"mc_samples": data.draw(st.integers(1, 10**6)), "seed": np.int64(7)}
    tensors_out = [OutputTensor(t.name, t.datatype, t.array) for t in outputs]
    body, headers = encode_infer_response("m", version, "req", tensors_out, params, binary)
    assert (HEADER_LENGTH in headers) == bool(binary)
    doc, arrays = decode_response(body, headers)
    assert doc["model_name"] == "m"
    assert doc.get("model_version") == version
    assert doc["id"] == "req"
    assert doc["parameters"] == {"mc_samples": params["mc_samples"], "seed": 7}
    assert [e["name"] for e in doc["outputs"]] == [t.name for t in outputs]
    for t in outputs:
        want = t.array.astype(native(t.datatype))
        assert_same_values(arrays[t.name].astype(native(t.datatype)), want, t.binary)


def test_a_zero_dimensional_output_keeps_its_empty_shape() -> None:
    """The protocol allows shape []; no output of the service has it today (rows come first)."""
    out = OutputTensor("s", "FP64", np.array(2.5))
    body, _ = encode_infer_response("m", None, None, [out], {}, set())
    assert json.loads(body)["outputs"][0]["shape"] == []


# -- (b) hostile bodies ----------------------------------------------------------------------------


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE), st.floats(), st.text(max_size=6)
)


def json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Lists and objects of `inner` values: the recursive step of any JSON document."""
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)


json_values = st.recursive(json_scalars, json_containers, max_leaves=16)
dims = st.integers(-2, 6) | st.sampled_from(HUGE) | st.just(0)
sizes = st.integers(-2, 64) | st.sampled_from(HUGE) | json_values
hostile = {
    "name": st.just("x") | NAMES | json_values,
    "datatype": st.sampled_from([*DATATYPES, "BYTES", "BF16", "fp32", ""]) | json_values,
    "shape": st.one_of(
        st.lists(dims, max_size=4),
        st.lists(st.integers(0, 2), min_size=60, max_size=70),  # around the 64-dimension limit
        json_values,
    ),
    "data": st.one_of(
        st.lists(json_scalars, max_size=8),
        st.lists(st.lists(json_scalars, max_size=3), max_size=3),
        json_values,
    ),
    "parameters": st.one_of(
        st.fixed_dictionaries(
            {}, optional={"binary_data_size": sizes, "shared_memory_region": json_values}
        ),
        json_values,
    ),
}


@st.composite
def mutated_bodies(draw: st.DrawFn) -> tuple[bytes, int | None]:
    """A valid body with fields replaced by hostile values, its bytes and header length bent."""
    tensors_in = draw(tensor_lists())
    body, header_length = encode_request(tensors_in)
    split = len(body) if header_length is None else header_length
    doc = json.loads(body[:split])
    tail = body[split:]
    for entry in doc["inputs"]:
        for key in draw(st.sets(st.sampled_from(sorted(hostile)), max_size=3)):
            if draw(st.booleans()):
                entry[key] = draw(hostile[key])
            else:
                entry.pop(key, None)
    top_level = st.sampled_from(["id", "parameters", "outputs", "inputs"])
    for key in draw(st.sets(top_level, max_size=2)):
        doc[key] = draw(json_values)
    header = json.dumps(doc).encode()
    extra = draw(st.binary(max_size=8))
    tail = draw(st.sampled_from([tail, tail + extra]) | st.binary(max_size=64))
    raw = bytearray(header + tail)
    for _ in range(draw(st.integers(0, 3))):  # a few corrupted bytes anywhere
        if raw:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    length = draw(
        st.sampled_from([len(header), None])
        | st.integers(-3, len(raw) + 3)
        | st.sampled_from([2**63, 10**12])
    )
    return bytes(raw), length


@FUZZ
@given(body=st.binary(max_size=256), header_length=st.none() | st.integers(-4, 300))
def test_arbitrary_bytes_are_refused_with_invalid_input(
    body: bytes, header_length: int | None
) -> None:
    parse_bounded(body, header_length)


@FUZZ
@given(doc=json_values)
def test_arbitrary_json_documents_are_refused_with_invalid_input(doc: Any) -> None:
    parse_bounded(json.dumps(doc).encode(), None)
    parse_bounded(json.dumps({"inputs": doc}).encode(), None)
    parse_bounded(json.dumps({"inputs": [doc], "outputs": doc}).encode(), None)


@settings(FUZZ, max_examples=400)
@given(case=mutated_bodies())
def test_mutated_bodies_parse_or_raise_invalid_input(case: tuple[bytes, int | None]) -> None:
    body, header_length = case
    request = parse_bounded(body, header_length)
    if request is None:
        return
    for tensor in request.inputs:  # whatever got through is a consistent tensor
        assert tensor.datatype in DATATYPES
        assert list(tensor.data.shape) == tensor.shape
        assert tensor.data.dtype == native(tensor.datatype)
        assert tensor.data.flags.writeable


# -- hostile bodies that must fail in one particular way -------------------------------------------


def one_input(**fields: Any) -> dict[str, Any]:
    """A JSON input named 'x' (FP32, shape [2], two values) with `fields` replaced."""
    return {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0], **fields}


def refused(body: bytes, header_length: int | None = None) -> str:
    """The InvalidInput message for a body, which must be refused quickly and within memory."""
    start = time.perf_counter()
    with peak_memory() as peak, pytest.raises(InvalidInput) as info:
        parse_infer_request(body, header_length)
    assert peak() <= BYTES_PER_BODY_BYTE * len(body) + FIXED_ALLOWANCE, peak()
    assert time.perf_counter() - start < 1.0
    return str(info.value)


def json_request(*inputs: dict[str, Any]) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


def binary_request(entry: dict[str, Any], tail: bytes) -> tuple[bytes, int]:
    header = json.dumps({"inputs": [entry]}).encode()
    return header + tail, len(header)


@pytest.mark.parametrize("binary", [False, True])
def test_more_than_64_dimensions_is_named_and_refused(binary: bool) -> None:
    shape = [1] * (MAX_DIMS + 1)
    if binary:
        entry = one_input(shape=shape, parameters={"binary_data_size": 4})
        del entry["data"]
        message = refused(*binary_request(entry, bytes(4)))
    else:
        message = refused(json_request(one_input(shape=shape, data=[1.0])))
    assert message == "input 'x': shape has 65 dimensions; at most 64 are supported"
    ok = parse_infer_request(json_request(one_input(shape=[1] * MAX_DIMS, data=[1.0])), None)
    assert ok.inputs[0].data.ndim == MAX_DIMS


@pytest.mark.parametrize(
    "shape",
    [[10**12], [10**6, 10**6], [2**62, 4], [0, 10**30], [0, 2**62, 2**62], [0, 2**60], [10**400]],
)
def test_shapes_claiming_huge_counts_are_refused_cheaply(shape: list[int]) -> None:
    assert "input 'x'" in refused(json_request(one_input(shape=shape)))
    count = math.prod(shape)
    for size in (count * 4, 8):  # what the shape needs, and what is really sent
        entry = {"name": "x", "datatype": "FP32", "shape": shape,
                 "parameters": {"binary_data_size": size}}  # fmt: skip
        assert "input 'x'" in refused(*binary_request(entry, bytes(8)))


@pytest.mark.parametrize("datatype", ["BOOL", "FP32", "INT64"])
def test_empty_tensors_are_refused_where_no_datatype_could_hold_their_shape(datatype: str) -> None:
    # The router casts inputs to float64: shape [0, 2**60] is fine in 1 or 4 bytes, not in 8.
    message = refused(json_request(one_input(datatype=datatype, shape=[0, 2**60], data=[])))
    assert message == "input 'x': shape [0, 1152921504606846976] is too large for any tensor"
    body = json_request(one_input(datatype=datatype, shape=[0, 2**40], data=[]))
    request = parse_infer_request(body, None)
    assert request.inputs[0].data.astype(np.float64).shape == (0, 2**40)


def test_one_long_string_among_many_is_refused_without_a_string_array() -> None:
    # numpy would infer a <U20000 array: 20,000 x 80 KB = 1.6 GB for a 120 KB body.
    data = ["a"] * 20_000
    data[0] = "b" * 20_000
    for datatype in ("FP32", "INT32", "BOOL"):
        body = json_request(one_input(datatype=datatype, shape=[20_000], data=data))
        assert "input 'x'" in refused(body)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"datatype": "INT32", "data": ["a", 1]}, "INT32 data must be integers"),
        ({"datatype": "UINT8", "data": [["a"], [1]]}, "UINT8 data must be integers"),
        ({"datatype": "INT32", "data": [{"a": 1}, 2]}, "INT32 data must be integers"),
        ({"datatype": "INT64", "data": [None, 2]}, "INT64 data must be integers"),
        ({"datatype": "INT64", "data": [True, 2]}, "INT64 data must be integers"),
        ({"datatype": [1]}, "datatype [1] is not a tensor datatype"),
        ({"datatype": {"a": 1}}, "is not a tensor datatype"),
        ({"data": [True, 1.5]}, "FP32 data must hold only numbers"),
        ({"data": [None, 1.5]}, "FP32 data must hold only numbers"),
        ({"datatype": "FP64", "data": [10**400, 1]}, "FP64 data must be numbers within float"),
        ({"datatype": "BOOL", "data": [True, None]}, "BOOL data must be true/false values"),
        ({"data": [1, [2]]}, "nested data must be rectangular"),
        ({"data": [[1], [2, 3]]}, "nested data must be rectangular"),
        ({"data": [[[1]], [2]]}, "nested data must be rectangular"),
        ({"data": json.loads("[" * 500 + "1" + "]" * 500)}, "shape [2] needs 2 values, got 1"),
    ],
)  # fmt: skip
def test_values_of_the_wrong_kind_are_invalid_input(fields: dict[str, Any], message: str) -> None:
    assert message in refused(json_request(one_input(**fields)))


def test_deep_nesting_matching_the_shape_parses() -> None:
    deep: Any = [1.5]
    for _ in range(MAX_DIMS - 1):
        deep = [deep]
    request = parse_infer_request(json_request(one_input(shape=[1] * MAX_DIMS, data=deep)), None)
    assert request.inputs[0].data.reshape(-1).tolist() == [1.5]
