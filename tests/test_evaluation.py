"""evaluate(): metrics of fixed-weight models whose answers are computed here by hand."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from mcdrop import scoring
from mcdrop.engine.core import MCEngine, MCOptions
from mcdrop.errors import InvalidInput
from mcdrop.evaluation import (
    ClassificationMetrics,
    RegressionMetrics,
    batch_seed,
    evaluate,
    shape_rows,
)
from mcdrop.model import ServedModel
from mcdrop.repository.manifest import ModelSpec
from mcdrop.uncertainty import RegressionSummary

Z95 = 1.959963984540054


class Exact(nn.Module):
    """out = x @ W^T + b exactly: its dropout feeds a branch multiplied by zero.

    The engine needs a stochastic op to accept the model; this one cannot change the output,
    so every MC sample is the same and the metrics have closed forms.
    """

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        self.dropout = nn.Dropout(0.5)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.linear(x) + 0.0 * self.dropout(x).sum(dim=-1, keepdim=True)
        return out


def served(
    module: nn.Module,
    *,
    task: str = "regression",
    outputs: int = 1,
    inputs: int = 2,
    tau: float | None = None,
    heteroscedastic: bool = False,
    max_rows: int = 1024,
    target: tuple[float, float] | None = None,  # (mean, std) target normalisation
) -> ServedModel:
    """A ServedModel around `module` without a folder (the spec only describes it)."""
    document: dict[str, Any] = {
        "name": "exact",
        "task": task,
        "input": {"shape": [inputs]},
        "output": {"names": [str(k) for k in range(outputs)], "heteroscedastic": heteroscedastic},
        "model": {"format": "entrypoint", "entrypoint": "tests.test_evaluation:Exact"},
        "mc": {"tau": tau, "max_rows": max_rows},
    }
    if target is not None:
        document["normalization"] = {"target_mean": [target[0]], "target_std": [target[1]]}
    spec = ModelSpec.model_validate(document)
    scale = shift = None
    if target is not None:
        shift, scale = torch.tensor([target[0]]), torch.tensor([target[1]])
    engine = MCEngine(
        module,
        task="classification" if task == "classification" else "regression",
        input_shape=(inputs,),
        heteroscedastic=heteroscedastic,
        tau=tau,
        device="cpu",
        output_scale=scale,
        output_shift=shift,
    )
    return ServedModel(spec, Path("."), engine, None, None)


W = torch.tensor([[1.0, -2.0]])
B = torch.tensor([0.5])


def _line(rows: int = 50, noise: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """Rows x [N, 2], exact means [N] and noisy targets [N] (seeded)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 2, generator=gen, dtype=torch.float64)
    mean = (x @ W.double().T + B.double())[:, 0]
    return x, mean, mean + noise * torch.randn(rows, generator=gen, dtype=torch.float64)


def _gaussian_loglik(y: Tensor, mean: Tensor, var: float) -> float:
    return float((-0.5 * math.log(2 * math.pi * var) - (y - mean) ** 2 / (2 * var)).mean())


# --- regression -----------------------------------------------------------------------------


def test_regression_metrics_match_the_closed_forms() -> None:
    x, mean, y = _line()
    model = served(Exact(W, B), tau=4.0)  # noise std 0.5
    report = evaluate(model, x, y, MCOptions(samples=256, seed=3))
    m = report.metrics
    assert isinstance(m, RegressionMetrics)
    assert (report.rows, report.samples, report.seed, report.task) == (50, 256, 3, "regression")
    assert m.rmse == pytest.approx(float((y - mean).square().mean().sqrt()), rel=1e-6)
    assert m.log_likelihood == pytest.approx(_gaussian_loglik(y, mean, 0.25), rel=1e-6)
    assert m.log_likelihood_note is None
    inside = ((y - mean).abs() <= Z95 * 0.5).double().mean()
    assert m.coverage_gaussian_95 == pytest.approx(float(inside))
    assert 0.0 < m.coverage_gaussian_95 < 1.0
    assert m.coverage_empirical_95 == pytest.approx(m.coverage_gaussian_95, abs=0.1)
    assert m.mean_std == pytest.approx(0.5)
    assert m.mean_epistemic_std == pytest.approx(0.0, abs=1e-6)
    assert m.mean_aleatoric_std == pytest.approx(0.5)


def test_heteroscedastic_head_and_target_units() -> None:
    # out = [x @ w + b, log 0.0625]; raw = 2 * out + 1, raw noise variance 4 * 0.0625 = 0.25
    weight = torch.cat([W / 2, torch.zeros(1, 2)])
    bias = torch.tensor([(0.5 - 1.0) / 2, math.log(0.0625)])
    x, mean, y = _line()
    model = served(Exact(weight, bias), heteroscedastic=True, target=(1.0, 2.0))
    m = evaluate(model, x, y, MCOptions(samples=8, seed=0)).metrics
    assert isinstance(m, RegressionMetrics)
    assert m.rmse == pytest.approx(float((y - mean).square().mean().sqrt()), rel=1e-6)
    assert m.log_likelihood == pytest.approx(_gaussian_loglik(y, mean, 0.25), rel=1e-6)
    assert m.mean_aleatoric_std == pytest.approx(0.5, rel=1e-6)


def test_without_a_noise_model_the_log_likelihood_is_none_with_a_reason() -> None:
    x, _, y = _line(rows=10)
    m = evaluate(served(Exact(W, B)), x, y, MCOptions(samples=4, seed=0)).metrics
    assert isinstance(m, RegressionMetrics)
    assert m.log_likelihood is None
    assert m.log_likelihood_note is not None
    assert "tau" in m.log_likelihood_note
    assert m.mean_std == pytest.approx(0.0, abs=1e-6)
    assert m.coverage_gaussian_95 == 0.0  # zero-width intervals around the exact line


def test_batches_of_max_rows_cover_every_row() -> None:
    x, _, y = _line(rows=23)
    whole = evaluate(served(Exact(W, B), tau=4.0), x, y, MCOptions(samples=4, seed=0))
    batched = evaluate(served(Exact(W, B), tau=4.0, max_rows=5), x, y, MCOptions(4, seed=0))
    assert batched.rows == 23
    # the empirical intervals add seeded noise draws, which differ between batch seeds
    ours, theirs = batched.metrics, whole.metrics
    assert isinstance(ours, RegressionMetrics)
    assert isinstance(theirs, RegressionMetrics)
    assert replace(ours, coverage_empirical_95=0.0) == replace(theirs, coverage_empirical_95=0.0)


def test_random_model_is_reproducible_and_batches_draw_different_masks() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    model = served(net, tau=4.0, max_rows=4)
    x = torch.ones(8, 2, dtype=torch.float64)  # two batches of four identical rows
    y = torch.zeros(8)
    first = evaluate(model, x, y, MCOptions(samples=4, seed=7))
    assert evaluate(model, x, y, MCOptions(samples=4, seed=7)) == first
    assert evaluate(model, x, y, MCOptions(samples=4, seed=8)) != first
    batches = [model.predict(x[:4], MCOptions(samples=4, seed=batch_seed(7, k))) for k in (0, 1)]
    assert isinstance(batches[0], RegressionSummary)
    assert isinstance(batches[1], RegressionSummary)
    assert not torch.equal(batches[0].mean, batches[1].mean)
    assert batch_seed(7, 0) == 7  # one batch reproduces predict() with the same seed
    assert batch_seed(7, 1) != batch_seed(7, 2)
    assert all(0 <= batch_seed(s, k) < 2**63 for s in (0, 2**63 - 1) for k in (0, 5))


def test_no_seed_draws_one_and_reports_it() -> None:
    x, _, y = _line(rows=6)
    model = served(Exact(W, B), tau=4.0)
    report = evaluate(model, x, y, MCOptions(samples=4))
    again = evaluate(model, x, y, MCOptions(samples=4, seed=report.seed))
    assert again.metrics == report.metrics


def test_bad_targets_are_refused() -> None:
    x, _, y = _line(rows=6)
    model = served(Exact(W, B), tau=4.0)
    with pytest.raises(InvalidInput, match="5 rows, but the input has 6"):
        evaluate(model, x, y[:5], MCOptions(samples=2, seed=0))
    with pytest.raises(InvalidInput, match="1 value"):
        evaluate(model, x, torch.zeros(6, 2), MCOptions(samples=2, seed=0))
    with pytest.raises(InvalidInput, match="no rows"):
        evaluate(model, x[:0], y[:0], MCOptions(samples=2, seed=0))


# --- classification -------------------------------------------------------------------------


def test_classification_metrics_match_direct_computation() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(3, 2, generator=gen)
    bias = torch.tensor([0.1, -0.2, 0.0])
    x = torch.randn(40, 2, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (40,), generator=gen)
    model = served(Exact(weight, bias), task="classification", outputs=3)
    report = evaluate(model, x, labels.double().unsqueeze(1), MCOptions(samples=8, seed=0))
    m = report.metrics
    assert isinstance(m, ClassificationMetrics)
    probs = torch.softmax((x @ weight.double().T + bias.double()), dim=1)
    assert m.accuracy == pytest.approx(float((probs.argmax(1) == labels).double().mean()))
    assert 0.0 < m.accuracy < 1.0
    picked = probs[torch.arange(40), labels]
    assert m.nll == pytest.approx(float(-picked.log().mean()), rel=1e-5)
    onehot = nn.functional.one_hot(labels, 3).double()
    assert m.brier == pytest.approx(float((probs - onehot).square().sum(1).mean()), rel=1e-5)
    assert m.ece == pytest.approx(scoring.expected_calibration_error(probs, labels), abs=1e-6)
    entropy = -(probs * probs.log()).sum(1)
    assert m.mean_entropy == pytest.approx(float(entropy.mean()), rel=1e-5)
    assert m.mean_mutual_information == pytest.approx(0.0, abs=1e-6)
    assert sum(m.calibration.count) == 40
    assert len(m.calibration.edges) == len(m.calibration.count) + 1


def test_bad_class_labels_are_refused() -> None:
    model = served(Exact(torch.eye(2), torch.zeros(2)), task="classification", outputs=2)
    x = torch.zeros(3, 2)
    for bad in ([0.0, 1.0, 2.0], [0.0, 0.5, 1.0], [0.0, -1.0, 1.0]):
        with pytest.raises(InvalidInput, match=r"integers in 0\.\.1"):
            evaluate(model, x, torch.tensor(bad), MCOptions(samples=2, seed=0))


def test_report_is_json_serialisable() -> None:
    model = served(Exact(torch.eye(2), torch.zeros(2)), task="classification", outputs=2)
    report = evaluate(model, torch.eye(2), torch.tensor([0, 1]), MCOptions(samples=2, seed=0))
    data = json.loads(json.dumps(report.as_dict()))
    assert data["task"] == "classification"
    assert data["metrics"]["accuracy"] == 1.0
    assert data["metrics"]["calibration"]["count"][-1] == 0


def test_flat_rows_are_shaped_to_the_input() -> None:
    spec = ModelSpec.model_validate(
        {
            "name": "img",
            "task": "classification",
            "input": {"shape": [1, 2, 2]},
            "output": {"names": ["a", "b"]},
            "model": {"format": "builtin", "architecture": "cnn"},
        }
    )
    model = ServedModel(spec, Path("."), served(Exact(W, B)).engine, None, None)
    assert shape_rows(model, torch.zeros(3, 4)).shape == (3, 1, 2, 2)
    assert shape_rows(model, torch.zeros(3, 5)).shape == (3, 5)  # left for predict to refuse
