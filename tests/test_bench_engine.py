"""The engine benchmark runs end to end, reports consistent figures, and times real MC work.

No timing assertions: timing claims belong to bench/ and docs/performance.md, not to tests.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--quick", "--json", "--repeats", "1", "--threads", "1"]  # 1 thread: no stalls when busy


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """bench.engine, importable whether or not the repository root is on sys.path."""
    yield from bench_module("engine")


@pytest.fixture(scope="module")
def report(bench: ModuleType) -> dict[str, Any]:
    """One quick run with the ablation section."""
    result: dict[str, Any] = bench.main([*QUICK, "--ablation"])
    return result


def test_json_has_both_cases_and_all_ways(bench: ModuleType, report: dict[str, Any]) -> None:
    assert set(report["cases"]) == {"mlp", "cnn"}
    assert report["settings"]["repeats"] == 1
    assert report["machine"]["torch_threads"] == 1
    assert report["settings"]["quick"] is True
    assert isinstance(report["noisy"], bool)
    assert set(report["ways"]) == set(bench.WAYS)
    for case in report["cases"].values():
        assert set(case["ways"]) == set(bench.WAYS)
        assert case["rows"] >= 1
        assert case["samples"] >= 1
        assert case["repeats_done"] == 1


def test_ratios_are_positive_and_match_the_times(report: dict[str, Any]) -> None:
    for case in report["cases"].values():
        floor = case["ways"]["dense"]["median_ms"]
        assert floor > 0
        for way in case["ways"].values():
            assert way["median_ms"] > 0
            assert way["min_ms"] <= way["median_ms"]
            assert way["spread"] >= 0
            assert way["ratio"] > 0
            assert math.isclose(way["ratio"], way["median_ms"] / floor, rel_tol=1e-9)
        assert case["ways"]["dense"]["ratio"] == 1.0
        for name, target in case["targets"].items():
            assert target["ratio"] == case["ways"][name]["ratio"]
            assert target["met"] == (target["ratio"] <= target["max_ratio"])
        vectorised = case["ways"]["vectorised"]["median_ms"]
        for name, speedup in case["speedup_vs_vectorised"].items():
            assert math.isclose(speedup, vectorised / case["ways"][name]["median_ms"])


def test_targets_are_the_issue_targets(report: dict[str, Any]) -> None:
    mlp, cnn = report["cases"]["mlp"]["targets"], report["cases"]["cnn"]["targets"]
    assert mlp["engine_independent"]["max_ratio"] == 1.6
    assert mlp["engine_shared"]["max_ratio"] == 1.2
    assert cnn["engine_independent"]["max_ratio"] == 0.5


def test_ablation_groups_are_relative_to_their_baseline(report: dict[str, Any]) -> None:
    groups = report["ablation"]["groups"]
    assert {"mask draw + apply", "mask draw only", "prefix once per row"} <= set(groups)
    for group in groups.values():
        base = group["ways"][group["baseline"]]
        assert base["ratio"] == 1.0
        assert len(group["ways"]) >= 2
        for way in group["ways"].values():
            assert math.isclose(way["ratio"], way["median_ms"] / base["median_ms"])


def test_json_output_is_the_returned_report(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    threads = torch.get_num_threads()
    result = bench.main(QUICK)
    assert json.loads(capsys.readouterr().out) == result
    assert "ablation" not in result
    assert torch.get_num_threads() == threads  # restored for the rest of the process


def test_table_names_every_way_and_target(bench: ModuleType, report: dict[str, Any]) -> None:
    text = bench.render(report)
    for name in bench.WAYS:
        assert f"| {name} " in text
    assert "<= 1.6" in text
    assert "<= 1.2" in text
    assert "<= 0.5" in text
    assert "mask draw only" in text


def test_quick_cases_keep_the_issue_architectures(bench: ModuleType) -> None:
    mlp, cnn = bench.build_cases(quick=True)
    assert [type(m).__name__ for m in mlp.module][-4:] == ["Linear", "ReLU", "Dropout", "Linear"]
    with torch.inference_mode():
        assert cnn.module(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    dropouts = [i for i, m in enumerate(cnn.module) if isinstance(m, torch.nn.Dropout)]
    first_linear = next(i for i, m in enumerate(cnn.module) if isinstance(m, torch.nn.Linear))
    assert dropouts
    assert min(dropouts) > first_linear  # dropout only in the classifier head
    full_mlp, full_cnn = bench.build_cases(quick=False)
    assert (full_mlp.rows, full_mlp.samples, full_cnn.rows, full_cnn.samples) == (32, 100, 8, 100)


def test_every_way_computes_class_probabilities(bench: ModuleType) -> None:
    for case in bench.build_cases(quick=True):
        ways = bench.make_ways(case)
        with torch.inference_mode():
            answers = {name: way() for name, way in ways.items()}
        assert answers["dense"].shape == (case.rows * case.samples, 10)
        for name in ("loop", "vectorised", "engine_independent", "engine_shared"):
            probs = answers[name]
            assert probs.shape == (case.rows, 10), name
            assert bool((probs >= 0).all()), name
            assert torch.allclose(
                probs.sum(-1).double(), torch.ones(case.rows, dtype=torch.float64)
            )
        bench.check_answers(case, answers)


def test_baselines_really_sample_and_the_engine_is_seeded(bench: ModuleType) -> None:
    case = bench.build_cases(quick=True)[0]
    ways = bench.make_ways(case)
    with torch.inference_mode():
        for name in ("loop", "vectorised"):
            assert not torch.equal(ways[name](), ways[name]()), f"{name} does not sample"
        for name in ("engine_independent", "engine_shared"):
            assert torch.equal(ways[name](), ways[name]()), f"{name} is not seeded"
        assert not torch.equal(ways["engine_independent"](), ways["engine_shared"]())


def test_check_answers_rejects_wrong_work(bench: ModuleType) -> None:
    case = bench.build_cases(quick=True)[0]
    good = torch.full((case.rows, 10), 0.1)
    with pytest.raises(RuntimeError, match="shape"):
        bench.check_answers(case, {"loop": good[:1]})
    with pytest.raises(RuntimeError, match="sum to 1"):
        bench.check_answers(case, {"loop": good * 2})
    bench.check_answers(case, {"loop": good})


@pytest.mark.parametrize("flags", [["--repeats", "0"], ["--threads", "0"], ["--warmup", "-1"]])
def test_rejects_bad_counts(
    bench: ModuleType, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--quick", *flags])
    assert flags[0] in capsys.readouterr().err


def test_runs_as_a_script() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "engine.py"), *QUICK],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=ROOT / "bench",
    )
    assert set(json.loads(done.stdout)["cases"]) == {"mlp", "cnn"}


# -- bench.common ---------------------------------------------------------------------------


def test_interleaved_rotates_the_order(bench: ModuleType) -> None:
    from bench.common import interleaved

    calls: list[str] = []
    ways = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved(ways, repeats=3, warmup=1)
    assert calls == list("abc" + "abc" + "bca" + "cab")
    assert all(len(t) == 3 and min(t) >= 0 for t in times.values())


def test_interleaved_stops_at_the_time_budget(bench: ModuleType) -> None:
    from bench.common import interleaved

    times = interleaved({"a": lambda: None}, repeats=50, warmup=0, budget_s=0.0)
    assert len(times["a"]) == 3


def test_summarize_median_and_spread(bench: ModuleType) -> None:
    from bench.common import format_table, summarize

    stats = summarize([4.0, 1.0, 2.0, 3.0, 100.0])
    assert stats.median_ms == 3.0
    assert stats.min_ms == 1.0
    assert stats.spread > 0
    assert summarize([2.0, 2.0]).spread == 0.0
    with pytest.raises(ValueError, match="no times"):
        summarize([])
    table = format_table(["a", "bb"], [["1", "2"]]).splitlines()
    assert table == ["| a | bb |", "| - | -- |", "| 1 | 2  |"]
