"""The MC dropout training recipe, its weight decay, and the model folders it writes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from mcdrop.config import Settings
from mcdrop.engine.core import MCOptions
from mcdrop.model import ServedModel
from mcdrop.repository.architectures import build_cnn, build_mlp
from mcdrop.scoring import rmse
from mcdrop.training.export import write_model_folder
from mcdrop.training.recipe import (
    ClassifierConfig,
    TrainConfig,
    TrainedModel,
    l2_terms,
    standardisation,
    standardise,
    train_classifier,
    train_regressor,
    weight_decay,
)
from mcdrop.uncertainty import RegressionSummary


def _line_data(rows: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """y = 2x + 1 + noise(0.1) on x ~ U(-1, 1): [rows, 1], [rows]."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(rows, 1))
    y = 2 * x[:, 0] + 1 + rng.normal(0, 0.1, size=rows)
    return x, y


def _small(**changes: object) -> TrainConfig:
    base: dict[str, object] = {"tau": 100.0, "hidden": [16], "epochs": 20, "batch_size": 32}
    base.update(changes)
    return TrainConfig.model_validate(base)


# --- weight decay ---------------------------------------------------------------------------


def test_weight_decay_formula_by_hand() -> None:
    # Boston-like: l = 1e-2, p = 0.05, N = 455, tau = 0.1
    assert weight_decay(1e-2, 0.05, 455, 0.1) == pytest.approx(1e-4 * 0.95 / 91.0, rel=1e-12)
    assert weight_decay(0.5, 0.0, 10, 2.0) == pytest.approx(0.25 / 40.0, rel=1e-12)


def test_l2_terms_use_the_dropout_before_each_layer() -> None:
    module = build_mlp(3, 1, [4, 5], dropout=0.2, input_dropout=0.1)
    terms = l2_terms(module, lengthscale=0.1, n_train=50, tau=2.0)
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    assert [w is lin.weight for (w, _), lin in zip(terms, linears, strict=True)] == [True] * 3
    scale = 0.01 / (2 * 50 * 2.0)
    assert [c for _, c in terms] == pytest.approx([0.9 * scale, 0.8 * scale, 0.8 * scale])


def test_l2_terms_without_input_dropout_use_p_zero() -> None:
    terms = l2_terms(build_mlp(3, 1, [4], dropout=0.5), lengthscale=1.0, n_train=1, tau=1.0)
    assert [c for _, c in terms] == pytest.approx([0.5, 0.25])


def test_config_defaults_and_validation() -> None:
    config = TrainConfig(tau=1.0)
    assert config.hidden == [50]
    assert config.dropout == 0.05
    assert config.effective_input_dropout == 0.05
    assert config.lengthscale == 1e-2
    assert (config.batch_size, config.lr) == (128, 1e-3)
    assert TrainConfig(tau=1.0, input_dropout=0.0).effective_input_dropout == 0.0
    with pytest.raises(ValidationError, match="dropout"):
        TrainConfig(tau=1.0, dropout=1.0)
    with pytest.raises(ValidationError, match="tau"):
        TrainConfig(tau=0.0)
    with pytest.raises(ValidationError, match="hiden"):
        TrainConfig.model_validate({"tau": 1.0, "hiden": [3]})


# --- regression ---------------------------------------------------------------------------


def test_training_reduces_loss_and_fits_the_line() -> None:
    x, y = _line_data()
    trained = train_regressor(x, y, _small(lr=1e-2), progress=False)
    losses = [h["loss"] for h in trained.history]
    assert len(losses) == 20
    assert losses[-1] < 0.25 * losses[0]
    assert not trained.module.training
    with torch.no_grad():
        out = trained.module(trained.normalize_inputs(torch.tensor(x)))
    assert trained.target_std is not None
    assert trained.target_mean is not None
    pred = out.double()[:, 0] * trained.target_std + trained.target_mean
    assert float((pred - torch.tensor(y)).square().mean().sqrt()) < 0.25  # std(y) is about 1.2


def test_standardisation_uses_training_statistics() -> None:
    x = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0], [7.0, 5.0]])
    y = np.array([0.0, 2.0, 4.0, 6.0])
    trained = train_regressor(x, y, _small(epochs=1), progress=False)
    torch.testing.assert_close(trained.input_mean, torch.tensor([4.0, 5.0]).double())
    # population std of 1, 3, 5, 7 is sqrt(5); a constant column is left unscaled (std 1)
    torch.testing.assert_close(trained.input_std, torch.tensor([math.sqrt(5.0), 1.0]).double())
    torch.testing.assert_close(trained.target_mean, torch.tensor([3.0]).double())
    torch.testing.assert_close(trained.target_std, torch.tensor([math.sqrt(5.0)]).double())


def test_training_is_bit_reproducible_from_the_seed() -> None:
    x, y = _line_data(rows=100)
    before = torch.random.get_rng_state()
    first = train_regressor(x, y, _small(epochs=3), progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched
    torch.manual_seed(1234)  # global state must not matter
    second = train_regressor(x, y, _small(epochs=3), progress=False)
    other = train_regressor(x, y, _small(epochs=3, seed=1), progress=False)
    assert first.history == second.history
    for key, value in first.module.state_dict().items():
        assert torch.equal(value, second.module.state_dict()[key])
    assert not torch.equal(
        first.module.state_dict()["out.weight"], other.module.state_dict()["out.weight"]
    )


def test_weight_decay_is_applied() -> None:
    x, y = _line_data(rows=100)
    strong = train_regressor(x, y, _small(epochs=20, lr=1e-2, tau=1e-6), progress=False)
    weak = train_regressor(x, y, _small(epochs=20, lr=1e-2, tau=1e6), progress=False)

    def norm(trained: TrainedModel) -> float:
        return sum(float(w.detach().square().sum()) for w, _ in l2_terms(trained.module, 1, 1, 1))

    assert norm(strong) < 0.5 * norm(weak)


def test_network_has_input_and_hidden_dropout() -> None:
    x, y = _line_data(rows=20)
    trained = train_regressor(x, y, _small(epochs=1, dropout=0.1), progress=False)
    rates = [m.p for m in trained.module.modules() if isinstance(m, nn.Dropout)]
    assert rates == [0.1, 0.1]
    assert trained.architecture == "mlp"
    assert trained.architecture_config == {
        "in_features": 1,
        "out_features": 1,
        "hidden": [16],
        "dropout": 0.1,
        "input_dropout": 0.1,
        "activation": "relu",
    }


def test_validation_split_reports_loss_and_mc_scores() -> None:
    x, y = _line_data()
    trained = train_regressor(
        x, y, _small(validation_fraction=0.25, validation_samples=20), progress=False
    )
    assert all("val_loss" in h for h in trained.history)
    assert trained.validation is not None
    assert 0.0 < trained.validation["rmse"] < 0.5
    assert math.isfinite(trained.validation["log_likelihood"])


def test_heteroscedastic_head_learns_where_noise_is_larger() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(300, 1))
    noise = np.where(x[:, 0] < 0, 0.05, 0.6)
    y = x[:, 0] + rng.normal(0, 1, size=300) * noise
    config = _small(
        heteroscedastic=True,
        epochs=20,
        lr=1e-2,
        batch_size=64,
        dropout=0.01,
        validation_fraction=0.2,
    )
    trained = train_regressor(x, y, config, progress=False)
    probe = trained.normalize_inputs(torch.tensor([[-0.5], [0.5]]))
    with torch.no_grad():
        log_var = trained.module(probe)[:, 1]
    assert float(log_var[1]) > float(log_var[0]) + 2.0  # true gap: log(0.6^2 / 0.05^2) = 5
    assert trained.validation is not None
    assert math.isfinite(trained.validation["log_likelihood"])


def test_bad_regression_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="rows"):
        train_regressor(np.zeros((5, 2)), np.zeros(4), _small(), progress=False)
    with pytest.raises(ValueError, match="NaN"):
        train_regressor(np.full((3, 1), np.nan), np.zeros(3), _small(), progress=False)
    with pytest.raises(ValueError, match="no training rows"):
        train_regressor(
            np.zeros((1, 1)), np.zeros(1), _small(validation_fraction=0.5), progress=False
        )


def test_no_progress_output_when_disabled(capsys: pytest.CaptureFixture[str]) -> None:
    x, y = _line_data(rows=20)
    train_regressor(x, y, _small(epochs=2), progress=False)
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out == ""


# --- classification -------------------------------------------------------------------------


def _blobs(rows: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=rows)
    centres = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    return centres[labels] + rng.normal(0, 0.5, size=(rows, 2)) + 10.0, labels


def test_classifier_learns_and_is_reproducible() -> None:
    x, y = _blobs()
    config = ClassifierConfig(epochs=15, batch_size=16, lr=1e-2, validation_fraction=0.25)

    def build() -> nn.Module:
        return build_mlp(2, 3, [16], dropout=0.1)

    first = train_classifier(x, y, build, config, progress=False)
    second = train_classifier(x, y, build, config, progress=False)
    assert first.history == second.history
    assert first.history[-1]["loss"] < 0.5 * first.history[0]["loss"]
    assert first.validation is not None
    assert first.validation["accuracy"] > 0.9
    torch.testing.assert_close(first.input_mean, torch.tensor(x.mean(axis=0)), atol=1.0, rtol=0)
    assert first.target_mean is None


def test_classifier_standardises_images_per_channel() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 16, size=(12, 2, 4, 4))
    x[:, 1] = 3.0
    y = rng.integers(0, 2, size=12)

    def build() -> nn.Module:
        return build_cnn(2, [4, 4], 2, channels=[3], hidden=4)

    trained = train_classifier(x, y, build, ClassifierConfig(epochs=1), progress=False)
    assert trained.input_mean.shape == (2,)
    assert float(trained.input_mean[0]) == pytest.approx(x[:, 0].mean())
    assert float(trained.input_mean[1]) == 3.0
    assert float(trained.input_std[1]) == 1.0


def test_classifier_refuses_labels_beyond_the_outputs() -> None:
    x, y = _blobs(20)
    with pytest.raises(ValueError, match="labels go up to 2 but the network has 2 outputs"):
        train_classifier(
            x, y, lambda: build_mlp(2, 2, [4]), ClassifierConfig(epochs=1), progress=False
        )
    with pytest.raises(ValueError, match="integer class labels"):
        train_classifier(
            x, y + 0.5, lambda: build_mlp(2, 3, [4]), ClassifierConfig(epochs=1), progress=False
        )


def test_config_needs_dropout_somewhere() -> None:
    with pytest.raises(ValidationError, match="needs dropout"):
        TrainConfig(tau=1.0, dropout=0.0)
    assert TrainConfig(tau=1.0, dropout=0.0, input_dropout=0.1).effective_input_dropout == 0.1


def test_validation_scores_are_the_engines(tmp_path: Path) -> None:
    x, y = _line_data(rows=80)
    config = _small(epochs=3, validation_fraction=0.25, validation_samples=30, seed=4)
    trained = train_regressor(x, y, config, progress=False)
    assert all(not m.training for m in trained.module.modules())
    assert sum(isinstance(m, nn.Dropout) for m in trained.module.modules()) == 2
    # the validation rows: the first 20 of the seeded permutation drawn before training
    order = torch.randperm(80, generator=torch.Generator().manual_seed(4))
    rows = order[:20].sort().values
    folder = write_model_folder(tmp_path / "m", "m", trained, input_shape=[1], output_names=["y"])
    model = ServedModel.load(folder, Settings(device="cpu"))
    targets = torch.tensor(y)[rows].unsqueeze(1)
    summary = model.predict(torch.tensor(x)[rows], MCOptions(samples=30, seed=4), targets)
    assert isinstance(summary, RegressionSummary)
    assert summary.log_likelihood is not None
    assert trained.validation is not None
    # same masks; only the float32 input normalisation differs (served: float32 statistics)
    assert trained.validation["rmse"] == pytest.approx(rmse(summary.mean, targets), rel=1e-6)
    assert trained.validation["log_likelihood"] == pytest.approx(
        float(summary.log_likelihood.mean()), rel=1e-6
    )


def test_the_one_standardisation_leaves_a_constant_column_unscaled() -> None:
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0]], dtype=torch.float64)
    mean, std = standardisation(x)
    assert mean.tolist() == [2.0, 5.0]
    assert std.tolist() == [1.0, 1.0]  # population std of (1, 3) is 1; the constant gets 1
    assert standardise(x, mean, std).tolist() == [[-1.0, 0.0], [1.0, 0.0]]
    images = torch.arange(16, dtype=torch.float64).view(2, 2, 2, 2)  # [N, C, H, W]
    channel_mean, channel_std = standardisation(images, dim=(0, 2, 3))
    assert channel_mean.tolist() == [5.5, 9.5]
    assert standardise(images, channel_mean, channel_std)[:, 0].mean().item() == pytest.approx(0.0)
