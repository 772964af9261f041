"""Benchmark: the HTTP server under concurrent load, next to the in-process ceiling and LitServe.

`python bench/server.py` prints a table; `--json` prints the same figures as one JSON object.
Load comes from async httpx clients (one connection per concurrent worker) on 127.0.0.1 only:
the shipped `digits` model, 1 row per request, 100 MC samples, at concurrency 1, 16 and 64.
See docs/performance.md ("Server").
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ceiling import ceiling_slice
from bench.common import emit, machine, torch_threads
from bench.load import Endpoint, Slice, figures, http_slice
from bench.server_report import render, targets
from bench.servers import (
    LITSERVE_BATCH_TIMEOUT_S,
    free_ports,
    launched,
    server_env,
    server_specs,
    wait_ready,
)
from bench.workload import (
    ANSWER_CHECKS,
    CEILING,
    FLOOR,
    HOST,
    LITSERVE,
    MCDROP,
    MODEL,
    MODEL_DIR,
    SAMPLES,
    WAYS,
    Digits,
)
from mcdrop.config import Settings
from mcdrop.model import ServedModel


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Start the servers, drive every way at every concurrency (interleaved), stop them."""
    digits = Digits.load()
    settings = Settings(device="cpu")  # LitServe runs on the CPU too; MCDROP_* apply otherwise
    model = ServedModel.load(MODEL_DIR, settings)
    gc.collect()
    gc.freeze()  # torch, sklearn and the model: never worth a collector's scan
    max_rows = settings.max_batch_rows or model.spec.batching.max_batch_rows
    env = server_env(args.threads)
    served = [MCDROP, LITSERVE, FLOOR]
    ports = free_ports(served)
    pooled = {c: {way: Slice() for way in WAYS} for c in args.concurrency}
    with ExitStack() as stack:
        servers = {
            name: stack.enter_context(launched(name, command, env, ports[name], predict, ready))
            for name, (command, predict, ready) in server_specs(ports, max_rows).items()
        }
        wait_ready(list(servers.values()), args.start_timeout_s)
        pids = {name: s.process.pid for name, s in servers.items()}
        endpoints = {
            name: Endpoint(
                s.url(s.predict_path),
                ANSWER_CHECKS[name],
                pgid=s.process.pid,
                metrics_url=s.url("/metrics") if name == MCDROP else None,
            )
            for name, s in servers.items()
        }
        per_slice = math.ceil(args.requests / args.rounds)
        seconds = args.duration_s / args.rounds
        first = 0
        for c in args.concurrency:
            ways = list(WAYS)
            for r in range(args.rounds):
                for way in ways[r % len(ways) :] + ways[: r % len(ways)]:
                    if way == CEILING:
                        group = min(c, max_rows)
                        part = ceiling_slice(model, digits, group, first, per_slice, seconds)
                    else:
                        part = http_slice(endpoints[way], digits, c, first, per_slice, seconds)
                    pooled[c][way].add(part)
                    if not args.json:
                        print(
                            f"  c={c} round {r + 1}/{args.rounds} {way}: "
                            f"{part.requests / part.wall_s if part.wall_s else 0:.0f} req/s",
                            file=sys.stderr,
                        )
                first += per_slice  # each round's requests (and seeds) are new ones
    results = {
        str(c): {
            way: figures(s, "batch" if way == CEILING else "request") for way, s in by_way.items()
        }
        for c, by_way in pooled.items()
    }
    return {
        "machine": machine(),
        "settings": {
            "model": MODEL,
            "samples": SAMPLES,
            "rows_per_request": 1,
            "concurrency": args.concurrency,
            "requests": args.requests,
            "duration_s": args.duration_s,
            "rounds": args.rounds,
            "max_batch_rows": max_rows,
            "litserve_batch_timeout_s": LITSERVE_BATCH_TIMEOUT_S,
            "quick": args.quick,
            "threads": args.threads,
            "host": HOST,
            "device": "cpu",
        },
        "servers": {name: {"pid": pid, "port": ports[name]} for name, pid in pids.items()},
        "ways": WAYS,
        "results": results,
        "targets": targets(results),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags (--quick sets small defaults for the test)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="tiny counts, concurrency 1 and 4")
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per way and concurrency (default 2000; quick 24)",
    )
    parser.add_argument(
        "--duration-s",
        type=float,
        default=None,
        help="time cap per way and concurrency (default 8; quick 5)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds the requests are split into (default 3)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=None,
        help="concurrency levels (default 1 16 64; quick 1 4)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads, here and in every server"
    )
    parser.add_argument(
        "--start-timeout-s",
        type=float,
        default=120.0,
        help="how long the servers may take to become ready",
    )
    args = parser.parse_args(argv)
    defaults = {
        "requests": (24, 2000),
        "duration_s": (5.0, 8.0),
        "rounds": (1, 3),
        "concurrency": ([1, 4], [1, 16, 64]),
    }
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for flag in ("requests", "rounds", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not args.duration_s > 0 or not args.start_timeout_s > 0:
        parser.error("--duration-s and --start-timeout-s must be > 0")
    if min(args.concurrency) < 1:
        parser.error(f"--concurrency levels must be >= 1, got {args.concurrency}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print it (table or JSON) and return the figures."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        try:
            report = measure(args)
        finally:
            gc.unfreeze()  # measure() froze the heap; an importing caller gets its collector back
    emit(report, render, args.json)
    return report


if __name__ == "__main__":
    main()
