"""mcdrop.ray_serve on the session's Ray cluster: every endpoint through Ray's proxy, unchanged.

Runs only inside a loopback-only network namespace (`make ray-test`); skips elsewhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from http_helpers import ROOT, copy_shipped, error_of, serve
from ray_helpers import RayCluster, pids_in, wait_until

from mcdrop.repository.loading import save_weights

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPLICAS = 2
CPUS_PER_REPLICA = 0.5
DIGIT = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8) % 17  # one 8x8 "image", 0..16
PREDICT = {"rows": DIGIT.tolist(), "samples": 40, "seed": 5}

PROBE_MODEL = '''
"""Appends its process id to `log` when built: which processes loaded the repository."""

import os

from torch import nn


def build(log: str) -> nn.Module:
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\\n")
    return nn.Sequential(nn.Linear(1, 1), nn.Dropout(0.5))
'''


def write_probe_model(folder: Path, log: Path) -> None:
    """An entrypoint model that logs the pid of every process that loads it."""
    folder.mkdir(parents=True)
    save_weights(torch.nn.Sequential(torch.nn.Linear(1, 1)), folder / "weights.safetensors")
    (folder / "probe.py").write_text(PROBE_MODEL, encoding="utf-8")
    (folder / "model.toml").write_text(
        'name = "probe"\ntask = "regression"\n\n[input]\nshape = [1]\n\n'
        '[output]\nnames = ["y"]\n\n[model]\nformat = "entrypoint"\nentrypoint = "probe:build"\n'
        f"\n[model.config]\nlog = {str(log)!r}\n\n[mc]\ntau = 1.0\n",
        encoding="utf-8",
    )


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits and toy-regression as shipped, plus the pid-logging probe model."""
    repo = copy_shipped(tmp_path_factory.mktemp("ray-repo") / "models", "digits", "toy-regression")
    write_probe_model(repo / "probe", repo.parent / "probe.pids")
    return repo


def app_running(name: str = "mcdrop") -> bool:
    from ray import serve

    app = serve.status().applications.get(name)
    return app is not None and str(app.status) in ("RUNNING", "ApplicationStatus.RUNNING")


def test_cli_joins_the_cluster_serves_and_removes_only_its_app_on_sigterm(
    ray_cluster: RayCluster, repository: Path, tmp_path: Path
) -> None:
    # First in this module: the CLI deploys the app name the module's deployment uses later.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCDROP_")}
    log = tmp_path / "serve.log"
    argv = ["serve", "--ray", "--ray-address", ray_cluster.address, "--replicas", "1",
            "--ray-num-cpus", "0.25", "--model-repository", str(repository), "--device", "cpu",
            "--port", "1"]  # fmt: skip
    main = "import sys; from mcdrop.cli.main import main; sys.exit(main(sys.argv[1:]))"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", main, *argv], cwd=ROOT, env=env, stdout=sink, stderr=sink
        )
    try:
        wait_until(lambda: "mcdrop: serving" in log.read_text() or process.poll() is not None,
                   "the serve banner")  # fmt: skip
        assert process.poll() is None, log.read_text()
        # Serve already ran on the cluster: the banner names its proxy, not the asked port 1.
        assert f"on {ray_cluster.url}\n" in log.read_text()
        assert "1 replica(s), 0.25 CPU and 0 GPU each" in log.read_text()
        ready = httpx.get(f"{ray_cluster.url}/v2/models/digits/ready", timeout=30)
        assert ready.status_code == 200
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    assert code == 0, log.read_text()
    assert not app_running()
    assert httpx.get(f"{ray_cluster.url}/-/healthz", timeout=10).status_code == 200  # cluster up


@pytest.fixture(scope="module")
def deployed(ray_cluster: RayCluster, repository: Path) -> Iterator[str]:
    """The app as KubeRay deploys it (build_app with args): 2 replicas of 0.5 CPU. Its URL."""
    from ray import serve

    from mcdrop.ray_serve import build_app

    (repository.parent / "probe.pids").unlink(missing_ok=True)  # the CLI test's replica too
    args = {"model_repository": str(repository), "device": "cpu", "replicas": REPLICAS,
            "num_cpus": CPUS_PER_REPLICA}  # fmt: skip
    serve.run(build_app(args), name="mcdrop", route_prefix="/")
    try:
        yield ray_cluster.url
    finally:
        serve.delete("mcdrop")


def test_each_replica_runs_the_app_lifespan_and_reserves_its_fraction(
    deployed: str, repository: Path
) -> None:
    import ray
    from ray import serve

    states = serve.status().applications["mcdrop"].deployments["mcdrop"].replica_states
    assert dict(states) == {"RUNNING": REPLICAS}
    loaded_by = pids_in(str(repository.parent / "probe.pids"))
    assert len(loaded_by) == REPLICAS  # every replica loaded the repository: its own lifespan
    assert os.getpid() not in loaded_by
    wanted = REPLICAS * CPUS_PER_REPLICA  # all that runs now (Ray reports with a small lag)

    def reserved() -> float:
        return float(ray.cluster_resources()["CPU"] - ray.available_resources().get("CPU", 0.0))

    wait_until(lambda: abs(reserved() - wanted) < 1e-6, f"{wanted} CPUs reserved", timeout_s=20)


def test_health_and_metadata_through_the_proxy(deployed: str) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/digits/ready"):
        assert httpx.get(deployed + path, timeout=30).status_code == 200, path
    server = httpx.get(f"{deployed}/v2", timeout=30).json()
    assert server["name"] == "mcdrop"
    meta = httpx.get(f"{deployed}/v2/models/digits", timeout=30).json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]


@pytest.mark.anyio
async def test_native_predict_equals_the_in_process_app(deployed: str, repository: Path) -> None:
    from mcdrop.config import Settings

    via_ray = httpx.post(f"{deployed}/v1/models/digits/predict", json=PREDICT, timeout=60)
    assert via_ray.status_code == 200, via_ray.text
    async with serve(Settings(model_repository=repository, device="cpu")) as (_, client):
        local = (await client.post("/v1/models/digits/predict", json=PREDICT)).json()
    ray_row, local_row = via_ray.json()["predictions"][0], local["predictions"][0]
    assert ray_row["predicted"] == local_row["predicted"]
    for key in ("entropy", "mutual_information"):
        assert ray_row[key] == pytest.approx(local_row[key], rel=1e-6, abs=1e-9), key
    for c, p in local_row["probabilities"].items():
        assert ray_row["probabilities"][c] == pytest.approx(p, rel=1e-6, abs=1e-9)


def _triton_infer(client: Any, binary: bool) -> Any:
    tensor = triton.InferInput("input", list(DIGIT.shape), "FP32")
    tensor.set_data_from_numpy(DIGIT, binary_data=binary)
    wanted = [triton.InferRequestedOutput(n, binary_data=binary)
              for n in ("probabilities", "mutual_information")]  # fmt: skip
    return client.infer(
        "digits", [tensor], outputs=wanted, parameters={"seed": 5, "mc_samples": 40}
    )


def test_tritonclient_binary_and_json_through_the_proxy(deployed: str) -> None:
    client = triton.InferenceServerClient(deployed.removeprefix("http://"))
    try:
        assert client.is_server_ready()
        binary, as_json = _triton_infer(client, True), _triton_infer(client, False)
    finally:
        client.close()
    native = httpx.post(f"{deployed}/v1/models/digits/predict", json=PREDICT, timeout=60).json()
    assert "data" not in binary.get_output("probabilities")  # it really came back as binary
    probs = binary.as_numpy("probabilities")
    assert np.array_equal(probs, as_json.as_numpy("probabilities"))
    row = native["predictions"][0]
    assert probs[0].tolist() == [row["probabilities"][str(c)] for c in range(10)]
    assert binary.as_numpy("mutual_information")[0] == row["mutual_information"]


def test_metrics_dashboard_docs_and_errors_through_the_proxy(deployed: str) -> None:
    httpx.post(f"{deployed}/v1/models/digits/predict", json=PREDICT, timeout=60)
    metrics = httpx.get(f"{deployed}/metrics", timeout=30)
    assert metrics.status_code == 200
    assert "mcdrop_requests_total" in metrics.text
    page = httpx.get(f"{deployed}/dashboard", timeout=30)
    assert page.status_code == 200
    assert "<html" in page.text
    assert httpx.get(f"{deployed}/openapi.json", timeout=30).json()["info"]["title"] == "mcdrop"
    assert httpx.get(f"{deployed}/docs", timeout=30).status_code == 200
    listed = httpx.get(f"{deployed}/v1/models", timeout=30)
    assert {m["name"] for m in listed.json()} == {"digits", "toy-regression", "probe"}
    # build_app assumes the cluster's proxy listens beyond loopback: no control without a token
    index = httpx.post(f"{deployed}/v2/repository/index", timeout=30)
    assert "MCDROP_CONTROL_TOKEN" in error_of(index, 403)
    missing = httpx.post(f"{deployed}/v1/models/nope/predict", json=PREDICT, timeout=30)
    assert "nope" in error_of(missing, 404)
