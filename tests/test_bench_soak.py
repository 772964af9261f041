"""The soak benchmark runs end to end on 127.0.0.1 for a few seconds, checks answers, cleans up.

No timing or memory assertions: those figures belong to the benchmark's report, not to tests.
"""

from __future__ import annotations

import itertools
import json
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
QUICK = ["--seconds", "3", "--concurrency", "4", "--timeout-s", "20"]


@pytest.fixture(scope="module")
def soak() -> Iterator[ModuleType]:
    """bench.soak, importable whether or not the repository root is on sys.path."""
    yield from bench_module("soak")


@pytest.fixture(scope="module")
def servers() -> Iterator[ModuleType]:
    """bench.servers: process groups of the servers the benchmarks start."""
    yield from bench_module("servers")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One short run of the script as a user starts it: the saved JSON and the printed table."""
    out = tmp_path_factory.mktemp("soak") / "figures" / "soak.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), *QUICK, "--json-out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT / "bench",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return report, done.stdout


@pytest.mark.slow
def test_every_kind_ran_and_got_its_status(
    soak: ModuleType, run: tuple[dict[str, Any], str]
) -> None:
    report, _ = run
    assert report["clean"] is True
    assert report["server_alive_at_end"] is True
    assert report["settings"]["host"] == "127.0.0.1"
    assert report["settings"]["concurrency"] == 4
    assert set(report["kinds"]) == {k.name for k in soak.KINDS}
    for name, k in report["kinds"].items():
        assert k["requests"] > 0, name
        assert k["statuses"] == {str(k["expected_status"]): k["requests"]}, name
        assert k["unexpected"] == 0
        assert 0 < k["p50_ms"] <= k["p99_ms"] <= k["max_ms"]
    totals = report["totals"]
    assert totals["problems"] == {}
    assert totals["seed_checks"] > 0
    assert totals["completed"] == sum(k["requests"] for k in report["kinds"].values())
    assert totals["completed"] == totals["sent"]
    assert 3.0 <= totals["wall_s"] < 3.0 + 20.0


@pytest.mark.slow
def test_rss_was_sampled_every_second(run: tuple[dict[str, Any], str]) -> None:
    report, _ = run
    rss = report["rss"]
    samples = rss["samples"]
    assert len(samples) >= 4  # t = 0, 1, 2, (3) and the last one after the load
    assert all(s["rss_mb"] > 50 and s["processes"] >= 1 for s in samples)  # torch is loaded
    gaps = [b["t_s"] - a["t_s"] for a, b in itertools.pairwise(samples)]
    assert all(g <= 3.0 for g in gaps), gaps
    assert rss["peak_mb"] == max(s["rss_mb"] for s in samples)
    assert rss["growth_mb"] == pytest.approx(samples[-1]["rss_mb"] - samples[0]["rss_mb"])


@pytest.mark.slow
def test_the_table_is_printed(soak: ModuleType, run: tuple[dict[str, Any], str]) -> None:
    report, stdout = run
    assert stdout.strip() == soak.render(report).strip()
    assert "verdict: clean" in stdout
    for k in soak.KINDS:
        assert f"| {k.name} " in stdout


@pytest.mark.slow
def test_no_server_process_outlives_the_run(
    servers: ModuleType, run: tuple[dict[str, Any], str]
) -> None:
    report, _ = run
    members = servers.group_stats(report["server"]["pid"])
    assert members is not None
    assert all(fields[0] == "Z" for fields in members.values()), members


# -- the pieces, without a server ----------------------------------------------------------------


def test_schedule_follows_the_weights_in_a_fixed_order(soak: ModuleType) -> None:
    order = soak.schedule()
    assert order == soak.schedule()
    assert {name: order.count(name) for name in set(order)} == {
        k.name: k.weight for k in soak.KINDS
    }


def response(status: int, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, content=body, headers=headers)


def test_check_counts_wrong_statuses_bad_answers_and_changed_seeded_answers(
    soak: ModuleType,
) -> None:
    figures = soak.Figures()
    good = json.dumps({"predictions": [{"y": {"mean": 1.0}}]}).encode()
    soak.check(figures, "v1_predict", 0, response(200, good))
    soak.check(figures, "v1_predict", 0, response(200, good))
    assert figures.problems == {}
    assert figures.seed_checks == 2
    changed = json.dumps({"predictions": [{"y": {"mean": 1.5}}]}).encode()
    soak.check(figures, "v1_predict", 0, response(200, changed))
    soak.check(figures, "v1_predict", soak.SEEDS, response(200, changed))  # unseeded: any answer
    soak.check(figures, "v1_predict", 1, response(200, b'{"predictions": []}'))
    soak.check(figures, "bad_json", 0, response(200, good))
    soak.check(figures, "bad_json", 0, response(400, b'{"error": "x"}'))
    soak.check(figures, "oip_json", 1, response(500, b'{"error": "internal server error"}'))
    assert figures.problems == {
        "v1_predict: seeded answer changed": 1,
        "v1_predict: malformed answer": 1,
        "bad_json: HTTP 200 (expected 400)": 1,
        "oip_json: HTTP 500 (expected 200)": 1,
    }


def test_binary_answers_must_add_up(soak: ModuleType) -> None:
    header = json.dumps(
        {"outputs": [{"name": "mean", "parameters": {"binary_data_size": 8}}]}
    ).encode()
    headers = {"Inference-Header-Content-Length": str(len(header))}
    assert soak.answer_problem("oip_binary", response(200, header + bytes(8), headers)) is None
    short = soak.answer_problem("oip_binary", response(200, header + bytes(4), headers))
    assert short == "binary outputs do not add up to the body"
    assert "KeyError" in soak.answer_problem("oip_binary", response(200, header + bytes(8)))


def test_slope_is_least_squares(soak: ModuleType) -> None:
    assert soak.slope([0.0, 1.0, 2.0], [5.0, 7.0, 9.0]) == pytest.approx(2.0)
    assert soak.slope([1.0, 1.0], [3.0, 4.0]) == 0.0


def test_flags_are_checked(soak: ModuleType) -> None:
    assert soak.parse_args([]).seconds == 60.0
    assert soak.parse_args([]).concurrency == 64
    for bad in (["--seconds", "0"], ["--seconds", "inf"], ["--concurrency", "0"]):
        with pytest.raises(SystemExit):
            soak.parse_args(bad)
