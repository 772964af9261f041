"""Evaluation metrics for regression and classification (pure tensor math, no I/O).

Shapes: B rows, D regression outputs, T Monte Carlo samples, C classes. Summary metrics
return Python floats; per-row quantities return tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _as_2d(values: Tensor) -> Tensor:
    """[B] -> [B, 1]; [B, D] unchanged."""
    return values.unsqueeze(-1) if values.dim() == 1 else values


def _same_shape(name: str, a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")


# --- regression ---------------------------------------------------------------------------


def rmse(mean: Tensor, y: Tensor) -> float:
    """Root mean squared error of `mean` against targets y ([B] or [B, D]), over all entries."""
    _same_shape("rmse", mean, y)
    return float((mean.double() - y.double()).square().mean().sqrt())


def mc_mixture_log_likelihood(samples: Tensor, y: Tensor, tau: float | Tensor) -> Tensor:
    """Log density of y under the MC mixture of Gaussians N(yhat_t, 1/tau), per row: [B].

    samples [B, T, D] (or [B, T] for one output), y [B, D] (or [B]); tau a float or a tensor
    broadcastable to samples (per-sample precisions of a heteroscedastic head). With D
    outputs the components are independent Gaussians over the D outputs. For scalar tau:
    logsumexp_t(-tau/2 (y - yhat_t)^2) - log T - log(2 pi)/2 + log(tau)/2 (Gal & Ghahramani).
    """
    if samples.dim() == 2:
        samples = samples.unsqueeze(-1)
    if samples.dim() != 3:
        raise ValueError(f"samples must be [B, T, D] or [B, T], got {tuple(samples.shape)}")
    y = _as_2d(y)
    if y.shape != (samples.shape[0], samples.shape[2]):
        raise ValueError(
            f"targets {tuple(y.shape)} do not match samples {tuple(samples.shape)} ([B, T, D])"
        )
    samples = samples.double()
    precision = torch.as_tensor(tau, dtype=torch.float64, device=samples.device)
    if bool((precision <= 0).any()):
        raise ValueError("tau (precision) must be positive")
    precision = precision.expand_as(samples)
    squared = (y.double().unsqueeze(1) - samples).square()
    per_sample = (0.5 * precision.log() - 0.5 * precision * squared).sum(dim=-1)  # [B, T]
    n_samples, n_outputs = samples.shape[1], samples.shape[2]
    return (
        torch.logsumexp(per_sample, dim=1)
        - math.log(n_samples)
        - 0.5 * n_outputs * math.log(2.0 * math.pi)
    )


def mean_log_likelihood(per_row: Tensor) -> float:
    """Average test log-likelihood from per-row log densities [B] (e.g. the engine's)."""
    if per_row.numel() == 0:
        raise ValueError("mean_log_likelihood of no rows")
    return float(per_row.double().mean())


def interval_coverage(lower: Tensor, upper: Tensor, y: Tensor) -> float:
    """Fraction of targets inside their closed interval [lower, upper] (all same shape)."""
    _same_shape("interval_coverage", lower, y)
    _same_shape("interval_coverage", upper, y)
    return float(((y >= lower) & (y <= upper)).double().mean())


# --- classification -----------------------------------------------------------------------


def _check_classes(probs: Tensor, y: Tensor) -> Tensor:
    if probs.dim() != 2 or y.shape != probs.shape[:1]:
        raise ValueError(
            f"expected probabilities [B, C] and labels [B], got {tuple(probs.shape)} "
            f"and {tuple(y.shape)}"
        )
    labels = y.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= probs.shape[1]):
        raise ValueError(f"labels must lie in 0..{probs.shape[1] - 1}")
    return labels


def accuracy(probs: Tensor, y: Tensor) -> float:
    """Fraction of rows whose most probable class (probs [B, C]) equals the label y [B]."""
    labels = _check_classes(probs, y)
    return float((probs.argmax(dim=1) == labels).double().mean())


def nll(probs: Tensor, y: Tensor, eps: float = 1e-12) -> float:
    """Mean negative log probability of the true class; probabilities clamped at eps."""
    labels = _check_classes(probs, y)
    picked = probs.double().gather(1, labels.unsqueeze(1)).squeeze(1)
    return float(-picked.clamp_min(eps).log().mean())


def brier(probs: Tensor, y: Tensor) -> float:
    """Multi-class Brier score: mean over rows of sum_c (p_c - onehot(y)_c)^2, in [0, 2]."""
    labels = _check_classes(probs, y)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return float((probs.double() - onehot).square().sum(dim=1).mean())


@dataclass(frozen=True)
class CalibrationBins:
    """Reliability-diagram data over equal-width confidence bins ([bins] tensors).

    Bin b holds confidences in (edges[b], edges[b+1]] (the first also holds 0). Empty bins
    have count 0 and confidence = accuracy = 0.
    """

    edges: Tensor  # [bins + 1]
    count: Tensor  # [bins], int64
    confidence: Tensor  # [bins], mean top-class probability in the bin
    accuracy: Tensor  # [bins], fraction correct in the bin


def calibration_bins(probs: Tensor, y: Tensor, bins: int = 15) -> CalibrationBins:
    """Bin rows by top-class confidence (probs [B, C], labels [B]) into equal-width bins."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    labels = _check_classes(probs, y)
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == labels).double()
    edges = torch.arange(bins + 1, dtype=torch.float64, device=confidence.device) / bins
    index = torch.bucketize(confidence, edges[1:-1])
    count = torch.zeros(bins, dtype=torch.int64, device=confidence.device)
    count.index_add_(0, index, torch.ones_like(index))
    conf_sum = torch.zeros(bins, dtype=torch.float64, device=confidence.device)
    conf_sum.index_add_(0, index, confidence)
    correct_sum = torch.zeros(bins, dtype=torch.float64, device=confidence.device)
    correct_sum.index_add_(0, index, correct)
    denominator = count.clamp_min(1).double()
    return CalibrationBins(
        edges=edges,
        count=count,
        confidence=conf_sum / denominator,
        accuracy=correct_sum / denominator,
    )


def expected_calibration_error(probs: Tensor, y: Tensor, bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of (n_b / N) |accuracy_b - confidence_b|."""
    binned = calibration_bins(probs, y, bins)
    total = int(binned.count.sum())
    if total == 0:
        raise ValueError("expected_calibration_error of no rows")
    gaps = (binned.accuracy - binned.confidence).abs()
    return float((binned.count.double() * gaps).sum() / total)
