"""bench/ray_replicas.py: real figures from a quick run on the session's cluster, or a reason.

The measured run is a `ray` test (loopback-only network namespace); elsewhere the benchmark
must refuse to start Ray and say why.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
from conftest import bench_module
from ray_helpers import RayCluster, ray_unavailable


@pytest.fixture(scope="module")
def rr() -> Iterator[ModuleType]:
    """bench.ray_replicas, importable whether or not the repository root is on sys.path."""
    yield from bench_module("ray_replicas")


def test_outside_the_namespace_it_skips_with_the_reason(rr: ModuleType) -> None:
    reason = ray_unavailable()
    if reason is None:
        pytest.skip("inside a loopback-only namespace with Ray: the measured test covers it")
    section = rr.measure(quick=True)
    assert set(section) == {"skipped"}
    assert "make bench-ray" in section["skipped"] or "pip install '.[ray]'" in section["skipped"]
    assert rr.render(section).startswith("Ray Serve replicas: skipped (")


@pytest.mark.ray
@pytest.mark.slow
def test_quick_run_measures_every_way_with_checked_answers(
    rr: ModuleType, ray_cluster: RayCluster
) -> None:
    section = rr.measure(quick=True, concurrency=[1, 2], requests=10, duration_s=6.0)
    assert section["settings"]["concurrency"] == [1, 2]
    for level in ("1", "2"):
        ways = section["results"][level]
        assert set(ways) == {rr.UVICORN, rr.RAY_1, rr.RAY_2}
        for name, way in ways.items():
            assert way["valid"], (level, name, way["first_error"])
            assert way["requests"] > 0
            assert way["accuracy"] > 0.5  # real answers of the digits model, checked one by one
            assert way["p50_ms"] > 0
            if name != rr.UVICORN:  # Ray's processes did the work, the proxy among them
                cpu = way["ray_cpu_ms_per_request"]
                assert cpu["proxy"] > 0
                assert cpu["replicas"] > 0
    summary = section["summary"]
    assert summary["valid"]
    assert summary["replicas_2_vs_1_throughput"] > 0
    assert summary["proxy_overhead_ms_p50"] == pytest.approx(
        section["results"]["1"][rr.RAY_1]["p50_ms"] - section["results"]["1"][rr.UVICORN]["p50_ms"]
    )
    text = rr.render(section)
    assert "2 replicas vs 1 at concurrency 2" in text
    assert "Ray's proxy at concurrency 1" in text
    from ray import serve

    assert set(serve.status().applications).isdisjoint({rr.RAY_1, rr.RAY_2})  # cleaned up
