"""The server benchmark's verdict and text report: the issue's targets and the tables.

Targets are checked at concurrency 64 (or the highest level run) against the same run's
ceiling and LitServe figures; see docs/performance.md ("Server").
"""

from __future__ import annotations

import math
from typing import Any

from bench.common import format_table
from bench.workload import CEILING, LITSERVE, MCDROP, WAYS

TARGET_CONCURRENCY = 64
MIN_VS_CEILING = 0.7
MIN_VS_LITSERVE = 2.0


def targets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets at concurrency 64 (or the highest level run)."""
    level = max(int(c) for c in results)
    at = results[str(level)]
    ours, ceiling, lit = at[MCDROP], at[CEILING], at[LITSERVE]

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else math.inf

    vs_ceiling = ratio(ours["throughput_rps"], ceiling["throughput_rps"])
    vs_litserve = ratio(ours["throughput_rps"], lit["throughput_rps"])
    p99, lit_p99 = ours["p99_ms"], lit["p99_ms"]
    return {
        "concurrency": level,
        "is_issue_level": level == TARGET_CONCURRENCY,
        "vs_ceiling": {
            "ratio": vs_ceiling,
            "min": MIN_VS_CEILING,
            "met": vs_ceiling >= MIN_VS_CEILING,
        },
        "vs_litserve": {
            "ratio": vs_litserve,
            "min": MIN_VS_LITSERVE,
            "met": vs_litserve >= MIN_VS_LITSERVE,
        },
        "p99_vs_litserve": {
            "p99_ms": p99,
            "litserve_p99_ms": lit_p99,
            "met": p99 is not None and lit_p99 is not None and p99 <= lit_p99,
        },
    }


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(report: dict[str, Any]) -> str:
    """The report as text: one line per (concurrency, way), then the target check."""
    m, s = report["machine"], report["settings"]
    lines = [
        f"mcdrop server benchmark: {s['model']}, {s['rows_per_request']} row/request, "
        f"{s['samples']} samples, max_batch_rows {s['max_batch_rows']}; torch {m['torch']}, "
        f"{m['cpus']} CPUs, {m['torch_threads']} torch threads, load average {m['load_average']}",
        *(f"  {name}: {what}" for name, what in WAYS.items()),
        "",
    ]
    rows = []
    for c, by_way in report["results"].items():
        ceiling = by_way[CEILING]["throughput_rps"]
        for way, f in by_way.items():
            share = f["throughput_rps"] / ceiling if ceiling > 0 else math.nan
            rows.append(
                [
                    c,
                    way,
                    str(f["requests"]),
                    str(f["errors"]),
                    f"{f['throughput_rps']:.0f}",
                    f"{share:.2f}",
                    _ms(f["p50_ms"]),
                    _ms(f["p99_ms"]),
                    _ms(f["client_cpu_ms_per_request"], 2),
                    _ms(f["server_cpu_ms_per_request"], 2),
                    f"{f['accuracy']:.3f}",
                ]
            )
    headers = [
        "concurrency",
        "way",
        "requests",
        "errors",
        "req/s",
        "/ ceiling",
        "p50 ms",
        "p99 ms",
        "client CPU ms/req",
        "server CPU ms/req",
        "accuracy",
    ]
    lines += [
        format_table(headers, rows),
        "(ceiling latencies are per engine call; http_floor does no work: its accuracy is chance)",
        "",
    ]
    seen = []
    for c, by_way in report["results"].items():
        m = by_way[MCDROP]["server"]
        if m and m["engine_calls"]:
            seen.append(
                f"c={c}: {m['engine_calls']:.0f} engine calls of {m['mean_batch_rows']:.1f} rows"
                f", {_ms(m['compute_ms_per_call'])} ms compute each"
                f", {_ms(m['queue_ms_mean'])} ms mean queue wait"
            )
    if seen:
        lines += ["mcdrop's /metrics over the timed requests: " + "; ".join(seen), ""]
    t = report["targets"]
    p99 = t["p99_vs_litserve"]
    yes = {True: "yes", False: "NO"}
    lines += [
        format_table(
            ["target at concurrency " + str(t["concurrency"]), "measured", "met"],
            [
                [
                    f"throughput >= {MIN_VS_CEILING} x ceiling",
                    f"{t['vs_ceiling']['ratio']:.2f} x",
                    yes[t["vs_ceiling"]["met"]],
                ],
                [
                    f"throughput >= {MIN_VS_LITSERVE} x LitServe",
                    f"{t['vs_litserve']['ratio']:.2f} x",
                    yes[t["vs_litserve"]["met"]],
                ],
                [
                    "p99 <= LitServe p99",
                    f"{_ms(p99['p99_ms'])} vs {_ms(p99['litserve_p99_ms'])} ms",
                    yes[p99["met"]],
                ],
            ],
        ),
    ]
    if not t["is_issue_level"]:
        lines.append(f"(the issue's targets are at concurrency {TARGET_CONCURRENCY}; not run)")
    errors = [
        (c, w, f["first_error"])
        for c, ws in report["results"].items()
        for w, f in ws.items()
        if f["errors"]
    ]
    lines += [f"ERRORS at concurrency {c}, {w}: {e}" for c, w, e in errors]
    return "\n".join(lines)
