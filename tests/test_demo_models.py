"""The shipped demo models: their uncertainty properties on the committed weights, and
deterministic regeneration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mcdrop.config import Settings
from mcdrop.errors import ModelNotFound
from mcdrop.model import ServedModel
from mcdrop.repository.manifest import load_manifest
from mcdrop.training import demo_models as dm
from mcdrop.uncertainty import ClassificationSummary, RegressionSummary

MODELS = Path(__file__).resolve().parent.parent / "models"
CPU = Settings(device="cpu")


@pytest.fixture(scope="module")
def toy() -> ServedModel:
    return ServedModel.load(MODELS / dm.TOY, CPU)


@pytest.fixture(scope="module")
def digits() -> ServedModel:
    return ServedModel.load(MODELS / dm.DIGITS, CPU)


def _toy_summary(model: ServedModel, points: tuple[float, ...]) -> RegressionSummary:
    summary = model.predict(torch.tensor(points)[:, None], model.options(1000, seed=0))
    assert isinstance(summary, RegressionSummary)
    return summary


def _epistemic_std(model: ServedModel, points: tuple[float, ...]) -> float:
    return float(_toy_summary(model, points).epistemic_variance.sqrt().mean())


def test_toy_epistemic_uncertainty_grows_in_the_gap_and_outside(toy: ServedModel) -> None:
    inside = _epistemic_std(toy, dm.TOY_INSIDE)
    gap = _epistemic_std(toy, dm.TOY_GAP)
    outside = _epistemic_std(toy, dm.TOY_OUTSIDE)
    assert _epistemic_std(toy, dm.TOY_GAP + dm.TOY_OUTSIDE) > 1.5 * inside
    assert gap > 1.5 * inside
    assert outside > 3.0 * inside


def test_toy_fits_the_curve_where_it_has_data(toy: ServedModel) -> None:
    summary = _toy_summary(toy, dm.TOY_INSIDE)
    truth = torch.tensor(dm.toy_function(np.array(dm.TOY_INSIDE)))
    assert float((summary.mean[:, 0] - truth).abs().max()) < 0.3
    # the heteroscedastic head learned that the noise grows with |x|
    noise = summary.aleatoric_variance[:, 0].sqrt()
    assert float(noise[[0, -1]].mean()) > float(noise[[3, 4]].mean())


def _digits_mi(model: ServedModel, images: torch.Tensor) -> float:
    summary = model.predict(images, model.options(50, seed=0))
    assert isinstance(summary, ClassificationSummary)
    return float(summary.mutual_information.mean())


def test_digits_accuracy_and_mutual_information(digits: ServedModel) -> None:
    _, _, x_test, y_test = dm.digits_holdout()
    clean = torch.as_tensor(x_test, dtype=torch.float32)
    summary = digits.predict(clean, digits.options(50, seed=0))
    assert isinstance(summary, ClassificationSummary)
    accuracy = float((summary.predicted_class == torch.as_tensor(y_test)).double().mean())
    assert accuracy > 0.9
    clean_mi = float(summary.mutual_information.mean())
    for degrees in (60.0, 75.0, 90.0):
        assert _digits_mi(digits, dm.rotate(clean, degrees)) > 1.5 * clean_mi
    assert _digits_mi(digits, dm.add_noise(clean, seed=1)) > 1.5 * clean_mi


def test_digits_manifest_describes_raw_pixels(digits: ServedModel) -> None:
    spec = digits.spec
    assert spec.input.shape == [1, 8, 8]
    assert spec.output.names == [str(k) for k in range(10)]
    assert spec.normalization.input_mean is not None
    assert spec.model.config["batchnorm"] is True
    assert {s.kind for s in digits.engine.sites} == {"dropout"}


def test_committed_weights_are_small() -> None:
    for name in (dm.TOY, dm.DIGITS):
        spec = load_manifest(MODELS / name / "model.toml")
        assert (MODELS / name / spec.model.weights).stat().st_size < 256 * 1024


def test_rotation_by_zero_is_the_identity_and_by_180_flips() -> None:
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(dm.rotate(image, 0.0), image)
    torch.testing.assert_close(dm.rotate(image, 180.0), image.flip(2, 3), atol=1e-4, rtol=0)
    noisy = dm.add_noise(image, std=100.0)
    assert float(noisy.min()) == 0.0
    assert float(noisy.max()) == 16.0


# --- regeneration ---------------------------------------------------------------------------


def test_toy_regeneration_is_deterministic_and_loadable(tmp_path: Path) -> None:
    first = dm.generate_toy_regression(tmp_path / "a", epochs=5)
    second = dm.generate_toy_regression(tmp_path / "b", epochs=5)
    other = dm.generate_toy_regression(tmp_path / "c", epochs=5, seed=1)
    for file in ("model.toml", "weights.safetensors"):
        assert (first / file).read_bytes() == (second / file).read_bytes()
    assert (first / "weights.safetensors").read_bytes() != (
        other / "weights.safetensors"
    ).read_bytes()
    model = ServedModel.load(first, CPU)
    assert model.spec.output.heteroscedastic
    assert model.spec.input.names == ["x"]
    assert "[-4.0, -1.0]" in model.spec.description
    assert isinstance(model.predict(torch.zeros(2, 1), model.options(8, seed=0)), RegressionSummary)


def test_digits_regeneration_is_deterministic(tmp_path: Path) -> None:
    first = dm.generate_digits(tmp_path / "a", epochs=1)
    second = dm.generate_digits(tmp_path / "b", epochs=1)
    assert (first / "weights.safetensors").read_bytes() == (
        second / "weights.safetensors"
    ).read_bytes()
    model = ServedModel.load(first, CPU)
    assert model.spec.name == dm.DIGITS
    assert model.spec.model.architecture == "cnn"


def test_main_writes_the_chosen_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(
        dm.GENERATORS, dm.TOY, lambda out: dm.generate_toy_regression(out, epochs=2)
    )
    assert dm.main(["--out", str(tmp_path), "--only", dm.TOY]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [dm.TOY]
    assert f"wrote {tmp_path / dm.TOY}" in capsys.readouterr().out


def test_demo_text_explains_both_models() -> None:
    text = dm.demo_text(Settings(model_repository=MODELS, device="cpu"))
    assert "in the gap" in text
    assert "rotated 75 degrees" in text
    assert "mutual information" in text


def test_demo_without_models_says_how_to_make_them(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="make models"):
        dm.demo_text(Settings(model_repository=tmp_path))
