"""The MC dropout training recipe, its weight decay, and the model folders it writes."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from service.architectures import build_cnn, build_mlp
from service.errors import ModelLoadError
from service.loading import load_module
from service.manifest import load_manifest
from service.training import (
    ClassifierConfig,
    TrainConfig,
    TrainedModel,
    dumps_toml,
    l2_terms,
    train_classifier,
    train_regressor,
    weight_decay,
    write_model_folder,
)


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


# --- model folders ---------------------------------------------------------------------------


def test_regression_folder_loads_and_reproduces_the_module(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(60, 3)) * [1.0, 10.0, 0.1] + [0.0, 5.0, -1.0]
    y = x @ np.array([1.0, 0.1, 5.0]) + 2.0
    trained = train_regressor(x, y, _small(epochs=2, tau=4.0), progress=False)
    folder = write_model_folder(
        tmp_path / "line",
        "line",
        trained,
        task="regression",
        input_shape=[3],
        output_names=["y"],
        input_names=["a", "b", "c"],
        description='a "quoted" line\nsecond line',
        mc={"max_samples": 5000},
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["line"]
    assert sorted(p.name for p in folder.iterdir()) == ["model.toml", "weights.safetensors"]
    spec = load_manifest(folder / "model.toml")
    assert spec.name == "line"
    assert spec.task == "regression"
    assert spec.description == 'a "quoted" line\nsecond line'
    assert spec.input.shape == [3]
    assert spec.input.names == ["a", "b", "c"]
    assert spec.model.format == "builtin"
    assert spec.model.architecture == "mlp"
    assert spec.model.config == trained.architecture_config
    assert spec.mc.tau == 4.0
    assert spec.mc.max_samples == 5000
    assert spec.mc.default_samples == 100
    assert spec.output.heteroscedastic is False
    assert spec.normalization.input_mean == trained.input_mean.tolist()
    assert spec.normalization.target_std == trained.target_std.tolist()  # type: ignore[union-attr]

    # the weights, loaded independently, rebuild a module with identical eval outputs
    rebuilt = build_mlp(**spec.model.config)
    rebuilt.load_state_dict(load_file(str(folder / "weights.safetensors")), strict=True)
    rebuilt.eval()
    probe = trained.normalize_inputs(torch.tensor(x[:7]))
    with torch.no_grad():
        assert torch.equal(rebuilt(probe), trained.module(probe))
        assert torch.equal(load_module(spec, folder)(probe), trained.module(probe))


def test_heteroscedastic_folder_has_no_tau(tmp_path: Path) -> None:
    x, y = _line_data(rows=30)
    trained = train_regressor(x, y, _small(epochs=1, heteroscedastic=True), progress=False)
    folder = write_model_folder(tmp_path / "h", "h", trained, input_shape=[1], output_names=["y"])
    spec = load_manifest(folder / "model.toml")
    assert spec.output.heteroscedastic is True
    assert spec.mc.tau is None
    assert spec.model.config["out_features"] == 2


def test_classifier_folder_with_a_cnn(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 16, size=(16, 1, 8, 8))
    y = rng.integers(0, 3, size=16)
    config = {
        "in_channels": 1,
        "image_size": [8, 8],
        "out_features": 3,
        "channels": [4],
        "hidden": 8,
    }

    def build() -> nn.Module:
        return build_cnn(**config)  # type: ignore[arg-type]

    trained = train_classifier(x, y, build, ClassifierConfig(epochs=1), progress=False)
    folder = write_model_folder(
        tmp_path / "digits",
        "digits",
        trained,
        input_shape=[1, 8, 8],
        output_names=["0", "1", "2"],
        architecture="cnn",
        config=config,
        runtime={"device": "cpu"},
    )
    spec = load_manifest(folder / "model.toml")
    assert spec.task == "classification"
    assert spec.normalization.input_mean == trained.input_mean.tolist()
    assert spec.normalization.target_mean is None
    assert spec.mc.tau is None
    assert spec.runtime.device == "cpu"
    probe = trained.normalize_inputs(torch.tensor(x[:4]))
    with torch.no_grad():
        assert torch.equal(load_module(spec, folder)(probe), trained.module(probe))


def test_folder_with_a_config_that_does_not_fit_the_weights_is_refused(tmp_path: Path) -> None:
    x, y = _line_data(rows=30)
    trained = train_regressor(x, y, _small(epochs=1), progress=False)
    wrong = {**trained.architecture_config, "hidden": [8]}
    with pytest.raises(ModelLoadError, match="shape mismatch"):
        write_model_folder(
            tmp_path / "w", "w", trained, input_shape=[1], output_names=["y"], config=wrong
        )
    assert list(tmp_path.iterdir()) == []  # nothing left behind, not even the staging folder


def test_classifier_folder_needs_an_architecture(tmp_path: Path) -> None:
    x, y = _blobs(12)
    trained = train_classifier(
        x, y, lambda: build_mlp(2, 3, [4]), ClassifierConfig(epochs=1), progress=False
    )
    with pytest.raises(ValueError, match="architecture"):
        write_model_folder(
            tmp_path / "c", "c", trained, input_shape=[2], output_names=["a", "b", "c"]
        )


# --- the TOML writer -------------------------------------------------------------------------


def test_dumps_toml_round_trips_through_tomllib() -> None:
    document = {
        "name": "m",
        "text": 'quote " backslash \\ tab \t newline \n bell \x07 del \x7f ünï',
        "count": -3,
        "flag": False,
        "small": 1e-05,
        "big": 1e16,
        "third": 1 / 3,
        "np_float": np.float64(0.25),
        "nested": [[1, 2], [3.5]],
        "records": [{"a": 1, "b key": "x"}],
        "skipped": None,
        "odd key.with dots": 1,
        "table": {"inner": {"deep": [True, False]}, "empty": {}, "value": "v"},
        "after": {"x": 1},
    }
    text = dumps_toml(document)
    parsed = tomllib.loads(text)
    expected = {k: v for k, v in document.items() if v is not None}
    expected["np_float"] = 0.25
    assert parsed == expected


def test_dumps_toml_special_floats_and_errors() -> None:
    parsed = tomllib.loads(dumps_toml({"a": math.inf, "b": -math.inf, "c": math.nan}))
    assert parsed["a"] == math.inf
    assert parsed["b"] == -math.inf
    assert math.isnan(parsed["c"])
    with pytest.raises(TypeError, match="cannot write"):
        dumps_toml({"a": object()})
    with pytest.raises(TypeError, match="None"):
        dumps_toml({"a": [1, None]})


def test_rewriting_a_folder_replaces_its_model(tmp_path: Path) -> None:
    x, y = _line_data(rows=30)
    first = train_regressor(x, y, _small(epochs=1, tau=1.0), progress=False)
    second = train_regressor(x, y, _small(epochs=1, tau=2.0, seed=5), progress=False)
    for trained in (first, second):
        write_model_folder(tmp_path / "m", "m", trained, input_shape=[1], output_names=["y"])
    assert load_manifest(tmp_path / "m" / "model.toml").mc.tau == 2.0
    weights = load_file(str(tmp_path / "m" / "weights.safetensors"))
    assert torch.equal(weights["out.weight"], second.module.state_dict()["out.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
