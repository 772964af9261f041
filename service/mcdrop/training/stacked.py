"""Many dropout MLPs trained side by side as one batched model (weights stacked [M, in, out]).

A grid search over dropout rate x tau x split is M small independent networks; running
them as one model with torch.baddbmm turns M tiny matrix products into one. Each network
has its own rows, minibatch order, dropout rates and weight-decay coefficients; the loss is
the sum of the M losses, so every gradient stays per network, and Adam, being elementwise,
equals M independent Adams. With M = 1 this is `mcdrop.training.recipe.train_regressor`'s recipe
step for step (tests/test_stacked.py checks the weights agree).
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from mcdrop.repository.architectures import build_mlp
from mcdrop.training.concrete import concrete_keep, entropy_penalty

Runs = list[tuple[int, int, float]]


def _runs(rates: Tensor) -> Runs:
    """Contiguous (start, end, p) runs of equal rates [M]: one bernoulli_ call per run."""
    runs: Runs = []
    start = 0
    values = rates.tolist()
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            runs.append((start, i, float(values[start])))
            start = i
    return runs


def quantized(rates: Tensor) -> Tensor:
    """Drop rates as the 16-bit masks realise them: round(p * 2^16) / 2^16."""
    return (rates * 65536).round() / 65536


class StackedMLP(nn.Module):
    """M ReLU MLPs [M, B, in] -> [M, B, out], dropout before every Linear layer.

    rates [M, L] (float64) are the dropout rates before each of the L Linear layers (column 0:
    the inputs). With `concrete` they only initialise learned logits (Concrete dropout).
    Masks are 16-bit draws like the engine's; `exact_masks` uses nn.Dropout's own bernoulli_
    steps instead, so that one network reproduces train_regressor bit for bit.
    """

    fixed_rates: Tensor
    thresholds: Tensor
    scales: Tensor

    def __init__(
        self,
        weights: Sequence[Tensor],
        biases: Sequence[Tensor],
        rates: Tensor,
        concrete: bool,
        exact_masks: bool = False,
    ) -> None:
        super().__init__()
        if rates.shape != (weights[0].shape[0], len(weights)):
            raise ValueError(f"rates must be [models, layers], got {list(rates.shape)}")
        self.weights = nn.ParameterList([nn.Parameter(w.detach().clone()) for w in weights])
        self.biases = nn.ParameterList([nn.Parameter(b.detach().clone()) for b in biases])
        self.concrete = concrete
        self.temperature = 0.1
        self.register_buffer("fixed_rates", rates.to(torch.float64).clone())
        self.logits = nn.Parameter(torch.logit(rates.to(torch.float32)), requires_grad=concrete)
        self.exact_masks = exact_masks
        self._runs = [_runs(rates[:, layer]) for layer in range(rates.shape[1])]
        thresholds = (rates * 65536).round() - 32768  # the engine's 16-bit drop thresholds
        self.register_buffer("thresholds", thresholds.to(torch.int32))
        self.register_buffer("scales", (1 / (1 - quantized(rates))).to(torch.float32))

    @classmethod
    def glorot(cls, sizes: Sequence[int], rates: Tensor, concrete: bool = False) -> StackedMLP:
        """Keras's defaults: Glorot-uniform weights, zero biases; layer widths `sizes`."""
        models = rates.shape[0]
        weights, biases = [], []
        for fan_in, fan_out in itertools.pairwise(sizes):
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            weights.append(torch.empty(models, fan_in, fan_out).uniform_(-limit, limit))
            biases.append(torch.zeros(models, 1, fan_out))
        return cls(weights, biases, rates, concrete)

    @classmethod
    def from_modules(
        cls, modules: Sequence[nn.Sequential], rates: Tensor, exact_masks: bool = False
    ) -> StackedMLP:
        """Stack build_mlp networks of one shape (their Linear layers in order)."""
        linears = [[m for m in module if isinstance(m, nn.Linear)] for module in modules]
        weights = [torch.stack([ls[i].weight.T for ls in linears]) for i in range(len(linears[0]))]
        biases = [torch.stack([ls[i].bias[None] for ls in linears]) for i in range(len(linears[0]))]
        return cls(weights, biases, rates, concrete=False, exact_masks=exact_masks)

    @property
    def models(self) -> int:
        return int(self.weights[0].shape[0])

    def rates(self) -> Tensor:
        """Dropout rates [M, L]: the fixed ones, or the learned sigmoid(logits)."""
        if self.concrete:
            return torch.sigmoid(self.logits)
        return self.fixed_rates

    def forward(self, x: Tensor, sample: bool = True) -> Tensor:
        """x [M, B, in] -> [M, B, out]; `sample` draws dropout masks (else the plain network)."""
        p = self.rates()
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if sample:
                x = self._drop(x, layer, p[:, layer])
            x = torch.baddbmm(b, x, w)
            if layer < last:
                x = torch.relu(x)
        return x

    def _drop(self, x: Tensor, layer: int, p: Tensor) -> Tensor:
        if self.concrete:
            p = p.view(-1, 1, 1)
            return x * concrete_keep(p, torch.rand_like(x), self.temperature) / (1 - p)
        if not self.exact_masks:
            scale = self.scales[:, layer].view(-1, 1, 1)
            return x * torch.where(self._keep(x.shape, layer), scale, 0.0)
        # nn.Dropout's own steps (bernoulli_(1 - p), div_(1 - p), multiply) per run of equal p
        noise = torch.empty_like(x)
        for start, end, rate in self._runs[layer]:
            if rate == 0:
                noise[start:end].fill_(1.0)
                continue
            noise[start:end].bernoulli_(1 - rate)
            noise[start:end].div_(1 - rate)
        return x * noise

    def _keep(self, shape: torch.Size, layer: int) -> Tensor:
        """Keep-mask [M, B, K]: 16 random bits per element against the model's threshold.

        Four elements per 64-bit draw, about six times faster than bernoulli_ on the CPU; the
        rate is quantised to 1/65536 exactly as the serving engine quantises it.
        """
        models, rest = shape[0], math.prod(shape[1:])
        words = -(-rest // 4)
        bits = torch.empty(models, words, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        values = bits.view(torch.int16)[:, :rest].view(shape)
        return values >= self.thresholds[:, layer].view(-1, 1, 1)

    def penalty(self, prior: Tensor, entropy_scale: Tensor) -> Tensor:
        """Regulariser per model [M]: prior[M] (l^2 / 2 N tau) weights each ||W||^2 by (1 - p),
        or with Concrete by 1 / (1 - p), plus entropy_scale * K * (p log p + (1-p) log(1-p))."""
        prior, entropy_scale = prior.float(), entropy_scale.float()
        p = self.rates().float()
        total = torch.zeros_like(prior)
        for layer, w in enumerate(self.weights):
            squares = w.square().sum(dim=(1, 2))
            if self.concrete:
                total = total + prior * squares / (1 - p[:, layer])
                fan_in = w.shape[1]
                total = total + entropy_scale * fan_in * entropy_penalty(p[:, layer])
            else:
                total = total + prior * (1 - p[:, layer]) * squares
        return total

    def with_fixed_rates(self) -> StackedMLP:
        """A copy whose dropout rates are today's rates (learned ones included), in eval mode."""
        rates = self.rates().detach().to(torch.float64)
        return StackedMLP(list(self.weights), list(self.biases), rates, concrete=False).eval()

    def network(self, index: int) -> nn.Sequential:
        """Model `index` as an ordinary build_mlp network (nn.Dropout at its rates), eval mode."""
        sizes = [self.weights[0].shape[1], *(w.shape[2] for w in self.weights)]
        p = self.rates()[index].tolist()
        if len(set(p[1:])) > 1:
            raise ValueError(f"hidden layers have different dropout rates {p[1:]}")
        module = build_mlp(
            in_features=int(sizes[0]),
            out_features=int(sizes[-1]),
            hidden=[int(h) for h in sizes[1:-1]],
            dropout=float(p[1]) if len(p) > 1 else 0.0,
            input_dropout=float(p[0]),
        )
        linears = [m for m in module if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for linear, w, b in zip(linears, self.weights, self.biases, strict=True):
                linear.weight.copy_(w[index].T)
                linear.bias.copy_(b[index, 0])
        return module.eval()


@dataclass(frozen=True)
class StackedData:
    """Rows for M networks: tables x [G, N, F], y [G, N, D] (float32, already standardised),
    group [M] (which table each network reads) and rows [M, n] (its training rows)."""

    x: Tensor
    y: Tensor
    group: Tensor
    rows: Tensor

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Rows index [M, B] of each network's table -> x [M, B, F], y [M, B, D]."""
        g = self.group[:, None]
        return self.x[g, index], self.y[g, index]


def train_stacked(
    build: Callable[[], StackedMLP],
    data: StackedData,
    prior: Tensor,
    entropy_scale: Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    shuffle_seeds: Sequence[int] | None = None,
    progress: bool = True,
    desc: str = "train",
    fused_adam: bool = True,
    history: list[dict[str, float]] | None = None,
) -> StackedMLP:
    """Minibatch Adam on sum_m (MSE_m + penalty_m); returns the trained model in eval mode.

    Like train_regressor: the global RNG (dropout masks, and init inside build()) is seeded
    with `seed` in a forked RNG; network m shuffles its rows each epoch with its own
    generator seeded by shuffle_seeds[m] (default: `seed` for all). fused_adam: one kernel
    for all parameters (fewer per-step launches); False is train_regressor's Adam. history,
    when given, gets one {"loss": mean objective over rows, summed over networks} per epoch.
    """
    models, n = data.rows.shape
    seeds = list(shuffle_seeds) if shuffle_seeds is not None else [seed] * models
    if len(seeds) != models:
        raise ValueError(f"shuffle_seeds: need {models} seeds, got {len(seeds)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        model = build()
        if model.models != models:
            raise ValueError(f"build() made {model.models} networks for {models} row sets")
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=lr, fused=fused_adam or None)
        bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, file=sys.stderr)
        model.train()
        for _ in bar:
            order = torch.stack(
                [data.rows[m][torch.randperm(n, generator=generators[m])] for m in range(models)]
            )
            total = 0.0
            for start in range(0, n, batch_size):
                x, y = data.batch(order[:, start : start + batch_size])
                mse = (model(x) - y).square().mean(dim=(1, 2))
                loss = mse.sum() + model.penalty(prior, entropy_scale).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if history is not None:
                    total += float(loss.detach()) * x.shape[1]
            if history is not None:
                history.append({"loss": total / n})
    return model.eval()
