"""RayShardExecutor on the session's Ray cluster: the merged answer is the single-process one.

The round-robin assignment is checked without a cluster; the rest runs only inside a
loopback-only network namespace (`make ray-test`) and skips elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import (
    assert_split_answers_like_one_process,
    assert_uneven_shards_merge_exactly,
    shard_ref,
    write_shard_test_models,
)
from http_helpers import decode_outputs, oip_body, serve, settings_for
from ray_helpers import RayCluster, wait_until

from mcdrop.config import Settings
from mcdrop.engine.partials import Shard
from mcdrop.model import ServedModel
from mcdrop.shards.executor import ModelRef, run_sharded
from mcdrop.uncertainty import RegressionSummary

ACTORS = 2
ACTOR_CPUS = 0.5


@pytest.mark.parametrize(
    ("shards", "actors", "expected"),
    [(2, 2, [0, 1]), (5, 2, [0, 1, 0, 1, 0]), (1, 3, [0]), (3, 1, [0, 0, 0]), (0, 2, [])],
)
def test_shards_go_round_robin_over_the_actors(
    shards: int, actors: int, expected: list[int]
) -> None:
    pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]'")
    from mcdrop.shards.ray_actors import assign

    assert assign(shards, actors) == expected


def test_no_actors_is_refused() -> None:
    pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]'")
    from mcdrop.shards.ray_actors import assign

    with pytest.raises(ValueError, match="shard actors must be >= 1, got 0"):
        assign(3, 0)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray-shards")
    write_shard_test_models(root)
    return root


@pytest.fixture(scope="module")
def executor(ray_cluster: RayCluster) -> Iterator[object]:
    from mcdrop.shards.ray_actors import RayShardExecutor

    shards = RayShardExecutor(ACTORS, Settings(device="cpu"), num_cpus=ACTOR_CPUS)
    try:
        yield shards
    finally:
        shards.close()


def free_cpus() -> float:
    """Logical CPUs of the cluster that nothing reserves now."""
    import ray

    return float(ray.available_resources().get("CPU", 0.0))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("mask_mode", ["independent", "shared"])
@pytest.mark.parametrize("name", ["reg", "cls"])
def test_ray_actors_answer_what_one_process_answers(
    repo: Path, executor: object, name: str, mask_mode: str
) -> None:
    from mcdrop.shards.ray_actors import RayShardExecutor

    assert isinstance(executor, RayShardExecutor)
    assert_split_answers_like_one_process(executor, repo / name, mask_mode)


@pytest.mark.ray
@pytest.mark.slow
def test_more_shards_than_actors_still_merge_exactly_and_actors_are_other_processes(
    repo: Path, executor: object
) -> None:
    from mcdrop.shards.ray_actors import RayShardExecutor

    assert isinstance(executor, RayShardExecutor)
    executor.preload(shard_ref(repo / "cls"))
    assert len(set(executor.pids)) == ACTORS
    assert os.getpid() not in executor.pids
    assert_uneven_shards_merge_exactly(executor, repo / "cls")


@pytest.mark.ray
@pytest.mark.slow
def test_errors_in_an_actor_come_back_with_their_reason(repo: Path, executor: object) -> None:
    from mcdrop.shards.ray_actors import RayShardExecutor
    from mcdrop.shards.worker import ShardFailed

    assert isinstance(executor, RayShardExecutor)
    model = ServedModel.load(repo / "reg")
    request = model.request(torch.ones(1, 3), model.options(512, seed=0))
    stale = ModelRef("reg", repo / "reg", "not-the-fingerprint")
    with pytest.raises(ShardFailed, match="model 'reg' changed on disk since the server loaded"):
        executor.run_shards(stale, request, [Shard(0, 512)])


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_actor_restarts_and_the_request_still_answers(
    repo: Path, ray_cluster: RayCluster
) -> None:
    import ray

    from mcdrop.shards.ray_actors import RayShardExecutor

    free_before = free_cpus()
    shards = RayShardExecutor(1, Settings(device="cpu"), num_cpus=ACTOR_CPUS)
    try:
        shards.preload(shard_ref(repo / "reg"))
        (first_pid,) = shards.pids
        ray.kill(shards._actors[0], no_restart=False)
        model = ServedModel.load(repo / "reg")
        request = model.request(torch.ones(2, 3), model.options(640, seed=3))
        split = run_sharded(
            shards, shard_ref(repo / "reg"), model.engine.head, request, min_shard=64
        )
        whole = model.engine.run_many([request])[0]
        assert isinstance(split, RegressionSummary)
        assert isinstance(whole, RegressionSummary)
        torch.testing.assert_close(split.mean, whole.mean, rtol=1e-12, atol=1e-12)
        shards.preload(shard_ref(repo / "reg"))
        assert shards.pids[0] != first_pid  # it really was a new process
    finally:
        shards.close()
    wait_until(lambda: free_cpus() == pytest.approx(free_before), "close() to free the actor")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.anyio
async def test_a_serve_replica_splits_large_requests_over_ray_actors(
    repo: Path, ray_cluster: RayCluster
) -> None:
    from ray import serve as ray_serve

    from mcdrop.ray_serve import build_app

    args = {"model_repository": str(repo), "device": "cpu", "replicas": 1, "num_cpus": 0.5,
            "shard_actors": ACTORS, "shard_num_cpus": ACTOR_CPUS,
            "shard_threshold": 512}  # fmt: skip
    free_before = free_cpus()
    ray_serve.run(build_app(args), name="mcdrop-sharded", route_prefix="/sharded")
    try:
        # The replica and its shard actors (Ray reports reservations with a small lag).
        wanted = 0.5 + ACTORS * ACTOR_CPUS
        wait_until(lambda: free_before - free_cpus() == pytest.approx(wanted),
                   f"{wanted} CPUs reserved", timeout_s=30)  # fmt: skip
        params = {"mc_samples": 1200, "seed": 5}
        body = oip_body(np.ones((4, 3)), params)
        via_ray = httpx.post(f"{ray_cluster.url}/sharded/v2/models/cls/infer", json=body,
                             timeout=120)  # fmt: skip
        assert via_ray.status_code == 200, via_ray.text
    finally:
        ray_serve.delete("mcdrop-sharded")
    # The replica's lifespan closed its executor: its actors went with it.
    wait_until(lambda: free_cpus() == pytest.approx(free_before), "the actors to be freed")
    async with serve(settings_for(repo)) as (_, client):  # unsplit, in this process
        local = await client.post("/v2/models/cls/infer", json=body)
    split_out, local_out = decode_outputs(via_ray), decode_outputs(local)
    for name in ("probabilities", "entropy", "mutual_information"):
        np.testing.assert_allclose(split_out[name], local_out[name], rtol=1e-9, atol=1e-12)
