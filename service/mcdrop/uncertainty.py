"""Uncertainty summaries from streamed Monte Carlo moments (pure tensor math, no I/O).

Shapes: B rows, D regression outputs, C classes, K kept samples.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from statistics import NormalDist

import torch
from torch import Tensor

_NORMAL = NormalDist()


def gaussian_quantile(level: float) -> float:
    """z such that a central interval mean ± z·std holds `level` of a Gaussian."""
    return _NORMAL.inv_cdf(0.5 + level / 2.0)


def validate_levels(levels: tuple[float, ...]) -> tuple[float, ...]:
    """Reject interval levels outside (0, 1); returns them sorted and de-duplicated.

    A level so close to 1 that its upper tail 0.5 + level / 2 rounds to 1.0 has no finite
    Gaussian quantile, so it is refused too (0.9999999999999999 is; 0.999999999999999 is not).
    """
    for level in levels:
        if not 0.0 < level < 1.0 or math.isnan(level):
            raise ValueError(f"interval level {level} must lie strictly between 0 and 1")
        if 0.5 + level / 2.0 >= 1.0:
            raise ValueError(f"interval level {level} is too close to 1 for a finite interval")
    return tuple(sorted(set(levels)))


@dataclass(frozen=True)
class Interval:
    """A central interval per row and output: lower, upper with shape [B, D]."""

    lower: Tensor
    upper: Tensor


@dataclass(frozen=True)
class RegressionSummary:
    """Predictive distribution per row and output ([B, D] tensors, raw target units)."""

    mean: Tensor
    epistemic_variance: Tensor
    aleatoric_variance: Tensor
    samples_used: int
    seed: int
    gaussian_intervals: dict[float, Interval] = field(default_factory=dict)
    empirical_intervals: dict[float, Interval] = field(default_factory=dict)
    samples: Tensor | None = None  # [B, K, D]
    log_likelihood: Tensor | None = None  # [B], MC-mixture log density of given targets

    @property
    def variance(self) -> Tensor:
        """Total predictive variance: epistemic + aleatoric."""
        return self.epistemic_variance + self.aleatoric_variance

    @property
    def std(self) -> Tensor:
        """Total predictive standard deviation."""
        return self.variance.sqrt()


@dataclass(frozen=True)
class ClassificationSummary:
    """Predictive class distribution per row ([B, C] or [B] tensors), or per element of a map
    (probabilities [B, C, H, W] with class_axis 1, the measures [B, H, W])."""

    probabilities: Tensor
    probabilities_std: Tensor
    entropy: Tensor
    expected_entropy: Tensor
    variation_ratio: Tensor
    samples_used: int
    seed: int
    samples: Tensor | None = None  # [B, K, C] per-sample probabilities
    class_axis: int = -1  # of probabilities: the classes ([B, C]: -1; [B, C, H, W]: 1)

    @property
    def predicted_class(self) -> Tensor:
        """Index of the most probable class under the averaged probabilities, [B] (or per
        element: [B, H, W])."""
        return self.probabilities.argmax(dim=self.class_axis)

    @property
    def mutual_information(self) -> Tensor:
        """Epistemic part of the entropy (BALD): entropy of the mean minus mean entropy, [B]."""
        return (self.entropy - self.expected_entropy).clamp_min(0.0)


Summary = RegressionSummary | ClassificationSummary


@dataclass(frozen=True)
class NonFinite:
    """Where a summary first holds NaN or inf: the field, its rows, its last-axis indices."""

    field: str  # e.g. "mean", "gaussian_intervals[0.95].lower", "log_likelihood"
    rows: list[int]  # request rows with a non-finite value in this field
    columns: list[int]  # indices on the last axis ([B, D]: outputs, [B, C]: classes); [] for [B]


def first_non_finite(summary: Summary) -> NonFinite | None:
    """The first field (in declaration order) holding NaN or inf, or None when all are finite."""
    for f in dataclasses.fields(summary):
        value = getattr(summary, f.name)
        tensors: list[tuple[str, Tensor]] = []
        if isinstance(value, Tensor):
            tensors = [(f.name, value)]
        elif isinstance(value, dict):
            for level in sorted(value):
                bounds = value[level]
                tensors += [(f"{f.name}[{level}].lower", bounds.lower),
                            (f"{f.name}[{level}].upper", bounds.upper)]  # fmt: skip
        for name, tensor in tensors:
            found = _non_finite(name, tensor)
            if found is not None:
                return found
    return None


def _non_finite(name: str, values: Tensor) -> NonFinite | None:
    """The rows (first axis) and last-axis indices of values [B, ...] that are NaN or inf."""
    bad = ~torch.isfinite(values)
    if not bool(bad.any()):
        return None
    rows = bad.reshape(bad.shape[0] if bad.dim() else 1, -1).any(dim=1).nonzero().flatten()
    columns: list[int] = []
    if values.dim() >= 2:
        columns = bad.reshape(-1, values.shape[-1]).any(dim=0).nonzero().flatten().tolist()
    return NonFinite(name, rows.tolist(), columns)


def rows_of(summary: Summary, rows: slice, seed: int) -> Summary:
    """The summary of some rows (views, no copies), reporting `seed`."""
    changes: dict[str, object] = {"seed": seed}
    for f in dataclasses.fields(summary):
        value = getattr(summary, f.name)
        if isinstance(value, Tensor):
            changes[f.name] = value[rows]
        elif isinstance(value, dict):
            changes[f.name] = {k: Interval(v.lower[rows], v.upper[rows]) for k, v in value.items()}
    return dataclasses.replace(summary, **changes)  # type: ignore[arg-type]


def shaped(summary: RegressionSummary, shape: tuple[int, ...]) -> RegressionSummary:
    """A regression summary of flat outputs [B, F] as maps [B, *shape] (samples [B, K, *shape])."""
    changes: dict[str, object] = {}
    for f in dataclasses.fields(summary):
        value = getattr(summary, f.name)
        if f.name == "samples" and isinstance(value, Tensor):
            changes[f.name] = value.reshape(*value.shape[:2], *shape)
        elif f.name == "log_likelihood":
            continue
        elif isinstance(value, Tensor):
            changes[f.name] = value.reshape(len(value), *shape)
        elif isinstance(value, dict):
            changes[f.name] = {k: Interval(v.lower.reshape(len(v.lower), *shape),
                                           v.upper.reshape(len(v.upper), *shape))
                               for k, v in value.items()}  # fmt: skip
    return dataclasses.replace(summary, **changes)  # type: ignore[arg-type]


def classes_in_place(summary: ClassificationSummary, class_axis: int) -> ClassificationSummary:
    """Per-element probabilities [B, *rest, C] (samples [B, K, *rest, C]) with the class axis
    moved back to where the model has it (class_axis of the per-row shape)."""
    samples = summary.samples
    return dataclasses.replace(
        summary,
        class_axis=1 + class_axis,
        probabilities=summary.probabilities.movedim(-1, 1 + class_axis),
        probabilities_std=summary.probabilities_std.movedim(-1, 1 + class_axis),
        samples=None if samples is None else samples.movedim(-1, 2 + class_axis),
    )


MAP_MEASURES = ("entropy", "expected_entropy", "mutual_information", "variation_ratio")


def is_map(summary: Summary) -> bool:
    """Whether a summary is per element (pixel, token) rather than one answer per row."""
    if isinstance(summary, ClassificationSummary):
        return summary.class_axis != -1
    return summary.mean.dim() > 2


def map_reductions(summary: Summary) -> dict[str, Tensor]:
    """What users read alongside a map: each measure's mean over the map, [B]; for a
    classifier also per predicted class region ([B, C]: the measure's mean over the elements
    predicted as that class, 0 where none is) and the region sizes (class_elements [B, C])."""
    if isinstance(summary, RegressionSummary):
        return {f"{name}_map_mean": getattr(summary, name).flatten(1).mean(dim=1)
                for name in ("mean", "epistemic_variance", "aleatoric_variance")}  # fmt: skip
    classes = summary.probabilities.shape[summary.class_axis]
    predicted = summary.predicted_class.flatten(1)  # [B, E]
    regions = torch.nn.functional.one_hot(predicted, classes).to(torch.float64)  # [B, E, C]
    sizes = regions.sum(dim=1)  # [B, C]
    out = {"class_elements": sizes}
    for name in MAP_MEASURES:
        values = getattr(summary, name).flatten(1).to(torch.float64)  # [B, E]
        out[f"{name}_map_mean"] = values.mean(dim=1)
        totals = torch.einsum("be,bec->bc", values, regions)
        out[f"{name}_by_class"] = totals / sizes.clamp_min(1)  # 0 for an empty region
    return out


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats over the last dimension, with 0·log 0 = 0."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)


def classification_features(logits: Tensor) -> Tensor:
    """Per-sample features whose means make the classification summary.

    logits [..., C] -> [..., 2C+1]: softmax probabilities, their entropy, one-hot argmax.
    """
    probs = torch.softmax(logits, dim=-1)
    votes = torch.nn.functional.one_hot(probs.argmax(dim=-1), probs.shape[-1]).to(probs.dtype)
    return torch.cat([probs, entropy(probs).unsqueeze(-1), votes], dim=-1)


def summarize_classification(
    mean: Tensor, variance: Tensor, samples_used: int, seed: int, samples: Tensor | None
) -> ClassificationSummary:
    """Classification summary from the mean/variance of classification_features, [B, 2C+1]."""
    n_classes = (mean.shape[-1] - 1) // 2
    probs = mean[..., :n_classes]
    votes = mean[..., n_classes + 1 :]
    return ClassificationSummary(
        probabilities=probs,
        probabilities_std=variance[..., :n_classes].clamp_min(0.0).sqrt(),
        entropy=entropy(probs),
        expected_entropy=mean[..., n_classes],
        variation_ratio=(1.0 - votes.max(dim=-1).values).clamp_min(0.0),
        samples_used=samples_used,
        seed=seed,
        samples=None if samples is None else samples[..., :n_classes],
    )


def summarize_regression(
    mean: Tensor,
    epistemic: Tensor,
    aleatoric: Tensor,
    samples_used: int,
    seed: int,
    levels: tuple[float, ...],
    samples: Tensor | None = None,
    kept: Tensor | None = None,
    kept_aleatoric: Tensor | None = None,
    log_likelihood: Tensor | None = None,
) -> RegressionSummary:
    """Regression summary from the sample mean [B, D], its variance and the aleatoric part.

    kept [B, K, D] are samples 0 .. K-1 of the means for empirical intervals (kept_aleatoric
    [B, K, D] their predicted variances, else `aleatoric` is the noise); samples [B, K', >=D]
    the ones returned to the caller.
    """
    empirical = {}
    if kept is not None:
        noise_std = kept_aleatoric.sqrt() if kept_aleatoric is not None else aleatoric.sqrt()
        empirical = empirical_intervals(kept, noise_std, levels, seed)
    d = mean.shape[1]
    return RegressionSummary(
        mean=mean,
        epistemic_variance=epistemic,
        aleatoric_variance=aleatoric,
        samples_used=samples_used,
        seed=seed,
        gaussian_intervals=gaussian_intervals(mean, epistemic + aleatoric, levels),
        empirical_intervals=empirical,
        samples=None if samples is None else samples[..., :d],
        log_likelihood=log_likelihood,
    )


def gaussian_intervals(
    mean: Tensor, variance: Tensor, levels: tuple[float, ...]
) -> dict[float, Interval]:
    """Central Gaussian intervals mean ± z·sqrt(variance) for each level."""
    std = variance.clamp_min(0.0).sqrt()
    out = {}
    for level in levels:
        z = gaussian_quantile(level)
        out[level] = Interval(mean - z * std, mean + z * std)
    return out


def empirical_intervals(
    samples: Tensor, aleatoric_std: Tensor, levels: tuple[float, ...], seed: int
) -> dict[float, Interval]:
    """Central intervals from quantiles of kept samples [B, K, D] of the predictive.

    Aleatoric noise (std [B, D] or [B, K, D]) is added to each kept sample from a
    seeded generator so the quantiles describe the total predictive, not only the mean's.
    """
    if samples.shape[1] == 0 or not levels:
        return {}
    draws = samples
    if bool((aleatoric_std > 0).any()):
        gen = torch.Generator(device=samples.device).manual_seed(seed ^ 0x5EED)
        noise = torch.randn(
            samples.shape, generator=gen, dtype=samples.dtype, device=samples.device
        )
        std = aleatoric_std if aleatoric_std.dim() == 3 else aleatoric_std.unsqueeze(1)
        draws = samples + noise * std
    out = {}
    for level in levels:
        q = torch.tensor([0.5 - level / 2.0, 0.5 + level / 2.0], dtype=draws.dtype)
        bounds = torch.quantile(draws, q.to(draws.device), dim=1)
        out[level] = Interval(bounds[0], bounds[1])
    return out
