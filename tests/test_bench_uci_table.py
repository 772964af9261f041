"""bench/uci_table.py: pooling split ranges run apart, and the target check."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from conftest import bench_module


@pytest.fixture(scope="module")
def table() -> Iterator[ModuleType]:
    yield from bench_module("uci_table")


def _result(splits: list[tuple[int, float, float]]) -> dict[str, Any]:
    return {
        "dataset": "yacht",
        "n_splits": len(splits),
        "rmse_mean": 0.0,
        "rmse_se": None,
        "ll_mean": 0.0,
        "ll_se": None,
        "seconds": {"total": 10.0},
        "splits": [{"split": k, "rmse": r, "log_likelihood": ll} for k, r, ll in splits],
    }


def test_pooled_splits_give_the_statistics_of_one_run(table: ModuleType) -> None:
    a = _result([(0, 1.0, -1.0), (1, 2.0, -2.0)])
    b = _result([(2, 4.0, -1.5)])
    out = table.pooled(a, b)
    assert [s["split"] for s in out["splits"]] == [0, 1, 2]
    assert out["n_splits"] == 3
    assert out["rmse_mean"] == pytest.approx(7 / 3)
    assert out["rmse_se"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1) / math.sqrt(3))
    assert out["ll_mean"] == pytest.approx(-1.5)
    assert out["seconds"]["total"] == 20.0
    with pytest.raises(ValueError, match="same split"):
        table.pooled(a, a)


def test_verdict_against_the_authors_grid_numbers(table: ModuleType) -> None:
    """yacht, authors' grid: RMSE 0.67 ± 0.05, LL -1.25 ± 0.01."""
    met = {"ll_mean": -1.26, "rmse_mean": 0.72}
    assert table.verdict(met, "yacht") == "LL met, RMSE met"
    close = {"ll_mean": -1.263, "rmse_mean": 0.80}
    assert table.verdict(close, "yacht") == "LL within rounding (0.003), RMSE over by 0.080"
    assert table.verdict(None, "yacht") == "not run"


def test_one_column_per_run_with_the_target_check_and_learned_rates(
    table: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = dict(_result([(0, 0.70, -1.26), (1, 0.74, -1.24)]), rmse_mean=0.72, ll_mean=-1.25)
    concrete = dict(_result([(0, 3.0, -2.2)]), rmse_mean=3.0, ll_mean=-2.2, concrete=True)
    for split, rates in zip(concrete["splits"], [[0.06, 0.2]], strict=True):
        split.update(dropout=rates, tau=0.5)
    (tmp_path / "g.json").write_text(json.dumps({"datasets": {"yacht": grid}}))
    (tmp_path / "c.json").write_text(json.dumps({"datasets": {"yacht": concrete}}))
    argv = ["--run", "long", str(tmp_path / "g.json"), "--run", "conc", str(tmp_path / "c.json")]
    assert table.main(argv) == 0
    out = capsys.readouterr().out
    assert "| dataset | target, long | target, conc |" in out
    assert "| yacht | LL met, RMSE met | LL short by 0.940, RMSE over by 2.280 |" in out
    assert "| yacht | 0.720 (2) | 3.000 (1) | 0.67 ± 0.05 | 0.70 ± 0.05 |" in out
    assert "Learned rates, conc:" in out
    assert "Learned rates, long:" not in out
    with pytest.raises(SystemExit):
        table.main(["--run", "label-only"])


def test_paired_differences_use_the_authors_result_of_the_same_split(
    table: ModuleType, tmp_path: Path
) -> None:
    """Split k of ours minus line k of the authors' file; mean ± SE of the differences."""
    results = tmp_path / "UCI_Datasets" / "yacht" / "results"
    results.mkdir(parents=True)
    (results / "test_ll_100_xepochs_1_hidden_layers.txt").write_text("-1.0\n-2.0\n-3.0\n")
    (results / "test_MC_rmse_100_xepochs_1_hidden_layers.txt").write_text("0.5\n0.6\n0.7\n")
    ours = _result([(2, 0.8, -2.5), (0, 0.5, -1.5)])  # ll diffs +0.5, -0.5; rmse +0.1, 0.0
    out = table.paired([("mine", {"yacht": ours})], tmp_path)
    assert "| yacht | mine | 2 | 0.000 ± 0.500 | 0.0500 ± 0.0500 |" in out
    assert "bostonHousing" not in out  # no authors' file: no row
