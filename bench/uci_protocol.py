"""The UCI regression protocol of Gal & Ghahramani (2018 grid-search re-run), fast by design.

Per split: hold out 20% of the training rows, train every (dropout rate, tau) grid point on
the rest, pick the pair with the best validation MC-mixture log-likelihood, retrain on the
whole training split, and score the test rows through the serving engine (MCEngine, T
samples, streamed). All networks of a stage, over every split, train at once as one
StackedMLP. With `concrete` the dropout rates are learned and only tau is grid-searched.
Data layout: ../shared/uci/README.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from mcdrop import scoring
from mcdrop.config import DEFAULT_CHUNK_ELEMENTS
from mcdrop.engine.core import MaskMode, MCEngine, MCOptions
from mcdrop.training.recipe import standardisation, standardise
from mcdrop.training.stacked import StackedData, StackedMLP, train_stacked
from mcdrop.uncertainty import RegressionSummary

CONCRETE_INIT = 0.1  # initial learned dropout rate (Gal, Hron & Kendall's init_min = init_max)


@dataclass(frozen=True)
class UCIDataset:
    """One dataset folder: rows x [N, F], targets y [N], its splits and its grids."""

    name: str
    x: np.ndarray
    y: np.ndarray
    splits: list[tuple[np.ndarray, np.ndarray]]
    hidden: int
    epochs: int
    dropout_grid: list[float]
    tau_grid: list[float]


def _numbers(path: Path) -> list[float]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent.name}: missing {path.name} (see uci/README.md)")
    return [float(v) for v in path.read_text().split()]


def _index(path: Path, rows: int) -> np.ndarray:
    values = np.array(_numbers(path), dtype=np.int64)
    if values.size == 0 or values.min() < 0 or values.max() >= rows:
        raise ValueError(f"{path}: row numbers must lie in [0, {rows})")
    return values


def load_dataset(folder: Path) -> UCIDataset:
    """Read one dataset folder (data.txt, index_*.txt, grids); errors name the bad file."""
    folder = Path(folder)
    if not (folder / "data.txt").is_file():
        raise FileNotFoundError(f"{folder}: no data.txt, not a UCI dataset folder")
    table = np.loadtxt(folder / "data.txt", ndmin=2)
    features = [int(v) for v in _numbers(folder / "index_features.txt")]
    target = int(_numbers(folder / "index_target.txt")[0])
    n_splits = int(_numbers(folder / "n_splits.txt")[0])
    rows = table.shape[0]
    splits = [
        (
            _index(folder / f"index_train_{k}.txt", rows),
            _index(folder / f"index_test_{k}.txt", rows),
        )
        for k in range(n_splits)
    ]
    return UCIDataset(
        name=folder.name,
        x=table[:, features],
        y=table[:, target],
        splits=splits,
        hidden=int(_numbers(folder / "n_hidden.txt")[0]),
        epochs=int(_numbers(folder / "n_epochs.txt")[0]),
        dropout_grid=_numbers(folder / "dropout_rates.txt"),
        tau_grid=_numbers(folder / "tau_values.txt"),
    )


@dataclass(frozen=True)
class UCIProtocol:
    """How to run the protocol; defaults are the paper's (epochs: n_epochs x epoch_factor)."""

    epoch_factor: float = 10.0
    batch_size: int = 128
    lr: float = 1e-3
    lengthscale: float = 1e-2
    validation_fraction: float = 0.2
    validation_samples: int = 200
    test_samples: int = 10_000
    concrete: bool = False
    seed: int = 0

    def epochs(self, dataset: UCIDataset) -> int:
        return max(1, round(dataset.epochs * self.epoch_factor))


@dataclass
class SplitResult:
    """One split: the chosen hyper-parameters and the test scores in raw units."""

    split: int
    tau: float
    dropout: list[float]  # [input, hidden]: the grid choice, or the learned Concrete rates
    validation_log_likelihood: float
    rmse: float
    log_likelihood: float


@dataclass
class DatasetResult:
    """Mean and standard error (sample std / sqrt(splits)) over the splits run."""

    dataset: str
    concrete: bool
    splits: list[SplitResult]
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        rmse = np.array([s.rmse for s in self.splits])
        ll = np.array([s.log_likelihood for s in self.splits])
        return {
            "dataset": self.dataset,
            "concrete": self.concrete,
            "n_splits": len(self.splits),
            "rmse_mean": float(rmse.mean()),
            "rmse_se": standard_error(rmse),
            "ll_mean": float(ll.mean()),
            "ll_se": standard_error(ll),
            "seconds": self.seconds,
            "splits": [asdict(s) for s in self.splits],
        }


def standard_error(values: np.ndarray) -> float | None:
    """Sample standard deviation over sqrt(n); None for a single value."""
    if len(values) < 2:
        return None
    return float(values.std(ddof=1) / math.sqrt(len(values)))


@dataclass(frozen=True)
class ScaledSplit:
    """One standardisation: rows standardised by the statistics of `fit` rows (float64 stats)."""

    x: Tensor  # [N, F] float32
    y: Tensor  # [N, 1] float32
    y_mean: float
    y_std: float


def standardised(dataset: UCIDataset, fit: np.ndarray) -> ScaledSplit:
    """All rows, standardised by the mean and population std of the `fit` rows (as Keras-era
    code did; a constant column is left unscaled)."""
    x = torch.from_numpy(dataset.x)
    y = torch.from_numpy(dataset.y)[:, None]
    x_mean, x_std = standardisation(x[fit])
    y_mean, y_std = standardisation(y[fit])
    return ScaledSplit(
        standardise(x, x_mean, x_std).float(),
        standardise(y, y_mean, y_std).float(),
        float(y_mean),
        float(y_std),
    )


def holdout_rows(train: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) rows of a split: the last `fraction` of its training rows, in the
    index file's order, are held out, as in the reference implementation."""
    n_fit = int((1 - fraction) * len(train))
    if not 0 < n_fit < len(train):
        raise ValueError(f"validation_fraction {fraction} leaves no rows on one side")
    return train[:n_fit], train[n_fit:]


@dataclass(frozen=True)
class Stage:
    """M networks to train at once: per network its table, rows, tau and initial rates."""

    tables: list[ScaledSplit]
    group: list[int]
    rows: list[np.ndarray]
    tau: list[float]
    rates: list[float]


def train_stage(
    stage: Stage, dataset: UCIDataset, protocol: UCIProtocol, seed: int, desc: str, progress: bool
) -> StackedMLP:
    """Train a stage's M networks as one StackedMLP with the protocol's recipe."""
    models = len(stage.group)
    lengths = {len(r) for r in stage.rows}
    if len(lengths) != 1:
        raise ValueError(f"{dataset.name}: splits have different training sizes {sorted(lengths)}")
    n = lengths.pop()
    tau = torch.tensor(stage.tau, dtype=torch.float64)
    data = StackedData(
        x=torch.stack([t.x for t in stage.tables]),
        y=torch.stack([t.y for t in stage.tables]),
        group=torch.tensor(stage.group),
        rows=torch.from_numpy(np.stack(stage.rows)),
    )
    rates = torch.tensor(stage.rates, dtype=torch.float64)[:, None].repeat(1, 2)
    sizes = [dataset.x.shape[1], dataset.hidden, 1]
    return train_stacked(
        lambda: StackedMLP.glorot(sizes, rates, concrete=protocol.concrete),
        data,
        protocol.lengthscale**2 / (2 * n * tau),
        1 / (n * tau),
        epochs=protocol.epochs(dataset),
        batch_size=protocol.batch_size,
        lr=protocol.lr,
        seed=seed,
        shuffle_seeds=[seed * 100_003 + m for m in range(models)],
        progress=progress,
        desc=desc,
    )


def run_dataset(
    dataset: UCIDataset, split_ids: list[int], protocol: UCIProtocol, progress: bool = True
) -> DatasetResult:
    """Grid search, retrain and engine evaluation for the given splits of one dataset."""
    started = time.perf_counter()
    rates = [CONCRETE_INIT] if protocol.concrete else dataset.dropout_grid
    grid = [(p, t) for p in rates for t in dataset.tau_grid]

    # 1. every grid point of every split, trained on 80% of its training rows
    tables, group, fit_rows, val_rows = [], [], [], []
    for i, k in enumerate(split_ids):
        fit, val = holdout_rows(dataset.splits[k][0], protocol.validation_fraction)
        tables.append(standardised(dataset, fit))
        fit_rows.append(fit)
        val_rows.append(val)
        group.extend([i] * len(grid))
    stage = Stage(
        tables,
        group,
        [fit_rows[g] for g in group],
        [t for _ in split_ids for _, t in grid],
        [p for _ in split_ids for p, _ in grid],
    )
    name = f"{dataset.name} grid"
    model = train_stage(stage, dataset, protocol, protocol.seed, name, progress)
    grid_trained = time.perf_counter()
    fixed = model.with_fixed_rates()
    n_val = {len(v) for v in val_rows}.pop()
    x_val = torch.stack([tables[g].x[val_rows[g]] for g in group])
    y_val = torch.stack([torch.from_numpy(dataset.y[val_rows[g]])[:, None] for g in group])
    _, val_ll = mc_scores(
        fixed,
        x_val.view(len(group), n_val, -1),
        y_val,
        torch.tensor([tables[g].y_mean for g in group]),
        torch.tensor([tables[g].y_std for g in group]),
        torch.tensor(stage.tau),
        protocol.validation_samples,
        seed=protocol.seed,
    )
    best = val_ll.view(len(split_ids), len(grid)).argmax(dim=1).tolist()
    searched = time.perf_counter()

    # 2. the best pair of each split, retrained on all its training rows
    full = [standardised(dataset, dataset.splits[k][0]) for k in split_ids]
    chosen = [grid[b] for b in best]
    retrain = Stage(
        full,
        list(range(len(split_ids))),
        [dataset.splits[k][0] for k in split_ids],
        [t for _, t in chosen],
        [p for p, _ in chosen],
    )
    final = train_stage(
        retrain, dataset, protocol, protocol.seed + 1, f"{dataset.name} retrain", progress
    )
    final_fixed = final.with_fixed_rates()
    trained = time.perf_counter()

    # 3. the test rows through the serving engine
    results = []
    bar = tqdm(
        list(enumerate(split_ids)), desc=f"{dataset.name} test", unit="split", disable=not progress
    )
    for i, k in bar:
        test = dataset.splits[k][1]
        rmse, ll = evaluate_network(
            final_fixed.network(i),
            full[i],
            test,
            torch.from_numpy(dataset.y[test])[:, None],
            chosen[i][1],
            protocol.test_samples,
            seed=protocol.seed + k,
        )
        results.append(
            SplitResult(
                split=k,
                tau=chosen[i][1],
                dropout=[float(v) for v in final_fixed.rates()[i].tolist()],
                validation_log_likelihood=float(val_ll[i * len(grid) + best[i]]),
                rmse=rmse,
                log_likelihood=ll,
            )
        )
    done = time.perf_counter()
    seconds = {
        "grid_train": grid_trained - started,
        "grid_validation": searched - grid_trained,
        "retrain": trained - searched,
        "test": done - trained,
        "total": done - started,
    }
    return DatasetResult(dataset.name, protocol.concrete, results, seconds)


def evaluate_network(
    network: torch.nn.Module,
    table: ScaledSplit,
    rows: np.ndarray,
    y: Tensor,
    tau: float,
    samples: int,
    seed: int,
) -> tuple[float, float]:
    """RMSE and mean MC-mixture log-likelihood (raw units) of `rows` through MCEngine."""
    mean, ll = engine_scores(make_engine(network, table, tau), table.x[rows], y, samples, seed)
    return scoring.rmse(mean, y.double()), ll


def engine_scores(
    engine: MCEngine,
    x: Tensor,
    y: Tensor,
    samples: int,
    seed: int,
    mask_mode: MaskMode = "independent",
) -> tuple[Tensor, float]:
    """MC mean [B, 1] and mean mixture log-likelihood of rows x [B, F] against raw targets
    y [B, 1]; test scoring needs nothing else, so no intervals are computed."""
    options = MCOptions(samples=samples, seed=seed, mask_mode=mask_mode, interval_levels=())
    summary = engine.run(x, options, targets=y.double())
    assert isinstance(summary, RegressionSummary)
    assert summary.log_likelihood is not None
    return summary.mean, scoring.mean_log_likelihood(summary.log_likelihood)


def make_engine(network: torch.nn.Module, table: ScaledSplit, tau: float) -> MCEngine:
    """The serving engine on one network, answering in raw target units."""
    return MCEngine(
        network,
        task="regression",
        input_shape=(table.x.shape[1],),
        tau=tau,
        device="cpu",
        output_scale=torch.tensor([table.y_std], dtype=torch.float64),
        output_shift=torch.tensor([table.y_mean], dtype=torch.float64),
    )


@torch.no_grad()
def mc_scores(
    model: StackedMLP,
    x: Tensor,
    y: Tensor,
    y_mean: Tensor,
    y_std: Tensor,
    tau: Tensor,
    samples: int,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """RMSE [M] of the MC mean and mean MC-mixture log-likelihood [M], raw units, streamed.

    x [M, V, F] standardised rows, y [M, V, 1] raw targets, y_mean/y_std/tau [M]. Masks come
    from the global RNG (seeded, forked); used to rank grid points on validation rows.
    chunk bounds the elements of the widest activation per pass.
    """
    models, rows, _ = x.shape
    widest = max(int(w.shape[1]) for w in model.weights)
    per_pass = max(1, chunk // (models * rows * widest))
    shift, scale = y_mean.view(-1, 1, 1).float(), y_std.view(-1, 1, 1).float()
    total = torch.zeros(models, rows, 1, dtype=torch.float64)
    lse = torch.full((models, rows), -math.inf, dtype=torch.float64)
    half_tau = (tau.view(-1, 1, 1) / 2).double()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        done = 0
        while done < samples:
            count = min(per_pass, samples - done)
            out = model(x.repeat(1, count, 1), sample=True).double() * scale + shift
            out = out.view(models, count, rows, -1)
            total += out.sum(dim=1)
            log_k = -(half_tau[:, None] * (y[:, None].double() - out).square()).sum(dim=-1)
            lse = torch.logaddexp(lse, torch.logsumexp(log_k, dim=1))
            done += count
    mean = total / samples
    rmse = (mean - y.double()).square().mean(dim=(1, 2)).sqrt()
    constant = -math.log(samples) - 0.5 * math.log(2 * math.pi) + 0.5 * torch.log(tau.double())
    return rmse, lse.mean(dim=1) + constant
