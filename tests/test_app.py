"""create_app as a whole, in process: health, readiness, OpenAPI, auth, CORS, limits, metrics."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import write_mlp_model
from http_helpers import (
    asgi_call,
    copy_shipped,
    error_of,
    metric,
    oip_body,
    parse_metrics,
    queue_depth,
    raw_asgi_post,
    serve,
    settings_for,
    spy_engine,
    wait_for,
    write_slow_model,
)

from mcdrop import __version__
from mcdrop.app import create_app

pytestmark = pytest.mark.anyio
TOKEN = "s3cret-token"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """An MLP 'mlp' (2 features, tau 1, at most 4 rows) and the shipped toy-regression, digits."""
    repository = copy_shipped(tmp_path / "repo", "toy-regression", "digits")
    write_mlp_model(repository / "mlp", tau=1.0, mc={"max_rows": 4, "default_samples": 10})
    return repository


# -- health and metadata -----------------------------------------------------------------------


async def test_server_metadata_and_liveness(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        meta = (await client.get("/v2")).json()
        live = await client.get("/v2/health/live")
        ready = await client.get("/v2/health/ready")
    assert meta["name"] == "mcdrop"
    assert meta["version"] == __version__
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    assert live.status_code == 200
    assert live.json() == {"live": True}
    assert ready.status_code == 200


async def test_ready_is_503_before_the_lifespan_has_loaded_the_repository(repo: Path) -> None:
    async with serve(settings_for(repo), lifespan=False) as (app, client):
        before = await client.get("/v2/health/ready")
        live = await client.get("/v2/health/live")
        infer = await client.post("/v2/models/mlp/infer", json=oip_body([[0.0, 0.0]]))
        async with app.router.lifespan_context(app):
            after = await client.get("/v2/health/ready")
    assert "loading" in error_of(before, 503)
    assert before.headers["retry-after"]
    assert live.status_code == 200
    assert "mlp" in error_of(infer, 404)
    assert after.status_code == 200


async def test_ready_stays_503_while_a_model_is_still_loading(tmp_path: Path) -> None:
    slow = write_slow_model(tmp_path / "repo" / "slow")
    async with serve(settings_for(tmp_path / "repo"), lifespan=False) as (app, client):
        stop = asyncio.Event()

        async def run_lifespan() -> None:
            async with app.router.lifespan_context(app):
                await stop.wait()

        with slow.held():  # the load-time probe of the model waits while held
            task = asyncio.create_task(run_lifespan())
            await slow.started(0.0)
            loading = await client.get("/v2/health/ready")
            listed = (await client.get("/v1/models")).json()
        await wait_for(lambda: app.state.registry.ready, "the repository to load")
        ready = await client.get("/v2/health/ready")
        stop.set()
        await task
    error_of(loading, 503)
    assert [(m["name"], m["state"]) for m in listed] == [("slow", "LOADING")]
    assert ready.status_code == 200


# -- OpenAPI -----------------------------------------------------------------------------------


async def test_openapi_documents_the_native_endpoints_with_examples(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        schema = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
    paths = schema["paths"]
    assert "get" in paths["/v1/models"]
    for endpoint, model in (("predict", "PredictRequest"), ("evaluate", "EvaluateRequest")):
        post = paths[f"/v1/models/{{name}}/{endpoint}"]["post"]
        assert post["description"] or post["summary"]
        ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith(model)
        component = schema["components"]["schemas"][model]
        assert component["examples"], f"{model} has no example"
        assert {"rows", "samples", "seed"} <= set(component["properties"])
    predict_ok = paths["/v1/models/{name}/predict"]["post"]["responses"]["200"]
    ok_ref = predict_ok["content"]["application/json"]["schema"]["$ref"]
    assert ok_ref.endswith("PredictResponse")
    assert "/v2/models/{name}/infer" in paths
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]
    assert "/openapi.json" in docs.text


async def test_every_route_documents_its_error_answers_and_oip_infer_its_body(
    repo: Path,
) -> None:
    async with serve(settings_for(repo)) as (_, client):
        schema = (await client.get("/openapi.json")).json()
    error_ref = "#/components/schemas/ErrorBody"
    assert schema["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            for status in ("400", "401", "404", "413", "422", "503", "504", "500"):
                content = responses[status]["content"]["application/json"]
                assert content["schema"]["$ref"] == error_ref, (method, path, status)
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        body = schema["paths"][path]["post"]["requestBody"]
        request = body["content"]["application/json"]["schema"]
        assert request["required"] == ["inputs"]
        assert set(request["properties"]["inputs"]["items"]["properties"]["datatype"]["enum"]) >= {
            "FP32", "FP64", "INT64", "BOOL"}  # fmt: skip
        assert "application/octet-stream" in body["content"]


async def test_the_documented_examples_are_accepted(repo: Path) -> None:
    """The OpenAPI examples are one-feature regression rows: toy-regression answers them."""
    async with serve(settings_for(repo)) as (_, client):
        schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
        answers = []
        for endpoint, model in (("predict", "PredictRequest"), ("evaluate", "EvaluateRequest")):
            for example in schemas[model]["examples"]:
                url = f"/v1/models/toy-regression/{endpoint}"
                answers.append(await client.post(url, json=example))
    assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers]


# -- bearer tokens and CORS --------------------------------------------------------------------


async def test_control_endpoints_need_the_control_token(repo: Path) -> None:
    settings = settings_for(repo, control_token=TOKEN)
    good = {"Authorization": f"Bearer {TOKEN}"}
    async with serve(settings) as (_, client):
        refused = [
            await client.post("/v2/repository/index"),
            await client.post("/v2/repository/index", headers={"Authorization": "Bearer nope"}),
            await client.post("/v2/repository/index", headers={"Authorization": TOKEN}),
            await client.post("/v2/repository/models/mlp/unload"),
            await client.post("/v2/repository/models/mlp/load"),
        ]
        still_serving = await client.get("/v2/models/mlp/ready")
        index = await client.post("/v2/repository/index", headers=good)
        unload = await client.post("/v2/repository/models/mlp/unload", headers=good)
        gone = await client.get("/v2/models/mlp/ready")
        load = await client.post("/v2/repository/models/mlp/load", headers=good)
        infer = await client.post("/v2/models/mlp/infer", json=oip_body([[0.0, 0.0]]))
    for response in refused:
        assert "Bearer" in error_of(response, 401)
    assert still_serving.status_code == 200
    assert index.status_code == 200
    assert unload.status_code == 200
    assert gone.status_code == 404
    assert load.status_code == 200
    assert infer.status_code == 200  # inference needs no token unless inference_token is set


async def test_inference_endpoints_need_the_inference_token(repo: Path) -> None:
    settings = settings_for(repo, inference_token=TOKEN)
    good = {"Authorization": f"Bearer {TOKEN}"}
    bad = {"Authorization": f"Bearer {TOKEN}x"}
    infer = ("/v2/models/mlp/infer", oip_body([[0.0, 0.0]]))
    predict = ("/v1/models/mlp/predict", {"rows": [[0.0, 0.0]]})
    evaluate = ("/v1/models/mlp/evaluate", {"rows": [[0.0, 0.0]], "targets": [1.0]})
    async with serve(settings) as (_, client):
        refused, accepted = [], []
        for url, body in (infer, predict, evaluate):
            refused.append(await client.post(url, json=body))
            refused.append(await client.post(url, json=body, headers=bad))
            accepted.append(await client.post(url, json=body, headers=good))
        health = await client.get("/v2/health/ready")
        index = await client.post("/v2/repository/index")  # control has its own token (none)
    for response in refused:
        assert "Bearer" in error_of(response, 401)
    assert [a.status_code for a in accepted] == [200, 200, 200], [a.text for a in accepted]
    assert health.status_code == 200
    assert index.status_code == 200


CONTROL = [
    ("/v2/repository/index", 200),
    ("/v2/repository/models/mlp/unload", 200),
    ("/v2/repository/models/mlp/load", 200),
]


async def _control(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> list[int]:
    return [(await client.post(url, headers=headers)).status_code for url, _ in CONTROL]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "mcdrop.example"])
async def test_control_is_off_without_a_token_when_bound_beyond_loopback(
    repo: Path, host: str
) -> None:
    """The image binds 0.0.0.0: there, index/load/unload need MCDROP_CONTROL_TOKEN."""
    async with serve(settings_for(repo, host=host)) as (_, client):
        refused = [await client.post(url) for url, _ in CONTROL]
        still_serving = await client.get("/v2/models/mlp/ready")
    for response in refused:
        assert "MCDROP_CONTROL_TOKEN" in error_of(response, 403)
    assert still_serving.status_code == 200
    async with serve(settings_for(repo, host=host, control_token=TOKEN)) as (_, client):
        assert await _control(client) == [401] * 3
        assert await _control(client, {"Authorization": f"Bearer {TOKEN}"}) == [200] * 3


@pytest.mark.parametrize("peer", ["203.0.113.9", "192.168.0.7", "::ffff:10.0.0.1"])
async def test_control_without_a_token_refuses_a_peer_beyond_loopback(
    repo: Path, peer: str
) -> None:
    """Even bound to loopback (e.g. behind a forwarder that keeps the peer address)."""
    app = create_app(settings_for(repo))
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        assert await _control(client) == [403] * 3
    local = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=local, base_url="http://t") as client,
    ):
        assert await _control(client) == [200] * 3


async def test_the_model_list_needs_the_inference_token_and_shows_no_host_paths(
    repo: Path,
) -> None:
    (repo / "broken").mkdir()
    (repo / "broken" / "model.toml").write_text('name = "broken"\ntask = "nope"\n')
    async with serve(settings_for(repo, inference_token=TOKEN)) as (_, client):
        refused = await client.get("/v1/models")
        listed = await client.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
    error_of(refused, 401)
    broken = next(m for m in listed.json() if m["name"] == "broken")
    assert broken["state"] == "FAILED"
    assert broken["error"].startswith("broken/model.toml: ")
    assert str(repo) not in listed.text
    assert str(repo.resolve()) not in listed.text


async def test_a_load_error_names_files_relative_to_the_repository(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        (repo / "mlp" / "weights.safetensors").write_bytes(b"\x80\x04 not weights")
        response = await client.post("/v2/repository/models/mlp/load")
        serving = await client.get("/v2/models/mlp/ready")
    message = error_of(response, 400)
    assert message.startswith("mlp/weights.safetensors: not a safetensors file"), message
    assert str(repo.resolve()) not in message
    assert serving.status_code == 200  # the old version keeps serving


async def test_cors_headers_for_the_configured_origins_only(repo: Path) -> None:
    allowed, other = "https://dashboard.example", "https://evil.example"
    async with serve(settings_for(repo, cors_origins=[allowed])) as (_, client):
        simple = await client.get("/v1/models", headers={"Origin": allowed})
        foreign = await client.get("/v1/models", headers={"Origin": other})
        preflight = await client.options(
            "/v2/models/mlp/infer",
            headers={"Origin": allowed, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type"},
        )  # fmt: skip
    assert simple.headers["access-control-allow-origin"] == allowed
    assert "access-control-allow-origin" not in foreign.headers
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == allowed
    assert "POST" in preflight.headers["access-control-allow-methods"]
    async with serve(settings_for(repo)) as (_, client):
        plain = await client.get("/v1/models", headers={"Origin": allowed})
    assert "access-control-allow-origin" not in plain.headers


# -- body limit --------------------------------------------------------------------------------


async def _chunks(body: bytes, size: int = 512) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize(
    ("url", "body"),
    [
        ("/v2/models/mlp/infer", oip_body([[0.5, 0.5]] * 4)),
        ("/v1/models/mlp/predict", {"rows": [[0.5, 0.5]] * 4}),
    ],
    ids=["oip", "native"],
)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_above_max_body_bytes_gets_413(
    repo: Path, url: str, body: dict[str, Any], chunked: bool
) -> None:
    """Declared by Content-Length or only seen while streaming (chunked), the answer is 413."""
    small = json.dumps(body).encode()
    padded = small[:-1] + b" " * 3000 + b"}"  # same JSON, 3 kB of whitespace
    async with serve(settings_for(repo, max_body_bytes=2048)) as (_, client):
        headers = {"content-type": "application/json"}
        content = _chunks(padded) if chunked else padded
        big = await client.post(url, content=content, headers=headers)
        fine = await client.post(url, content=small, headers=headers)
    assert "2048 bytes" in error_of(big, 413)
    assert fine.status_code == 200


# -- timeouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["soon", "-5", "0", "nan", "inf", "1e400"])
async def test_a_bad_timeout_header_gets_400_naming_it(repo: Path, header: str) -> None:
    async with serve(settings_for(repo)) as (_, client):
        oip = await client.post(
            "/v2/models/mlp/infer", json=oip_body([[0.0, 0.0]]),
            headers={"X-Request-Timeout-Ms": header},
        )  # fmt: skip
        native = await client.post(
            "/v1/models/mlp/predict", json={"rows": [[0.0, 0.0]]},
            headers={"X-Request-Timeout-Ms": header},
        )  # fmt: skip
    for response in (oip, native):
        assert "timeout" in error_of(response, 400).lower()


# -- client disconnects ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "make"),
    [
        ("/v2/models/mlp/infer", lambda v: oip_body([[v, 0.0]], {"seed": 1})),
        ("/v1/models/mlp/predict", lambda v: {"rows": [[v, 0.0]], "seed": 1}),
    ],
    ids=["oip", "native"],
)
async def test_a_client_that_disconnects_while_queued_costs_no_compute(
    repo: Path, monkeypatch: pytest.MonkeyPatch, url: str, make: Any
) -> None:
    async with serve(settings_for(repo, max_batch_delay_ms=0)) as (app, client):
        spy = spy_engine(app, "mlp", monkeypatch)
        gone = asyncio.Event()
        with spy.held():
            first = asyncio.create_task(client.post(url, json=make(1.0)))
            await spy.wait_calls(1)  # the worker is busy with the first request
            leaver = asyncio.create_task(
                raw_asgi_post(app, url, json.dumps(make(2.0)).encode(), gone)
            )
            await wait_for(lambda: queue_depth(app, "mlp") == 1, "the request to queue")
            gone.set()
            messages = await leaver
        assert (await first).status_code == 200
        after = await client.post(url, json=make(3.0))  # queued behind the abandoned job
        depth = queue_depth(app, "mlp")
    assert after.status_code == 200
    assert 2.0 not in spy.rows_seen()
    assert {1.0, 3.0} <= set(spy.rows_seen())
    assert depth == 0
    assert messages[0]["status"] >= 400  # nobody reads it; it must not claim success


async def test_a_client_that_leaves_mid_body_is_no_server_error(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Logged as an ordinary event, not as an unhandled traceback."""
    caplog.set_level(logging.INFO)
    async with serve(settings_for(repo)) as (app, _):
        for path in ("/v2/models/mlp/infer", "/v1/models/mlp/predict"):
            parts = [{"type": "http.request", "body": b'{"inputs": [', "more_body": True}]

            async def receive(parts: list[dict[str, Any]] = parts) -> dict[str, Any]:
                return parts.pop(0) if parts else {"type": "http.disconnect"}

            declared = [(b"content-length", b"5000")]
            status, _ = await asgi_call(app, "POST", path, receive, declared)
            assert status == 400, path
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert any("client left before sending the whole body" in r.getMessage()
               for r in caplog.records)  # fmt: skip


# -- failures stay isolated --------------------------------------------------------------------


async def test_a_failing_request_never_affects_the_others(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = [oip_body([[0.1 * k, -0.2 * k]], {"seed": k, "mc_samples": 16}) for k in range(4)]
    bad = [
        oip_body([[float("nan"), 0.0]], {"seed": 9, "mc_samples": 16}),
        oip_body([[0.0, 0.0, 0.0]], {"seed": 9, "mc_samples": 16}),
        oip_body([[0.0, 0.0]], {"seed": 9, "mc_samples": 10**9}),
        oip_body([[0.0, 0.0]] * 5, {"seed": 9, "mc_samples": 16}),
    ]
    async with serve(settings_for(repo, max_batch_delay_ms=0)) as (app, client):
        spy = spy_engine(app, "mlp", monkeypatch)
        blocker = asyncio.create_task(client.post("/v2/models/mlp/infer", json=good[0]))
        with spy.held():
            await spy.wait_calls(1)
            mixed = [good[1], bad[0], good[2], bad[1], bad[2], good[3], bad[3]]
            tasks = [
                asyncio.create_task(
                    client.post("/v2/models/mlp/infer", content=json.dumps(body).encode())
                )
                for body in mixed
            ]
            await wait_for(lambda: queue_depth(app, "mlp") == 3, "the good requests to queue")
        answers = [await blocker] + [await t for t in tasks]
        merged = len(spy.calls[1])
        alone = [await client.post("/v2/models/mlp/infer", json=body) for body in good]
    statuses = [a.status_code for a in answers]
    assert statuses == [200, 200, 400, 200, 400, 422, 200, 422], [a.text for a in answers]
    assert merged == 3  # the good ones were batched together despite the bad company
    together = [answers[i] for i in (0, 1, 3, 6)]
    assert [a.json() for a in together] == [a.json() for a in alone]


# -- metrics -----------------------------------------------------------------------------------


async def test_metrics_count_requests_batches_and_uncertainty(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        ok1 = await client.post("/v2/models/mlp/infer", json=oip_body([[0.0, 1.0]]))
        ok3 = await client.post("/v2/models/mlp/infer", json=oip_body([[0.0, 1.0]] * 3))
        bad = await client.post("/v2/models/mlp/infer", json=oip_body([[0.0]]))
        native = await client.post("/v1/models/mlp/predict", json={"rows": [[2.0, 2.0]] * 2})
        pixels = [[[0.0] * 8] * 8]
        digits = await client.post("/v1/models/digits/predict", json={"rows": [pixels] * 3})
        exposition = await client.get("/metrics")
    assert [r.status_code for r in (ok1, ok3, bad, native, digits)] == [200, 200, 400, 200, 200]
    assert exposition.headers["content-type"].startswith("text/plain")
    s = parse_metrics(exposition.text)
    assert metric(s, "mcdrop_requests_total", model="mlp", endpoint="oip_infer", status="200") == 2
    assert metric(s, "mcdrop_requests_total", model="mlp", endpoint="oip_infer", status="400") == 1
    assert metric(s, "mcdrop_requests_total", model="mlp", endpoint="predict", status="200") == 1
    assert metric(s, "mcdrop_requests_total", model="digits", endpoint="predict", status="200") == 1
    assert metric(s, "mcdrop_request_seconds_count", model="mlp", endpoint="oip_infer") == 3
    assert metric(s, "mcdrop_batch_rows_count", model="mlp") == 3
    assert metric(s, "mcdrop_batch_rows_sum", model="mlp") == 1 + 3 + 2
    assert metric(s, "mcdrop_samples_sum", model="mlp") == 3 * 10  # the manifest's default
    assert metric(s, "mcdrop_predictive_std_count", model="mlp") == 6  # rows x outputs
    assert metric(s, "mcdrop_entropy_nats_count", model="digits") == 3
    assert metric(s, "mcdrop_mutual_information_nats_count", model="digits") == 3
    assert metric(s, "mcdrop_queue_seconds_count", model="digits") == 1
    assert metric(s, "mcdrop_models_loaded") == 3
    assert metric(s, "mcdrop_queue_depth", model="mlp") == 0


async def test_a_413_is_not_counted_as_a_server_error(repo: Path) -> None:
    body = json.dumps(oip_body([[0.5, 0.5]])).encode()[:-1] + b" " * 3000 + b"}"
    async with serve(settings_for(repo, max_body_bytes=2048)) as (_, client):
        response = await client.post("/v2/models/mlp/infer", content=_chunks(body))
        s = parse_metrics((await client.get("/metrics")).text)
    error_of(response, 413)
    statuses = {dict(k[1]).get("status") for k in s if k[0] == "mcdrop_requests_total"}
    assert "500" not in statuses


async def test_requests_for_unknown_models_do_not_create_metric_series(repo: Path) -> None:
    """Model labels come from the repository, not from URLs: otherwise every typo (or a
    scanner) adds a series to the exposition forever."""
    async with serve(settings_for(repo)) as (_, client):
        for k in range(5):
            await client.post(f"/v2/models/no-such-model-{k}/infer", json=oip_body([[0.0, 0.0]]))
            await client.post(f"/v1/models/no-such-model-{k}/predict", json={"rows": [[0.0]]})
        s = parse_metrics((await client.get("/metrics")).text)
    models = {dict(labels).get("model") for _, labels in s}
    assert not any(str(m).startswith("no-such-model") for m in models), sorted(map(str, models))


async def test_model_metadata_says_what_samples_what_does_not_and_the_audit(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        listed = {m["name"]: m for m in (await client.get("/v1/models")).json()}
        oip = (await client.get("/v2/models/digits")).json()
    coverage = listed["digits"]["coverage"]
    assert oip["parameters"]["coverage"] == coverage
    assert coverage["program"] == "partitioned"
    assert [s["kind"] for s in coverage["sampled"]] == ["dropout", "dropout"]
    assert {n["name"] for n in coverage["not_sampled"]} == {"bn0", "bn1"}
    assert all("deterministic" in n["reason"] for n in coverage["not_sampled"])
    assert coverage["audit"]["verdict"] == "ok"
    assert abs(coverage["audit"]["ratio"] - 1) <= coverage["audit"]["tolerance"]
