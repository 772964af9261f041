"""Model folders written from trained networks, and the small TOML writer behind them."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mcdrop.errors import ModelLoadError
from mcdrop.repository.architectures import build_cnn, build_mlp
from mcdrop.repository.loading import load_module
from mcdrop.repository.manifest import load_manifest
from mcdrop.training.export import dumps_toml, write_model_folder
from mcdrop.training.recipe import ClassifierConfig, TrainConfig, train_classifier, train_regressor


def _line_data(rows: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """y = 2x + 1 + noise(0.1) on x ~ U(-1, 1): [rows, 1], [rows]."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(rows, 1))
    y = 2 * x[:, 0] + 1 + rng.normal(0, 0.1, size=rows)
    return x, y


def _small(**changes: object) -> TrainConfig:
    base: dict[str, object] = {"tau": 100.0, "hidden": [16], "epochs": 1, "batch_size": 32}
    base.update(changes)
    return TrainConfig.model_validate(base)


def _blobs(rows: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=rows)
    centres = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    return centres[labels] + rng.normal(0, 0.5, size=(rows, 2)), labels


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


def test_files_are_readable_by_a_server_and_runtime_is_optional(tmp_path: Path) -> None:
    x, y = _line_data()
    trained = train_regressor(x, y, _small(), progress=False)
    folder = write_model_folder(tmp_path / "m", "m", trained, input_shape=[1], output_names=["y"])
    for file in folder.iterdir():
        assert file.stat().st_mode & 0o777 == 0o644  # safetensors itself writes 0600
    assert "[runtime]" not in (folder / "model.toml").read_text(encoding="utf-8")
