"""Benchmark: one very large request split over 1 vs 2 shard workers (and the plain engine).

One request of N = 20,000 samples on the shipped `digits` model, 16 held-out digits: the
local shard pool with one worker against two, interleaved in the same run, medians and
their ratio, and a check that every way answers the same statistics. The in-process engine
(torch's default threads) is timed beside them for honesty. `--ray` appends the Ray
helper's figures from bench/ray_replicas.py (replicas under load, proxy overhead) when that
module is present. See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, format_table, interleaved, machine, noisy, summarize
from mcdrop.config import Settings
from mcdrop.engine.core import MCRequest
from mcdrop.model import ServedModel
from mcdrop.repository.scan import fingerprint
from mcdrop.shards.executor import ModelRef, ShardExecutor, run_sharded
from mcdrop.shards.pool import LocalShardPool
from mcdrop.uncertainty import ClassificationSummary

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"
TEST_DIGITS = ROOT / "service" / "mcdrop" / "static" / "dashboard" / "digits-test.json"
SEED = 0
ONE, TWO, ENGINE = "shards_1_worker", "shards_2_workers", "engine_in_process"
WAYS = {
    ONE: "local shard pool, 1 worker process (1 torch thread)",
    TWO: "local shard pool, 2 worker processes (1 torch thread each), 2 shards",
    ENGINE: "MCEngine in the server process, torch's default threads, unsplit",
}
FIELDS = ("probabilities", "probabilities_std", "entropy", "expected_entropy", "variation_ratio")
# Where the Ray helper's measurements plug in: bench/ray_replicas.py exposes
# measure(quick: bool, repeats: int) -> dict (JSON-ready) and render(section) -> str.
RAY_MODULE = "bench.ray_replicas"


def digit_rows(rows: int) -> torch.Tensor:
    """The first `rows` held-out digits the dashboard ships, raw pixels [rows, 1, 8, 8]."""
    digits = json.loads(TEST_DIGITS.read_text(encoding="utf-8"))
    if rows > len(digits):
        raise ValueError(f"--rows: at most {len(digits)} test digits ship, asked for {rows}")
    return torch.tensor([d["pixels"] for d in digits[:rows]], dtype=torch.float32).unsqueeze(1)


def max_difference(a: ClassificationSummary, b: ClassificationSummary) -> float:
    """Largest absolute difference over every statistic of two summaries."""
    return max(float((getattr(a, f) - getattr(b, f)).abs().max()) for f in FIELDS)


def measure(samples: int, rows: int, repeats: int, warmup: int, budget_s: float) -> dict[str, Any]:
    """Time the three ways round-robin; check they answer the same statistics."""
    settings = Settings(device="cpu")
    model = ServedModel.load(DIGITS, settings)
    ref = ModelRef("digits", DIGITS, fingerprint(DIGITS))
    request = model.request(digit_rows(rows), model.options(samples, seed=SEED))
    with ExitStack() as stack:
        pools = {n: stack.enter_context(LocalShardPool(n, settings)) for n in (1, 2)}
        for pool in pools.values():
            pool.preload(ref)
        answers: dict[str, ClassificationSummary] = {}
        cpu: dict[str, list[tuple[float, float]]] = {ONE: [], TWO: []}  # (critical path, total)

        def way(name: str, run: Callable[[], object]) -> Callable[[], None]:
            def call() -> None:
                result = run()
                assert isinstance(result, ClassificationSummary)
                answers[name] = result
                if name in cpu:
                    spent = pools[1 if name == ONE else 2].last_cpu_s
                    cpu[name].append((max(spent) * 1e3, sum(spent) * 1e3))

            return call

        ways = {
            ONE: way(ONE, lambda: split(pools[1], ref, model, request)),
            TWO: way(TWO, lambda: split(pools[2], ref, model, request)),
            ENGINE: way(ENGINE, lambda: model.engine.run_many([request])[0]),
        }
        times = interleaved(ways, repeats, warmup=warmup, budget_s=budget_s)
    stats = {name: summarize(t) for name, t in times.items()}
    timed = {name: pairs[warmup:] for name, pairs in cpu.items()}  # drop the warm-up calls
    critical = {name: summarize([c for c, _ in pairs]) for name, pairs in timed.items()}
    total = {name: summarize([t for _, t in pairs]) for name, pairs in timed.items()}
    return {
        "samples": samples,
        "rows": rows,
        "rounds": len(times[ONE]),
        "ways": {name: s.as_dict() for name, s in stats.items()},
        "speedup_2_vs_1_worker": stats[ONE].median_ms / stats[TWO].median_ms,
        "speedup_2_workers_vs_engine": stats[ENGINE].median_ms / stats[TWO].median_ms,
        # Worker CPU time: the busiest worker's (what wall time would be with free cores) and
        # all workers' together (the work splitting adds); both barely depend on machine load.
        "worker_cpu_ms": {
            name: {"critical_path": critical[name].as_dict(), "total": total[name].as_dict()}
            for name in cpu
        },
        "cpu_speedup_2_vs_1_worker": critical[ONE].median_ms / critical[TWO].median_ms,
        "cpu_overhead_2_vs_1_worker": total[TWO].median_ms / total[ONE].median_ms,
        "max_difference": {
            f"{TWO} vs {ONE}": max_difference(answers[TWO], answers[ONE]),
            f"{TWO} vs {ENGINE}": max_difference(answers[TWO], answers[ENGINE]),
        },
        "noisy": noisy([s.spread for s in stats.values()]),
    }


def split(executor: ShardExecutor, ref: ModelRef, model: ServedModel, request: MCRequest) -> object:
    """One request through the executor, one shard per worker (as the server splits it)."""
    return run_sharded(executor, ref, model.engine.head, request)


def ray_section(quick: bool, repeats: int) -> dict[str, Any]:
    """The Ray helper's figures, or why there are none."""
    try:
        module = importlib.import_module(RAY_MODULE)
    except ModuleNotFoundError as exc:
        return {"skipped": f"{RAY_MODULE} not importable ({exc.name} missing)"}
    section: dict[str, Any] = module.measure(quick=quick, repeats=repeats)
    if "skipped" not in section:  # e.g. Ray not installed: the reason is printed instead
        section["rendered"] = module.render(section)
    return section


def render(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    figures = report["split"]
    base = figures["ways"][ONE]["median_ms"]
    rows = [
        [name, WAYS[name], f"{w['median_ms']:.0f}", f"{w['spread']:.2f}",
         f"{base / w['median_ms']:.2f}"]
        for name, w in figures["ways"].items()
    ]  # fmt: skip
    lines = [
        f"# One request, N = {figures['samples']:,} samples x {figures['rows']} rows, `digits` "
        f"({figures['rounds']} interleaved rounds)",
        "",
        format_table(["way", "what", "median ms", "spread", "speed-up vs 1 worker"], rows),
        "",
        f"speed-up, 2 workers vs 1: {figures['speedup_2_vs_1_worker']:.2f}; "
        f"2 workers vs the in-process engine: {figures['speedup_2_workers_vs_engine']:.2f}",
        "worker CPU time, busiest worker, 1 worker / 2 workers (the wall-clock speed-up free "
        f"cores would give): {figures['cpu_speedup_2_vs_1_worker']:.2f}; all workers' CPU "
        f"time, 2 / 1 (work added by splitting): {figures['cpu_overhead_2_vs_1_worker']:.2f}",
        "largest difference between answers: "
        + ", ".join(f"{k}: {v:.1e}" for k, v in figures["max_difference"].items()),
        f"load average before {report['machine']['load_average']}, after "
        f"{report['machine']['load_average_after']}"
        + ("  (NOISY: some way's spread > 25%)" if figures["noisy"] else ""),
    ]
    if "ray" in report:
        ray = report["ray"]
        lines += ["", ray.get("rendered") or f"Ray: {ray.get('skipped', 'no figures')}"]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--samples", type=int, default=20_000, help="MC samples (20,000)")
    parser.add_argument("--rows", type=int, default=16, help="held-out digits per request (16)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--budget-s", type=float, default=300.0, help="no new round after this")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    parser.add_argument("--ray", action="store_true", help=f"append {RAY_MODULE}'s figures")
    args = parser.parse_args(argv)
    for flag, lowest in {"samples": 64, "rows": 1, "repeats": 1, "warmup": 0}.items():
        if getattr(args, flag) < lowest:
            parser.error(f"--{flag} must be >= {lowest}, got {getattr(args, flag)}")
    if args.quick:
        args.samples, args.rows = min(args.samples, 512), min(args.rows, 2)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print it (table or JSON) and return the figures."""
    args = parse_args(argv)
    report: dict[str, Any] = {
        "benchmark": "scale",
        "machine": machine(),
        "ways": dict(WAYS),
        "split": measure(args.samples, args.rows, args.repeats, args.warmup, args.budget_s),
    }
    report["machine"]["load_average_after"] = machine()["load_average"]
    if args.ray:
        report["ray"] = ray_section(args.quick, args.repeats)
    emit(report, render, args.json)
    return report


if __name__ == "__main__":
    main()
