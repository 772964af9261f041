"""Concrete dropout: the relaxed mask, the entropy term, and rates that learn."""

from __future__ import annotations

import math

import pytest
import torch

from mcdrop.training.concrete import concrete_keep, entropy_penalty
from mcdrop.training.stacked import StackedData, StackedMLP, train_stacked


def test_relaxed_mask_is_nearly_bernoulli_at_low_temperature() -> None:
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(200_000, generator=gen)
    keep = concrete_keep(torch.tensor(0.3), u, temperature=0.1)
    assert bool(((keep >= 0) & (keep <= 1)).all())
    assert float((keep > 0.5).float().mean()) == pytest.approx(0.7, abs=0.005)
    soft = concrete_keep(torch.tensor(0.3), u, temperature=1.0)

    def middling(k: torch.Tensor) -> float:
        return float(((k > 0.05) & (k < 0.95)).float().mean())

    assert middling(keep) < 0.15 < 0.8 < middling(soft)  # low temperature: mostly 0 or 1
    # u = 1 - p sits exactly on the boundary: keep = 0.5
    assert float(concrete_keep(torch.tensor(0.3), torch.tensor(0.7))) == pytest.approx(
        0.5, abs=1e-5
    )


def test_rate_gets_a_gradient_through_the_mask() -> None:
    p = torch.tensor(0.2, requires_grad=True)
    noise = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(concrete_keep(p, noise).sum(), [p])
    assert float(grad) < 0  # a higher drop rate keeps less


def test_entropy_penalty_by_hand() -> None:
    p = torch.tensor([0.5, 0.1])
    expected = [-math.log(2), 0.1 * math.log(0.1) + 0.9 * math.log(0.9)]
    torch.testing.assert_close(entropy_penalty(p), torch.tensor(expected))


def test_concrete_penalty_by_hand() -> None:
    """prior * ||W||^2 / (1 - p) + scale * K * (p log p + (1 - p) log(1 - p)) per layer."""
    rates = torch.tensor([[0.1]], dtype=torch.float64)
    model = StackedMLP([torch.full((1, 4, 1), 0.5)], [torch.zeros(1, 1, 1)], rates, concrete=True)
    got = model.penalty(torch.tensor([2.0]), torch.tensor([3.0]))
    expected = 2.0 * 1.0 / 0.9 + 3.0 * 4 * (0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    assert float(got.detach()) == pytest.approx(expected, rel=1e-5)


def test_learned_rate_rises_with_little_data_and_falls_with_much() -> None:
    """The entropy term (weight 1 / (N tau)) pulls p towards 0.5; the data term pulls it
    down. Network 0 has a strong prior (tiny N tau), network 1 a weak one."""
    torch.manual_seed(0)
    x = torch.randn(256, 2)
    y = (x[:, :1] - 2 * x[:, 1:]).tanh()
    data = StackedData(
        x[None], y[None], torch.zeros(2, dtype=torch.long), torch.arange(256)[None].repeat(2, 1)
    )
    rates = torch.full((2, 2), 0.1, dtype=torch.float64)
    n_tau = torch.tensor([0.5, 1e5], dtype=torch.float64)
    model = train_stacked(
        lambda: StackedMLP.glorot([2, 16, 1], rates, concrete=True),
        data,
        1e-4 / (2 * n_tau),
        1 / n_tau,
        epochs=60,
        batch_size=64,
        lr=1e-2,
        progress=False,
    )
    learned = model.rates().detach()
    assert bool((learned[0] > 0.2).all())
    assert bool((learned[1] < 0.1).all())
    served = model.network(1)  # ordinary dropout at the learned rates
    drops = [m.p for m in served if isinstance(m, torch.nn.Dropout)]
    assert drops == pytest.approx(learned[1].tolist())
