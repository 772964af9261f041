"""ModelRegistry: hot reload by index, load, unload and polling; swaps never fail a request."""

from __future__ import annotations

import asyncio
import math
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import write_mlp_model
from http_helpers import (
    decode_outputs,
    error_of,
    metric,
    oip_body,
    parse_metrics,
    queue_depth,
    serve,
    set_version,
    settings_for,
    spy_engine,
    wait_for,
)
from numpy.typing import NDArray

from mcdrop.api.outputs import summary_outputs
from mcdrop.errors import ModelLoadError, ModelNotFound, NonFiniteOutput
from mcdrop.model import ServedModel
from mcdrop.serving.metrics import Metrics
from mcdrop.serving.registry import ModelRegistry
from mcdrop.uncertainty import RegressionSummary

pytestmark = pytest.mark.anyio
INFER = "/v2/models/mlp/infer"
ROW = [[0.5, -1.0]]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repository = tmp_path / "repo"
    write_mlp_model(repository / "mlp", seed=0, mc={"default_samples": 16})
    return repository


def new_version(repo: Path, version: str = "2", seed: int = 1) -> None:
    """Rewrite 'mlp' on disk with other weights and the given version."""
    write_mlp_model(repo / "mlp", seed=seed, mc={"default_samples": 16})
    set_version(repo / "mlp", version)


def answers(folder: Path, seeds: list[int]) -> list[NDArray[Any]]:
    """The mean ServedModel.predict gives for ROW with each seed."""
    model = ServedModel.load(folder)
    x = torch.tensor(ROW, dtype=torch.float64)
    return [summary_outputs(model.predict(x, model.options(seed=s)))["mean"] for s in seeds]


def mcdrop_threads(name: str) -> int:
    return sum(t.name == f"mcdrop-{name}" for t in threading.enumerate())


# -- index -------------------------------------------------------------------------------------


async def test_index_swaps_in_a_changed_model(repo: Path) -> None:
    old = answers(repo / "mlp", [0])
    async with serve(settings_for(repo)) as (_, client):
        before = await client.post(INFER, json=oip_body(ROW, {"seed": 0}))
        new_version(repo)
        index = await client.post("/v2/repository/index")
        after = await client.post(INFER, json=oip_body(ROW, {"seed": 0}))
        old_version = await client.post("/v2/models/mlp/versions/1/infer", json=oip_body(ROW))
        listed = (await client.get("/v1/models")).json()
        threads = mcdrop_threads("mlp")
    new = answers(repo / "mlp", [0])
    assert [(m["name"], m["version"], m["state"]) for m in index.json()] == [("mlp", "2", "READY")]
    assert before.json()["model_version"] == "1"
    assert after.json()["model_version"] == "2"
    assert np.array_equal(decode_outputs(before)["mean"], old[0])
    assert np.array_equal(decode_outputs(after)["mean"], new[0])
    assert not np.array_equal(old[0], new[0])
    error_of(old_version, 404)
    assert listed[0]["version"] == "2"
    assert threads == 1  # the old worker thread stopped


async def test_index_reloads_changed_weights_under_the_same_version(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        before = decode_outputs(await client.post(INFER, json=oip_body(ROW, {"seed": 0})))
        write_mlp_model(repo / "mlp", seed=7, mc={"default_samples": 16})
        await client.post("/v2/repository/index")
        after = decode_outputs(await client.post(INFER, json=oip_body(ROW, {"seed": 0})))
        unchanged = await client.post("/v2/repository/index")  # nothing changed: no reload
        same = decode_outputs(await client.post(INFER, json=oip_body(ROW, {"seed": 0})))
    assert np.array_equal(after["mean"], answers(repo / "mlp", [0])[0])
    assert not np.array_equal(before["mean"], after["mean"])
    assert unchanged.status_code == 200
    assert np.array_equal(same["mean"], after["mean"])


async def test_index_loads_new_folders_and_unloads_removed_ones(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        write_mlp_model(repo / "other", in_features=3)
        added = (await client.post("/v2/repository/index")).json()
        shutil.rmtree(repo / "mlp")
        removed = (await client.post("/v2/repository/index")).json()
        gone = await client.post(INFER, json=oip_body(ROW))
        other = await client.post("/v2/models/other/infer", json=oip_body([[1.0, 2.0, 3.0]]))
    assert sorted(m["name"] for m in added) == ["mlp", "other"]
    assert [m["name"] for m in removed] == ["other"]
    assert "mlp" in error_of(gone, 404)
    assert other.status_code == 200


async def test_requests_queued_and_arriving_during_a_swap_all_succeed(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Work queued on the old version finishes there; new work goes to the new version."""
    seeds = list(range(5))
    old = answers(repo / "mlp", seeds)
    async with serve(settings_for(repo, max_batch_delay_ms=0)) as (app, client):
        spy = spy_engine(app, "mlp", monkeypatch)
        with spy.held():
            first = asyncio.create_task(client.post(INFER, json=oip_body(ROW, {"seed": 0})))
            await spy.wait_calls(1)
            queued = [asyncio.create_task(client.post(INFER, json=oip_body(ROW, {"seed": s})))
                      for s in seeds[1:]]  # fmt: skip
            await wait_for(lambda: queue_depth(app, "mlp") == 4, "4 queued requests")
            new_version(repo)
            index = asyncio.create_task(client.post("/v2/repository/index"))
            await wait_for(
                lambda: app.state.registry.status("mlp").version == "2", "the swap to version 2"
            )
            during = await asyncio.gather(
                *(client.post(INFER, json=oip_body(ROW, {"seed": s})) for s in seeds)
            )
        on_old = [await first] + [await t for t in queued]
        indexed = await index
    new = answers(repo / "mlp", seeds)
    assert [r.status_code for r in on_old + during] == [200] * 10
    assert indexed.status_code == 200
    for k, response in enumerate(on_old):
        assert np.array_equal(decode_outputs(response)["mean"], old[k])
    for k, response in enumerate(during):
        assert response.json()["model_version"] == "2"
        assert np.array_equal(decode_outputs(response)["mean"], new[k])


async def test_a_stream_of_requests_across_repeated_swaps_never_fails(repo: Path) -> None:
    async with serve(settings_for(repo, max_batch_delay_ms=1)) as (_, client):
        stop = asyncio.Event()

        async def hammer(k: int) -> list[int]:
            statuses = []
            while not stop.is_set():
                response = await client.post(INFER, json=oip_body(ROW, {"seed": k}))
                statuses.append(response.status_code)
            return statuses

        clients = [asyncio.create_task(hammer(k)) for k in range(8)]
        for version in range(2, 6):
            new_version(repo, str(version), seed=version)
            swapped = await client.post("/v2/repository/index")
            assert swapped.json()[0]["version"] == str(version)
        stop.set()
        statuses = [s for task in clients for s in await task]
    assert statuses
    assert set(statuses) == {200}


# -- failures ----------------------------------------------------------------------------------


async def test_a_broken_new_version_leaves_the_old_one_serving(repo: Path) -> None:
    old = answers(repo / "mlp", [3])
    async with serve(settings_for(repo)) as (_, client):
        set_version(repo / "mlp", "2")
        (repo / "mlp" / "weights.safetensors").write_bytes(b"\x80\x04 a pickle, refused")
        index = await client.post("/v2/repository/index")
        served = await client.post(INFER, json=oip_body(ROW, {"seed": 3}))
        listed = (await client.get("/v1/models")).json()
        load = await client.post("/v2/repository/models/mlp/load")
        still = await client.post(INFER, json=oip_body(ROW, {"seed": 3}))
        metrics = parse_metrics((await client.get("/metrics")).text)
        new_version(repo, "3")
        fixed = (await client.post("/v2/repository/index")).json()
        listed_fixed = (await client.get("/v1/models")).json()
    assert index.status_code == 200
    entry = index.json()[0]
    assert (entry["state"], entry["version"]) == ("READY", "1")
    assert "weights.safetensors" in entry["reason"]
    assert served.status_code == 200
    assert served.json()["model_version"] == "1"
    assert np.array_equal(decode_outputs(served)["mean"], old[0])
    assert listed[0]["state"] == "READY"
    assert listed[0]["version"] == "1"
    assert "weights.safetensors" in listed[0]["error"]
    assert load.status_code not in (200, 404)
    assert "weights.safetensors" in error_of(load, load.status_code)
    assert still.status_code == 200
    assert metric(metrics, "mcdrop_model_load_failures_total", model="mlp") >= 1
    assert (fixed[0]["version"], fixed[0]["reason"]) == ("3", "")
    assert listed_fixed[0]["error"] is None


async def test_a_folder_whose_manifest_names_another_model_is_refused(repo: Path) -> None:
    write_mlp_model(repo / "misnamed", name="someone-else")
    async with serve(settings_for(repo)) as (_, client):
        listed = {m["name"]: m for m in (await client.get("/v1/models")).json()}
        ready = await client.get("/v2/models/someone-else/ready")
    assert listed["misnamed"]["state"] == "FAILED"
    assert "someone-else" in listed["misnamed"]["error"]
    error_of(ready, 404)


# -- polling -----------------------------------------------------------------------------------


async def test_polling_picks_up_a_change_without_any_request(repo: Path) -> None:
    async with serve(settings_for(repo, poll_interval_s=0.02)) as (app, client):
        registry: ModelRegistry = app.state.registry
        new_version(repo)
        await wait_for(lambda: registry.status("mlp").version == "2", "the poller to swap")
        served = await client.post(INFER, json=oip_body(ROW, {"seed": 0}))
    assert served.json()["model_version"] == "2"
    assert np.array_equal(decode_outputs(served)["mean"], answers(repo / "mlp", [0])[0])


async def test_without_polling_nothing_changes_until_index(repo: Path) -> None:
    async with serve(settings_for(repo)) as (app, client):
        new_version(repo)
        for _ in range(3):
            await client.post(INFER, json=oip_body(ROW))
        version = app.state.registry.status("mlp").version
    assert version == "1"


# -- the registry directly ---------------------------------------------------------------------


async def test_an_answer_names_the_version_that_computed_it_across_a_swap(repo: Path) -> None:
    """A request that looked up version 1 just before a swap is run, and labelled, by 2."""
    registry = ModelRegistry(settings_for(repo), Metrics())
    await registry.start()
    try:
        looked_up = registry.get("mlp")
        set_version(repo / "mlp", "2")
        await registry.load("mlp")  # retires version 1's worker
        rows = torch.tensor(ROW, dtype=torch.float64)
        answer = await registry.infer(looked_up, rows, looked_up.model.options(seed=1))
        pinned = registry.infer(looked_up, rows, looked_up.model.options(seed=1), version="1")
        with pytest.raises(ModelNotFound, match="no version '1'"):
            await pinned
    finally:
        await registry.close()
    assert looked_up.model.spec.version == "1"
    assert answer.model.spec.version == "2"
    assert isinstance(answer.result, RegressionSummary)


async def test_unload_then_infer_is_model_not_found(repo: Path) -> None:
    registry = ModelRegistry(settings_for(repo), Metrics())
    await registry.start()
    try:
        entry = registry.get("mlp")
        model = entry.model
        rows = torch.tensor(ROW, dtype=torch.float64)
        first = (await registry.infer(entry, rows, model.options(seed=1))).result
        await registry.unload("mlp")
        with pytest.raises(ModelNotFound, match="'mlp' is not loaded"):
            await registry.infer(entry, rows, model.options(seed=1))
        with pytest.raises(ModelNotFound, match="'mlp'"):
            await registry.unload("mlp")
        with pytest.raises(ModelNotFound, match="'ghost'"):
            await registry.load("ghost")
        assert registry.status("mlp").state == "UNAVAILABLE"
        await registry.load("mlp")
        again = (await registry.infer(registry.get("mlp"), rows, model.options(seed=1))).result
    finally:
        await registry.close()
    assert isinstance(first, RegressionSummary)
    assert isinstance(again, RegressionSummary)
    assert torch.equal(first.mean, again.mean)
    assert mcdrop_threads("mlp") == 0


async def test_load_of_a_broken_model_raises_and_records_the_error(repo: Path) -> None:
    registry = ModelRegistry(settings_for(repo), Metrics())
    await registry.start()
    try:
        (repo / "mlp" / "model.toml").write_text("name = [", encoding="utf-8")
        with pytest.raises(ModelLoadError, match=r"model\.toml"):
            await registry.load("mlp")
        status = registry.status("mlp")
    finally:
        await registry.close()
    assert status.state == "READY"  # the old version still serves
    assert status.error is not None
    assert "TOML" in status.error


# -- canary: a version that cannot answer never replaces a working one --------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param(1e30, "the canary prediction on 2 probe rows failed, so this version is not "
                     "served: NonFiniteOutput: model 'mlp' cannot compute a finite answer for "
                     "this input: output 'y' (mean) is NaN or infinite in rows [0, 1]", id="huge"),
        pytest.param(math.nan, "NaN or infinite values (as float32) in tensors [fc0.weight, "
                     "fc0.bias, out.weight, out.bias]", id="nan"),
    ],
)  # fmt: skip
async def test_a_version_whose_answers_are_not_finite_never_replaces_the_serving_one(
    repo: Path, value: float, reason: str
) -> None:
    old = answers(repo / "mlp", [3])
    async with serve(settings_for(repo)) as (app, client):
        before = await client.post(INFER, json=oip_body(ROW, {"seed": 3}))
        module = write_mlp_model(repo / "mlp", seed=1, mc={"default_samples": 16})
        state = {k: torch.full_like(v, value) for k, v in module.state_dict().items()}
        write_mlp_model(repo / "mlp", mc={"default_samples": 16}, state=state)
        set_version(repo / "mlp", "2")  # well-formed files; finite but huge, or NaN
        index = (await client.post("/v2/repository/index")).json()
        served = await client.post(INFER, json=oip_body(ROW, {"seed": 3}))
        with pytest.raises(ModelLoadError) as info:
            await app.state.registry.load("mlp")
        still = await client.post(INFER, json=oip_body(ROW, {"seed": 3}))
    assert before.status_code == 200
    assert (index[0]["state"], index[0]["version"]) == ("READY", "1")
    assert reason in index[0]["reason"]
    assert reason in str(info.value)
    for response in (served, still):
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == "1"
        assert np.array_equal(decode_outputs(response)["mean"], old[0])


def test_the_canary_probes_the_normalisation_mean(tmp_path: Path) -> None:
    """Far from its input mean this model overflows: the probe must be the mean, not zeros."""
    state = {"fc0.weight": torch.tensor([[-1e20]]), "fc0.bias": torch.zeros(1),
             "out.weight": torch.tensor([[1.0]]), "out.bias": torch.zeros(1)}  # fmt: skip
    write_mlp_model(tmp_path / "m", in_features=1, hidden=(1,), tau=1.0, state=state,
                    input_mean=[1e20], input_std=[1.0])  # fmt: skip
    model = ServedModel.load(tmp_path / "m")
    canary = model.canary()
    with pytest.raises(NonFiniteOutput):
        model.predict(torch.zeros(1, 1), model.options(8, seed=0))
    assert isinstance(canary, RegressionSummary)
    assert canary.samples_used == 8
    assert torch.equal(canary.mean, torch.zeros(2, 1, dtype=torch.float64))
