"""`mcdrop train --concrete`: the regression recipe with dropout rates learned (Concrete dropout).

Trains one StackedMLP network with Concrete masks (mcdrop.training.concrete), then hands back an
ordinary build_mlp network whose nn.Dropout layers hold the learned rates, so the exported
model folder serves like any other.
"""

from __future__ import annotations

import numpy as np
import torch

from mcdrop.training.recipe import (
    ArrayLike,
    TrainConfig,
    TrainedModel,
    mlp_architecture,
    standardisation,
    standardise,
)
from mcdrop.training.stacked import StackedData, StackedMLP, train_stacked


def train_concrete_regressor(
    x: ArrayLike, y: ArrayLike, config: TrainConfig, progress: bool = True
) -> TrainedModel:
    """Train on rows x [N, F] and targets y [N] or [N, 1] learning the input and hidden rates.

    config.input_dropout / config.dropout are the initial rates (Gal, Hron & Kendall: 0.1);
    the returned config holds the learned ones. Weights: Glorot uniform, zero biases.
    """
    if config.heteroscedastic:
        raise ValueError("heteroscedastic: Concrete training supports the homoscedastic head only")
    if len(config.hidden) != 1:
        raise ValueError(f"hidden: Concrete training takes one hidden layer, got {config.hidden}")
    if config.activation != "relu":
        raise ValueError(f"activation: Concrete training uses relu, got {config.activation!r}")
    if config.validation_fraction:
        raise ValueError("validation_fraction: not supported with Concrete training")
    start = [config.effective_input_dropout, config.dropout]
    if not all(0 < p < 1 for p in start):
        raise ValueError(f"dropout: Concrete rates start inside (0, 1), got {start}")
    x64 = torch.as_tensor(np.asarray(x, dtype=np.float64))
    y64 = torch.as_tensor(np.asarray(y, dtype=np.float64))
    y64 = y64[:, None] if y64.dim() == 1 else y64
    if x64.dim() != 2 or y64.shape != (x64.shape[0], 1):
        raise ValueError(
            f"x must be [rows, features] and y [rows]; got {list(x64.shape)}, {list(y64.shape)}"
        )
    if not bool(torch.isfinite(x64).all() and torch.isfinite(y64).all()):
        raise ValueError("x and y must be finite")
    x_mean, x_std = standardisation(x64)
    y_mean, y_std = standardisation(y64)
    n, features = x64.shape
    data = StackedData(
        x=standardise(x64, x_mean, x_std).float()[None],
        y=standardise(y64, y_mean, y_std).float()[None],
        group=torch.zeros(1, dtype=torch.long),
        rows=torch.arange(n)[None],
    )
    tau = torch.tensor([config.tau], dtype=torch.float64)
    rates = torch.tensor([start], dtype=torch.float64)
    sizes = [features, config.hidden[0], 1]
    history: list[dict[str, float]] = []
    model = train_stacked(
        lambda: StackedMLP.glorot(sizes, rates, concrete=True),
        data,
        config.lengthscale**2 / (2 * n * tau),
        1 / (n * tau),
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        progress=progress,
        desc="train (concrete)",
        history=history,
    )
    p_input, p_hidden = (float(v) for v in model.rates()[0].tolist())
    learned = config.model_copy(update={"dropout": p_hidden, "input_dropout": p_input})
    return TrainedModel(
        module=model.network(0),
        config=learned,
        input_mean=x_mean,
        input_std=x_std,
        target_mean=y_mean,
        target_std=y_std,
        history=history,
        architecture="mlp",
        architecture_config=mlp_architecture(learned, features, 1),
    )
