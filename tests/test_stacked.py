"""The stacked trainer: equal to train_regressor at M = 1, independent networks at M > 1."""

from __future__ import annotations

import torch
from torch import Tensor

from mcdrop.repository.architectures import build_mlp
from mcdrop.training.recipe import TrainConfig, train_regressor, weight_decay
from mcdrop.training.stacked import StackedData, StackedMLP, train_stacked


def _data(rows: int = 50, features: int = 3) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(rows, features, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.1 * torch.randn(
        rows, generator=gen, dtype=torch.float64
    )
    return x, 3.0 + 2.0 * y


def _standardised(v: Tensor) -> Tensor:
    return ((v - v.mean(0)) / v.std(0, correction=0)).float()


def _linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def test_one_stacked_network_trains_exactly_like_train_regressor() -> None:
    x, y = _data()
    config = TrainConfig(tau=2.0, hidden=[8], dropout=0.1, epochs=6, batch_size=16, seed=3)
    reference = train_regressor(x, y, config, progress=False)
    arch = reference.architecture_config
    rates = torch.tensor([[0.1, 0.1]], dtype=torch.float64)
    data = StackedData(
        x=_standardised(x)[None],
        y=_standardised(y[:, None])[None],
        group=torch.zeros(1, dtype=torch.long),
        rows=torch.arange(len(x))[None],
    )
    prior = torch.tensor([weight_decay(1e-2, 0.0, len(x), 2.0)], dtype=torch.float64)
    stacked = train_stacked(
        lambda: StackedMLP.from_modules([build_mlp(**arch)], rates, exact_masks=True),
        data,
        prior,
        torch.zeros(1, dtype=torch.float64),
        epochs=6,
        batch_size=16,
        seed=3,
        progress=False,
        fused_adam=False,
    )
    before = StackedMLP.from_modules([build_mlp(**arch)], rates)  # unseeded: differs
    for mine, theirs in zip(_linears(stacked.network(0)), _linears(reference.module), strict=True):
        torch.testing.assert_close(mine.weight, theirs.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.bias, theirs.bias, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before.weights[0], stacked.weights[0])


def test_each_stacked_network_is_independent_of_its_neighbours() -> None:
    """Network 0 trained beside others equals network 0 trained alone (no dropout: masks
    come from one shared RNG stream, so only the deterministic recipe can match)."""
    x, y = _data()
    xs, ys = _standardised(x), _standardised(y[:, None])
    rows = torch.stack([torch.arange(0, 40), torch.arange(10, 50), torch.arange(5, 45)])
    data = StackedData(xs[None], ys[None], torch.zeros(3, dtype=torch.long), rows)
    prior = torch.tensor([1e-3, 1e-1, 1.0], dtype=torch.float64)
    rates = torch.zeros(3, 2, dtype=torch.float64)

    torch.manual_seed(11)
    init = StackedMLP.glorot([3, 8, 1], rates)

    def build(models: int) -> StackedMLP:
        weights = [w[:models] for w in init.weights]
        biases = [b[:models] for b in init.biases]
        return StackedMLP(weights, biases, rates[:models], concrete=False)

    kwargs = {"epochs": 5, "batch_size": 16, "progress": False}
    together = train_stacked(lambda: build(3), data, prior, torch.zeros(3), **kwargs)  # type: ignore[arg-type]
    alone_data = StackedData(xs[None], ys[None], torch.zeros(1, dtype=torch.long), rows[:1])
    alone = train_stacked(lambda: build(1), alone_data, prior[:1], torch.zeros(1), **kwargs)  # type: ignore[arg-type]
    torch.testing.assert_close(together.weights[0][:1], alone.weights[0], rtol=1e-5, atol=1e-6)
    # a larger weight decay really shrinks the weights of its own network only
    norms = together.weights[0].square().sum(dim=(1, 2))
    assert norms[2] < norms[0]


def test_network_export_is_the_stacked_network_without_dropout() -> None:
    torch.manual_seed(0)
    rates = torch.tensor([[0.2, 0.3], [0.05, 0.1]], dtype=torch.float64)
    stacked = StackedMLP.glorot([3, 5, 1], rates)
    torch.nn.init.normal_(stacked.biases[0])
    x = torch.randn(2, 4, 3)
    expected = stacked(x, sample=False)
    for i in range(2):
        net = stacked.network(i)
        drops = [m.p for m in net if isinstance(m, torch.nn.Dropout)]
        assert drops == rates[i].tolist()
        torch.testing.assert_close(net(x[i]), expected[i])


def test_dropout_rates_apply_per_network() -> None:
    """Network 0 drops nothing, network 1 drops half its inputs (scaling kept ones by 2)."""
    rates = torch.tensor([[0.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    stacked = StackedMLP.glorot([400, 1], rates[:, :1])
    with torch.no_grad():
        stacked.weights[0].fill_(1.0)
    out = stacked(torch.ones(2, 1, 400))
    assert out[0].item() == 400.0
    assert 300 < out[1].item() < 500
    assert out[1].item() % 2 == 0
