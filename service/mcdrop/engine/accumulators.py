"""Per-run streaming state: per-sample features, their moments, kept samples, log-likelihood."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mcdrop.engine.streaming import StreamingLogMeanExp, StreamingMoments
from mcdrop.uncertainty import (
    ClassificationSummary,
    RegressionSummary,
    classes_in_place,
    classification_features,
    shaped,
    summarize_classification,
    summarize_regression,
)

QUANTILE_SAMPLES = 4096  # kept per row for empirical intervals; the moments use every sample
# Kept samples cost samples x output elements per row: a map keeps fewer (KEPT_ELEMENTS per row,
# 16 MiB of float64), and one that cannot keep MIN_EMPIRICAL_SAMPLES gets Gaussian intervals only.
KEPT_ELEMENTS = 2**21
MIN_EMPIRICAL_SAMPLES = 256


def quantile_samples(elements: int) -> int:
    """Samples kept per row for empirical intervals of `elements` outputs (0: none)."""
    keep = min(QUANTILE_SAMPLES, KEPT_ELEMENTS // max(elements, 1))
    return keep if keep >= MIN_EMPIRICAL_SAMPLES else 0


# A heteroscedastic head's log-variance is clamped to +-LOG_VARIANCE_BOUND, and its variance in
# raw units capped at MAX_VARIANCE = e^300 (~1.9e130), so finite inputs give finite answers.
# Why 300: float64 overflows past e^709.78, and the streaming moments square the variance
# feature (sum2 ~ S*V^2, sum1*sum1 ~ (S*V)^2), so 2*300 + 2*ln(S) < 709 holds for S up to ~7e23
# samples; the Gaussian intervals need only sqrt(V). The floor e^-300 keeps log(variance) in the
# log-likelihood finite. Neither bound moves a meaningful answer (a std of 1e65 says "unknown").
LOG_VARIANCE_BOUND = 300.0
MAX_VARIANCE = math.exp(LOG_VARIANCE_BOUND)


@dataclass(frozen=True)
class OutputHead:
    """How a network's outputs become per-sample features, in raw target units.

    shape is the model's output per row; a classifier's classes lie on class_axis (of shape),
    and its summary is per element of the other axes (per pixel, per token).
    """

    task: Literal["regression", "classification"]
    heteroscedastic: bool = False  # regression: outputs are [means..., log-variances...]
    tau: float | None = None  # regression: precision, aleatoric variance 1/tau
    scale: Tensor | None = None  # regression: raw = output * scale + shift (flat, or broadcast)
    shift: Tensor | None = None
    shape: tuple[int, ...] = ()  # per row; () = a flat vector of whatever length
    class_axis: int = 0  # classification: index into shape

    @property
    def classes_last(self) -> tuple[int, ...]:
        """A classifier's per-row shape with the class axis moved last: (*elements, C)."""
        if not self.shape:
            return ()
        rest = [d for i, d in enumerate(self.shape) if i != self.class_axis]
        return (*rest, self.shape[self.class_axis])

    def elements(self) -> int:
        """Output values per row and sample (0 when the shape is not known)."""
        return math.prod(self.shape) if self.shape else 0


class Accumulators:
    """Per-run streaming state: moments of per-sample features, kept samples, log-likelihood.

    Regression keeps the first samples of each row for empirical intervals only when
    `intervals` is set (some request asked for interval levels).
    """

    def __init__(
        self,
        head: OutputHead,
        rows: int,
        max_samples: int,
        returned: int,
        targets: Tensor | None,
        device: torch.device,
        start: int = 0,
        intervals: bool = True,
    ) -> None:
        self.head = head
        self.start = start  # first sample index fed in: 0, or a shard's first sample
        quantiles = 0
        if head.task == "regression" and intervals:
            quantiles = quantile_samples(head.elements()) if head.shape else QUANTILE_SAMPLES
        self.keep = min(max_samples, max(returned, quantiles))
        self.kept: Tensor | None = None
        self.kept_aleatoric: Tensor | None = None
        self.moments: StreamingMoments | None = None
        self._final: tuple[Tensor, Tensor] | None = None  # mean and variance once sampling ended
        self.rows = rows
        self.targets = None if targets is None else targets.to(device, torch.float64)
        self.loglik = StreamingLogMeanExp(rows, device) if targets is not None else None

    def _features(self, out: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-sample features [R, S, F] and, for regression, per-sample variance or None."""
        out = out.to(torch.float64)
        head = self.head
        if head.task == "classification":
            if len(head.shape) > 1:  # per element: [R, S, *shape] -> [R, S, *rest, C] -> flat
                maps = out.view(*out.shape[:2], *head.shape).movedim(2 + head.class_axis, -1)
                return classification_features(maps).flatten(2), None
            return classification_features(out), None
        d = out.shape[-1] // 2 if head.heteroscedastic else out.shape[-1]
        mean = out[..., :d]
        var = self._variance(out[..., d:]) if head.heteroscedastic else None
        if head.scale is not None:
            mean = mean * head.scale
        if head.shift is not None:
            mean = mean + head.shift
        return (mean if var is None else torch.cat([mean, var], -1)), var

    def _variance(self, log_var: Tensor) -> Tensor:
        """A heteroscedastic head's variance in raw units, bounded (see LOG_VARIANCE_BOUND).

        Unclamped values are bit-identical to exp(log_var) * scale**2; NaN stays NaN.
        """
        var = log_var.clamp(-LOG_VARIANCE_BOUND, LOG_VARIANCE_BOUND).exp()
        if self.head.scale is not None:
            var = (var * self.head.scale**2).clamp(max=MAX_VARIANCE)
        return var

    def update(self, rows: slice, first: int, out: Tensor, total: int) -> None:
        feats, var = self._features(out)
        if self.moments is None:
            self.moments = StreamingMoments(self.rows, feats.shape[-1], feats.device, self.start)
        self.moments.update(rows, first, feats, total)
        if self.keep and first < self.keep:
            self._keep_samples(rows, first, feats, var)
        if self.loglik is not None and self.targets is not None:
            d = self.targets.shape[-1]
            mu = feats[..., :d]
            var_t = var if var is not None else torch.full_like(mu, 1.0 / float(self.head.tau or 1))
            y = self.targets[rows].unsqueeze(1)
            ll = (-0.5 * (torch.log(2 * math.pi * var_t) + (y - mu) ** 2 / var_t)).sum(-1)
            self.loglik.update(rows, first, ll, total)

    def _keep_samples(self, rows: slice, first: int, feats: Tensor, var: Tensor | None) -> None:
        if self.kept is None:
            self.kept = feats.new_zeros((self.rows, self.keep, feats.shape[-1]))
            if var is not None:
                self.kept_aleatoric = feats.new_zeros((self.rows, self.keep, var.shape[-1]))
        take = min(self.keep - first, feats.shape[1])
        self.kept[rows, first : first + take] = feats[:, :take]
        if var is not None and self.kept_aleatoric is not None:
            self.kept_aleatoric[rows, first : first + take] = var[:, :take]

    def converged(self, tolerance: float) -> bool:
        """Every standard error (of each regression mean, or of the top-class probability) small."""
        assert self.moments is not None
        n = self.moments.count.unsqueeze(1).to(torch.float64)
        se = (self.moments.variance / n).sqrt()
        if self.head.task == "regression":
            d = se.shape[1] // 2 if self.head.heteroscedastic else se.shape[1]
            return bool((se[:, :d] <= tolerance).all())
        classes = self.head.classes_last[-1] if self.head.shape else (se.shape[1] - 1) // 2
        se = se.view(len(se), -1, 2 * classes + 1)[..., :classes]  # [R, elements, C]
        mean = self.moments.mean.view(len(se), -1, 2 * classes + 1)[..., :classes]
        top = mean.argmax(dim=-1, keepdim=True)
        return bool((se.gather(-1, top) <= tolerance).all())

    def summary(
        self, rows: slice, n: int, seed: int, levels: tuple[float, ...], returned: int
    ) -> RegressionSummary | ClassificationSummary:
        """The summary of one request's rows after n samples."""
        assert self.moments is not None
        if self._final is None:  # every request of the batch reads its rows of one computation
            self._final = (self.moments.mean, self.moments.variance)
        kept = None if self.kept is None else self.kept[rows, : min(n, self.keep)]
        kept_aleatoric = None
        if kept is not None and self.kept_aleatoric is not None:
            kept_aleatoric = self.kept_aleatoric[rows, : kept.shape[1]]
        return summarize(
            self.head,
            self._final[0][rows],
            self._final[1][rows],
            n,
            seed,
            levels,
            returned,
            kept,
            kept_aleatoric,
            None if self.loglik is None else self.loglik.value[rows],
        )


def summarize(
    head: OutputHead,
    mean: Tensor,
    var: Tensor,
    n: int,
    seed: int,
    levels: tuple[float, ...],
    returned: int,
    kept: Tensor | None = None,
    kept_aleatoric: Tensor | None = None,
    log_likelihood: Tensor | None = None,
) -> RegressionSummary | ClassificationSummary:
    """The summary from feature moments mean, var [B, F] of n samples.

    kept [B, K, F] holds samples 0 .. K-1 (kept_aleatoric [B, K, D] their predicted variances);
    log_likelihood [B] is the MC-mixture log density of the targets, when given.
    """
    samples = None if kept is None or not returned else kept[:, :returned]
    if head.task == "classification":
        if len(head.shape) <= 1:
            return summarize_classification(mean, var, n, seed, samples)
        per_element = (*head.classes_last[:-1], -1)  # [B, F] -> [B, *rest, 2C+1]
        return classes_in_place(
            summarize_classification(
                mean.view(len(mean), *per_element), var.view(len(var), *per_element), n, seed,
                None if samples is None else samples.view(*samples.shape[:2], *per_element),
            ),
            head.class_axis,
        )  # fmt: skip
    d = mean.shape[1] // 2 if head.heteroscedastic else mean.shape[1]
    if head.heteroscedastic:
        aleatoric = mean[:, d:]
    elif head.tau is not None:
        aleatoric = torch.full_like(mean[:, :d], 1.0 / head.tau)
    else:
        aleatoric = torch.zeros_like(mean[:, :d])
    kept_means = None if kept is None else kept[..., :d]
    flat = summarize_regression(
        mean[:, :d], var[:, :d], aleatoric, n, seed, levels, samples, kept_means, kept_aleatoric,
        log_likelihood,
    )  # fmt: skip
    return flat if len(head.shape) <= 1 else shaped(flat, head.shape)
