"""Open Inference Protocol v2 over HTTP (in process): metadata, infer, repository, every error."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import write_mlp_model
from http_helpers import (
    binary_body,
    copy_shipped,
    decode_outputs,
    error_of,
    oip_body,
    queue_depth,
    serve,
    settings_for,
    spy_engine,
    wait_for,
)
from numpy.typing import NDArray
from test_api_native import FAR, strict_json, write_overflowing_mlp

from mcdrop.api.outputs import summary_outputs
from mcdrop.engine.masks import MASK_STREAM
from mcdrop.model import ServedModel

pytestmark = pytest.mark.anyio
INFER = "/v2/models/mlp/infer"
ROWS = [[0.5, -1.25], [2.0, 0.75], [-3.5, 0.0]]  # exact in float32


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """'mlp': 2 features -> 2 outputs, tau 4, at most 4 rows and 64 samples; shipped digits."""
    repository = copy_shipped(tmp_path / "repo", "digits")
    write_mlp_model(
        repository / "mlp", outputs=("a", "b"), hidden=(16,), dropout=0.2, tau=4.0,
        mc={"max_rows": 4, "max_samples": 64, "default_samples": 16},
    )  # fmt: skip
    return repository


def library(repo: Path, name: str, rows: Any, **options: Any) -> dict[str, NDArray[Any]]:
    """The outputs ServedModel.predict gives for the same rows and options, by OIP name."""
    model = ServedModel.load(repo / name, settings_for(repo))
    x = torch.tensor(np.asarray(rows, dtype=np.float64))
    samples = options.pop("samples", None)
    return summary_outputs(model.predict(x, model.options(samples, **options)))


def assert_same(got: dict[str, NDArray[Any]], want: dict[str, NDArray[Any]]) -> None:
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert np.array_equal(got[name], array), name


# -- metadata ----------------------------------------------------------------------------------


async def test_model_metadata_lists_inputs_outputs_and_limits(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        plain = (await client.get("/v2/models/mlp")).json()
        versioned = (await client.get("/v2/models/mlp/versions/1")).json()
        digits = (await client.get("/v2/models/digits")).json()
    assert plain == versioned
    assert plain["name"] == "mlp"
    assert plain["versions"] == ["1"]
    assert plain["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 2]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in plain["outputs"]}
    for name in ("mean", "variance", "epistemic_variance", "aleatoric_variance", "std",
                 "lower_95", "upper_95", "lower_95_empirical", "upper_95_empirical"):  # fmt: skip
        assert outputs[name] == ("FP64", [-1, 2]), name
    assert outputs["samples"] == ("FP64", [-1, -1, 2])
    assert plain["parameters"]["max_samples"] == 64
    assert plain["parameters"]["max_rows"] == 4
    assert plain["parameters"]["mc_samples"] == 16
    assert plain["parameters"]["task"] == "regression"
    classes = {o["name"]: (o["datatype"], o["shape"]) for o in digits["outputs"]}
    assert classes["probabilities"] == ("FP64", [-1, 10])
    assert classes["predicted_class"] == ("INT64", [-1])
    for name in ("entropy", "mutual_information", "variation_ratio", "expected_entropy"):
        assert classes[name] == ("FP64", [-1]), name
    assert digits["inputs"][0]["shape"] == [-1, 1, 8, 8]


async def test_model_ready_with_and_without_version(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        plain = await client.get("/v2/models/mlp/ready")
        versioned = await client.get("/v2/models/mlp/versions/1/ready")
        other = await client.get("/v2/models/mlp/versions/2/ready")
        unknown = await client.get("/v2/models/nope/ready")
    assert plain.status_code == versioned.status_code == 200
    assert "'2'" in error_of(other, 404)
    assert "nope" in error_of(unknown, 404)


# -- infer -------------------------------------------------------------------------------------


async def test_infer_json_flat_nested_and_versioned_equal_the_library(repo: Path) -> None:
    params = {"seed": 11, "mc_samples": 32}
    async with serve(settings_for(repo)) as (_, client):
        flat = await client.post(INFER, json=oip_body(ROWS, params))
        nested = await client.post(INFER, json=oip_body(ROWS, params, flat=False))
        versioned = await client.post(
            "/v2/models/mlp/versions/1/infer", json=oip_body(ROWS, params)
        )
    assert flat.status_code == 200, flat.text
    doc = flat.json()
    assert doc["model_name"] == "mlp"
    assert doc["model_version"] == "1"
    assert doc["parameters"] == {"mc_samples": 32, "seed": 11, "mask_stream": MASK_STREAM}
    assert nested.json() == doc
    assert versioned.json() == doc
    want = library(repo, "mlp", ROWS, samples=32, seed=11)
    assert_same(decode_outputs(flat), want)
    assert decode_outputs(flat)["mean"].shape == (3, 2)


async def test_classification_outputs_equal_the_library(repo: Path) -> None:
    images = np.arange(2 * 64, dtype=np.float64).reshape(2, 1, 8, 8) % 17
    async with serve(settings_for(repo)) as (_, client):
        response = await client.post(
            "/v2/models/digits/infer", json=oip_body(images, {"seed": 5, "mc_samples": 20})
        )
    assert response.status_code == 200, response.text
    got = decode_outputs(response)
    assert_same(got, library(repo, "digits", images, samples=20, seed=5))
    assert got["predicted_class"].dtype == np.int64
    assert np.allclose(got["probabilities"].sum(axis=1), 1.0)


async def test_outputs_selects_and_orders_what_comes_back(repo: Path) -> None:
    body = oip_body(ROWS, {"seed": 3}, outputs=["std", "mean", "upper_95"])
    async with serve(settings_for(repo)) as (_, client):
        chosen = await client.post(INFER, json=body)
        everything = await client.post(INFER, json=oip_body(ROWS, {"seed": 3}))
        unknown = await client.post(INFER, json=oip_body(ROWS, outputs=["mean", "median"]))
        samples = await client.post(INFER, json=oip_body(ROWS, outputs=["samples"]))
    got = decode_outputs(chosen)
    assert list(got) == ["std", "mean", "upper_95"]
    full = decode_outputs(everything)
    for name in got:
        assert np.array_equal(got[name], full[name])
    message = error_of(unknown, 400)
    assert "'median'" in message
    assert "mean" in message
    assert "return_samples" in error_of(samples, 400)


async def test_request_id_is_echoed(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        tagged = await client.post(INFER, json=oip_body(ROWS, request_id="req-42"))
        untagged = await client.post(INFER, json=oip_body(ROWS))
        bad_id = await client.post(INFER, json={**oip_body(ROWS), "id": 42})
    assert tagged.json()["id"] == "req-42"
    assert "id" not in untagged.json()
    assert "id" in error_of(bad_id, 400)


async def test_unknown_parameters_are_ignored(repo: Path) -> None:
    extras = {"timeout": 30_000_000, "priority": 1, "binary_data": False, "foo": {"bar": [1]}}
    async with serve(settings_for(repo)) as (_, client):
        plain = await client.post(INFER, json=oip_body(ROWS, {"seed": 8}))
        noisy = await client.post(INFER, json=oip_body(ROWS, {"seed": 8, **extras}))
    assert noisy.status_code == 200, noisy.text
    assert noisy.json() == plain.json()


async def test_response_parameters_report_samples_and_seed(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        unseeded = await client.post(INFER, json=oip_body(ROWS))
        seed = unseeded.json()["parameters"]["seed"]
        replay = await client.post(INFER, json=oip_body(ROWS, {"seed": seed}))
        auto = await client.post(
            INFER, json=oip_body(ROWS, {"mc_samples": "auto", "mc_tolerance": 1e-9, "seed": 1})
        )
        as_string = await client.post(INFER, json=oip_body(ROWS, {"mc_samples": "24", "seed": 1}))
    assert unseeded.json()["parameters"]["mc_samples"] == 16  # the manifest's default
    assert isinstance(seed, int)
    assert replay.json() == unseeded.json()  # the reported seed reproduces the answer
    auto_params = auto.json()["parameters"]
    assert auto_params["mc_samples"] == 64  # tolerance never met: stops at max_samples
    assert as_string.json()["parameters"]["mc_samples"] == 24


async def test_mc_options_levels_samples_and_mask_mode(repo: Path) -> None:
    params = {"seed": 2, "mc_samples": 16, "interval_levels": [0.5, 0.9], "return_samples": 5,
              "mask_mode": "shared"}  # fmt: skip
    async with serve(settings_for(repo)) as (_, client):
        response = await client.post(INFER, json=oip_body(ROWS, params))
        bad_mode = await client.post(INFER, json=oip_body(ROWS, {"mask_mode": "sometimes"}))
        bad_level = await client.post(INFER, json=oip_body(ROWS, {"interval_levels": [1.5e3]}))
    got = decode_outputs(response)
    assert got["samples"].shape == (3, 5, 2)
    assert {"lower_50", "upper_50", "lower_90", "upper_90_empirical"} <= set(got)
    assert "lower_95" not in got
    want = library(repo, "mlp", ROWS, samples=16, seed=2, interval_levels=(0.5, 0.9),
                   return_samples=5, mask_mode="shared")  # fmt: skip
    assert_same(got, want)
    assert "mask_mode" in error_of(bad_mode, 400)
    assert "interval_levels" in error_of(bad_level, 400)


async def test_binary_tensors_in_and_out_equal_json(repo: Path) -> None:
    rows = np.asarray(ROWS, dtype=np.float32)
    async with serve(settings_for(repo)) as (_, client):
        as_json = await client.post(INFER, json=oip_body(ROWS, {"seed": 4}))
        content, headers = binary_body(rows, {"seed": 4, "binary_data_output": True})
        as_binary = await client.post(INFER, content=content, headers=headers)
        mixed_doc = {**oip_body(ROWS, {"seed": 4}),
                     "outputs": [{"name": "mean", "parameters": {"binary_data": True}},
                                 {"name": "std"}]}  # fmt: skip
        mixed = await client.post(INFER, json=mixed_doc)
    assert as_binary.status_code == 200, as_binary.text
    length = int(as_binary.headers["inference-header-content-length"])
    header = json.loads(as_binary.content[:length])
    assert all("data" not in o for o in header["outputs"])
    assert_same(decode_outputs(as_binary), decode_outputs(as_json))
    mixed_header = json.loads(
        mixed.content[: int(mixed.headers["inference-header-content-length"])]
    )
    assert [("data" in o) for o in mixed_header["outputs"]] == [False, True]
    got = decode_outputs(mixed)
    assert np.array_equal(got["mean"], decode_outputs(as_json)["mean"])
    assert np.array_equal(got["std"], decode_outputs(as_json)["std"])


# -- repository extension ----------------------------------------------------------------------


async def test_repository_index_load_and_unload(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        index = await client.post("/v2/repository/index")
        unload = await client.post("/v2/repository/models/mlp/unload")
        after_unload = [
            await client.get("/v2/models/mlp/ready"),
            await client.get("/v2/models/mlp"),
            await client.post(INFER, json=oip_body(ROWS)),
        ]
        digits_still = await client.get("/v2/models/digits/ready")
        again = await client.post("/v2/repository/models/mlp/unload")
        load = await client.post("/v2/repository/models/mlp/load")
        infer = await client.post(INFER, json=oip_body(ROWS))
        missing_load = await client.post("/v2/repository/models/ghost/load")
        missing_unload = await client.post("/v2/repository/models/ghost/unload")
    assert index.status_code == 200
    assert {(m["name"], m["state"], m["version"]) for m in index.json()} == {
        ("mlp", "READY", "1"),
        ("digits", "READY", "1"),
    }
    assert unload.status_code == 200
    for response in after_unload:
        assert "mlp" in error_of(response, 404)
    assert digits_still.status_code == 200
    assert "mlp" in error_of(again, 404)
    assert load.status_code == 200
    assert infer.status_code == 200
    assert "ghost" in error_of(missing_load, 404)
    assert "ghost" in error_of(missing_unload, 404)


# -- errors ------------------------------------------------------------------------------------


def _input(**fields: Any) -> dict[str, Any]:
    tensor = {"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [0.0, 1.0]}
    return {"inputs": [{**tensor, **fields}]}


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b'{"inputs": [', 400, ["malformed JSON"]),
        (b"[1, 2]", 400, ["object"]),
        (b'{"parameters": {}}', 400, ["inputs"]),
        (_input(shape=[1, 3], data=[0, 1, 2]), 400, ["shape", "[rows, 2]"]),
        (_input(shape=[2, 2]), 400, ["shape", "4 values"]),
        (_input(shape=[1, 2, 1]), 400, ["shape"]),
        (_input(shape=[0, 2], data=[]), 400, ["shape"]),
        (_input(shape="1x2"), 400, ["shape"]),
        (_input(datatype="BYTES", data=["a", "b"]), 400, ["BYTES"]),
        (_input(datatype="FLOAT"), 400, ["FLOAT", "FP32"]),
        (_input(data=["zero", "one"]), 400, ["FP32", "numbers"]),
        (_input(datatype="UINT8", data=[1, 300]), 400, ["UINT8"]),
        (_input(name="x"), 400, ["'input'"]),
        (_input(data=[0.0, float("inf")]), 400, ["NaN or infinite"]),
        (_input(data=[float("nan"), 0.0]), 400, ["NaN or infinite"]),
        (_input(data=[1e39, 0.0]), 400, ["infinite"]),  # overflows FP32
        pytest.param(
            _input(datatype="FP64", data=[1e300, 0.0]), 400, ["input"], id="fp64-beyond-fp32"
        ),  # finite as sent, infinite in the model's float32: NaN answers otherwise
        ({**_input(), "parameters": {"mc_samples": 65}}, 422, ["65", "64"]),
        ({**_input(), "parameters": {"mc_samples": 0}}, 400, ["samples"]),
        ({**_input(), "parameters": {"mc_samples": "many"}}, 400, ["mc_samples"]),
        ({**_input(), "parameters": {"seed": -1}}, 400, ["seed"]),
        ({**_input(), "parameters": {"return_samples": 65}}, 422, ["return_samples"]),
        (_input(shape=[5, 2], data=[0.0] * 10), 422, ["5 rows", "4"]),
        ({**_input(), "outputs": "mean"}, 400, ["outputs"]),
    ],
)
async def test_bad_requests_get_a_clear_error(
    repo: Path, body: bytes | dict[str, Any], status: int, words: list[str]
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with serve(settings_for(repo)) as (_, client):
        response = await client.post(INFER, content=content)
        healthy = await client.post(INFER, json=oip_body(ROWS))
    message = error_of(response, status)
    for word in words:
        assert word in message, message
    assert healthy.status_code == 200


async def test_unknown_model_and_version_get_404(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        model = await client.post("/v2/models/ghost/infer", json=oip_body(ROWS))
        version = await client.post("/v2/models/mlp/versions/9/infer", json=oip_body(ROWS))
        meta = await client.get("/v2/models/mlp/versions/9")
    assert "ghost" in error_of(model, 404)
    for response in (version, meta):
        message = error_of(response, 404)
        assert "'9'" in message
        assert "'1'" in message  # what does serve


@pytest.mark.parametrize(
    ("size", "extra", "words"),
    [
        (4, b"", ["8 bytes", "binary_data_size is 4"]),
        (12, b"", ["binary_data_size"]),
        (None, b"\x00\x00\x00\x00", ["4 bytes", "no input"]),
    ],
    ids=["too-small", "too-large", "trailing-bytes"],
)
async def test_mismatched_binary_sizes_get_400(
    repo: Path, size: int | None, extra: bytes, words: list[str]
) -> None:
    rows = np.asarray([[0.5, 1.0]], dtype=np.float32)
    content, headers = binary_body(rows, size=size)
    async with serve(settings_for(repo)) as (_, client):
        response = await client.post(INFER, content=content + extra, headers=headers)
        wrong_length = await client.post(
            INFER, content=content, headers={**headers, "Inference-Header-Content-Length": "9999"}
        )
        no_length = await client.post(INFER, content=content)
    message = error_of(response, 400)
    for word in words:
        assert word in message, message
    assert "Inference-Header-Content-Length" in error_of(wrong_length, 400)
    error_of(no_length, 400)


async def test_infinite_binary_input_gets_400(repo: Path) -> None:
    rows = np.asarray([[np.inf, 1.0]], dtype=np.float32)
    content, headers = binary_body(rows)
    async with serve(settings_for(repo)) as (_, client):
        response = await client.post(INFER, content=content, headers=headers)
    assert "NaN or infinite" in error_of(response, 400)


# -- overload and deadlines --------------------------------------------------------------------


async def test_a_full_queue_gets_503_with_retry_after(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(repo, queue_size=1, max_batch_delay_ms=0)
    async with serve(settings) as (app, client):
        spy = spy_engine(app, "mlp", monkeypatch)
        with spy.held():
            running = asyncio.create_task(client.post(INFER, json=oip_body(ROWS)))
            await spy.wait_calls(1)
            queued = asyncio.create_task(client.post(INFER, json=oip_body(ROWS, {"seed": 1})))
            await wait_for(lambda: queue_depth(app, "mlp") == 1, "one queued request")
            refused = await client.post(INFER, json=oip_body(ROWS))
            other_model = await client.post(
                "/v2/models/digits/infer", json=oip_body(np.zeros((1, 1, 8, 8)))
            )
        done = [await running, await queued]
    assert "mlp" in error_of(refused, 503)
    assert int(refused.headers["retry-after"]) >= 1
    assert other_model.status_code == 200  # one model's queue does not stop another
    assert [d.status_code for d in done] == [200, 200]


@pytest.mark.parametrize(
    ("parameters", "headers"),
    [({"timeout": 50_000}, {}), ({}, {"X-Request-Timeout-Ms": "50"})],
    ids=["timeout-parameter-us", "header-ms"],
)
async def test_a_deadline_that_passes_while_queued_gets_504_and_is_never_computed(
    repo: Path, monkeypatch: pytest.MonkeyPatch, parameters: dict[str, Any],
    headers: dict[str, str]
) -> None:  # fmt: skip
    async with serve(settings_for(repo, max_batch_delay_ms=0)) as (app, client):
        spy = spy_engine(app, "mlp", monkeypatch)
        with spy.held():
            running = asyncio.create_task(client.post(INFER, json=oip_body([[1.0, 0.0]])))
            await spy.wait_calls(1)
            late = await client.post(
                INFER, json=oip_body([[2.0, 0.0]], parameters), headers=headers
            )
        assert (await running).status_code == 200
        after = await client.post(INFER, json=oip_body([[3.0, 0.0]]))  # queued behind it
    assert "deadline" in error_of(late, 504)
    assert after.status_code == 200
    assert 2.0 not in spy.rows_seen()
    assert 3.0 in spy.rows_seen()


# -- numerics ----------------------------------------------------------------------------------


async def test_toy_regression_far_from_its_data_infers_finite_valid_json(repo: Path) -> None:
    copy_shipped(repo, "toy-regression")
    body = oip_body(FAR, {"seed": 3, "mc_samples": 64})
    async with serve(settings_for(repo)) as (_, client):
        response = await client.post("/v2/models/toy-regression/infer", json=body)
    assert response.status_code == 200, response.text
    doc = strict_json(response.text)
    got = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in doc["outputs"]}
    want = library(repo, "toy-regression", FAR, samples=64, seed=3)
    assert list(got) == list(want)
    for name, array in want.items():
        assert np.isfinite(array).all(), name
        assert np.array_equal(got[name], array), name


async def test_an_overflowing_output_is_a_422_naming_it(tmp_path: Path) -> None:
    write_overflowing_mlp(tmp_path / "huge")
    async with serve(settings_for(tmp_path)) as (_, client):
        response = await client.post(
            "/v2/models/huge/infer", json=oip_body([[1.0], [2.0], [1e20]], {"seed": 0})
        )
        finite = await client.post("/v2/models/huge/infer", json=oip_body([[1.0]], {"seed": 0}))
    assert error_of(response, 422) == (
        "model 'huge' cannot compute a finite answer for this input: output 'y' (mean) is NaN "
        "or infinite in rows [2]"
    )
    assert finite.status_code == 200
