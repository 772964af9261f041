"""Score a served model on held-out rows through the MC engine (no I/O; the CLI and HTTP use it).

Regression: RMSE of the MC mean, the MC-mixture test log-likelihood, coverage of the 95%
intervals and the mean predictive std. Classification: accuracy, NLL, Brier, ECE, mean
entropy and mutual information, and the reliability-diagram bins.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mcdrop import scoring
from mcdrop.engine.core import MCOptions
from mcdrop.errors import InvalidInput
from mcdrop.model import ServedModel
from mcdrop.uncertainty import ClassificationSummary, RegressionSummary

LEVEL = 0.95  # the interval whose coverage is reported
CALIBRATION_BINS = 15


@dataclass(frozen=True)
class RegressionMetrics:
    """Regression scores in raw target units (means over rows and outputs)."""

    rmse: float
    log_likelihood: float | None  # mean over rows of the MC-mixture log density
    log_likelihood_note: str | None  # why log_likelihood is None
    coverage_gaussian_95: float  # fraction of targets inside mean ± 1.96 total std
    coverage_empirical_95: float  # fraction inside the central 95% of predictive draws
    mean_std: float  # total predictive std
    mean_epistemic_std: float
    mean_aleatoric_std: float


@dataclass(frozen=True)
class CalibrationTable:
    """Reliability-diagram bins: confidence in (edges[b], edges[b+1]]."""

    edges: list[float]
    count: list[int]
    confidence: list[float]
    accuracy: list[float]


@dataclass(frozen=True)
class ClassificationMetrics:
    """Classification scores of the MC-averaged probabilities (means over rows)."""

    accuracy: float
    nll: float
    brier: float
    ece: float
    mean_entropy: float
    mean_mutual_information: float
    calibration: CalibrationTable


@dataclass(frozen=True)
class EvaluationReport:
    """What `evaluate` measured, and with which model, rows, samples and seed."""

    model: str
    version: str
    task: str
    rows: int
    samples: int  # MC samples per row (the largest over batches with samples="auto")
    seed: int  # reruns with this seed reproduce the report
    metrics: RegressionMetrics | ClassificationMetrics

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (plain numbers, strings, lists, None)."""
        return dataclasses.asdict(self)


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch `batch` of a run seeded with `seed`: the seed itself for the first
    batch (so one batch reproduces `predict` with that seed), a mixed one for the others."""
    if batch == 0:
        return seed
    state = np.random.SeedSequence([seed, batch]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) % 2**63


def shape_rows(model: ServedModel, x: Tensor) -> Tensor:
    """Flat table rows [N, prod(shape)] -> [N, *input.shape]; other shapes pass unchanged."""
    shape = tuple(model.spec.input.shape)
    if x.dim() == 2 and len(shape) > 1 and x.shape[1] == math.prod(shape):
        return x.reshape(len(x), *shape)
    return x


def evaluate(model: ServedModel, x: Tensor, y: Tensor, options: MCOptions) -> EvaluationReport:
    """Score rows x [N, *input.shape] (raw) against targets y ([N] or [N, D]; class indices).

    Rows run in batches of the model's mc.max_rows; batch k > 0 uses a seed derived from
    (options.seed, k), so batches never share masks.
    """
    x = shape_rows(model, x)
    if len(x) == 0:
        raise InvalidInput("input: no rows to evaluate")
    if y.shape[0] != x.shape[0]:
        raise InvalidInput(f"targets: {y.shape[0]} rows, but the input has {x.shape[0]}")
    regression = model.spec.task == "regression"
    targets = _targets(model, y) if regression else _labels(model, y)
    seed = secrets.randbits(63) if options.seed is None else options.seed
    levels = tuple(sorted({*options.interval_levels, LEVEL}))
    step = model.spec.mc.max_rows
    summaries = []
    for k, start in enumerate(range(0, len(x), step)):
        opts = dataclasses.replace(options, seed=batch_seed(seed, k), interval_levels=levels)
        rows = x[start : start + step]
        with_targets = regression and _likelihood_note(model) is None
        batch_targets = targets[start : start + step] if with_targets else None
        summaries.append(model.predict(rows, opts, targets=batch_targets))
    metrics: RegressionMetrics | ClassificationMetrics
    if regression:
        reg = [s for s in summaries if isinstance(s, RegressionSummary)]
        metrics = _regression_metrics(_likelihood_note(model), reg, targets)
    else:
        cls = [s for s in summaries if isinstance(s, ClassificationSummary)]
        metrics = _classification_metrics(cls, targets)
    return EvaluationReport(
        model=model.spec.name,
        version=model.spec.version,
        task=model.spec.task,
        rows=len(x),
        samples=max(s.samples_used for s in summaries),
        seed=seed,
        metrics=metrics,
    )


def _likelihood_note(model: ServedModel) -> str | None:
    """Why the log-likelihood cannot be computed for this model, or None when it can."""
    if model.spec.output.heteroscedastic or model.spec.mc.tau is not None:
        return None
    return "needs mc.tau in the manifest or a heteroscedastic head (no noise model)"


def _targets(model: ServedModel, y: Tensor) -> Tensor:
    """Regression targets as [N, D] float64, D the model's outputs."""
    y = y.to(torch.float64)
    y = y.unsqueeze(1) if y.dim() == 1 else y
    if y.dim() != 2 or y.shape[1] != model.spec.n_outputs:
        raise InvalidInput(
            f"targets: expected {model.spec.n_outputs} value(s) per row, got shape {list(y.shape)}"
        )
    return y


def _labels(model: ServedModel, y: Tensor) -> Tensor:
    """Class indices [N] (int64) in 0..C-1, from [N] or [N, 1]."""
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    n_classes = model.spec.n_outputs
    if y.dim() != 1:
        raise InvalidInput(f"targets: expected one class index per row, got shape {list(y.shape)}")
    if bool((y != y.round()).any()) or bool((y < 0).any()) or bool((y >= n_classes).any()):
        raise InvalidInput(f"targets: class indices must be integers in 0..{n_classes - 1}")
    return y.long()


def _regression_metrics(
    note: str | None, summaries: list[RegressionSummary], targets: Tensor
) -> RegressionMetrics:
    mean = torch.cat([s.mean for s in summaries]).cpu()
    std = torch.cat([s.std for s in summaries]).cpu()
    gaussian = [s.gaussian_intervals[LEVEL] for s in summaries]
    empirical = [s.empirical_intervals[LEVEL] for s in summaries]

    def coverage(intervals: list[Any]) -> float:
        lower = torch.cat([i.lower for i in intervals]).cpu()
        upper = torch.cat([i.upper for i in intervals]).cpu()
        return scoring.interval_coverage(lower, upper, targets)

    loglik = None
    if note is None:
        per_row = [s.log_likelihood for s in summaries if s.log_likelihood is not None]
        loglik = scoring.mean_log_likelihood(torch.cat(per_row).cpu())
    return RegressionMetrics(
        rmse=scoring.rmse(mean, targets),
        log_likelihood=loglik,
        log_likelihood_note=note,
        coverage_gaussian_95=coverage(gaussian),
        coverage_empirical_95=coverage(empirical),
        mean_std=float(std.mean()),
        mean_epistemic_std=_mean_sqrt([s.epistemic_variance for s in summaries]),
        mean_aleatoric_std=_mean_sqrt([s.aleatoric_variance for s in summaries]),
    )


def _mean_sqrt(variances: list[Tensor]) -> float:
    return float(torch.cat(variances).clamp_min(0.0).sqrt().mean())


def _classification_metrics(
    summaries: list[ClassificationSummary], labels: Tensor
) -> ClassificationMetrics:
    probs = torch.cat([s.probabilities for s in summaries]).cpu().double()
    bins = scoring.calibration_bins(probs, labels, CALIBRATION_BINS)
    return ClassificationMetrics(
        accuracy=scoring.accuracy(probs, labels),
        nll=scoring.nll(probs, labels),
        brier=scoring.brier(probs, labels),
        ece=scoring.expected_calibration_error(probs, labels, CALIBRATION_BINS),
        mean_entropy=float(torch.cat([s.entropy for s in summaries]).mean()),
        mean_mutual_information=float(torch.cat([s.mutual_information for s in summaries]).mean()),
        calibration=CalibrationTable(
            edges=bins.edges.tolist(),
            count=bins.count.tolist(),
            confidence=bins.confidence.tolist(),
            accuracy=bins.accuracy.tolist(),
        ),
    )
