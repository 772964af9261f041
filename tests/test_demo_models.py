"""The shipped demo models: their uncertainty properties on the committed weights, and
deterministic regeneration."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from mcdrop.config import Settings
from mcdrop.errors import ModelNotFound
from mcdrop.model import ServedModel
from mcdrop.repository.architectures import build_fcn
from mcdrop.repository.loading import load_module, load_weights
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


# --- segmentation, checked by hand (MC dropout written out here, not mcdrop's engine) -------

SEGMENTATION = MODELS / dm.SEGMENTATION
SEG_SAMPLES = 200
SEG_HELD_OUT = 32  # held-out images: 32 x 32 x 32 pixels per statistic


def _segmentation_manifest(folder: Path = SEGMENTATION) -> dict[str, Any]:
    with (folder / "model.toml").open("rb") as f:
        return tomllib.load(f)


def _segmenter(folder: Path = SEGMENTATION) -> tuple[nn.Module, Tensor, Tensor]:
    """The shipped network rebuilt from its manifest's config (eval), and its [1] mean, std."""
    doc = _segmentation_manifest(folder)
    module = build_fcn(**doc["model"]["config"])
    load_weights(module, folder / doc["model"]["weights"])
    norm = doc["normalization"]
    return module.eval(), torch.tensor(norm["input_mean"]), torch.tensor(norm["input_std"])


@dataclass(frozen=True)
class PixelStats:
    """Per-pixel MC dropout statistics of images [B, 1, H, W]."""

    probabilities: Tensor  # [B, C, H, W] mean of the per-sample softmax over the class axis
    entropy: Tensor  # [B, H, W] entropy of the mean (nats)
    mutual_information: Tensor  # [B, H, W] entropy minus the mean of per-sample entropies


def _mc_dropout(module: nn.Module, x: Tensor, samples: int = SEG_SAMPLES) -> PixelStats:
    """`samples` forward passes with only the dropout layers in training mode (BatchNorm stays
    in eval: batch statistics would change the model), on a seeded global RNG."""
    dropouts = [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert dropouts, "the segmenter has no dropout to sample"
    module.eval()
    for m in dropouts:
        m.train()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            probs = torch.stack([torch.softmax(module(x), dim=1) for _ in range(samples)])
    finally:
        module.eval()
    mean = probs.double().mean(dim=0)  # [B, C, H, W]
    entropy = -torch.special.xlogy(mean, mean).sum(dim=1)
    expected = -torch.special.xlogy(probs.double(), probs.double()).sum(dim=2).mean(dim=0)
    return PixelStats(mean, entropy, entropy - expected)


@pytest.fixture(scope="module")
def held_out() -> tuple[Tensor, Tensor]:
    """In-distribution images [32, 1, 32, 32] (raw) and labels [32, 32, 32] never trained on."""
    x, y = dm.segmentation_data(SEG_HELD_OUT, seed=dm.SEG_HELD_OUT_SEED)
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.fixture(scope="module")
def segmentation_stats(held_out: tuple[Tensor, Tensor]) -> tuple[PixelStats, PixelStats]:
    """MC statistics of the held-out images, clean and with noisy right-hand quarters."""
    module, mean, std = _segmenter()
    clean = held_out[0]
    noisy = dm.noisy_right_quarter(clean, seed=1)

    def normalized(x: Tensor) -> Tensor:
        return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

    return _mc_dropout(module, normalized(clean)), _mc_dropout(module, normalized(noisy))


@pytest.mark.slow
def test_segmentation_labels_held_out_images(
    held_out: tuple[Tensor, Tensor], segmentation_stats: tuple[PixelStats, PixelStats]
) -> None:
    labels = held_out[1]
    predicted = segmentation_stats[0].probabilities.argmax(dim=1)
    # measured 0.98; all-background would score 0.80, so this needs the shapes found
    assert float((predicted == labels).double().mean()) > 0.95
    for k, name in enumerate(dm.SEG_CLASSES):
        # measured recall 0.996 / 0.97 / 0.88: the net tells squares from discs, not only
        # bright from dark (guessing the kind would give about 0.5 for each shape)
        recall = float((predicted[labels == k] == k).double().mean())
        assert recall > 0.8, name


@pytest.mark.slow
def test_segmentation_mutual_information_is_higher_where_the_noise_is_new(
    segmentation_stats: tuple[PixelStats, PixelStats],
) -> None:
    """Training saw pixel noise of std 0.05..0.15 only; std 0.5 more in the right quarter.

    Measured (shipped weights, 200 samples): MI over the noisy right quarter 0.072 against
    0.023 over the left three quarters of the same images (3.2x) and 0.010 over the same
    right-quarter pixels without the extra noise (6.9x). Across training seeds 0-2 these ratios
    were 2.3-3.2 and 6.1-6.9; the 200-sample MC error of such means is a few percent. The
    margins 2x and 3x leave room for that spread and fail for a model whose MI does not
    respond to the new input (ratio near 1) or whose dropout does not sample (MI 0).
    """
    clean, noisy = segmentation_stats
    right = slice(dm.SEG_UNSEEN_FROM, None)
    unseen = float(noisy.mutual_information[..., right].mean())
    seen_elsewhere = float(noisy.mutual_information[..., : dm.SEG_UNSEEN_FROM].mean())
    seen_here = float(clean.mutual_information[..., right].mean())
    assert seen_here > 1e-3  # dropout samples: the clean image has some MI too
    assert unseen > 2.0 * seen_elsewhere
    assert unseen > 3.0 * seen_here
    # mutual information is part of the entropy, never more
    assert bool((noisy.mutual_information <= noisy.entropy + 1e-9).all())
    assert bool((noisy.mutual_information >= -1e-9).all())


def test_segmentation_manifest_declares_per_pixel_classes() -> None:
    doc = _segmentation_manifest()
    size = dm.SEG_SIZE
    assert doc["name"] == dm.SEGMENTATION
    assert doc["task"] == "classification"
    assert doc["input"]["shape"] == [1, size, size]
    assert doc["output"] == {
        "names": ["background", "square", "disc"],
        "shape": [3, size, size],
        "class_axis": 0,
    }
    assert doc["model"]["architecture"] == "fcn"
    assert doc["model"]["config"] == dm.SEGMENTATION_FCN
    assert doc["mc"]["default_samples"] >= 1
    assert f"--only {dm.SEGMENTATION}" in doc["description"]
    assert (SEGMENTATION / doc["model"]["weights"]).stat().st_size < 256 * 1024
    module, _, _ = _segmenter()
    assert module(torch.zeros(2, 1, size, size)).shape == (2, 3, size, size)


def test_shipped_segmentation_loads_through_the_repository() -> None:
    """The manifest schema knows [output] shape / class_axis and the fcn architecture."""
    spec = load_manifest(SEGMENTATION / "model.toml")
    assert spec.model.config == dm.SEGMENTATION_FCN
    assert spec.output_shape == (3, dm.SEG_SIZE, dm.SEG_SIZE)
    assert spec.output.class_axis == 0
    loaded = load_module(spec, SEGMENTATION)
    by_hand, _, _ = _segmenter()
    for key, value in by_hand.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_segmentation_data_labels_the_bright_shapes() -> None:
    x, y = dm.segmentation_data(16, seed=3)
    assert x.shape == (16, 1, dm.SEG_SIZE, dm.SEG_SIZE)
    assert x.dtype == np.float32
    assert y.shape == (16, dm.SEG_SIZE, dm.SEG_SIZE)
    assert set(np.unique(y)) == {0, 1, 2}
    pixels = x[:, 0]
    assert abs(float(pixels[y == 0].mean())) < 0.05  # background: zero-mean noise
    assert float(pixels[y > 0].mean()) > 0.6  # shapes: intensity 0.6..1 plus noise
    again, labels = dm.segmentation_data(16, seed=3)
    assert np.array_equal(again, x)
    assert np.array_equal(labels, y)
    # every image holds a shape: at least a disc of diameter 8 (about pi * 4^2 = 50 pixels)
    assert int((y > 0).sum(axis=(1, 2)).min()) >= 40


def test_noisy_right_quarter_changes_only_that_quarter() -> None:
    x = torch.zeros(2, 1, 8, dm.SEG_SIZE)
    noisy = dm.noisy_right_quarter(x, std=0.5, seed=0)
    assert torch.equal(noisy[..., : dm.SEG_UNSEEN_FROM], x[..., : dm.SEG_UNSEEN_FROM])
    right = noisy[..., dm.SEG_UNSEEN_FROM :]
    assert abs(float(right.std()) - 0.5) < 0.1
    assert torch.equal(dm.noisy_right_quarter(x, std=0.5, seed=0), noisy)
    assert torch.equal(x, torch.zeros_like(x))  # the input is not modified


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


def test_segmentation_regeneration_is_deterministic(tmp_path: Path) -> None:
    first = dm.generate_segmentation(tmp_path / "a", epochs=1)
    second = dm.generate_segmentation(tmp_path / "b", epochs=1)
    other = dm.generate_segmentation(tmp_path / "c", epochs=1, seed=1)
    assert sorted(p.name for p in first.iterdir()) == ["model.toml", "weights.safetensors"]
    for file in ("model.toml", "weights.safetensors"):
        assert (first / file).read_bytes() == (second / file).read_bytes()
    assert (first / "weights.safetensors").read_bytes() != (
        other / "weights.safetensors"
    ).read_bytes()
    assert _segmentation_manifest(first)["output"]["class_axis"] == 0
    module, _, _ = _segmenter(first)
    assert module(torch.zeros(1, 1, dm.SEG_SIZE, dm.SEG_SIZE)).shape == (1, 3, 32, 32)
    assert not list(tmp_path.glob(".segmentation.*"))  # no staging folder left behind


def test_main_generates_segmentation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert dm.GENERATORS[dm.SEGMENTATION] is dm.generate_segmentation
    monkeypatch.setitem(
        dm.GENERATORS, dm.SEGMENTATION, lambda out: dm.generate_segmentation(out, epochs=1)
    )
    digits = tmp_path / "digits.json"
    assert (
        dm.main(["--out", str(tmp_path), "--only", dm.SEGMENTATION, "--test-digits", str(digits)])
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [dm.SEGMENTATION]


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


@pytest.mark.slow
def test_the_served_segmentation_model_is_more_uncertain_where_it_never_saw_data() -> None:
    """Through the engine as served: per-pixel MI in the noisy right quarter (noise it never
    saw in training) above twice the rest of the same images; pixel accuracy on clean ones."""
    from mcdrop.config import Settings
    from mcdrop.model import ServedModel
    from mcdrop.training.demo_models import (
        SEG_HELD_OUT_SEED,
        SEG_UNSEEN_FROM,
        noisy_right_quarter,
        segmentation_data,
    )
    from mcdrop.uncertainty import ClassificationSummary

    model = ServedModel.load(MODELS / "segmentation", Settings(device="cpu"))
    images, labels = segmentation_data(8, seed=SEG_HELD_OUT_SEED)
    clean = model.predict(torch.from_numpy(images).double(), model.options(200, seed=1))
    noisy = model.predict(noisy_right_quarter(images).double(), model.options(200, seed=1))
    assert isinstance(clean, ClassificationSummary)
    assert isinstance(noisy, ClassificationSummary)
    assert noisy.mutual_information.shape == (8, 32, 32)
    accuracy = float((clean.predicted_class == torch.from_numpy(labels)).double().mean())
    assert accuracy > 0.95
    mi = noisy.mutual_information
    unseen = float(mi[..., SEG_UNSEEN_FROM:].mean())
    seen = float(mi[..., :SEG_UNSEEN_FROM].mean())
    assert unseen > 2 * seen, (unseen, seen)
