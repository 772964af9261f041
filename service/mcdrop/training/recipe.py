"""The MC dropout training recipe (Gal & Ghahramani, 2016); training.export writes the folders.

Regression follows the UCI protocol of ../shared/uci/README.md: standardised inputs and
targets, dropout on the input and after every hidden layer, Adam, and an L2 penalty whose
coefficient comes from the prior length-scale, the dropout rate and the model precision tau.
Training runs on the CPU and is bit-reproducible from a seed. Validation rows are scored
through the serving engine (mcdrop.engine.core), so there is one MC dropout implementation.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import Tensor, nn
from tqdm import tqdm

from mcdrop import scoring
from mcdrop.engine.core import MCEngine, MCOptions
from mcdrop.repository.architectures import Activation, build_mlp
from mcdrop.uncertainty import ClassificationSummary, RegressionSummary

ArrayLike = np.ndarray | Tensor
_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


class TrainConfig(BaseModel):
    """Hyper-parameters of the MC dropout regression recipe (defaults: Gal's UCI networks)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tau: float = Field(gt=0, description="model precision, in raw target units")
    hidden: list[PositiveInt] = Field(default_factory=lambda: [50], min_length=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="after every hidden layer")
    input_dropout: float | None = Field(
        default=None, ge=0.0, lt=1.0, description="on the inputs; None: the same as dropout"
    )
    activation: Activation = "relu"
    lengthscale: float = Field(default=1e-2, gt=0, description="prior length-scale of weights")
    epochs: PositiveInt = Field(default=400, description="the 2018 UCI protocol: 40 x 10")
    batch_size: PositiveInt = 128
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate")
    heteroscedastic: bool = Field(default=False, description="emit [mean..., log-variance...]")
    seed: int = 0
    validation_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    validation_samples: PositiveInt = Field(default=100, description="MC samples, validation")

    @property
    def effective_input_dropout(self) -> float:
        """Dropout rate on the inputs (input_dropout, or dropout when it is None)."""
        return self.dropout if self.input_dropout is None else self.input_dropout

    @model_validator(mode="after")
    def _has_dropout(self) -> TrainConfig:
        if self.dropout == 0 and self.effective_input_dropout == 0:
            raise ValueError("dropout: an MC dropout network needs dropout > 0 somewhere")
        return self


class ClassifierConfig(BaseModel):
    """Hyper-parameters of the generic classifier loop (cross-entropy, Adam, L2 on weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: PositiveInt = 30
    batch_size: PositiveInt = 64
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0, description="L2 coefficient on weight tensors")
    standardize: bool = Field(default=True, description="per feature ([N, F]) or per channel")
    seed: int = 0
    validation_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    validation_samples: PositiveInt = 100


@dataclass
class TrainedModel:
    """A trained network (eval mode) with the statistics that map raw data to its units.

    Input statistics are per feature ([F]) or, for image rows [C, H, W], per channel ([C]).
    history holds one dict per epoch: `loss` (the training objective) and, with a
    validation split, `val_loss` (data term with dropout off). validation holds the final
    MC-dropout scores of the validation rows in raw units.
    """

    module: nn.Module
    config: TrainConfig | ClassifierConfig
    input_mean: Tensor
    input_std: Tensor
    target_mean: Tensor | None = None
    target_std: Tensor | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    validation: dict[str, float] | None = None
    architecture: str | None = None
    architecture_config: dict[str, Any] = field(default_factory=dict)

    def normalize_inputs(self, x: Tensor) -> Tensor:
        """Raw rows [B, *shape] -> the network's input units (float32)."""
        return standardise(x.double(), self.input_mean, self.input_std).float()


# --- the recipe ---------------------------------------------------------------------------


def mlp_architecture(config: TrainConfig, in_features: int, out_features: int) -> dict[str, Any]:
    """The `mlp` architecture arguments (as the manifest stores them) for this recipe."""
    return {
        "in_features": in_features,
        "out_features": out_features,
        "hidden": list(config.hidden),
        "dropout": config.dropout,
        "input_dropout": config.effective_input_dropout,
        "activation": config.activation,
    }


def weight_decay(lengthscale: float, dropout: float, n_train: int, tau: float) -> float:
    """L2 coefficient l^2 (1 - p) / (2 N tau) for a layer whose inputs are dropped with rate p."""
    return lengthscale**2 * (1.0 - dropout) / (2.0 * n_train * tau)


def l2_terms(
    module: nn.Module, lengthscale: float, n_train: int, tau: float
) -> list[tuple[Tensor, float]]:
    """(weight, coefficient) for every Linear layer, p being the dropout just before it.

    Walks the modules in registration order (an nn.Sequential's forward order). With the
    same p everywhere this is Gal's Keras code, which gave every Dense layer W_regularizer=l2(reg).
    """
    terms: list[tuple[Tensor, float]] = []
    p_before = 0.0
    for child in module.modules():
        if isinstance(child, _DROPOUT):
            p_before = child.p
        elif isinstance(child, nn.Linear):
            terms.append((child.weight, weight_decay(lengthscale, p_before, n_train, tau)))
            p_before = 0.0
    return terms


def train_regressor(
    x: ArrayLike, y: ArrayLike, config: TrainConfig, progress: bool = True
) -> TrainedModel:
    """Train a dropout MLP on rows x [N, F] and targets y [N] or [N, D] with the MC dropout recipe.

    The objective is Keras's `mean_squared_error` (or, heteroscedastic, the Gaussian NLL
    0.5 (log s^2 + (y - m)^2 / s^2) without its constant) on standardised targets plus the
    explicit penalty sum_layers reg_l * ||W_l||^2 on weight matrices, not biases, as Keras's
    W_regularizer added it. An explicit penalty rather than Adam's weight_decay because Adam's
    adds wd * W to the gradient (the penalty's 2 * reg * W would need wd = 2 * reg), would
    also decay biases, and could not give the input layer its own p; the logged loss is then
    the objective actually minimised. tau enters reg in raw target units, as in Gal's code.
    """
    x_all = _float64("x", x)
    y_all = _float64("y", y)
    if x_all.dim() != 2:
        raise ValueError(f"x must be [rows, features], got shape {tuple(x_all.shape)}")
    if y_all.dim() == 1:
        y_all = y_all.unsqueeze(1)
    if y_all.dim() != 2 or y_all.shape[0] != x_all.shape[0]:
        raise ValueError(
            f"y must be [rows] or [rows, outputs] with {x_all.shape[0]} rows, "
            f"got shape {tuple(y_all.shape)}"
        )
    n_outputs = y_all.shape[1]
    arch_config = mlp_architecture(
        config, x_all.shape[1], n_outputs * (2 if config.heteroscedastic else 1)
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        train_rows, val_rows = _holdout(x_all.shape[0], config.validation_fraction, generator)
        x_mean, x_std = standardisation(x_all[train_rows], dim=(0,))
        y_mean, y_std = standardisation(y_all[train_rows], dim=(0,))
        x_norm = standardise(x_all, x_mean, x_std).float()
        y_norm = standardise(y_all, y_mean, y_std).float()
        module = build_mlp(**arch_config)
        penalties = l2_terms(module, config.lengthscale, len(train_rows), config.tau)

        def data_loss(out: Tensor, target: Tensor) -> Tensor:
            if not config.heteroscedastic:
                return nn.functional.mse_loss(out, target)
            mean, log_var = out[:, :n_outputs], out[:, n_outputs:]
            return 0.5 * (log_var + (target - mean).square() * torch.exp(-log_var)).mean()

        def penalty() -> Tensor:
            return torch.stack([c * w.square().sum() for w, c in penalties]).sum()

        history = _fit(
            module,
            x_norm,
            y_norm,
            train_rows,
            val_rows,
            data_loss,
            penalty,
            config,
            generator,
            progress,
        )
    module.eval()
    validation = None
    if len(val_rows):
        validation = _score_regression(
            module, x_norm[val_rows], y_all[val_rows], y_mean, y_std, config
        )
    return TrainedModel(
        module=module,
        config=config,
        input_mean=x_mean,
        input_std=x_std,
        target_mean=y_mean,
        target_std=y_std,
        history=history,
        validation=validation,
        architecture="mlp",
        architecture_config=arch_config,
    )


def train_classifier(
    x: ArrayLike,
    y: ArrayLike,
    build: Callable[[], nn.Module],
    config: ClassifierConfig,
    progress: bool = True,
) -> TrainedModel:
    """Train build() (logits [B, C]) on rows x [N, *shape] and integer labels y [N].

    Cross-entropy plus config.weight_decay * ||W||^2 on every weight tensor of two or more
    dimensions (not biases or norm scales), Adam. The network is built after seeding, so its
    initialisation is reproducible too.
    """
    x_all = _float64("x", x)
    labels = _float64("y", y)
    if x_all.dim() < 2:
        raise ValueError(f"x must be [rows, *shape], got shape {tuple(x_all.shape)}")
    if labels.shape != x_all.shape[:1]:
        raise ValueError(
            f"y must be [rows] with {x_all.shape[0]} labels, got shape {tuple(labels.shape)}"
        )
    if bool((labels != labels.round()).any()) or bool((labels < 0).any()):
        raise ValueError("y must hold non-negative integer class labels")
    y_long = labels.long()
    channel_dims = (0,) if x_all.dim() == 2 else (0, *range(2, x_all.dim()))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        train_rows, val_rows = _holdout(x_all.shape[0], config.validation_fraction, generator)
        if config.standardize:
            x_mean, x_std = standardisation(x_all[train_rows], dim=channel_dims)
        else:
            x_mean = torch.zeros(x_all.shape[1], dtype=torch.float64)
            x_std = torch.ones(x_all.shape[1], dtype=torch.float64)
        x_norm = standardise(x_all, x_mean, x_std).float()
        module = build()
        module.eval()
        with torch.no_grad():
            n_classes = module(x_norm[:1]).shape[-1]
        if int(y_long.max()) >= n_classes:
            raise ValueError(
                f"labels go up to {int(y_long.max())} but the network has {n_classes} outputs"
            )
        weights = [p for p in module.parameters() if p.dim() >= 2]

        def penalty() -> Tensor:
            if not weights or config.weight_decay == 0:
                return torch.zeros(())
            return config.weight_decay * torch.stack([w.square().sum() for w in weights]).sum()

        history = _fit(
            module,
            x_norm,
            y_long,
            train_rows,
            val_rows,
            nn.functional.cross_entropy,
            penalty,
            config,
            generator,
            progress,
        )
    module.eval()
    validation = None
    if len(val_rows):
        validation = _score_classification(
            module, x_norm[val_rows], y_long[val_rows], config.validation_samples, config.seed
        )
    return TrainedModel(
        module=module,
        config=config,
        input_mean=x_mean,
        input_std=x_std,
        history=history,
        validation=validation,
    )


def _fit(
    module: nn.Module,
    x: Tensor,
    y: Tensor,
    train_rows: Tensor,
    val_rows: Tensor,
    data_loss: Callable[[Tensor, Tensor], Tensor],
    penalty: Callable[[], Tensor],
    config: TrainConfig | ClassifierConfig,
    generator: torch.Generator,
    progress: bool,
) -> list[dict[str, float]]:
    """Minibatch Adam (config's epochs, batch_size, lr) on data_loss + penalty; shuffles with
    `generator`. One dict per epoch."""
    epochs, batch_size = config.epochs, config.batch_size
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr)
    history: list[dict[str, float]] = []
    bar = tqdm(
        range(epochs),
        desc="train",
        unit="epoch",
        disable=not progress or not sys.stderr.isatty(),
    )
    for _ in bar:
        module.train()
        order = train_rows[torch.randperm(len(train_rows), generator=generator)]
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = data_loss(module(x[batch]), y[batch]) + penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        record = {"loss": total / len(order)}
        if len(val_rows):
            module.eval()
            with torch.no_grad():
                record["val_loss"] = float(data_loss(module(x[val_rows]), y[val_rows]))
        history.append(record)
        bar.set_postfix(record)
    return history


# --- helpers ------------------------------------------------------------------------------


def _float64(name: str, values: ArrayLike) -> Tensor:
    tensor = torch.as_tensor(np.asarray(values) if not isinstance(values, Tensor) else values)
    tensor = tensor.detach().to(device="cpu", dtype=torch.float64)
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def _holdout(n: int, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Seeded train/validation row indices; no validation rows when fraction is 0."""
    if fraction == 0:
        return torch.arange(n), torch.arange(0)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise ValueError(f"validation_fraction {fraction} leaves no training rows out of {n}")
    order = torch.randperm(n, generator=generator)
    return order[n_val:].sort().values, order[:n_val].sort().values


def standardisation(x: Tensor, dim: tuple[int, ...] = (0,)) -> tuple[Tensor, Tensor]:
    """Mean and population std over `dim`; a constant column gets std 1 (left unscaled).

    The one standardisation of training rows and targets (recipe, Concrete, the UCI bench).
    """
    mean = x.mean(dim=dim)
    std = x.std(dim=dim, correction=0)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def standardise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(x - mean) / std, with [F] or [C] statistics broadcast over x [N, F] or [N, C, ...]."""
    view = (1, -1, *([1] * (x.dim() - 2)))
    return (x - mean.view(view)) / std.view(view)


def _score_regression(
    module: nn.Module,
    x: Tensor,
    y: Tensor,
    y_mean: Tensor,
    y_std: Tensor,
    config: TrainConfig,
) -> dict[str, float]:
    """RMSE of the MC mean and mean MC-mixture log-likelihood of rows x [B, F], raw units."""
    engine = MCEngine(
        module,
        task="regression",
        input_shape=tuple(x.shape[1:]),
        heteroscedastic=config.heteroscedastic,
        tau=None if config.heteroscedastic else config.tau,
        device="cpu",
        output_scale=y_std,
        output_shift=y_mean,
    )
    options = MCOptions(samples=config.validation_samples, seed=config.seed)
    summary = engine.run(x, options, targets=y)
    assert isinstance(summary, RegressionSummary)
    assert summary.log_likelihood is not None
    return {
        "rmse": scoring.rmse(summary.mean, y),
        "log_likelihood": scoring.mean_log_likelihood(summary.log_likelihood),
    }


def _score_classification(
    module: nn.Module, x: Tensor, labels: Tensor, samples: int, seed: int
) -> dict[str, float]:
    """Accuracy and NLL of the MC-averaged class probabilities of rows x [B, *shape]."""
    engine = MCEngine(module, task="classification", input_shape=tuple(x.shape[1:]), device="cpu")
    summary = engine.run(x, MCOptions(samples=samples, seed=seed))
    assert isinstance(summary, ClassificationSummary)
    return {
        "accuracy": scoring.accuracy(summary.probabilities, labels),
        "nll": scoring.nll(summary.probabilities, labels),
    }
