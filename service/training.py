"""The MC dropout training recipe (Gal & Ghahramani, 2016) and writing model folders.

Regression follows the UCI protocol of ../shared/uci/README.md: standardised inputs and
targets, dropout on the input and after every hidden layer, Adam, and an L2 penalty whose
coefficient comes from the prior length-scale, the dropout rate and the model precision tau.
Training runs on the CPU and is bit-reproducible from a seed.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import Tensor, nn
from tqdm import tqdm

from service import scoring
from service.architectures import Activation, build_mlp
from service.loading import load_module, save_weights
from service.manifest import MANIFEST_NAME, ModelSpec, load_manifest

ArrayLike = np.ndarray | Tensor
_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_MC_CHUNK = 1 << 16  # rows x samples per forward call when scoring a validation split


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
        return _apply(x.double(), self.input_mean, self.input_std).float()


# --- the recipe ---------------------------------------------------------------------------


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
    arch_config: dict[str, Any] = {
        "in_features": x_all.shape[1],
        "out_features": n_outputs * (2 if config.heteroscedastic else 1),
        "hidden": list(config.hidden),
        "dropout": config.dropout,
        "input_dropout": config.effective_input_dropout,
        "activation": config.activation,
    }

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        train_rows, val_rows = _split(x_all.shape[0], config.validation_fraction, generator)
        x_mean, x_std = _moments(x_all[train_rows], dim=(0,))
        y_mean, y_std = _moments(y_all[train_rows], dim=(0,))
        x_norm = _apply(x_all, x_mean, x_std).float()
        y_norm = _apply(y_all, y_mean, y_std).float()
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
            config.epochs,
            config.batch_size,
            config.lr,
            generator,
            progress,
        )
        validation = None
        if len(val_rows):
            samples = _mc_outputs(module, x_norm[val_rows], config.validation_samples, config.seed)
            validation = _score_regression(
                samples, y_all[val_rows], y_mean, y_std, config.tau, config.heteroscedastic
            )
    module.eval()
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
        train_rows, val_rows = _split(x_all.shape[0], config.validation_fraction, generator)
        if config.standardize:
            x_mean, x_std = _moments(x_all[train_rows], dim=channel_dims)
        else:
            x_mean = torch.zeros(x_all.shape[1], dtype=torch.float64)
            x_std = torch.ones(x_all.shape[1], dtype=torch.float64)
        x_norm = _apply(x_all, x_mean, x_std).float()
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
            config.epochs,
            config.batch_size,
            config.lr,
            generator,
            progress,
        )
        validation = None
        if len(val_rows):
            samples = _mc_outputs(module, x_norm[val_rows], config.validation_samples, config.seed)
            probs = torch.softmax(samples.double(), dim=-1).mean(dim=1)
            validation = {
                "accuracy": scoring.accuracy(probs, y_long[val_rows]),
                "nll": scoring.nll(probs, y_long[val_rows]),
            }
    module.eval()
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
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    progress: bool,
) -> list[dict[str, float]]:
    """Minibatch Adam on data_loss + penalty; shuffles with `generator`. One dict per epoch."""
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
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


def _split(n: int, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Seeded train/validation row indices; no validation rows when fraction is 0."""
    if fraction == 0:
        return torch.arange(n), torch.arange(0)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise ValueError(f"validation_fraction {fraction} leaves no training rows out of {n}")
    order = torch.randperm(n, generator=generator)
    return order[n_val:].sort().values, order[:n_val].sort().values


def _moments(x: Tensor, dim: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Mean and population std over `dim`; a constant column gets std 1 (left unscaled)."""
    mean = x.mean(dim=dim)
    std = x.std(dim=dim, correction=0)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _apply(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(x - mean) / std, with [F] or [C] statistics broadcast over x [N, F] or [N, C, ...]."""
    view = (1, -1, *([1] * (x.dim() - 2)))
    return (x - mean.view(view)) / std.view(view)


@contextmanager
def _dropout_sampling(module: nn.Module) -> Iterator[None]:
    """Eval mode except dropout modules, which sample; restores eval afterwards."""
    module.eval()
    for child in module.modules():
        if isinstance(child, _DROPOUT):
            child.train()
    try:
        yield
    finally:
        module.eval()


def _mc_outputs(module: nn.Module, x: Tensor, samples: int, seed: int) -> Tensor:
    """Raw network outputs of `samples` dropout draws per row: x [B, ...] -> [B, T, out]."""
    rows_per_call = max(1, _MC_CHUNK // samples)
    parts = []
    with torch.random.fork_rng(devices=[]), torch.no_grad(), _dropout_sampling(module):
        torch.manual_seed(seed)
        for start in range(0, x.shape[0], rows_per_call):
            chunk = x[start : start + rows_per_call]
            expanded = chunk.repeat_interleave(samples, dim=0)
            parts.append(module(expanded).view(chunk.shape[0], samples, -1))
    return torch.cat(parts)


def _score_regression(
    samples: Tensor,
    y: Tensor,
    y_mean: Tensor,
    y_std: Tensor,
    tau: float,
    heteroscedastic: bool,
) -> dict[str, float]:
    """RMSE of the MC mean and mean MC-mixture log-likelihood, in raw target units."""
    n_outputs = y.shape[1]
    samples = samples.double()
    means = samples[..., :n_outputs] * y_std + y_mean
    precision: float | Tensor = tau
    if heteroscedastic:
        precision = 1.0 / (torch.exp(samples[..., n_outputs:]) * y_std.square())
    per_row = scoring.mc_mixture_log_likelihood(means, y, precision)
    return {
        "rmse": scoring.rmse(means.mean(dim=1), y),
        "log_likelihood": scoring.mean_log_likelihood(per_row),
    }


# --- model folders ------------------------------------------------------------------------


def write_model_folder(
    folder: Path,
    name: str,
    trained: TrainedModel,
    *,
    task: Literal["regression", "classification"] | None = None,
    input_shape: Sequence[int],
    output_names: Sequence[str],
    architecture: str | None = None,
    config: Mapping[str, Any] | None = None,
    input_names: Sequence[str] | None = None,
    description: str = "",
    version: str = "1",
    mc: Mapping[str, Any] | None = None,
    runtime: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete built-in model folder (model.toml + weights.safetensors); returns it.

    architecture/config default to what the trainer recorded (the MLP's constructor kwargs);
    mc overrides the written MC section (default_samples 100, tau for a homoscedastic
    regressor). Both files are first written to a staging folder beside it and read back
    through load_manifest and load_module; only when that reproduces the trained weights bit
    for bit do they replace the folder's files, so a folder that would not serve is never left.
    """
    folder = Path(folder)
    regression = isinstance(trained.config, TrainConfig)
    task = task or ("regression" if regression else "classification")
    architecture = architecture or trained.architecture
    if architecture is None:
        raise ValueError("architecture: the trainer recorded none; pass 'mlp' or 'cnn'")
    arch_config = dict(config if config is not None else trained.architecture_config)
    heteroscedastic = isinstance(trained.config, TrainConfig) and trained.config.heteroscedastic

    normalization: dict[str, Any] = {
        "input_mean": trained.input_mean.tolist(),
        "input_std": trained.input_std.tolist(),
    }
    if trained.target_mean is not None and trained.target_std is not None:
        normalization["target_mean"] = trained.target_mean.tolist()
        normalization["target_std"] = trained.target_std.tolist()
    mc_section: dict[str, Any] = {"default_samples": 100}
    if isinstance(trained.config, TrainConfig) and not heteroscedastic:
        mc_section["tau"] = trained.config.tau
    mc_section.update(mc or {})
    input_section: dict[str, Any] = {"shape": list(input_shape), "dtype": "float32"}
    if input_names is not None:
        input_section["names"] = list(input_names)
    document: dict[str, Any] = {
        "name": name,
        "version": version,
        "task": task,
        "description": description,
        "input": input_section,
        "output": {"names": list(output_names), "heteroscedastic": heteroscedastic},
        "model": {
            "format": "builtin",
            "architecture": architecture,
            "weights": "weights.safetensors",
            "config": arch_config,
        },
        "normalization": normalization,
        "mc": mc_section,
        "runtime": dict(runtime or {}),
    }
    spec = ModelSpec.model_validate(document)

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_weights(trained.module, staging / spec.model.weights)
        (staging / MANIFEST_NAME).write_text(dumps_toml(document), encoding="utf-8")
        rebuilt = load_module(load_manifest(staging / MANIFEST_NAME), staging)
        expected = trained.module.state_dict()
        for key, value in rebuilt.state_dict().items():
            if not torch.equal(value, expected[key].detach().to("cpu", value.dtype)):
                raise ValueError(f"{folder}: weights {key!r} did not round-trip through the folder")
        folder.mkdir(exist_ok=True)
        os.replace(staging / spec.model.weights, folder / spec.model.weights)
        os.replace(staging / MANIFEST_NAME, folder / MANIFEST_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# --- a small TOML writer (tomllib only reads) ---------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def dumps_toml(document: Mapping[str, Any]) -> str:
    """Serialise a mapping to TOML: str, int, float, bool, lists, nested tables; None skipped.

    Nested mappings become [section] tables; mappings inside lists become inline tables.
    """
    lines: list[str] = []
    _write_table(document, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _write_table(table: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    if path:
        lines.append("")
        lines.append("[" + ".".join(_key(part) for part in path) + "]")
    subtables = []
    for key, value in table.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            subtables.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in subtables:
        _write_table(value, [*path, key], lines)


def _key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"TOML keys must be strings, got {key!r}")
    return key if _BARE_KEY.match(key) else _string(key)


def _string(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _value(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        items = (f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list | tuple):
        if any(item is None for item in value):
            raise TypeError("TOML arrays cannot hold None")
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")
