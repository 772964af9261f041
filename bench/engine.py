"""Benchmark: the MC dropout engine against the usual ways, as ratios to the dense floor.

`python bench/engine.py` prints a table; `--json` prints the same figures as one JSON
object; `--ablation` adds the engine's ingredients timed in isolation. See
docs/performance.md for what is measured and why.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    emit,
    format_table,
    interleaved,
    machine,
    noisy,
    repeated,
    summarize,
    torch_threads,
)
from mcdrop.engine.core import MCEngine, MCOptions
from mcdrop.engine.masks import keep_mask, quantized_drop_probability
from mcdrop.uncertainty import ClassificationSummary

Way = Callable[[], Tensor]
SEED = 0
DENSE = "dense"
WAYS: dict[str, str] = {
    "loop": "Python loop of N forward calls, dropout modules in train mode",
    "vectorised": "input repeated N times, one forward, eager dropout (the usual way)",
    "engine_independent": "MCEngine.run, independent masks (summaries included)",
    "engine_shared": "MCEngine.run, shared masks (summaries included)",
    DENSE: "one forward of the N x B rows, dropout off (the floor)",
}


@dataclass(frozen=True)
class Case:
    """One benchmarked network: fixed weights (eval mode), batch size B and samples N."""

    name: str
    title: str
    module: nn.Module
    input_shape: tuple[int, ...]
    rows: int
    samples: int
    targets: dict[str, float]  # way -> largest acceptable ratio to the dense floor


def reference_mlp(in_features: int = 64, width: int = 512, depth: int = 3) -> nn.Sequential:
    """DESIGN.md's reference MLP: in -> depth x width (ReLU, Dropout(0.1)) -> 10 classes."""
    layers: list[nn.Module] = []
    size = in_features
    for _ in range(depth):
        layers += [nn.Linear(size, width), nn.ReLU(), nn.Dropout(0.1)]
        size = width
    layers.append(nn.Linear(size, 10))
    return nn.Sequential(*layers)


def lenet() -> nn.Sequential:
    """LeNet-like CNN on 1x28x28 with dropout only in its classifier head."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 120), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(120, 84), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(84, 10),
    )  # fmt: skip


def build_cases(quick: bool = False) -> list[Case]:
    """The two issue cases (MLP B=32 N=100, CNN B=8 N=100), or tiny ones for --quick."""
    torch.manual_seed(SEED)
    width, mlp_rows, cnn_rows, samples = (32, 4, 2, 16) if quick else (512, 32, 8, 100)
    mlp = reference_mlp(width=width).eval()
    cnn = lenet().eval()
    return [
        Case(
            "mlp", f"MLP 64 -> 3x{width} -> 10", mlp, (64,), mlp_rows, samples,
            {"engine_independent": 1.6, "engine_shared": 1.2},
        ),
        Case(
            "cnn", "LeNet CNN 1x28x28", cnn, (1, 28, 28), cnn_rows, samples,
            {"engine_independent": 0.5, "engine_shared": 0.5},
        ),
    ]  # fmt: skip


def _sampling_copy(module: nn.Module) -> nn.Module:
    """A copy in eval mode with only its dropout modules in train mode (what tutorials do)."""
    net = copy.deepcopy(module).eval()
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.train()
    return net


def make_ways(case: Case, seed: int = SEED) -> dict[str, Way]:
    """One zero-argument callable per way; the engine is built here, outside the timing.

    Every way but the floor returns mean class probabilities [B, C]; the floor returns
    the logits of the N*B expanded rows.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((case.rows, *case.input_shape), generator=gen)
    n, b = case.samples, case.rows
    ones = (1,) * len(case.input_shape)
    sampling = _sampling_copy(case.module)
    dense = copy.deepcopy(case.module).eval()
    engine = MCEngine(
        copy.deepcopy(case.module), task="classification", input_shape=case.input_shape
    )
    expanded = x.repeat(n, *ones)

    def loop() -> Tensor:
        return torch.stack([torch.softmax(sampling(x), dim=-1) for _ in range(n)]).mean(0)

    def vectorised() -> Tensor:
        out: Tensor = sampling(x.repeat(n, *ones))
        return torch.softmax(out.view(n, b, -1), dim=-1).mean(0)

    def run_engine(mode: Literal["independent", "shared"]) -> Way:
        options = MCOptions(samples=n, seed=seed, mask_mode=mode)

        def way() -> Tensor:
            summary = engine.run(x, options)
            assert isinstance(summary, ClassificationSummary)
            return summary.probabilities

        return way

    def floor() -> Tensor:
        out: Tensor = dense(expanded)
        return out

    return {
        "loop": loop,
        "vectorised": vectorised,
        "engine_independent": run_engine("independent"),
        "engine_shared": run_engine("shared"),
        DENSE: floor,
    }


def check_answers(case: Case, answers: dict[str, Tensor]) -> None:
    """Raise if a way did not compute what it should (so the benchmark times real work)."""
    for name, out in answers.items():
        rows = case.rows * case.samples if name == DENSE else case.rows
        if out.dim() != 2 or out.shape[0] != rows:
            raise RuntimeError(f"{case.name}/{name}: answer has shape {list(out.shape)}")
        if name != DENSE:
            total = out.sum(dim=-1).to(torch.float64)
            if not torch.allclose(total, torch.ones_like(total), atol=1e-5):
                raise RuntimeError(f"{case.name}/{name}: probabilities do not sum to 1")


def measure(
    cases: Sequence[Case], repeats: int, warmup: int, budget_s: float | None = None
) -> dict[str, Any]:
    """Time every way of every case, all interleaved round-robin; JSON-ready figures."""
    timed: dict[str, Callable[[], object]] = {}
    with torch.inference_mode():
        for case in cases:
            ways = make_ways(case)
            check_answers(case, {name: way() for name, way in ways.items()})
            timed.update({f"{case.name}/{name}": way for name, way in ways.items()})
        times = interleaved(timed, repeats, warmup, budget_s=budget_s)
    result: dict[str, Any] = {}
    for case in cases:
        stats = {name: summarize(times[f"{case.name}/{name}"]) for name in WAYS}
        floor = stats[DENSE].median_ms
        figures = {name: {**s.as_dict(), "ratio": s.median_ms / floor} for name, s in stats.items()}
        result[case.name] = {
            "title": case.title,
            "rows": case.rows,
            "samples": case.samples,
            "repeats_done": len(times[f"{case.name}/{DENSE}"]),
            "ways": figures,
            "targets": {
                name: {
                    "max_ratio": limit,
                    "ratio": figures[name]["ratio"],
                    "met": figures[name]["ratio"] <= limit,
                }
                for name, limit in case.targets.items()
            },
            "speedup_vs_vectorised": {
                name: stats["vectorised"].median_ms / stats[name].median_ms
                for name in ("engine_independent", "engine_shared")
            },
        }
    return result


# -- ablation: the engine's ingredients in isolation, on the MLP's 32 x 100 x 512 activation --


ABLATION_GROUPS: dict[str, tuple[str, list[str]]] = {
    # group -> (baseline, ways compared with it)
    "mask draw + apply": ("F.dropout, eager", ["keyed mask + apply", "shared mask + apply"]),
    "mask draw only": (
        "torch bernoulli float mask",
        ["keyed bool mask", "keyed 0/scale mask", "shared 0/scale mask"],
    ),
    "prefix once per row": ("layer 1 on N*B rows + mask", ["layer 1 on B rows + mask"]),
    "scale folded": ("bool mask, multiply, scale", ["0/scale mask, one multiply"]),
    "row-major layout": ("sample-major mask, strided apply", ["row-major mask, contiguous apply"]),
}


def ablation(
    repeats: int, warmup: int, quick: bool, budget_s: float | None = None
) -> dict[str, Any]:
    """Time the engine's mask and layout steps against the eager alternatives (MLP case).

    The masks are mcdrop.engine.masks.keep_mask's, as the engine draws them. Times are per
    call; sub-millisecond steps are timed as `inner` calls in a row.
    """
    rows, samples, features, p = (4, 16, 32, 0.1) if quick else (32, 100, 512, 0.1)
    inner = 1 if quick else 5
    scale = 1.0 / (1.0 - quantized_drop_probability(p))
    gen = torch.Generator().manual_seed(SEED)
    seeds, row_ids = [SEED] * rows, list(range(rows))
    cpu = torch.device("cpu")
    layer = nn.Linear(64, features).eval()
    x = torch.randn(rows, 64, generator=gen)
    x_expanded = x.repeat_interleave(samples, 0)
    act_rows = torch.relu(layer(x)).detach()  # [B, F]: the first site's input, before expansion
    act = act_rows.repeat_interleave(samples, 0)  # [B*N, F], row-major
    act3 = act.view(rows, samples, features)

    def keyed(scaled: bool = True) -> Tensor:
        """[B, N, F] keep-mask, one key per row, as the engine's independent mode draws it."""
        factor = scale if scaled else None
        return keep_mask(seeds, row_ids, 0, 0, samples, (features,), p, cpu, factor)

    def shared() -> Tensor:
        """[1, N, F] keep-mask, one key per request (shared mode)."""
        return keep_mask([SEED], [0], 0, 0, samples, (features,), p, cpu, scale)

    mask = keyed()
    mask_sample_major = mask.transpose(0, 1).contiguous()  # [N, B, F]
    steps: dict[str, Callable[[], object]] = {
        "F.dropout, eager": lambda: F.dropout(act, p, training=True),
        "keyed mask + apply": lambda: act3 * keyed(),
        "shared mask + apply": lambda: act3 * shared(),
        "torch bernoulli float mask": lambda: torch.empty_like(act).bernoulli_(1 - p),
        "keyed bool mask": lambda: keyed(scaled=False),
        "keyed 0/scale mask": keyed,
        "shared 0/scale mask": shared,
        "layer 1 on N*B rows + mask": lambda: (
            torch.relu(layer(x_expanded)).view(rows, samples, features) * mask
        ),
        "layer 1 on B rows + mask": lambda: torch.relu(layer(x)).unsqueeze(1) * mask,
        "bool mask, multiply, scale": lambda: (act3 * keyed(scaled=False)).mul_(scale),
        "0/scale mask, one multiply": lambda: act3 * keyed(),
        "sample-major mask, strided apply": lambda: act3 * mask_sample_major.transpose(0, 1),
        "row-major mask, contiguous apply": lambda: act3 * mask,
    }
    with torch.inference_mode():
        raw = interleaved(
            {k: repeated(f, inner) for k, f in steps.items()}, repeats, warmup, budget_s=budget_s
        )
        times = {k: [t / inner for t in v] for k, v in raw.items()}
    groups: dict[str, Any] = {}
    for group, (baseline, others) in ABLATION_GROUPS.items():
        base = summarize(times[baseline]).median_ms
        groups[group] = {
            "baseline": baseline,
            "ways": {
                name: {**stats.as_dict(), "ratio": stats.median_ms / base}
                for name in [baseline, *others]
                for stats in [summarize(times[name])]
            },
        }
    return {
        "shape": {"rows": rows, "samples": samples, "features": features, "p": p},
        "groups": groups,
    }


# -- output ---------------------------------------------------------------------------------


def _ms(way: dict[str, float]) -> str:
    return f"{way['median_ms']:.1f} ±{100 * way['spread']:.0f}%"


def _repeats(report: dict[str, Any]) -> str:
    done = min(case["repeats_done"] for case in report["cases"].values())
    asked = report["settings"]["repeats"]
    return str(done) if done == asked else f"{done} (of {asked}: time budget reached)"


def render(report: dict[str, Any]) -> str:
    """The report as text: main table, targets, optional ablation table."""
    cases: dict[str, Any] = report["cases"]
    m = report["machine"]
    lines = [
        f"mcdrop engine benchmark: torch {m['torch']}, {m['torch_threads']} torch threads, "
        f"{m['cpus']} CPUs, load average {m['load_average']}, "
        f"{_repeats(report)} interleaved repeats (median ms ±IQR/median)",
        *(f"  {name}: {what}" for name, what in WAYS.items()),
        "",
    ]
    headers = ["way"]
    for case in cases.values():
        headers += [f"{case['title']}, B={case['rows']} N={case['samples']}", "/ dense"]
    rows = []
    for name in WAYS:
        row = [name]
        for case in cases.values():
            way = case["ways"][name]
            row += [_ms(way), f"{way['ratio']:.2f}"]
        rows.append(row)
    lines += [format_table(headers, rows), ""]
    target_rows = []
    for key, case in cases.items():
        for name, t in case["targets"].items():
            speedup = case["speedup_vs_vectorised"][name]
            target_rows.append(
                [
                    key,
                    name,
                    f"{t['ratio']:.2f}",
                    f"<= {t['max_ratio']}",
                    "yes" if t["met"] else "NO",
                    f"{speedup:.1f}x",
                ]
            )
    headers = ["case", "way", "ratio to dense", "target", "met", "faster than vectorised"]
    lines += [format_table(headers, target_rows)]
    if "ablation" in report:
        ab = report["ablation"]
        shape = ab["shape"]
        lines += [
            "",
            f"Ablation (MLP activation: {shape['rows']} rows x {shape['samples']} samples x "
            f"{shape['features']} features, p={shape['p']}); ratio to the group's first line",
        ]
        ab_rows = []
        for group, g in ab["groups"].items():
            for name, way in g["ways"].items():
                ab_rows.append(
                    [group if name == g["baseline"] else "", name, _ms(way), f"{way['ratio']:.2f}"]
                )
        lines += [format_table(["step", "way", "ms", "ratio"], ab_rows)]
    if report.get("noisy"):
        lines += [
            "",
            "WARNING: noisy run (an IQR > 25% of its median in the main table; see the load "
            "average): "
            "re-run on a quiet machine, or with --threads 1, before quoting these figures.",
        ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeats", type=int, default=25, help="timed rounds (default 25)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--ablation", action="store_true", help="time the engine's steps too")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=60.0,
        help="stop repeating a section after this many seconds (a loaded machine stalls)",
    )
    args = parser.parse_args(argv)
    least = {"repeats": 1, "warmup": 0, "threads": 1, "budget_s": 0}
    for flag, lowest in least.items():
        value = getattr(args, flag)
        if value is not None and value < lowest:
            parser.error(f"--{flag.replace('_', '-')} must be >= {lowest}, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print it (table or JSON) and return the figures.

    torch's thread count is restored afterwards, so main() can be called in-process.
    """
    args = parse_args(argv)
    with torch_threads(args.threads):
        report = _run(args)
    emit(report, render, args.json)
    return report


def _run(args: argparse.Namespace) -> dict[str, Any]:
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    report: dict[str, Any] = {
        "benchmark": "engine",
        "machine": machine(),
        "settings": {
            "repeats": args.repeats,
            "warmup": warmup,
            "quick": args.quick,
            "seed": SEED,
            "budget_s": args.budget_s,
        },
        "ways": dict(WAYS),
        "cases": measure(build_cases(args.quick), args.repeats, warmup, args.budget_s),
    }
    if args.ablation:
        report["ablation"] = ablation(args.repeats, warmup, args.quick, args.budget_s / 2)
    report["machine"]["load_average_after"] = machine()["load_average"]
    # The ablation's micro-steps can be bimodal by nature; only the main table decides.
    report["noisy"] = noisy(
        [w["spread"] for c in report["cases"].values() for w in c["ways"].values()]
    )
    return report


if __name__ == "__main__":
    main()
