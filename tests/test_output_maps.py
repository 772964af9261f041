"""Per-element outputs: a segmentation net's per-pixel summaries and regression maps, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mcdrop.engine.accumulators import (
    KEPT_ELEMENTS,
    QUANTILE_SAMPLES,
    quantile_samples,
)
from mcdrop.engine.core import MCEngine, MCOptions
from mcdrop.engine.masks import keep_mask, quantized_drop_probability
from mcdrop.uncertainty import ClassificationSummary, RegressionSummary, entropy

P = 0.3


class PixelClassifier(nn.Module):
    """Images [B, 4, 5, 6] -> Dropout2d -> 1x1 conv -> per-pixel logits [B, 3, 5, 6]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.drop = nn.Dropout2d(P)
        self.conv = nn.Conv2d(4, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.drop(x))  # type: ignore[no-any-return]


def _by_hand_logits(model: PixelClassifier, x: Tensor, seed: int, samples: int) -> Tensor:
    """The logits [B, S, 3, 5, 6] under the engine's keyed channel masks (site 0, row r)."""
    scale = 1.0 / (1.0 - quantized_drop_probability(P))
    rows = list(range(len(x)))
    mask = keep_mask([seed] * len(x), rows, 0, 0, samples, (4, 1, 1), P, x.device, scale)
    dropped = x.double().unsqueeze(1) * mask.double()  # [B, S, 4, 5, 6]
    w = model.conv.weight.detach().double()[:, :, 0, 0]  # [3, 4]
    assert model.conv.bias is not None
    b = model.conv.bias.detach().double()
    return torch.einsum("bsihw,ci->bschw", dropped, w) + b[None, None, :, None, None]


def test_per_pixel_probabilities_are_the_by_hand_softmax_average_over_the_same_masks() -> None:
    model = PixelClassifier()
    x = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    engine = MCEngine(model, task="classification", input_shape=(4, 5, 6), class_axis=0)
    out = engine.run(x, MCOptions(samples=64, seed=7, return_samples=64))
    assert isinstance(out, ClassificationSummary)
    probs = torch.softmax(_by_hand_logits(model, x, 7, 64), dim=2)  # [B, S, C, H, W]
    mean = probs.mean(dim=1)
    assert out.probabilities.shape == (2, 3, 5, 6)
    torch.testing.assert_close(out.probabilities.double(), mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.probabilities_std.double(), probs.std(dim=1), rtol=0, atol=1e-6)
    per_sample_entropy = entropy(probs.movedim(2, -1))  # [B, S, H, W]
    torch.testing.assert_close(out.entropy.double(), entropy(mean.movedim(1, -1)), atol=1e-6,
                               rtol=0)  # fmt: skip
    torch.testing.assert_close(out.expected_entropy.double(), per_sample_entropy.mean(dim=1),
                               atol=1e-6, rtol=0)  # fmt: skip
    assert out.mutual_information.shape == (2, 5, 6)
    assert torch.equal(out.predicted_class, mean.argmax(dim=1))
    votes = torch.nn.functional.one_hot(probs.argmax(dim=2), 3).double().mean(dim=1)  # [B,H,W,C]
    torch.testing.assert_close(out.variation_ratio.double(), 1 - votes.max(dim=-1).values,
                               atol=1e-6, rtol=0)  # fmt: skip
    assert out.samples is not None
    torch.testing.assert_close(out.samples.double(), probs, rtol=0, atol=1e-6)


def test_a_classifier_map_without_its_class_axis_is_refused() -> None:
    with pytest.raises(ValueError, match="class_axis"):
        MCEngine(PixelClassifier(), task="classification", input_shape=(4, 5, 6))
    with pytest.raises(ValueError, match="not an axis"):
        MCEngine(PixelClassifier(), task="classification", input_shape=(4, 5, 6), class_axis=3)


def test_a_negative_class_axis_counts_from_the_end() -> None:
    engine = MCEngine(PixelClassifier(), task="classification", input_shape=(4, 5, 6),
                      class_axis=-3)  # fmt: skip
    out = engine.run(torch.ones(1, 4, 5, 6), MCOptions(samples=16, seed=0))
    assert isinstance(out, ClassificationSummary)
    assert out.probabilities.shape == (1, 3, 5, 6)
    torch.testing.assert_close(
        out.probabilities.sum(dim=1), torch.ones(1, 5, 6, dtype=torch.float64)
    )


class TokenTagger(nn.Module):
    """Tokens [B, 7, 4] -> dropout -> linear -> tag logits [B, 7, 5] (classes last)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(x))  # type: ignore[no-any-return]


def test_per_token_classification_keeps_tokens_apart_and_converges_per_token() -> None:
    engine = MCEngine(TokenTagger(), task="classification", input_shape=(7, 4), class_axis=-1)
    x = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(3))
    out = engine.run(x, MCOptions(samples="auto", tolerance=0.05, seed=1, max_samples=4000))
    assert isinstance(out, ClassificationSummary)
    assert out.probabilities.shape == (3, 7, 5)
    assert out.entropy.shape == out.predicted_class.shape == (3, 7)
    n = out.samples_used
    top = out.probabilities.gather(-1, out.predicted_class.unsqueeze(-1))
    se = out.probabilities_std.gather(-1, out.predicted_class.unsqueeze(-1)) / math.sqrt(n)
    assert bool((se <= 0.05).all()), "auto stopped before every token's top class converged"
    assert bool((top > 0).all())


class DepthMap(nn.Module):
    """Images [B, 2, 4, 4] -> Dropout2d -> 1x1 conv -> a depth map [B, 1, 4, 4]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.drop = nn.Dropout2d(0.25)
        self.conv = nn.Conv2d(2, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.drop(x))  # type: ignore[no-any-return]


def test_a_regression_map_is_summarised_per_pixel_in_its_own_shape() -> None:
    model = DepthMap()
    engine = MCEngine(model, task="regression", input_shape=(2, 4, 4))
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    out = engine.run(x, MCOptions(samples=3000, seed=2, return_samples=5))
    assert isinstance(out, RegressionSummary)
    assert out.mean.shape == out.epistemic_variance.shape == (2, 1, 4, 4)
    assert out.samples is not None
    assert out.samples.shape == (2, 5, 1, 4, 4)
    assert out.gaussian_intervals[0.95].lower.shape == (2, 1, 4, 4)
    assert out.empirical_intervals[0.95].upper.shape == (2, 1, 4, 4)
    # closed form: y = b + Σ_c a_c m_c / (1-p), a_c = w_c x_c: Var = p/(1-p) Σ_c a_c² per pixel;
    # a sum of two-point terms has excess kurtosis κ = (1-6pq)/(pq) Σa⁴/(Σa²)² (q = 1-p)
    p, q = 0.25, 0.75
    w = model.conv.weight.detach().double()[0, :, 0, 0]
    a2 = w[None, :, None, None] ** 2 * x.double() ** 2  # [B, 2, 4, 4]
    var = p / q * a2.sum(dim=1, keepdim=True)
    kappa = (1 - 6 * p * q) / (p * q) * (a2**2).sum(dim=1, keepdim=True) / a2.sum(1, True) ** 2
    tol = 4 * (2 / 2999 + kappa / 3000).sqrt()  # 4 sigma of one 3000-sample variance
    ratio = out.epistemic_variance.double() / var
    assert bool(((ratio - 1).abs() <= tol).all()), (ratio, tol)


def test_kept_samples_are_capped_per_row_so_a_large_map_keeps_none() -> None:
    """Empirical intervals keep samples x elements per row: capped at KEPT_ELEMENTS, and a map
    that cannot keep MIN_EMPIRICAL_SAMPLES of them gets Gaussian intervals only."""
    assert quantile_samples(1) == QUANTILE_SAMPLES
    assert quantile_samples(4 * 4) == QUANTILE_SAMPLES
    assert quantile_samples(KEPT_ELEMENTS // 300) == 300
    assert quantile_samples(256 * 256) == 0
    engine = MCEngine(DepthMapBig(), task="regression", input_shape=(1, 256, 256))
    out = engine.run(torch.ones(1, 1, 256, 256), MCOptions(samples=1000, seed=0))
    assert isinstance(out, RegressionSummary)
    assert out.mean.shape == (1, 1, 256, 256)
    assert out.gaussian_intervals[0.95].lower.shape == (1, 1, 256, 256)
    assert out.empirical_intervals == {}
    assert out.samples is None


class DepthMapBig(nn.Module):
    """[B, 1, 256, 256] -> Dropout2d over 4 channels -> a map [B, 1, 256, 256]."""

    def __init__(self) -> None:
        super().__init__()
        self.lift = nn.Conv2d(1, 4, 1)
        self.drop = nn.Dropout2d(0.3)
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.drop(self.lift(x)))  # type: ignore[no-any-return]
