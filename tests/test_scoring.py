"""Evaluation metrics against hand-computed values on tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch

from mcdrop.engine.core import MCEngine, MCOptions
from mcdrop.scoring import (
    accuracy,
    brier,
    calibration_bins,
    expected_calibration_error,
    interval_coverage,
    mc_mixture_log_likelihood,
    mean_log_likelihood,
    nll,
    rmse,
)
from mcdrop.uncertainty import RegressionSummary

LOG_2PI = math.log(2 * math.pi)


def test_rmse_by_hand() -> None:
    assert rmse(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 5.0])) == pytest.approx(
        math.sqrt(4 / 3)
    )
    with pytest.raises(ValueError, match="differ"):
        rmse(torch.zeros(3), torch.zeros(3, 1))


def test_mixture_of_one_sample_is_the_gaussian_log_density() -> None:
    samples = torch.tensor([[0.5], [2.0]], dtype=torch.float64).unsqueeze(-1)  # [B=2, T=1, D=1]
    y = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    tau = 4.0
    normal = torch.distributions.Normal(samples[:, 0, 0], tau**-0.5)
    expected = normal.log_prob(y[:, 0])  # type: ignore[no-untyped-call]
    torch.testing.assert_close(
        mc_mixture_log_likelihood(samples, y, tau), expected, rtol=0, atol=1e-12
    )


def test_mixture_of_two_samples_by_hand() -> None:
    # components at 0 and 1, y = 0, tau = 2: log(0.5 (N(0; 0, 1/2) + N(0; 1, 1/2)))
    samples = torch.tensor([[0.0, 1.0]])  # [B=1, T=2], one output
    y = torch.tensor([0.0])
    density = 0.5 * (math.sqrt(2 / (2 * math.pi)) * (1 + math.exp(-1.0)))
    result = mc_mixture_log_likelihood(samples, y, 2.0)
    assert result.shape == (1,)
    assert float(result[0]) == pytest.approx(math.log(density), abs=1e-12)
    # the README's formula, term by term
    terms = torch.tensor([0.0, -1.0], dtype=torch.float64)  # -tau/2 (y - yhat)^2
    formula = torch.logsumexp(terms, 0) - math.log(2) - LOG_2PI / 2 + math.log(2.0) / 2
    assert float(result[0]) == pytest.approx(float(formula), abs=1e-12)


def test_mixture_over_two_outputs_adds_independent_log_densities() -> None:
    samples = torch.tensor([[[0.0, 3.0]]])  # [B=1, T=1, D=2]
    y = torch.tensor([[1.0, 1.0]])
    expected = (-0.5 * 1.0 - LOG_2PI / 2) + (-0.5 * 4.0 - LOG_2PI / 2)
    assert float(mc_mixture_log_likelihood(samples, y, 1.0)[0]) == pytest.approx(expected)


def test_mixture_with_per_sample_precision_matches_scalar_when_constant() -> None:
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(5, 7, 2, generator=gen)
    y = torch.randn(5, 2, generator=gen)
    scalar = mc_mixture_log_likelihood(samples, y, 3.0)
    tensor = mc_mixture_log_likelihood(samples, y, torch.full((5, 7, 2), 3.0))
    torch.testing.assert_close(scalar, tensor)


def test_mixture_rejects_bad_shapes_and_precision() -> None:
    with pytest.raises(ValueError, match="do not match samples"):
        mc_mixture_log_likelihood(torch.zeros(2, 3, 1), torch.zeros(3, 1), 1.0)
    with pytest.raises(ValueError, match="must be positive"):
        mc_mixture_log_likelihood(torch.zeros(2, 3, 1), torch.zeros(2, 1), 0.0)


def test_mean_log_likelihood() -> None:
    assert mean_log_likelihood(torch.tensor([-1.0, -2.0, -4.5])) == pytest.approx(-2.5)
    with pytest.raises(ValueError, match="no rows"):
        mean_log_likelihood(torch.zeros(0))


def test_interval_coverage_counts_closed_intervals() -> None:
    lower = torch.tensor([0.0, 0.0, 0.0, 0.0])
    upper = torch.tensor([1.0, 1.0, 1.0, 1.0])
    y = torch.tensor([0.0, 0.5, 1.0, 1.5])  # both ends count as inside
    assert interval_coverage(lower, upper, y) == pytest.approx(0.75)


PROBS = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.55, 0.45]])
LABELS = torch.tensor([0, 1, 1, 0])  # right, wrong, right, right


def test_accuracy_nll_brier_by_hand() -> None:
    assert accuracy(PROBS, LABELS) == pytest.approx(0.75)
    expected_nll = -(math.log(0.9) + math.log(0.2) + math.log(0.6) + math.log(0.55)) / 4
    assert nll(PROBS, LABELS) == pytest.approx(expected_nll)
    # per row: 2 * (1 - p_true)^2 for two classes
    expected_brier = (2 * 0.1**2 + 2 * 0.8**2 + 2 * 0.4**2 + 2 * 0.45**2) / 4
    assert brier(PROBS, LABELS) == pytest.approx(expected_brier)


def test_brier_sums_over_all_classes() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    assert brier(probs, torch.tensor([1])) == pytest.approx(0.25 + 0.49 + 0.04)


def test_nll_clamps_zero_probability() -> None:
    assert nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == pytest.approx(-math.log(1e-12))


def test_classification_metrics_check_labels() -> None:
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1"):
        accuracy(PROBS, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="expected probabilities"):
        brier(PROBS, torch.tensor([0, 1]))


def test_ece_with_one_sample_per_bin() -> None:
    # confidences 0.9, 0.8, 0.6, 0.55 fall in four different bins of width 1/15
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.6) + abs(1 - 0.55)) / 4
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(expected)


def test_ece_with_shared_bins() -> None:
    # two bins: everything is in (0.5, 1]; accuracy 3/4, mean confidence 0.7125
    assert expected_calibration_error(PROBS, LABELS, bins=2) == pytest.approx(0.75 - 0.7125)


def test_calibration_bins_edges_counts_and_means() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.7, 0.3, 0.0], [0.2, 0.8, 0.0], [0.95, 0.05, 0.0]])
    labels = torch.tensor([1, 0, 0, 0])  # wrong, right, wrong, right
    binned = calibration_bins(probs, labels, bins=4)
    torch.testing.assert_close(binned.edges, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]).double())
    # 0.5 is the upper edge of bin 1 (bins are (lo, hi]); 0.7 -> bin 2; 0.8, 0.95 -> bin 3
    assert binned.count.tolist() == [0, 1, 1, 2]
    torch.testing.assert_close(binned.confidence, torch.tensor([0.0, 0.5, 0.7, 0.875]).double())
    torch.testing.assert_close(binned.accuracy, torch.tensor([0.0, 0.0, 1.0, 0.5]).double())
    expected_ece = (1 * 0.5 + 1 * 0.3 + 2 * 0.375) / 4
    assert expected_calibration_error(probs, labels, bins=4) == pytest.approx(expected_ece)


def test_perfectly_calibrated_bins_have_zero_ece() -> None:
    probs = torch.tensor([[0.75, 0.25]] * 4)
    labels = torch.tensor([0, 0, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 1"):
        calibration_bins(probs, labels, bins=0)


def test_engine_log_likelihood_matches_the_reference_formula() -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Dropout(0.3), torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )
    scale, shift = torch.tensor([2.0, 0.5]), torch.tensor([1.0, -3.0])
    engine = MCEngine(
        module, task="regression", input_shape=(3,), tau=2.5, output_scale=scale, output_shift=shift
    )
    x = torch.randn(5, 3)
    y = torch.randn(5, 2) + shift
    samples = 64
    options = MCOptions(samples=samples, seed=7, return_samples=samples)
    summary = engine.run(x, options, targets=y)
    assert isinstance(summary, RegressionSummary)
    assert summary.samples is not None
    assert summary.samples.shape == (5, samples, 2)
    assert summary.log_likelihood is not None
    expected = mc_mixture_log_likelihood(summary.samples, y, 2.5)
    torch.testing.assert_close(summary.log_likelihood.double(), expected, rtol=1e-9, atol=1e-9)
