"""The server benchmark runs end to end on 127.0.0.1, checks every answer, and cleans up.

No timing assertions: timing claims belong to bench/ and docs/performance.md, not to tests.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]
REAL_WAYS = ("mcdrop", "ceiling", "litserve")  # the ways that run the model
QUICK_REQUESTS = 24


def _bench_module(name: str) -> Iterator[ModuleType]:
    """bench.<name>, importable whether or not the repository root is on sys.path."""
    yield from bench_module(name)


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """bench.server: the command line and the run."""
    yield from _bench_module("server")


@pytest.fixture(scope="module")
def workload() -> Iterator[ModuleType]:
    """bench.workload: the requests and the checks of their answers."""
    yield from _bench_module("workload")


@pytest.fixture(scope="module")
def servers() -> Iterator[ModuleType]:
    """bench.servers: the subprocess servers and their process groups."""
    yield from _bench_module("servers")


@pytest.fixture(scope="module")
def load() -> Iterator[ModuleType]:
    """bench.load: the load generator and its statistics."""
    yield from _bench_module("load")


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    """One quick run of the script, as a user would start it (servers as subprocesses)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "server.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT / "bench",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.mark.slow
def test_every_way_ran_at_every_level(workload: ModuleType, report: dict[str, Any]) -> None:
    assert report["settings"]["host"] == "127.0.0.1"
    assert report["settings"]["concurrency"] == [1, 4]
    assert report["settings"]["samples"] == 100
    assert set(report["ways"]) == set(workload.WAYS)
    assert set(report["results"]) == {"1", "4"}
    for by_way in report["results"].values():
        assert set(by_way) == set(workload.WAYS)
        for way, f in by_way.items():
            assert f["errors"] == 0, (way, f["first_error"])
            assert f["valid"] is True
            assert 0 < f["requests"] <= QUICK_REQUESTS
            assert f["throughput_rps"] > 0
            assert math.isclose(f["throughput_rps"], f["requests"] / f["wall_s"])
            assert 0 < f["p50_ms"] <= f["p99_ms"]
            assert f["latency_per"] == ("batch" if way == "ceiling" else "request")


@pytest.mark.slow
def test_the_model_really_ran_in_every_real_way(report: dict[str, Any]) -> None:
    for by_way in report["results"].values():
        for way in REAL_WAYS:
            # Every answer was a valid probability vector; a model guessing would score ~0.1.
            assert by_way[way]["accuracy"] >= 0.6, way
        server = by_way["mcdrop"]["server"]
        assert server["engine_calls"] >= 1
        assert server["mean_batch_rows"] >= 1.0
        assert server["compute_ms_per_call"] > 0


@pytest.mark.slow
def test_targets_are_computed_from_the_table(report: dict[str, Any]) -> None:
    t = report["targets"]
    assert t["concurrency"] == 4
    assert t["is_issue_level"] is False
    at = report["results"]["4"]
    ours = at["mcdrop"]["throughput_rps"]
    assert math.isclose(t["vs_ceiling"]["ratio"], ours / at["ceiling"]["throughput_rps"])
    assert math.isclose(t["vs_litserve"]["ratio"], ours / at["litserve"]["throughput_rps"])
    assert t["vs_ceiling"]["met"] == (t["vs_ceiling"]["ratio"] >= 0.7)
    assert t["vs_litserve"]["met"] == (t["vs_litserve"]["ratio"] >= 2.0)
    p99 = t["p99_vs_litserve"]
    assert p99["met"] == (p99["p99_ms"] <= p99["litserve_p99_ms"])


@pytest.mark.slow
def test_no_server_process_outlives_the_run(servers: ModuleType, report: dict[str, Any]) -> None:
    started = report["servers"]
    assert set(started) == {"mcdrop", "litserve", "http_floor"}
    assert len({s["port"] for s in started.values()}) == 3
    for s in started.values():
        # Each server led its own process group: nothing of it may still run (an orphan's
        # zombie may wait a moment for init to reap it).
        members = servers.group_stats(s["pid"])
        assert members is not None
        assert all(fields[0] == "Z" for fields in members.values()), members


# -- the pieces, without servers ----------------------------------------------------------------


def test_check_probabilities_rejects_wrong_answers(workload: ModuleType) -> None:
    good = [0.05] * 9 + [0.55]
    assert workload.check_probabilities(good, "x") == 9
    with pytest.raises(ValueError, match="9 probabilities"):
        workload.check_probabilities(good[:9], "x")
    with pytest.raises(ValueError, match="sum to"):
        workload.check_probabilities([0.2] * 10, "x")
    with pytest.raises(ValueError, match="finite"):
        workload.check_probabilities([math.nan, *good[1:]], "x")
    with pytest.raises(ValueError, match=">= 0"):
        workload.check_probabilities([-0.05, 0.15, *good[2:]], "x")


def test_mcdrop_answer_checks_seed_samples_and_prediction(workload: ModuleType) -> None:
    probs = {str(c): (0.91 if c == 3 else 0.01) for c in range(10)}
    prediction: dict[str, Any] = {"predicted": "3", "probabilities": probs}
    doc = {"samples_used": 100, "seed": 7, "predictions": [prediction]}
    assert workload.mcdrop_answer(json.dumps(doc).encode(), 7) == 3
    with pytest.raises(ValueError, match="seed"):
        workload.mcdrop_answer(json.dumps(doc).encode(), 8)
    prediction["predicted"] = "4"
    with pytest.raises(ValueError, match="predicted"):
        workload.mcdrop_answer(json.dumps(doc).encode(), 7)
    with pytest.raises(ValueError, match="probabilities"):
        workload.litserve_answer(b'{"detail": "oops"}', 0)


def test_request_bodies_are_one_raw_digit_with_its_seed(workload: ModuleType) -> None:
    digits = workload.Digits.load()
    doc = json.loads(digits.body(5))
    assert doc["samples"] == 100
    assert doc["seed"] == 5
    row = doc["rows"]
    assert (len(row), len(row[0]), len(row[0][0]), len(row[0][0][0])) == (1, 1, 8, 8)
    pixels = [v for line in row[0][0] for v in line]
    assert min(pixels) >= 0
    assert max(pixels) <= 16
    assert max(pixels) > 1  # raw 0..16, not normalised
    assert digits.row(len(digits.labels)).equal(digits.row(0))  # cycles the test split


def test_canned_app_answers_valid_probabilities(servers: ModuleType, workload: ModuleType) -> None:
    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=servers.canned_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/predict", content=b'{"rows": []}')

    response = asyncio.run(ask())
    assert response.status_code == 200
    assert workload.litserve_answer(response.content, 0) == 0


def test_engine_counters_read_the_digits_histograms(load: ModuleType) -> None:
    text = "\n".join(
        [
            "# TYPE mcdrop_batch_rows histogram",
            'mcdrop_batch_rows_bucket{le="+Inf",model="digits"} 3.0',
            'mcdrop_batch_rows_count{model="digits"} 3.0',
            'mcdrop_batch_rows_sum{model="digits"} 12.0',
            'mcdrop_batch_rows_count{model="other"} 5.0',
            "",
        ]
    )
    counters = load.engine_counters(text)
    assert counters == {"mcdrop_batch_rows_count": 3.0, "mcdrop_batch_rows_sum": 12.0}
    figures = load.server_figures(counters)
    assert figures["engine_calls"] == 3.0
    assert figures["mean_batch_rows"] == 4.0
    assert figures["compute_ms_per_call"] is None
    assert load.server_figures({}) is None


def test_percentile_interpolates(load: ModuleType) -> None:
    assert load.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert load.percentile([1.0, 2.0], 50) == 1.5
    assert load.percentile([5.0], 99) == 5.0
    assert math.isclose(load.percentile(list(map(float, range(101))), 99), 99.0)
    with pytest.raises(ValueError, match="no values"):
        load.percentile([], 50)


@pytest.mark.parametrize(
    "flags",
    [
        ["--requests", "0"],
        ["--rounds", "0"],
        ["--concurrency", "0"],
        ["--duration-s", "0"],
        ["--threads", "0"],
    ],
)
def test_rejects_bad_bounds(
    bench: ModuleType, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(flags)
    assert flags[0] in capsys.readouterr().err


def test_quick_and_full_defaults(bench: ModuleType) -> None:
    quick, full = bench.parse_args(["--quick"]), bench.parse_args([])
    assert (quick.concurrency, quick.requests, quick.rounds) == ([1, 4], 24, 1)
    assert full.concurrency == [1, 16, 64]
    assert full.requests >= 1000
