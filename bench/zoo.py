"""Benchmark: the engine on the test zoo's models against their own training-mode recipe.

`python bench/zoo.py` times, side by side in interleaved rounds, for B rows x N samples of
every zoo model that samples (tests/model_zoo.py: timm-style ViT with DropPath, LockedDropout,
Gaussian and hand-written dropout, a 2-layer LSTM, HF-style BERT, a U-Net, ...):
  engine     mcdrop's MCEngine.run (built once, outside the timing)
  loop       the model in training mode (BatchNorm-like modules in eval), N forward calls
  vectorised the same, the B rows repeated N times in one forward call
  dense      one forward of the N x B rows in eval, no dropout: the floor all of them pay
  whole      only for models with submodules fx cannot trace (kept opaque in the graph): the
             same engine forced to run the model whole on rows x samples, the fallback such
             models had before; "opaque vs whole" is the speed-up of keeping the graph
Medians in ms, ratios to the dense floor, and the engine / recipe variance ratio of the same
run (a fast but wrong engine shows there). For DropConnect (one weight mask per forward call)
the vectorised recipe shares one mask among all samples: it is timed, but the variance
reference is the loop. `--json` prints the figures as one JSON object.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the zoo lives with the tests that check it

from model_zoo import DETERMINISTIC, MASK_PER_CALL, ZOO  # noqa: E402

from bench.common import emit, format_table, interleaved, machine, torch_threads  # noqa: E402
from mcdrop.engine.audit import training_mode  # noqa: E402
from mcdrop.engine.core import MCEngine, MCOptions  # noqa: E402
from mcdrop.engine.fallback import whole_program  # noqa: E402
from mcdrop.uncertainty import RegressionSummary  # noqa: E402

WAYS = ("engine", "loop", "vectorised", "dense")


def _ways(name: str, rows: int, samples: int) -> tuple[dict[str, Callable[[], object]], float, str]:
    """The four timed calls of one model, its engine/recipe variance ratio, its program."""
    factory, shape, _, _ = ZOO[name]
    kept = list(DETERMINISTIC.get(name, ()))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((rows, *shape), generator=gen)
    expanded = x.repeat_interleave(samples, dim=0)
    engine = MCEngine(factory(), task="regression", input_shape=shape)
    model = factory()
    options = MCOptions(samples=samples, seed=0, interval_levels=())

    def run_engine() -> object:
        return engine.run(x, options)

    def loop() -> object:
        with training_mode(model, kept), torch.inference_mode():
            return [model(x) for _ in range(samples)]

    def vectorised() -> Tensor:
        with training_mode(model, kept), torch.inference_mode():
            out: Tensor = model(expanded)
            return out

    def dense() -> object:
        with torch.inference_mode():
            return model.eval()(expanded)

    summary = engine.run(x, options)
    assert isinstance(summary, RegressionSummary)
    if name in MASK_PER_CALL:
        passes = torch.stack(loop())  # type: ignore[arg-type]
        reference = passes.double().var(dim=0)
    else:
        reference = vectorised().reshape(rows, samples, -1).double().var(dim=1)
    ratio = float(summary.epistemic_variance.sum() / reference.sum())
    ways = {"engine": run_engine, "loop": loop, "vectorised": vectorised, "dense": dense}
    if engine.coverage()["opaque"]:
        whole = _forced_whole(factory, shape)
        ways["whole"] = lambda: whole.run(x, options)
    return ways, ratio, str(engine.coverage()["program"])


def _forced_whole(factory: Callable[[], Any], shape: tuple[int, ...]) -> MCEngine:
    """The engine with its program replaced by the whole-model fallback (same sites, keys)."""
    module = factory()
    engine = MCEngine(module, task="regression", input_shape=shape, audit="off")
    program = engine.program  # prepared on `module`: its training branches are set
    whole = whole_program(module, shape, "all", engine.dtype, program.random_calls)
    whole.branches = program.branches
    engine.program = whole
    return engine


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every sampled zoo model, every way, interleaved rounds; medians and ratios."""
    results: dict[str, Any] = {}
    skipped = [n for n, (*_, expected) in ZOO.items() if expected != "sampled"]
    for name in (n for n in ZOO if n not in skipped):
        ways, ratio, program = _ways(name, args.rows, args.samples)
        times = interleaved(ways, args.rounds)
        medians = {way: median(times[way]) for way in ways}
        results[name] = {"ms": medians, "program": program, "variance_ratio": ratio,
                         "to_dense": {w: medians[w] / medians["dense"] for w in ways}}  # fmt: skip
    return {"machine": machine(), "rows": args.rows, "samples": args.samples,
            "rounds": args.rounds, "models": results, "skipped": skipped}  # fmt: skip


def render(report: dict[str, Any]) -> str:
    """The table: medians, ratios to the dense floor, speed-ups, the variance check."""
    rows = []
    for name, r in report["models"].items():
        ms, dense = r["ms"], r["to_dense"]
        rows.append([name, r["program"], *(f"{ms[w]:.1f}" for w in WAYS),
                     *(f"{dense[w]:.2f}" for w in ("engine", "loop", "vectorised")),
                     f"{ms['loop'] / ms['engine']:.1f}x", f"{ms['vectorised'] / ms['engine']:.1f}x",
                     f"{ms['whole'] / ms['engine']:.1f}x" if "whole" in ms else "-",
                     f"{r['variance_ratio']:.3f}"])  # fmt: skip
    head = ["model", "program", *(f"{w} ms" for w in WAYS), "engine/dense", "loop/dense",
            "vect./dense", "engine vs loop", "engine vs vect.", "opaque vs whole",
            "var. ratio"]  # fmt: skip
    title = (f"zoo: {report['rows']} rows x {report['samples']} samples, medians of "
             f"{report['rounds']} interleaved rounds; skipped (refused at load): "
             f"{', '.join(report['skipped']) or 'none'}")  # fmt: skip
    return title + "\n" + format_table(head, rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="2 rows x 16 samples, 3 rounds")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, help="also save the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.samples, args.rounds = 2, 16, 3
    with torch_threads(args.threads):
        report = measure(args)
    emit(report, render, args.json, args.out)
    return report


if __name__ == "__main__":
    main()
