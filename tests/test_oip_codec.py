"""OIP v2 REST codec: bodies built and read by the official tritonclient.http, and bad input."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from numpy.typing import NDArray
from tritonclient.http._utils import _get_inference_request

from mcdrop.api.oip_codec import (
    DATATYPES,
    HEADER_LENGTH,
    OutputTensor,
    datatype_of,
    encode_infer_response,
    parse_infer_request,
)
from mcdrop.errors import InvalidInput

RNG = np.random.default_rng(0)


def sample_array(datatype: str, shape: tuple[int, ...]) -> NDArray[Any]:
    """Values that exercise the whole range of a datatype (extremes, fractions, signs)."""
    dtype = DATATYPES[datatype].newbyteorder("=")
    if dtype.kind == "b":
        return RNG.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        flat = RNG.integers(info.min, info.max, int(np.prod(shape)), dtype=dtype, endpoint=True)
        flat[: min(2, flat.size)] = [info.min, info.max][: flat.size]
        return flat.reshape(shape)
    flat = (RNG.standard_normal(int(np.prod(shape))) * 1e3).astype(dtype)
    special = [np.finfo(dtype).max, np.finfo(dtype).tiny, -1 / 3]
    flat[: min(3, flat.size)] = special[: flat.size]
    return flat.reshape(shape)


def triton_body(
    inputs: list[triton.InferInput],
    outputs: list[triton.InferRequestedOutput] | None = None,
    request_id: str = "",
    parameters: dict[str, Any] | None = None,
    priority: int = 0,
    timeout: int | None = None,
) -> tuple[bytes, int | None]:
    """The exact body (and header length) tritonclient.http sends for an infer call."""
    body, json_size = _get_inference_request(
        inputs=inputs,
        request_id=request_id,
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=priority,
        timeout=timeout,
        custom_parameters=parameters,
    )
    return body, json_size


def triton_input(name: str, array: NDArray[Any], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype_of(array))
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def json_body(**doc: Any) -> bytes:
    return json.dumps(doc).encode()


def fp32_input(data: Any, shape: list[int], name: str = "input") -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": "FP32", "data": data}


def raises(message: str) -> Any:
    """pytest.raises(InvalidInput) whose message must contain `message` verbatim."""
    return pytest.raises(InvalidInput, match=re.escape(message))


# -- requests --------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_tritonclient_inputs_parse_exactly(datatype: str, binary: bool) -> None:
    array = sample_array(datatype, (3, 4))
    body, header = triton_body([triton_input("x", array, binary)])
    assert (header is not None) == binary
    request = parse_infer_request(body, header)
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", datatype, [3, 4])
    assert tensor.data.dtype == array.dtype
    assert tensor.data.shape == (3, 4)
    assert tensor.data.tobytes() == array.tobytes()
    assert tensor.data.flags.writeable  # torch.from_numpy warns on read-only arrays


def test_mixed_binary_and_json_inputs_keep_their_order_and_bytes() -> None:
    a, b, c = sample_array("FP32", (2, 5)), sample_array("INT64", (7,)), sample_array("BOOL", (3,))
    d = sample_array("FP16", (2, 2, 2))
    inputs = [
        triton_input("a", a, True),
        triton_input("b", b, False),
        triton_input("c", c, True),
        triton_input("d", d, True),
    ]
    request = parse_infer_request(*triton_body(inputs))
    assert [t.name for t in request.inputs] == ["a", "b", "c", "d"]
    for tensor, array in zip(request.inputs, [a, b, c, d], strict=True):
        assert tensor.data.dtype == array.dtype
        assert tensor.data.tobytes() == array.tobytes()


def test_request_id_outputs_and_parameters_are_kept() -> None:
    outputs = [
        triton.InferRequestedOutput("mean", binary_data=True),
        triton.InferRequestedOutput("std", binary_data=False),
    ]
    params = {"mc_samples": "auto", "interval_levels": [0.9, 0.95], "anything": {"x": 1}}
    body, header = triton_body(
        [triton_input("input", sample_array("FP32", (1, 3)), True)],
        outputs,
        request_id="req-7",
        parameters=params,
        priority=3,
        timeout=1000,
    )
    request = parse_infer_request(body, header)
    assert request.id == "req-7"
    assert [(o.name, o.binary) for o in request.outputs] == [("mean", True), ("std", False)]
    assert request.outputs[0].parameters == {"binary_data": True}
    assert request.parameters == {**params, "priority": 3, "timeout": 1000}
    assert request.binary_output_default is False


def test_no_outputs_means_all_in_binary_as_tritonclient_asks() -> None:
    body, header = triton_body([triton_input("input", sample_array("FP32", (2, 2)), True)])
    request = parse_infer_request(body, header)
    assert request.id is None
    assert request.outputs == []
    assert request.binary_output_default is True
    assert request.parameters == {"binary_data_output": True}


def test_binary_data_output_is_the_default_for_outputs_without_binary_data() -> None:
    body = json_body(
        inputs=[fp32_input([1], [1])],
        outputs=[{"name": "mean"}, {"name": "std", "parameters": {"binary_data": False}}],
        parameters={"binary_data_output": True},
    )
    request = parse_infer_request(body, None)
    assert [(o.name, o.binary) for o in request.outputs] == [("mean", True), ("std", False)]


def test_nested_and_flat_json_data_are_the_same_row_major_tensor() -> None:
    values = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    flat = parse_infer_request(
        json_body(inputs=[fp32_input(values.ravel().tolist(), [2, 3, 4])]), None
    )
    nested = parse_infer_request(json_body(inputs=[fp32_input(values.tolist(), [2, 3, 4])]), None)
    other = parse_infer_request(
        json_body(inputs=[fp32_input(values.reshape(6, 4).tolist(), [2, 3, 4])]), None
    )
    for request in (flat, nested, other):
        np.testing.assert_array_equal(request.inputs[0].data, values)
        assert request.inputs[0].data.dtype == np.float32


def test_json_integers_are_accepted_as_floats() -> None:
    request = parse_infer_request(json_body(inputs=[fp32_input([[1, 2.5]], [1, 2])]), None)
    np.testing.assert_array_equal(request.inputs[0].data, np.array([[1.0, 2.5]], np.float32))


def test_zero_sized_tensor_parses() -> None:
    request = parse_infer_request(json_body(inputs=[fp32_input([], [0, 4])]), None)
    assert request.inputs[0].data.shape == (0, 4)


# -- bad requests ----------------------------------------------------------------------------


def binary_fp32(shape: tuple[int, ...]) -> tuple[bytes, int | None]:
    return triton_body([triton_input("input", sample_array("FP32", shape), True)])


def test_wrong_value_count_names_input_shape_and_counts() -> None:
    body = json_body(inputs=[fp32_input([0.0] * 127, [2, 64])])
    with raises("input 'input': shape [2, 64] needs 128 values, got 127"):
        parse_infer_request(body, None)


def test_truncated_binary_data_says_how_many_bytes_remain() -> None:
    body, header = binary_fp32((2, 64))
    assert header is not None
    with raises("input 'input': binary_data_size is 512 but only 300 bytes remain"):
        parse_infer_request(body[: header + 300], header)


def test_binary_data_without_the_header_length_header_is_explained() -> None:
    body, header = binary_fp32((1, 2))
    assert header is not None
    with raises("binary_data_size is 8 but only 0 bytes remain (is the Inference-Header"):
        parse_infer_request(body[:header], None)


def test_binary_size_must_match_the_shape() -> None:
    doc = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32",
                       "parameters": {"binary_data_size": 12}}]}  # fmt: skip
    header = json.dumps(doc).encode()
    with raises("input 'x': 4 FP32 values need 16 bytes, binary_data_size is 12"):
        parse_infer_request(header + bytes(12), len(header))


def test_extra_binary_bytes_are_refused() -> None:
    body, header = binary_fp32((1, 2))
    with raises("4 bytes after the JSON header belong to no input"):
        parse_infer_request(body + bytes(4), header)


def test_header_length_beyond_the_body_is_refused() -> None:
    with raises(f"{HEADER_LENGTH} 900 is larger than the body (500 bytes)"):
        parse_infer_request(bytes(500), 900)
    with raises(f"{HEADER_LENGTH} -1 must not be negative"):
        parse_infer_request(b"{}", -1)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"inputs" [1]}', "malformed JSON at line 1 column 11: Expecting ':' delimiter"),
        (b'{\n  "id": 1,,', "malformed JSON at line 2 column 11: Expecting property name"),
        (b"\xff\xfe\xfa", "malformed JSON"),
        (b"[1, 2]", "request: must be a JSON object"),
        (b"{}", "inputs: required"),
        (b'{"inputs": []}', "inputs: must be a non-empty list of tensors"),
        (b'{"inputs": [1]}', "inputs[0]: must be an object"),
        (b'{"inputs": [{"shape": [1]}]}', "inputs[0].name: required"),
        (b'{"id": 5, "inputs": []}', "id: must be a string, got 5"),
        (b'{"parameters": [1], "inputs": []}', "parameters: must be a JSON object"),
    ],
)
def test_malformed_requests(body: bytes, message: str) -> None:
    with raises(message):
        parse_infer_request(body, None)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"datatype": "FP99"}, "input 'x': datatype 'FP99' is not a tensor datatype"),
        ({"datatype": None}, "input 'x': datatype None is not a tensor datatype"),
        ({"datatype": "BYTES", "data": ["a"]}, "input 'x': datatype 'BYTES' is not supported"),
        ({"shape": [-1, 2]}, "input 'x': shape must be a list of non-negative integers"),
        ({"shape": [2.0]}, "input 'x': shape must be a list of non-negative integers"),
        ({"shape": "2"}, "input 'x': shape must be a list of non-negative integers"),
        ({"data": None}, "input 'x': data must be a list, got None"),
        ({"data": [[1, 2], [3]]}, "input 'x': nested data must be rectangular"),
        ({"data": [1, "a"]}, "input 'x': FP32 data must hold only numbers"),
        ({"data": [True, False]}, "input 'x': FP32 data must hold only numbers"),
        ({"datatype": "INT8", "data": [1, 128]}, "INT8 data must be integers in [-128, 127]"),
        ({"datatype": "UINT8", "data": [-1, 0]}, "UINT8 data must be integers in [0, 255]"),
        ({"datatype": "INT64", "data": [1.0, 2.0]}, "input 'x': INT64 data must be integers"),
        ({"datatype": "INT64", "data": [2**64, 0]}, "input 'x': INT64 data must be integers"),
        ({"datatype": "BOOL", "data": [1, 0]}, "input 'x': BOOL data must be true/false values"),
        ({"parameters": {"shared_memory_region": "r"}}, "'x': shared memory is not supported"),
        ({"parameters": {"binary_data_size": 8}}, "input 'x': has both data and binary_data_size"),
        ({"parameters": {"binary_data_size": "8"}}, "'x': binary_data_size must be a non-negative"),
        ({"parameters": 3}, "input 'x': parameters: must be a JSON object"),
    ],
)  # fmt: skip
def test_bad_inputs_name_the_input_and_the_problem(tensor: dict[str, Any], message: str) -> None:
    doc = {"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0], **tensor}
    with raises(message):
        parse_infer_request(json_body(inputs=[doc]), None)


def test_missing_data_and_duplicate_inputs() -> None:
    with raises("input 'x': data required"):
        parse_infer_request(
            json_body(inputs=[{"name": "x", "shape": [1], "datatype": "FP32"}]), None
        )
    twice = [fp32_input([1], [1], "x"), fp32_input([2], [1], "x")]
    with raises("input 'x': given twice"):
        parse_infer_request(json_body(inputs=twice), None)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"outputs": {"name": "mean"}}, "outputs: must be a list"),
        ({"outputs": [{"nam": "mean"}]}, "outputs[0].name: required"),
        ({"outputs": [{"name": "m"}, {"name": "m"}]}, "output 'm': requested twice"),
        ({"outputs": [{"name": "m", "parameters": {"binary_data": 1}}]},
         "output 'm': parameters.binary_data: must be true or false, got 1"),
        ({"parameters": {"binary_data_output": "yes"}},
         "parameters.binary_data_output: must be true or false"),
    ],
)  # fmt: skip
def test_bad_outputs_and_flags(extra: dict[str, Any], message: str) -> None:
    with raises(message):
        parse_infer_request(json_body(inputs=[fp32_input([1], [1])], **extra), None)


def test_fp32_overflow_becomes_inf_without_a_warning() -> None:
    # The model's input check refuses non-finite rows with a clear message; the codec must not warn.
    request = parse_infer_request(json_body(inputs=[fp32_input([1e39], [1])]), None)
    assert np.isinf(request.inputs[0].data).all()


# -- responses -------------------------------------------------------------------------------


def response_outputs() -> list[OutputTensor]:
    arrays = {
        "mean": sample_array("FP64", (3, 2)),
        "lower_99.5": sample_array("FP64", (3, 2)),
        "predicted_class": sample_array("INT64", (3,)),
        "half": sample_array("FP16", (2, 2)),
        "single": sample_array("FP32", (4,)),
        "flags": sample_array("BOOL", (5,)),
        "samples": sample_array("FP64", (3, 4, 2)),
        "empty": np.zeros((0, 2)),
    }
    return [OutputTensor(name, datatype_of(a), a) for name, a in arrays.items()]


def decode(body: bytes, headers: dict[str, str]) -> triton.InferResult:
    header = headers.get(HEADER_LENGTH)
    return triton.InferResult.from_response_body(
        body, verbose=False, header_length=None if header is None else int(header)
    )


@pytest.mark.parametrize("mode", ["binary", "json", "mixed"])
def test_tritonclient_decodes_responses_bit_for_bit(mode: str) -> None:
    outputs = response_outputs()
    names = [o.name for o in outputs]
    binary = {"binary": set(names), "json": set(), "mixed": set(names[::2])}[mode]
    params = {"mc_samples": 100, "seed": np.int64(7)}
    body, headers = encode_infer_response("digits", "2", "req-1", outputs, params, binary)
    if mode == "json":
        assert headers == {"Content-Type": "application/json"}
        json.loads(body)  # a plain JSON document
    else:
        assert headers["Content-Type"] == "application/octet-stream"
        assert body[int(headers[HEADER_LENGTH]) - 1 : int(headers[HEADER_LENGTH])] == b"}"
    result = decode(body, headers)
    for out in outputs:
        got = result.as_numpy(out.name)
        assert got is not None
        assert got.dtype == out.data.dtype
        assert got.shape == out.data.shape
        assert got.tobytes() == out.data.tobytes()
        entry = result.get_output(out.name)
        assert ("data" in entry) == (out.name not in binary)
    response = result.get_response()
    assert response["model_name"] == "digits"
    assert response["model_version"] == "2"
    assert response["id"] == "req-1"
    assert response["parameters"] == {"mc_samples": 100, "seed": 7}


def test_response_without_version_id_or_parameters_omits_them() -> None:
    out = OutputTensor("mean", "FP64", np.array([[1.5]]))
    body, _ = encode_infer_response("m", None, None, [out], {}, set())
    assert json.loads(body) == {
        "model_name": "m",
        "outputs": [{"name": "mean", "datatype": "FP64", "shape": [1, 1], "data": [1.5]}],
    }


def test_response_casts_data_to_the_declared_datatype() -> None:
    out = OutputTensor("probs", "FP32", np.array([0.1, 0.2], dtype=np.float64))
    body, headers = encode_infer_response("m", None, None, [out], {}, {"probs"})
    got = decode(body, headers).as_numpy("probs")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array([0.1, 0.2], dtype=np.float32))


def test_datatype_table_round_trips() -> None:
    for name, wire in DATATYPES.items():
        assert datatype_of(np.zeros(2, wire)) == name
        assert datatype_of(np.zeros(2, wire.newbyteorder(">"))) == name
    assert datatype_of(np.zeros(1, np.float32)) == "FP32"
    assert datatype_of(np.zeros(1, bool)) == "BOOL"
    with pytest.raises(TypeError, match="complex128"):
        datatype_of(np.zeros(1, np.complex128))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_json_output_raises_instead_of_writing_bare_nan(value: float) -> None:
    out = OutputTensor("mean", "FP64", np.array([[1.0, value]]))
    with pytest.raises(ValueError, match="not JSON compliant"):
        encode_infer_response("m", None, None, [out], {}, set())
    body, headers = encode_infer_response("m", None, None, [out], {}, {"mean"})  # raw bytes: fine
    got = decode(body, headers).as_numpy("mean")
    assert got is not None
    assert np.array_equal(got, out.data, equal_nan=True)


def test_bf16_inputs_from_tritonclient_decode_exactly_as_float32() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="tritonclient's BF16 needs ml_dtypes")
    values = np.array(
        [[1.5, -2.25, 3.140625], [0.0, -0.0078125, 65280.0]], dtype=ml_dtypes.bfloat16
    )
    tensor_in = triton.InferInput("ids", list(values.shape), "BF16")
    tensor_in.set_data_from_numpy(values, binary_data=True)
    body, json_size = triton_body([tensor_in])
    (tensor,) = parse_infer_request(body, json_size).inputs
    assert tensor.datatype == "BF16"
    assert tensor.data.dtype == np.float32
    assert np.array_equal(tensor.data, values.astype(np.float32))


def test_bf16_json_numbers_round_to_the_nearest_bfloat16() -> None:
    doc = json_body(inputs=[{"name": "x", "shape": [3], "datatype": "BF16",
                             "data": [1.0, 1.00390625, 1.01171875]}])  # fmt: skip
    (tensor,) = parse_infer_request(doc, None).inputs
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: to even (1.0); 1 + 3·2^-8 rounds up
    assert tensor.data.tolist() == [1.0, 1.0, 1.015625]
