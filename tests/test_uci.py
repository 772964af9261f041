"""The UCI protocol: reading a dataset folder, held-out rows, grid choice, and the quick bench."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.uci_protocol import (
    UCIProtocol,
    holdout_rows,
    load_dataset,
    mc_scores,
    run_dataset,
    standard_error,
)
from mcdrop.engine.core import MCEngine, MCOptions
from mcdrop.training.stacked import StackedMLP
from mcdrop.uncertainty import RegressionSummary

ROOT = Path(__file__).resolve().parents[1]
SHARED_UCI = ROOT.parent / "shared" / "uci"  # ../shared/uci next to the clone


def _write_dataset(folder: Path, rows: int = 120, noise: float = 0.02) -> Path:
    """y = a - 2b + noise on `rows` rows; two splits; grids with one clearly right tau."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(rows, 2))
    y = x[:, 0] - 2 * x[:, 1] + rng.normal(0, noise, size=rows)
    folder.mkdir(parents=True)
    np.savetxt(folder / "data.txt", np.c_[x, y])
    (folder / "index_features.txt").write_text("0\n1\n")
    (folder / "index_target.txt").write_text("2\n")
    (folder / "n_splits.txt").write_text("2\n")
    (folder / "n_hidden.txt").write_text("16\n")
    (folder / "n_epochs.txt").write_text("30\n")
    (folder / "dropout_rates.txt").write_text("0.01\n0.05\n")
    (folder / "tau_values.txt").write_text("0.01\n1000\n")
    for k in range(2):
        order = rng.permutation(rows)
        np.savetxt(folder / f"index_train_{k}.txt", order[: rows * 9 // 10], fmt="%d")
        np.savetxt(folder / f"index_test_{k}.txt", order[rows * 9 // 10 :], fmt="%d")
    return folder


def test_load_dataset_reads_the_folder(tmp_path: Path) -> None:
    ds = load_dataset(_write_dataset(tmp_path / "line"))
    assert ds.name == "line"
    assert ds.x.shape == (120, 2)
    assert ds.y.shape == (120,)
    assert len(ds.splits) == 2
    assert len(ds.splits[1][0]) == 108
    assert (ds.hidden, ds.epochs) == (16, 30)
    assert ds.dropout_grid == [0.01, 0.05]
    assert ds.tau_grid == [0.01, 1000.0]


def test_load_dataset_names_the_bad_file(tmp_path: Path) -> None:
    folder = _write_dataset(tmp_path / "line")
    good = (folder / "index_test_1.txt").read_text()
    (folder / "index_test_1.txt").write_text("5\n999\n")
    with pytest.raises(ValueError, match=r"index_test_1\.txt: row numbers must lie in \[0, 120\)"):
        load_dataset(folder)
    (folder / "index_test_1.txt").write_text(good)
    (folder / "tau_values.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing tau_values\.txt"):
        load_dataset(folder)
    with pytest.raises(FileNotFoundError, match=r"no data\.txt"):
        load_dataset(tmp_path)


def test_validation_rows_are_the_last_fifth_in_file_order() -> None:
    train = np.array([9, 3, 7, 1, 5, 0, 2, 8, 4, 6])
    fit, val = holdout_rows(train, 0.2)
    assert fit.tolist() == [9, 3, 7, 1, 5, 0, 2, 8]
    assert val.tolist() == [4, 6]
    with pytest.raises(ValueError, match="validation_fraction"):
        holdout_rows(train, 0.0)


def test_standard_error_by_hand() -> None:
    assert standard_error(np.array([1.0, 3.0])) == pytest.approx(math.sqrt(2) / math.sqrt(2))
    assert standard_error(np.array([4.0])) is None


def test_grid_search_picks_the_right_tau_and_reports_every_split(tmp_path: Path) -> None:
    """Noise std 0.02: tau = 1000 fits the held-out rows far better than tau = 0.01."""
    ds = load_dataset(_write_dataset(tmp_path / "line"))
    protocol = UCIProtocol(epoch_factor=5, validation_samples=50, test_samples=200, batch_size=32)
    result = run_dataset(ds, [0, 1], protocol, progress=False)
    assert [s.split for s in result.splits] == [0, 1]
    for split in result.splits:
        assert split.tau == 1000.0
        assert split.dropout[0] == split.dropout[1]
        assert split.dropout[0] in ds.dropout_grid
        assert split.rmse < 0.5 * float(ds.y.std())  # it learned the plane
        assert math.isfinite(split.log_likelihood)
    summary = result.summary()
    assert summary["n_splits"] == 2
    assert summary["ll_mean"] == pytest.approx(np.mean([s.log_likelihood for s in result.splits]))
    assert set(summary["seconds"]) >= {"grid_train", "grid_validation", "retrain", "test"}


def test_concrete_protocol_learns_rates_and_searches_tau_only(tmp_path: Path) -> None:
    ds = load_dataset(_write_dataset(tmp_path / "line"))
    protocol = UCIProtocol(
        epoch_factor=5, validation_samples=50, test_samples=200, batch_size=32, concrete=True
    )
    result = run_dataset(ds, [0], protocol, progress=False)
    split = result.splits[0]
    assert split.tau == 1000.0
    assert all(0 < p < 1 for p in split.dropout)
    assert split.dropout != [0.1, 0.1]  # moved away from the starting rate
    assert result.concrete


def _constant_predictor(train_y: np.ndarray, test_y: np.ndarray) -> tuple[float, float]:
    """RMSE and mean Gaussian test LL of predicting the training mean with the training std."""
    mean, std = float(train_y.mean()), float(train_y.std())
    rmse = float(np.sqrt(np.mean((test_y - mean) ** 2)))
    ll = -0.5 * math.log(2 * math.pi * std**2) - (test_y - mean) ** 2 / (2 * std**2)
    return rmse, float(ll.mean())


@pytest.mark.slow
def test_quick_bench_on_yacht(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if not (SHARED_UCI / "yacht" / "data.txt").is_file():
        pytest.skip(f"UCI data not found at {SHARED_UCI} (a clone next to ../shared has it)")
    monkeypatch.syspath_prepend(str(ROOT))
    import bench.uci as bench_uci

    argv = ["--data", str(SHARED_UCI), "--datasets", "yacht", "--splits", "2",
            "--samples", "1000", "--json", "--no-progress"]  # fmt: skip
    assert bench_uci.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    result = report["datasets"]["yacht"]
    assert result["n_splits"] == 2
    assert report["protocol"]["test_samples"] == 1000
    ds = load_dataset(SHARED_UCI / "yacht")
    for split in result["splits"]:
        train, test = ds.splits[split["split"]]
        const_rmse, const_ll = _constant_predictor(ds.y[train], ds.y[test])
        assert math.isfinite(split["log_likelihood"])
        assert split["log_likelihood"] > const_ll + 0.5
        assert split["rmse"] < 0.5 * const_rmse
        assert split["tau"] in ds.tau_grid
        assert split["dropout"][0] in ds.dropout_grid
    lls = [s["log_likelihood"] for s in result["splits"]]
    assert result["ll_mean"] == pytest.approx(float(np.mean(lls)))
    assert result["ll_se"] == pytest.approx(float(np.std(lls, ddof=1) / math.sqrt(2)))
    assert result["seconds"]["total"] > 0


def test_compare_loop_times_three_ways_that_agree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine (both mask modes) and the per-sample loop estimate the same means and LL."""
    _write_dataset(tmp_path / "line", noise=0.3)
    monkeypatch.syspath_prepend(str(ROOT))
    import bench.uci as bench_uci

    argv = ["--data", str(tmp_path), "--datasets", "--compare-loop", "line", "--samples",
            "4000", "--compare-rounds", "2", "--json", "--no-progress"]  # fmt: skip
    assert bench_uci.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    c = report["compare_loop"]
    assert (c["rows"], c["samples"], c["rounds"]) == (12, 4000, 2)
    assert all(len(times) == 2 and min(times) > 0 for times in c["all_seconds"].values())
    assert c["loop_over_engine"] == pytest.approx(c["loop_seconds"] / c["engine_seconds"])
    assert math.isfinite(c["loop_ll"])
    assert c["engine_ll"] == pytest.approx(c["loop_ll"], abs=0.01)
    assert c["engine_shared_ll"] == pytest.approx(c["loop_ll"], abs=0.01)
    # per-row MC means agree to MC error (~0.01); dropping the 1/(1-p) scale gives ~0.13
    assert c["largest_mean_gap_over_y_std"] < 0.04


# -- validation scoring of the stacked networks ---------------------------------------------


def test_mc_scores_match_hand_computed_mixture() -> None:
    """Without dropout all T samples agree: LL is the Gaussian log density at tau."""
    rates = torch.zeros(1, 1, dtype=torch.float64)
    stacked = StackedMLP.glorot([1, 1], rates)
    with torch.no_grad():
        stacked.weights[0].fill_(2.0)
    x = torch.tensor([[[1.0], [0.0]]])
    y = torch.tensor([[[5.0], [1.0]]])
    tau = torch.tensor([0.5])
    rmse, ll = mc_scores(stacked, x, y, torch.tensor([1.0]), torch.tensor([3.0]), tau, 7)
    # predictions 2*3+1 = 7 and 1: errors 2 and 0
    assert rmse.item() == pytest.approx(math.sqrt(2.0))
    expected = 0.5 * math.log(0.5) - 0.5 * math.log(2 * math.pi) - 0.25 * (4 + 0) / 2
    assert ll.item() == pytest.approx(expected)


def test_mc_scores_agree_with_the_serving_engine() -> None:
    """Validation scores (stacked, torch RNG masks) estimate what the engine reports."""
    torch.manual_seed(4)
    rates = torch.full((1, 2), 0.2, dtype=torch.float64)
    stacked = StackedMLP.glorot([3, 16, 1], rates)
    x = torch.randn(40, 3)
    y = torch.randn(40, 1).double() * 2 + 1
    tau = 1.5
    rmse, ll = mc_scores(
        stacked, x[None], y[None], torch.tensor([1.0]), torch.tensor([2.0]),
        torch.tensor([tau]), samples=4000,
    )  # fmt: skip
    engine = MCEngine(
        stacked.network(0), task="regression", input_shape=(3,), tau=tau,
        output_scale=torch.tensor([2.0]), output_shift=torch.tensor([1.0]),
    )  # fmt: skip
    summary = engine.run(x, MCOptions(samples=4000, seed=0), targets=y)
    assert isinstance(summary, RegressionSummary)
    assert summary.log_likelihood is not None
    engine_rmse = float((summary.mean.double() - y).square().mean().sqrt())
    assert rmse.item() == pytest.approx(engine_rmse, rel=0.02)
    assert ll.item() == pytest.approx(float(summary.log_likelihood.mean()), abs=0.02)
