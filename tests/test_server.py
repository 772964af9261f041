"""A real uvicorn server on 127.0.0.1: tritonclient (binary and JSON), native API, concurrency,
client disconnects and graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from conftest import write_mlp_model
from http_helpers import (
    ServerProcess,
    SlowModel,
    append_table,
    decode_outputs,
    metric,
    oip_body,
    parse_metrics,
    start_server,
    wait_for,
    write_slow_model,
)

from mcdrop.config import Settings
from mcdrop.engine.masks import MASK_STREAM
from mcdrop.server import control_state

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CLIENTS = 32
ROWS_OF = [1 + k % 3 for k in range(CLIENTS)]  # 1, 2 or 3 rows per client
ROWS = np.asarray([[0.5, -1.25, 2.0], [1.5, 0.25, -0.75]], dtype=np.float32)
OUTPUTS = ["mean", "std", "epistemic_variance", "aleatoric_variance", "lower_95", "upper_95"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SlowModel]:
    """'mlp' answers alone; 'crowd' (same weights) waits to merge all CLIENTS requests; 'slow'."""
    repo = tmp_path_factory.mktemp("served") / "repo"
    for name in ("mlp", "crowd"):
        write_mlp_model(repo / name, in_features=3, outputs=("a", "b"), hidden=(32,),
                        dropout=0.25, tau=4.0, seed=3)  # fmt: skip
    append_table(repo / "mlp", "batching", {"max_batch_rows": 1, "max_batch_delay_ms": 0})
    # the batch closes when every client's rows are in (the delay only bounds a failure)
    append_table(repo / "crowd", "batching",
                 {"max_batch_rows": sum(ROWS_OF), "max_batch_delay_ms": 20_000})  # fmt: skip
    slow = write_slow_model(repo / "slow", batching={"max_batch_delay_ms": 0})
    return repo, slow


@pytest.fixture(scope="module")
def server(
    repository: tuple[Path, SlowModel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    process = start_server(repository[0], log)
    try:
        yield process
    finally:
        process.stop()


def _triton_infer(
    client: triton.InferenceServerClient, binary: bool, parameters: dict[str, Any]
) -> triton.InferResult:
    tensor = triton.InferInput("input", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS, binary_data=binary)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS]
    return client.infer("mlp", [tensor], outputs=outputs, request_id="tc-1", parameters=parameters)


def test_tritonclient_binary_json_and_native_give_the_same_numbers(server: ServerProcess) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("mlp")
        meta = client.get_model_metadata("mlp")
        parameters = {"seed": 12, "mc_samples": 48}
        binary = _triton_infer(client, True, parameters)
        as_json = _triton_infer(client, False, parameters)
    finally:
        client.close()
    native = httpx.post(
        f"{server.url}/v1/models/mlp/predict",
        json={"rows": ROWS.astype(float).tolist(), "seed": 12, "samples": 48},
        timeout=30.0,
    ).json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3]}]
    assert binary.get_response()["id"] == "tc-1"
    assert binary.get_response()["parameters"] == {
        "mc_samples": 48, "seed": 12, "mask_stream": MASK_STREAM}  # fmt: skip
    assert "data" not in binary.get_output("mean")  # it really came as binary
    assert "data" in as_json.get_output("mean")
    for name in OUTPUTS:
        b, j = binary.as_numpy(name), as_json.as_numpy(name)
        assert b is not None
        assert j is not None
        assert b.dtype == j.dtype == np.float64
        assert np.array_equal(b, j), name
    means, stds, lows = (binary.as_numpy(n) for n in ("mean", "std", "lower_95"))
    assert means is not None
    assert stds is not None
    assert lows is not None
    for r, row in enumerate(native["predictions"]):
        for d, output in enumerate(("a", "b")):
            assert row[output]["mean"] == means[r, d]
            assert row[output]["std"] == stds[r, d]
            assert row[output]["intervals"]["0.95"]["gaussian"][0] == lows[r, d]


async def test_concurrent_clients_are_batched_and_match_their_unbatched_twins(
    server: ServerProcess,
) -> None:
    rng = np.random.default_rng(0)
    inputs = [rng.uniform(-2, 2, size=(n, 3)).astype(np.float32) for n in ROWS_OF]
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=server.url, timeout=60.0, limits=limits) as client:
        before = parse_metrics((await client.get("/metrics")).text)

        async def ask(model: str, k: int) -> httpx.Response:
            body = oip_body(inputs[k], {"seed": 1000 + k, "mc_samples": 40})
            return await client.post(f"/v2/models/{model}/infer", json=body)

        crowd = await asyncio.gather(*(ask("crowd", k) for k in range(CLIENTS)))
        after = parse_metrics((await client.get("/metrics")).text)
        twins = [await ask("mlp", k) for k in range(CLIENTS)]  # one at a time, never merged
    assert [r.status_code for r in crowd] == [200] * CLIENTS
    assert [r.status_code for r in twins] == [200] * CLIENTS
    for k, (got, want) in enumerate(zip(crowd, twins, strict=True)):
        got_out, want_out = decode_outputs(got), decode_outputs(want)
        assert list(got_out) == list(want_out)
        for name in want_out:
            assert np.array_equal(got_out[name], want_out[name]), (k, name)
    calls = metric(after, "mcdrop_batch_requests_count", model="crowd") - metric(
        before, "mcdrop_batch_requests_count", model="crowd"
    )
    single = metric(after, "mcdrop_batch_requests_bucket", model="crowd", le="1.0") - metric(
        before, "mcdrop_batch_requests_bucket", model="crowd", le="1.0"
    )
    rows = metric(after, "mcdrop_batch_rows_sum", model="crowd") - metric(
        before, "mcdrop_batch_rows_sum", model="crowd"
    )
    assert rows == sum(ROWS_OF)
    assert calls < CLIENTS  # fewer engine calls than requests
    assert calls - single >= 1  # at least one engine call merged several requests
    assert metric(after, "mcdrop_batch_rows_bucket", model="crowd", le="1.0") < calls


async def test_a_client_that_hangs_up_while_queued_costs_no_compute(
    server: ServerProcess, repository: tuple[Path, SlowModel]
) -> None:
    slow = repository[1]
    url = f"{server.url}/v2/models/slow/infer"
    async with httpx.AsyncClient(timeout=60.0) as client:
        with slow.held():
            running = asyncio.create_task(client.post(url, json=oip_body([[11.0]])))
            await slow.started(11.0)
            async with httpx.AsyncClient(timeout=0.3) as impatient:
                with pytest.raises(httpx.ReadTimeout):
                    await impatient.post(url, json=oip_body([[12.0]]))

            async def gone_counted() -> bool:
                series = parse_metrics((await client.get(f"{server.url}/metrics")).text)
                return metric(series, "mcdrop_requests_total", model="slow",
                              endpoint="oip_infer", status="499") >= 1  # fmt: skip

            give_up = asyncio.get_running_loop().time() + 20.0
            while not await gone_counted():
                assert asyncio.get_running_loop().time() < give_up, "disconnect never noticed"
                await asyncio.sleep(0.02)
        assert (await running).status_code == 200
        after = await client.post(url, json=oip_body([[13.0]]))
    assert after.status_code == 200
    assert 12.0 not in slow.computed()
    assert 13.0 in slow.computed()


def _slow_cli_server(
    tmp_path: Path, env: dict[str, str] | None = None
) -> tuple[SlowModel, ServerProcess]:
    """`mcdrop serve` over a repository holding only the slow model (no batching delay)."""
    slow = write_slow_model(tmp_path / "repo" / "slow", batching={"max_batch_delay_ms": 0})
    return slow, start_server(tmp_path / "repo", tmp_path / "server.log", env, launcher="cli")


async def test_sigterm_finishes_work_in_flight_then_exits_0(tmp_path: Path) -> None:
    """`mcdrop serve`: stop accepting, finish the running and the queued request, exit 0."""
    slow, server = _slow_cli_server(tmp_path)
    try:
        url = f"{server.url}/v2/models/slow/infer"
        async with httpx.AsyncClient(timeout=60.0) as client:
            with slow.held():
                running = asyncio.create_task(client.post(url, json=oip_body([[1.0]])))
                await slow.started(1.0)
                queued = asyncio.create_task(
                    client.post(url, json=oip_body([[2.0]], {"mc_samples": 16}))
                )
                await wait_for(lambda: _queued_on_server(server), "the second request to queue")
                server.process.send_signal(signal.SIGTERM)
                await wait_for(lambda: _refuses_connections(server), "the listener to close")
                assert server.process.poll() is None  # still finishing its work
            answers = [await running, await queued]
        code = await asyncio.to_thread(server.process.wait, 30.0)
    finally:
        server.stop()
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert answers[1].json()["parameters"]["mc_samples"] == 16
    assert "Traceback" not in server.output()
    assert code == 0, server.output()
    assert {1.0, 2.0} <= slow.computed()


async def test_a_request_still_running_when_the_drain_window_closes_gets_a_503(
    tmp_path: Path,
) -> None:
    """Not uvicorn's bare text 500: a JSON error saying to retry, with Retry-After."""
    slow, server = _slow_cli_server(tmp_path, {"MCDROP_SHUTDOWN_TIMEOUT_S": "0.5"})
    try:
        url = f"{server.url}/v2/models/slow/infer"
        async with httpx.AsyncClient(timeout=60.0) as client:
            with slow.held():
                running = asyncio.create_task(client.post(url, json=oip_body([[1.0]])))
                await slow.started(1.0)
                server.process.send_signal(signal.SIGTERM)
                answer = await running
            code = await asyncio.to_thread(server.process.wait, 30.0)
    finally:
        server.stop()
    assert answer.status_code == 503, answer.text
    assert "shut down before this request finished" in answer.json()["error"]
    assert answer.headers["retry-after"] == "1"
    assert "Traceback" not in server.output()
    assert code == 0, server.output()


def _queued_on_server(server: ServerProcess) -> bool:
    series = parse_metrics(httpx.get(f"{server.url}/metrics", timeout=5.0).text)
    return metric(series, "mcdrop_queue_depth", model="slow") == 1


def _refuses_connections(server: ServerProcess) -> bool:
    try:
        httpx.get(f"{server.url}/v2/health/live", timeout=1.0)
    except httpx.TransportError:
        return True
    return False


def test_worker_processes_rebuild_exactly_the_served_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--workers N hands the settings to its processes through MCDROP_* variables."""
    from mcdrop.config import Settings
    from mcdrop.server import settings_environment, urls

    chosen = Settings(
        model_repository=tmp_path,
        port=8123,
        workers=2,
        compile=True,
        cors_origins=["http://a.test"],
        control_token="t",
        max_batch_delay_ms=0.5,
    )
    for key, value in settings_environment(chosen).items():
        monkeypatch.setenv(key, value)
    assert Settings() == chosen
    assert urls(chosen)["health"] == "http://127.0.0.1:8123/v2/health/ready"


@pytest.mark.parametrize(
    ("host", "token", "state"),
    [
        ("127.0.0.1", None, "open to loopback clients"),
        ("0.0.0.0", None, "off: listening beyond loopback"),
        ("0.0.0.0", "t", "needs the control token"),
    ],
)
def test_the_banner_says_how_control_is_reachable(host: str, token: str | None, state: str) -> None:
    assert control_state(Settings(host=host, control_token=token)).startswith(state)
