"""Benchmark: the UCI regression table of Gal & Ghahramani through mcdrop (docs/uci.md).

`python bench/uci.py` runs the full protocol (bench/uci_protocol.py) on the nine datasets of
../shared/uci; `--datasets yacht --splits 2 --samples 1000 --json` is the quick form.
`--compare-loop` also times the engine (independent and shared masks) against the reference
implementation's loop of one forward call per MC sample, on one dataset's first split, in
interleaved rounds of the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.uci_protocol import (
    DatasetResult,
    Stage,
    UCIDataset,
    UCIProtocol,
    engine_scores,
    holdout_rows,
    load_dataset,
    make_engine,
    run_dataset,
    standardised,
    train_stage,
)
from mcdrop import scoring
from mcdrop.engine.core import MaskMode
from mcdrop.training.stacked import StackedMLP

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "uci"
DATASETS = [
    "bostonHousing",
    "concrete",
    "energy",
    "kin8nm",
    "naval-propulsion-plant",
    "power-plant",
    "protein-tertiary-structure",
    "wine-quality-red",
    "yacht",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of dataset folders")
    ap.add_argument(
        "--datasets", nargs="*", default=DATASETS, help="folder names (none: only --compare-*)"
    )
    ap.add_argument("--splits", type=int, help="N splits of each dataset (default: all)")
    ap.add_argument("--first-split", type=int, default=0, help="start at this split (0-based)")
    ap.add_argument("--samples", type=int, default=10_000, help="MC samples on the test rows")
    ap.add_argument(
        "--validation-samples", type=int, default=200, help="MC samples ranking the grid"
    )
    ap.add_argument("--epochs-scale", type=float, default=10.0, help="epochs = n_epochs.txt x this")
    ap.add_argument("--concrete", action="store_true", help="learn dropout rates (grid: tau)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: fastest on shared cores)"
    )
    ap.add_argument("--compare-loop", metavar="DATASET", help="time engine vs per-sample loop")
    ap.add_argument(
        "--compare-rounds", type=int, default=3, help="interleaved rounds of --compare-loop"
    )
    ap.add_argument(
        "--compare-training",
        metavar="DATASET",
        help="time split 0's grid trained one network at a time vs stacked",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", type=Path, help="also write the JSON here after every dataset")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    for name in ("samples", "validation_samples", "splits", "threads", "compare_rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.first_split < 0:
        ap.error(f"--first-split must be >= 0, got {args.first_split}")
    if args.epochs_scale <= 0:
        ap.error(f"--epochs-scale must be positive, got {args.epochs_scale}")
    if not args.data.is_dir():
        ap.error(f"--data: {args.data} is not a folder (the UCI data lives in ../shared/uci)")
    extra = [n for n in (args.compare_loop, args.compare_training) if n]
    for name in args.datasets + extra:
        if not (args.data / name / "data.txt").is_file():
            ap.error(f"--datasets: no dataset {name!r} under {args.data}")
    return args


def reference_loop(
    network: nn.Module, x: Tensor, y: Tensor, y_mean: float, y_std: float, tau: float, samples: int
) -> tuple[Tensor, float]:
    """The reference implementation's way: one forward call per sample over all rows x [B, F]
    (nn.Dropout in train mode), mean and MC-mixture log-likelihood accumulated as it goes.
    Returns the MC mean [B, 1] in raw units and the mean test log-likelihood."""
    network.train()
    total = torch.zeros_like(y, dtype=torch.float64)
    lse = torch.full((len(y),), -math.inf, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(samples):
            out = network(x).double() * y_std + y_mean
            total += out
            lse = torch.logaddexp(lse, (-tau / 2 * (y - out).square()).sum(dim=1))
    network.eval()
    ll = lse - math.log(samples) - 0.5 * math.log(2 * math.pi) + 0.5 * math.log(tau)
    return total / samples, float(ll.mean())


def _record(
    report: dict[str, Any], key: str, result: dict[str, Any], out: Path | None, line: str
) -> None:
    """Add one comparison to the report, say it on stderr, and rewrite --out."""
    report[key] = result
    print(line, file=sys.stderr)
    if out:
        out.write_text(json.dumps(report, indent=1))


def compare_loop(
    dataset: UCIDataset, protocol: UCIProtocol, samples: int, rounds: int
) -> dict[str, Any]:
    """Engine (independent and shared masks) vs per-sample loop on split 0's test rows, one
    untrained network (Glorot weights; the timing does not depend on them), in interleaved
    rounds whose starting way rotates; medians reported."""
    train, test = dataset.splits[0]
    table = standardised(dataset, train)
    torch.manual_seed(protocol.seed)
    rates = torch.full((1, 2), dataset.dropout_grid[len(dataset.dropout_grid) // 2]).double()
    network = StackedMLP.glorot([dataset.x.shape[1], dataset.hidden, 1], rates).network(0)
    y = torch.from_numpy(dataset.y[test])[:, None].double()
    tau = dataset.tau_grid[0]
    engine = make_engine(network, table, tau)

    def run_engine(mode: MaskMode) -> Callable[[], tuple[Tensor, float]]:
        return lambda: engine_scores(engine, table.x[test], y, samples, 0, mode)

    def loop() -> tuple[Tensor, float]:
        return reference_loop(network, table.x[test], y, table.y_mean, table.y_std, tau, samples)

    ways = {"engine": run_engine("independent"), "engine_shared": run_engine("shared"),
            "loop": loop}  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    answers: dict[str, tuple[Tensor, float]] = {}
    names = list(ways)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            answers[name] = ways[name]()
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(times) for name, times in seconds.items()}
    return {
        "dataset": dataset.name,
        "rows": len(test),
        "samples": samples,
        "rounds": rounds,
        "engine_seconds": median["engine"],
        "engine_shared_seconds": median["engine_shared"],
        "loop_seconds": median["loop"],
        "loop_over_engine": median["loop"] / median["engine"],
        "loop_over_engine_shared": median["loop"] / median["engine_shared"],
        "all_seconds": seconds,
        **{f"{name}_ll": ll for name, (_, ll) in answers.items()},
        **{f"{name}_rmse": scoring.rmse(mean, y) for name, (mean, _) in answers.items()},
        "largest_mean_gap_over_y_std": max(
            float((mean - answers["loop"][0]).abs().max()) / table.y_std
            for mean, _ in answers.values()
        ),
    }


def compare_training(dataset: UCIDataset, protocol: UCIProtocol) -> dict[str, Any]:
    """Split 0's grid (every dropout rate x tau, on its 80% rows): train_regressor once per
    network, against all of them as one StackedMLP; same epochs, timed in this run."""
    from mcdrop.training.recipe import TrainConfig, train_regressor

    fit, _ = holdout_rows(dataset.splits[0][0], protocol.validation_fraction)
    grid = [(p, t) for p in dataset.dropout_grid for t in dataset.tau_grid]
    epochs = protocol.epochs(dataset)
    start = time.perf_counter()
    for p, tau in grid:
        config = TrainConfig(
            tau=tau, hidden=[dataset.hidden], dropout=p, epochs=epochs, lr=protocol.lr,
            batch_size=protocol.batch_size, lengthscale=protocol.lengthscale,
        )  # fmt: skip
        train_regressor(dataset.x[fit], dataset.y[fit], config, progress=False)
    one_by_one = time.perf_counter() - start
    table = standardised(dataset, fit)
    stage = Stage([table], [0] * len(grid), [fit] * len(grid), [t for _, t in grid],
                   [p for p, _ in grid])  # fmt: skip
    start = time.perf_counter()
    train_stage(stage, dataset, protocol, protocol.seed, "stacked", progress=False)
    stacked = time.perf_counter() - start
    return {
        "dataset": dataset.name,
        "networks": len(grid),
        "epochs": epochs,
        "one_by_one_seconds": one_by_one,
        "stacked_seconds": stacked,
        "one_by_one_over_stacked": one_by_one / stacked,
    }


def format_row(result: dict[str, Any]) -> str:
    def pm(mean: float, se: float | None, digits: int) -> str:
        return f"{mean:.{digits}f} ± {se:.{digits}f}" if se is not None else f"{mean:.{digits}f}"

    return (
        f"{result['dataset']:28s} {result['n_splits']:3d} splits  "
        f"RMSE {pm(result['rmse_mean'], result['rmse_se'], 3):>16s}  "
        f"LL {pm(result['ll_mean'], result['ll_se'], 3):>16s}  "
        f"{result['seconds']['total']:8.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny Adam moments otherwise slow every step several-fold
    protocol = UCIProtocol(
        epoch_factor=args.epochs_scale,
        validation_samples=args.validation_samples,
        test_samples=args.samples,
        concrete=args.concrete,
        seed=args.seed,
    )
    report: dict[str, Any] = {
        "protocol": {
            **protocol.__dict__,
            "splits": args.splits,
            "threads": torch.get_num_threads(),
        },
        "datasets": {},
    }
    progress = not args.no_progress
    for name in args.datasets:
        dataset = load_dataset(args.data / name)
        end = len(dataset.splits)
        if args.splits is not None:
            end = min(end, args.first_split + args.splits)
        if args.first_split >= end:
            raise SystemExit(f"--first-split {args.first_split}: {name} has {end} splits")
        splits = list(range(args.first_split, end))
        result: DatasetResult = run_dataset(dataset, splits, protocol, progress)
        summary = result.summary()
        report["datasets"][name] = summary
        print(format_row(summary), file=sys.stderr, flush=True)
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
    if args.compare_loop:
        dataset = load_dataset(args.data / args.compare_loop)
        c = compare_loop(dataset, protocol, args.samples, args.compare_rounds)
        _record(report, "compare_loop", c, args.out,
                f"evaluation of {c['rows']} rows x {c['samples']} samples, medians of "
                f"{c['rounds']}: engine {c['engine_seconds']:.2f} s, shared masks "
                f"{c['engine_shared_seconds']:.2f} s, per-sample loop {c['loop_seconds']:.2f} s "
                f"(loop/engine {c['loop_over_engine']:.2f}x, "
                f"loop/shared {c['loop_over_engine_shared']:.2f}x)")  # fmt: skip
    if args.compare_training:
        dataset = load_dataset(args.data / args.compare_training)
        c = compare_training(dataset, protocol)
        _record(report, "compare_training", c, args.out,
                f"training {c['networks']} networks x {c['epochs']} epochs: one by one "
                f"{c['one_by_one_seconds']:.1f} s, stacked {c['stacked_seconds']:.1f} s "
                f"({c['one_by_one_over_stacked']:.2f}x)")  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
