"""`mcdrop train --concrete`: learned rates, exported as ordinary dropout, served as usual."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_line_csv

from mcdrop.cli.main import main
from mcdrop.config import Settings
from mcdrop.engine.core import MCOptions
from mcdrop.model import ServedModel
from mcdrop.training.concrete_training import train_concrete_regressor
from mcdrop.training.recipe import TrainConfig
from mcdrop.uncertainty import RegressionSummary


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    """y = 2a - b + noise(0.1) on 200 rows, with a header line."""
    return write_line_csv(tmp_path / "line.csv", 200)


def test_cli_concrete_model_serves_with_its_learned_rates(
    csv_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "repo" / "line"
    argv = ["train", "--data", str(csv_file), "--features", "0-1", "--target", "2",
            "--out", str(out), "--hidden", "16", "--epochs", "40", "--lr", "1e-2",
            "--batch-size", "32", "--tau", "100", "--dropout", "0.1", "--concrete",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "(inputs)" in printed  # two learned rates, printed apart
    model = ServedModel.load(out, Settings(device="cpu"))
    config = model.spec.model.config
    rates = [config["input_dropout"], config["dropout"]]
    assert all(0 < p < 1 for p in rates)
    assert rates != [0.1, 0.1]  # learned, not the starting rate
    assert [site.p for site in model.engine.sites] == rates  # the engine samples at them
    table = np.loadtxt(csv_file, delimiter=",", skiprows=1)
    summary = model.predict(torch.tensor(table[:20, :2]), MCOptions(samples=200, seed=0))
    assert isinstance(summary, RegressionSummary)
    error = (summary.mean[:, 0].double() - torch.tensor(table[:20, 2])).abs().mean()
    assert float(error) < 0.3  # it learned the line (y spans about +-3)
    assert bool((summary.epistemic_variance > 0).all())  # dropout still samples


def test_concrete_needs_one_relu_layer_and_a_starting_rate() -> None:
    x, y = np.zeros((8, 2)), np.arange(8.0)
    with pytest.raises(ValueError, match="hidden"):
        train_concrete_regressor(x, y, TrainConfig(tau=1.0, hidden=[4, 4]), progress=False)
    with pytest.raises(ValueError, match="dropout"):
        train_concrete_regressor(
            x, y, TrainConfig(tau=1.0, dropout=0.1, input_dropout=0.0), progress=False
        )
    with pytest.raises(ValueError, match="heteroscedastic"):
        train_concrete_regressor(x, y, TrainConfig(tau=1.0, heteroscedastic=True), progress=False)
