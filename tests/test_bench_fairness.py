"""The fairness benchmark runs end to end on 127.0.0.1, both interleave settings, and cleans up.

No timing assertions: timing claims belong to bench/ and docs/performance.md, not to tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """bench.fairness, importable whether or not the repository root is on sys.path."""
    yield from bench_module("fairness")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick run of the script as a user starts it; the JSON it saved with --out."""
    out = tmp_path_factory.mktemp("fairness") / "report.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fairness.py"), "--quick", "--duration-s", "1",
         "--rate", "10", "--settle-s", "0.5", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT / "bench",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interleave" in done.stdout  # the table was printed
    result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return result


@pytest.mark.slow
def test_both_settings_ran_both_phases_without_errors(
    bench: ModuleType, report: dict[str, Any]
) -> None:
    s = report["settings"]
    assert s["host"] == "127.0.0.1"
    assert s["model"] == "toy-regression"
    assert (s["big"]["rows"], s["big"]["samples"]) == (1024, 100_000)  # the model's maximum
    assert set(report["results"]) == {"on", "off"}
    for r in report["results"].values():
        assert set(r["phases"]) == {bench.ALONE, bench.WITH_BIG}
        for f in r["phases"].values():
            assert f["errors"] == 0, f["first_error"]
            assert f["requests"] == s["requests_per_phase"] == 10
            assert 0 < f["p50_ms"] <= f["p99_ms"] <= f["max_ms"]
        assert r["big"]["status"] in (200, 504)  # its deadline ends it unless it finished
        assert r["probe_after_big_ms"] > 0
    assert set(report["ratios"]) == {
        "on: with big / alone",
        "off: with big / alone",
        f"{bench.ALONE}: off / on",
        f"{bench.WITH_BIG}: off / on",
    }


@pytest.fixture(scope="module")
def servers() -> Iterator[ModuleType]:
    """bench.servers: process groups of the servers the benchmarks start."""
    yield from bench_module("servers")


@pytest.mark.slow
def test_no_server_process_outlives_the_run(report: dict[str, Any], servers: ModuleType) -> None:
    started = report["servers"]
    assert set(started) == {"on", "off"}
    for s in started.values():
        members = servers.group_stats(s["pid"])
        assert members is not None
        assert all(fields[0] == "Z" for fields in members.values()), members


# -- the pieces, without servers ----------------------------------------------------------------


def _fake_report(bench: ModuleType) -> dict[str, Any]:
    def phase(p50: float, p99: float) -> dict[str, Any]:
        return {"requests": 4, "errors": 0, "first_error": None, "p50_ms": p50, "p99_ms": p99,
                "max_ms": p99}  # fmt: skip

    def mode(busy: float) -> dict[str, Any]:
        return {
            "phases": {bench.ALONE: phase(2.0, 4.0), bench.WITH_BIG: phase(busy, 2 * busy)},
            "big": {"status": 504, "seconds": 3.0, "deadline_ms": 3000.0},
            "probe_after_big_ms": 2.5,
        }

    results = {"on": mode(3.0), "off": mode(300.0)}
    settings = {"model": "toy-regression", "small": {"samples": 200}, "rate_per_s": 10.0,
                "duration_s": 1.0, "big": {"rows": 1024, "samples": 100_000}}  # fmt: skip
    return {"settings": settings, "results": results, "ratios": bench.ratios(results)}


def test_ratios_compare_each_phase_with_alone_and_off_with_on(bench: ModuleType) -> None:
    r = _fake_report(bench)["ratios"]
    assert r["on: with big / alone"] == {"p50": 1.5, "p99": 1.5}
    assert r["off: with big / alone"] == {"p50": 150.0, "p99": 150.0}
    assert r[f"{bench.WITH_BIG}: off / on"] == {"p50": 100.0, "p99": 100.0}
    assert r[f"{bench.ALONE}: off / on"] == {"p50": 1.0, "p99": 1.0}


def test_render_prints_one_row_per_setting_and_phase(bench: ModuleType) -> None:
    text = bench.render(_fake_report(bench))
    assert text.count("| on ") == 2
    assert text.count("| off ") == 2
    assert "100.00x" in text  # off / on with the big request running
    assert "HTTP 504" in text


def test_request_bodies(bench: ModuleType) -> None:
    work = bench.Workload("toy-regression", (1,), 200, 3, 500, 10.0, 1.0, 0.5)
    small = json.loads(work.small(7))
    assert small == {"rows": [[small["rows"][0][0]]], "seed": 7}
    assert -4.0 <= small["rows"][0][0] <= 4.0
    big = json.loads(work.big(1500.0))
    assert len(big["rows"]) == 3
    assert (big["samples"], big["timeout_ms"], big["seed"]) == (500, 1500.0, 0)
    image = bench.Workload("digits", (1, 8, 8), 100, 2, 100, 10.0, 1.0, 0.5)
    assert len(json.loads(image.small(0))["rows"][0][0][7]) == 8
    assert work.count == 10


@pytest.mark.parametrize(
    "flags",
    [
        ["--rate", "0"],
        ["--duration-s", "0"],
        ["--big-rows", "0"],
        ["--big-samples", "0"],
        ["--threads", "0"],
        ["--rate", "200", "--duration-s", "100"],  # more than a phase may queue
    ],
)
def test_rejects_bad_bounds(
    bench: ModuleType, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(flags)
    assert "--" in capsys.readouterr().err


def test_quick_and_full_defaults(bench: ModuleType) -> None:
    quick, full = bench.parse_args(["--quick"]), bench.parse_args([])
    assert quick.duration_s < full.duration_s == 10.0
    assert full.model == "toy-regression"
    assert full.big_rows is None  # the model's max_rows
