"""LocalShardPool: worker processes give the single-process answer, fail clearly, stop cleanly.

Also the served path: a request above MCDROP_SHARD_THRESHOLD goes through the pool and
answers exactly what the unsplit engine answers, through the same HTTP API.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    assert_split_answers_like_one_process,
    assert_uneven_shards_merge_exactly,
    shard_ref,
    write_shard_test_models,
)
from http_helpers import decode_outputs, oip_body, serve, settings_for, spy_engine
from torch import nn

from mcdrop.engine.core import MCRequest
from mcdrop.engine.partials import PartialStats, Shard
from mcdrop.model import ServedModel
from mcdrop.repository.loading import save_weights
from mcdrop.shards.executor import ModelRef, SerialExecutor, run_sharded
from mcdrop.shards.pool import LocalShardPool
from mcdrop.shards.worker import ShardFailed, ShardWorkerDied
from mcdrop.uncertainty import RegressionSummary

pytestmark = pytest.mark.slow  # spawns processes that import torch

# A model that loads in the server but kills any shard worker that loads it.
_DIES_IN_WORKERS = """
import multiprocessing, os
from torch import nn


def build() -> nn.Module:
    if multiprocessing.current_process().name.startswith("mcdrop-shard"):
        os._exit(3)
    return nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.2), nn.Linear(4, 1))
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    write_shard_test_models(root)
    dies = root / "dies"
    dies.mkdir()
    save_weights(nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.2), nn.Linear(4, 1)),
                 dies / "weights.safetensors")  # fmt: skip
    (dies / "arch.py").write_text(_DIES_IN_WORKERS, encoding="utf-8")
    (dies / "model.toml").write_text(
        'name = "dies"\ntask = "regression"\n[input]\nshape = [2]\n[output]\nnames = ["y"]\n'
        '[model]\nformat = "entrypoint"\nentrypoint = "arch:build"\n',
        encoding="utf-8",
    )
    return root


@pytest.fixture(scope="module")
def pool() -> Iterator[LocalShardPool]:
    with LocalShardPool(2) as shard_pool:
        yield shard_pool


@pytest.mark.parametrize("mask_mode", ["independent", "shared"])
@pytest.mark.parametrize("name", ["reg", "cls"])
def test_the_pool_answers_what_one_process_answers(
    repo: Path, pool: LocalShardPool, name: str, mask_mode: str
) -> None:
    assert_split_answers_like_one_process(pool, repo / name, mask_mode)


def test_more_shards_than_workers_queue_and_still_merge_exactly(
    repo: Path, pool: LocalShardPool
) -> None:
    assert_uneven_shards_merge_exactly(pool, repo / "cls")


def test_a_killed_worker_is_replaced_before_the_next_request(
    repo: Path, pool: LocalShardPool
) -> None:
    model = ServedModel.load(repo / "reg")
    request = model.request(torch.ones(1, 3), model.options(512, seed=0))
    whole = model.engine.run_many([request])[0]
    assert isinstance(whole, RegressionSummary)
    before = pool.pids
    os.kill(before[1], signal.SIGKILL)  # an idle worker killed from outside, between requests
    give_up = time.monotonic() + 30
    while pool.alive()[1]:  # until the kernel has delivered it and the process is gone
        assert time.monotonic() < give_up, "a worker still alive 30 s after SIGKILL"
        time.sleep(0.01)
    split = run_sharded(pool, shard_ref(repo / "reg"), model.engine.head, request, min_shard=256)
    assert pool.pids[0] == before[0]
    assert pool.pids[1] != before[1]
    assert isinstance(split, RegressionSummary)
    torch.testing.assert_close(split.mean, whole.mean, rtol=1e-12, atol=1e-12)


def test_a_worker_dying_mid_request_is_a_clear_error_not_a_hang(
    repo: Path, pool: LocalShardPool
) -> None:
    dies = ServedModel.load(repo / "dies")  # this process survives loading it; workers do not
    request = dies.request(torch.ones(1, 2), dies.options(512, seed=0))
    died = r"died \(exit code 3\) during samples \d+\.\.\d+ of model 'dies'"
    with pytest.raises(ShardWorkerDied, match=died):
        run_sharded(pool, shard_ref(repo / "dies"), dies.engine.head, request, min_shard=256)
    reg = ServedModel.load(repo / "reg")  # the pool recovers for the next request
    request = reg.request(torch.ones(1, 3), reg.options(512, seed=0))
    assert run_sharded(pool, shard_ref(repo / "reg"), reg.engine.head, request).samples_used == 512


def test_errors_inside_a_worker_come_back_with_their_reason(
    repo: Path, pool: LocalShardPool
) -> None:
    model = ServedModel.load(repo / "reg")
    request = model.request(torch.ones(1, 3), model.options(512, seed=0))
    stale = ModelRef("reg", repo / "reg", "not-the-fingerprint")
    with pytest.raises(ShardFailed, match="changed on disk since the server loaded it"):
        run_sharded(pool, stale, model.engine.head, request, min_shard=256)
    with pytest.raises(ShardFailed, match=r"ValueError: shard samples 0\.\.1023 run past"):
        pool.run_shards(shard_ref(repo / "reg"), request, [Shard(0, 1024)])


def test_closing_stops_every_worker_and_refuses_more_work(repo: Path) -> None:
    shard_pool = LocalShardPool(1)
    (pid,) = shard_pool.pids
    shard_pool.close()
    shard_pool.close()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    model = ServedModel.load(repo / "reg")
    request = model.request(torch.ones(1, 3), model.options(512, seed=0))
    with pytest.raises(ShardFailed, match="closed"):
        run_sharded(shard_pool, shard_ref(repo / "reg"), model.engine.head, request)


# -- the served path -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_create_app_uses_the_shard_executor_it_is_handed(repo: Path) -> None:
    """As a Ray Serve replica hands it Ray actors: the registry runs large-N requests there."""
    ran: list[int] = []

    class Counting(SerialExecutor):
        def run_shards(
            self, model: ModelRef, request: MCRequest, shards: Sequence[Shard]
        ) -> list[PartialStats]:
            ran.append(len(shards))
            return super().run_shards(model, request, shards)

    executor = Counting(lambda ref: ServedModel.load(ref.folder).engine, workers=2)
    params = {"mc_samples": 600, "seed": 5}
    settings = settings_for(repo, shard_threshold=512)
    async with serve(settings, shard_executor=executor) as (app, client):
        assert app.state.registry.shard_executor is executor
        sharded = await client.post("/v2/models/cls/infer", json=oip_body(np.ones((2, 3)), params))
    async with serve(settings_for(repo)) as (_, client):
        whole = await client.post("/v2/models/cls/infer", json=oip_body(np.ones((2, 3)), params))
    assert ran == [2]
    expected = decode_outputs(whole)
    for name, value in decode_outputs(sharded).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.anyio
async def test_a_request_above_the_threshold_is_split_and_answers_the_unsplit_numbers(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = {"mc_samples": 600, "seed": 5}
    async with serve(settings_for(repo, shard_workers=2, shard_threshold=512)) as (app, client):
        registry = app.state.registry
        assert registry.shard_executor is not None
        assert registry.shard_executor.workers == 2
        assert registry.get("cls").worker.shard_router is not None
        assert registry.get("dies").worker.shard_router is None  # workers cannot load it: unsplit
        spy = spy_engine(app, "cls", monkeypatch)
        split = await client.post("/v2/models/cls/infer", json=oip_body(np.ones((4, 3)), params))
        small_params = {"mc_samples": 512, "seed": 5}
        small = await client.post(
            "/v2/models/cls/infer", json=oip_body(np.ones((4, 3)), small_params)
        )
        assert split.status_code == 200, split.text
        assert small.status_code == 200, small.text
        assert [c[0].options.samples for c in spy.calls] == [512]  # 600 never ran in-process
    async with serve(settings_for(repo)) as (app, client):  # no shard workers: never split
        assert app.state.registry.shard_executor is None
        plain = await client.post("/v2/models/cls/infer", json=oip_body(np.ones((4, 3)), params))
    expected = decode_outputs(plain)
    for name, value in decode_outputs(split).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
