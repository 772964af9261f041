"""Helpers shared by the benchmarks: interleaved repeats, robust statistics, tables, threads, GC.

Absolute times on shared CPUs drift, so every benchmark runs its ways round-robin within
each repeat (drift hits all alike) and reports medians and ratios measured in the same run.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's garbage collector held off for one bounded slice, run once after it.

    A full collection of this process's heap stalls every in-flight request for a few hundred
    ms; that pause belongs to the load generator, not to the server being measured.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.collect()


def time_call(fn: Callable[[], object]) -> float:
    """Wall time of one call of fn in milliseconds, with the garbage collector held off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    finally:
        if enabled:
            gc.enable()


def interleaved(
    ways: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    before: Callable[[], object] | None = None,
    budget_s: float | None = None,
) -> dict[str, list[float]]:
    """Times in ms of each way, `repeats` each, run round-robin (start rotated each repeat).

    `warmup` untimed rounds come first (allocator, kernel selection, thread pools);
    `before`, when given, runs untimed before every timed call (to set the scene). With
    `budget_s`, no new round starts once that much time has passed (at least 3 rounds run).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(ways)
    for _ in range(warmup):
        for name in names:
            ways[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(repeats):
        if budget_s is not None and r >= 3 and time.perf_counter() - start > budget_s:
            break
        gc.collect()
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if before is not None:
                before()
            times[name].append(time_call(ways[name]))
    return times


@dataclass(frozen=True)
class Stats:
    """Robust summary of one way's repeated times (ms)."""

    median_ms: float
    min_ms: float
    spread: float  # interquartile range / median: how noisy the repeats were

    def as_dict(self) -> dict[str, float]:
        """JSON-ready form."""
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "spread": self.spread}


def summarize(times: Sequence[float]) -> Stats:
    """Median, minimum and relative interquartile range of a list of times."""
    if not times:
        raise ValueError("no times to summarize")
    median = statistics.median(times)
    if len(times) >= 4:
        q1, _, q3 = statistics.quantiles(times, n=4)
        iqr = q3 - q1
    else:
        iqr = max(times) - min(times)
    return Stats(median, min(times), iqr / median if median > 0 else 0.0)


def repeated(fn: Callable[[], object], times: int) -> Callable[[], None]:
    """fn called `times` times in a row: lifts sub-millisecond calls above timer noise."""

    def run() -> None:
        for _ in range(times):
            fn()

    return run


def noisy(spreads: Sequence[float], limit: float = 0.25) -> bool:
    """True when any way's interquartile range exceeds `limit` of its median."""
    return any(s > limit for s in spreads)


def set_threads(threads: int | None) -> None:
    """torch intra-op threads; None keeps torch's default."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """set_threads for a block, torch's thread count restored after it (main() in-process)."""
    before = torch.get_num_threads()
    set_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine() -> dict[str, object]:
    """What the figures were measured on (numbers are only comparable within one run)."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (also readable as plain text), columns padded to equal width."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def emit(
    report: dict[str, Any],
    render: Callable[[dict[str, Any]], str],
    as_json: bool,
    out: Path | None = None,
) -> None:
    """Print a benchmark's report (its table, or JSON) and save the JSON at `out` if given."""
    text = json.dumps(report, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
    print(text if as_json else render(report))
