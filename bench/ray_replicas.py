"""Benchmark: 1 vs 2 Ray Serve replicas under the server benchmark's load, and Ray's proxy cost.

Three ways serve the same app over the shipped `digits` model, side by side in one run:
plain uvicorn (one process), and Ray Serve with 1 and with 2 replicas behind Ray's proxy (two
applications, /r1 and /r2, on one local cluster). Every process runs torch on one thread
(Ray gives a 1-CPU replica one), so the ways differ only in HTTP path and replica count.
Load: bench/load.py's async clients, one row and 100 seeded samples per request, rounds
interleaved. Ray starts only in a loopback-only network namespace: `make bench-ray`.
`python bench/scale.py --ray` appends these figures; see docs/scaling.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, format_table, machine
from bench.load import Endpoint, Slice, figures, http_slice
from bench.servers import free_port as free_loopback_port
from bench.servers import launched, server_env, uvicorn_command, wait_ready
from bench.workload import HOST, MODEL, ROOT, SAMPLES, Digits, mcdrop_answer

UVICORN, RAY_1, RAY_2 = "uvicorn", "ray_1_replica", "ray_2_replicas"
WAYS = {
    UVICORN: "plain uvicorn, one process (what `mcdrop serve` runs)",
    RAY_1: "Ray Serve, 1 replica (1 CPU) behind Ray's HTTP proxy",
    RAY_2: "Ray Serve, 2 replicas (1 CPU each) behind the same proxy",
}
PREFIX = {RAY_1: "/r1", RAY_2: "/r2"}
PREDICT = f"/v1/models/{MODEL}/predict"
CLUSTER_CPUS = 4  # logical: the two deployments' 3 replicas fit; real cores are what they are


def ray_cpu_s() -> dict[str, float]:
    """CPU seconds so far of this machine's Ray processes by role: proxy, replicas, the rest.

    Read from /proc (Linux; empty elsewhere): Ray names its actor processes `ray::<Class>`.
    Every Ray process on the machine counts, so no other Ray cluster should run meanwhile.
    """
    proc = Path("/proc")
    totals = {"proxy": 0.0, "replicas": 0.0, "ray_other": 0.0}
    if not proc.is_dir():
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick
        if cmdline.startswith("ray::ProxyActor"):
            totals["proxy"] += cpu
        elif cmdline.startswith("ray::ServeReplica"):
            totals["replicas"] += cpu
        elif cmdline.startswith("ray::") or any(
            name in cmdline for name in ("raylet", "gcs_server", "ray/_private", "ray/dashboard")
        ):
            totals["ray_other"] += cpu
    return totals


def unavailable() -> str | None:
    """Why Ray may not start here (not installed, or traffic could leave the machine)."""
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed: pip install '.[ray]'"
    others = sorted(name for _, name in socket.if_nameindex() if name != "lo")
    if others:
        return (
            f"Ray starts only in a loopback-only network namespace (here also {', '.join(others)})"
            ": run `make bench-ray`"
        )
    return None


@contextmanager
def ray_apps(threads: int) -> Iterator[int]:
    """Apps /r1 (1 replica) and /r2 (2 replicas) on a Ray cluster; the proxy's port.

    Joins the cluster this process is already connected to (a test session's), else starts
    one and stops it after; either way only its own applications are removed.
    """
    import ray
    from ray import serve

    from mcdrop.config import Settings
    from mcdrop.ray_options import RayOptions
    from mcdrop.ray_serve import application, connect, start_proxy

    own = not ray.is_initialized()
    if own:
        # No replica logs echoed here: this process is also the load generator (and --json).
        connect(None, num_cpus=CLUSTER_CPUS, object_store_bytes=128 << 20, log_to_driver=False)
    try:
        _, port = start_proxy(HOST, free_loopback_port())
        settings = Settings(model_repository=ROOT / "models", device="cpu")
        for way, replicas in ((RAY_1, 1), (RAY_2, 2)):
            options = RayOptions(replicas=replicas, num_cpus=float(threads))
            serve.run(application(settings, options), name=way, route_prefix=PREFIX[way],
                      logging_config={"enable_access_log": False})  # as uvicorn's here  # fmt: skip
        yield port
    finally:
        for way in PREFIX:
            serve.delete(way)
        if own:
            serve.shutdown()
            ray.shutdown()


def measure(
    quick: bool = False,
    repeats: int = 3,
    concurrency: Sequence[int] | None = None,
    requests: int | None = None,
    duration_s: float | None = None,
) -> dict[str, Any]:
    """Every way at every concurrency, rounds interleaved; JSON-ready, or {"skipped": why}."""
    reason = unavailable()
    if reason is not None:
        return {"skipped": reason}
    levels = list(concurrency or ([1, 4] if quick else [1, 16]))
    per_way = requests or (24 if quick else 600)
    seconds = duration_s or (4.0 if quick else 10.0)
    rounds = 1 if quick else max(1, repeats)
    digits = Digits.load()
    threads = 1
    port = free_loopback_port()
    command = uvicorn_command("mcdrop.app:create_app", port, factory=True)
    pooled = {c: {way: Slice() for way in WAYS} for c in levels}
    ray_cpu: dict[int, dict[str, dict[str, float]]] = {c: {} for c in levels}
    server_ctx = launched(UVICORN, command, server_env(threads), port, PREDICT, "/v2/health/ready")
    with server_ctx as server, ray_apps(threads) as ray_port:
        wait_ready([server], 120.0)
        endpoints = {
            UVICORN: Endpoint(server.url(PREDICT), mcdrop_answer, pgid=server.process.pid),
            **{w: Endpoint(f"http://{HOST}:{ray_port}{PREFIX[w]}{PREDICT}", mcdrop_answer)
               for w in PREFIX},
        }  # fmt: skip
        per_slice = math.ceil(per_way / rounds)
        first = 0
        for c in levels:
            ways = list(WAYS)
            for r in range(rounds):
                for way in ways[r % len(ways) :] + ways[: r % len(ways)]:
                    before = ray_cpu_s()
                    part = http_slice(endpoints[way], digits, c, first, per_slice, seconds / rounds)
                    after = ray_cpu_s()
                    pooled[c][way].add(part)
                    if way in PREFIX:
                        spent = ray_cpu[c].setdefault(way, {})
                        for role, cpu_s in after.items():
                            spent[role] = spent.get(role, 0.0) + cpu_s - before.get(role, 0.0)
                    if not quick:
                        rate = part.requests / part.wall_s if part.wall_s else 0.0
                        print(f"  c={c} round {r + 1}/{rounds} {way}: {rate:.0f} req/s",
                              file=sys.stderr)  # fmt: skip
                first += per_slice
    results = {
        str(c): {way: figures(s, "request") for way, s in by_way.items()}
        for c, by_way in pooled.items()
    }
    for c, by_way in ray_cpu.items():  # Ray's CPU ms per request, by process role
        for way, spent in by_way.items():
            done = pooled[c][way].requests
            results[str(c)][way]["ray_cpu_ms_per_request"] = {
                role: cpu_s / done * 1e3 if done else None for role, cpu_s in spent.items()
            }
    return {
        "benchmark": "ray_replicas",
        "machine": machine(),
        "settings": {
            "model": MODEL,
            "samples": SAMPLES,
            "rows_per_request": 1,
            "concurrency": levels,
            "requests": per_way,
            "duration_s": seconds,
            "rounds": rounds,
            "torch_threads_per_process": threads,
            "quick": quick,
        },
        "ways": dict(WAYS),
        "results": results,
        "summary": summary(results),
    }


def summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The two answers asked for: 2 vs 1 replicas (busiest level), and the proxy's added ms."""
    low, high = str(min(int(c) for c in results)), str(max(int(c) for c in results))

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    at_low, at_high = results[low], results[high]
    p50_ray, p50_plain = at_low[RAY_1]["p50_ms"], at_low[UVICORN]["p50_ms"]
    return {
        "throughput_concurrency": int(high),
        "replicas_2_vs_1_throughput": ratio(
            at_high[RAY_2]["throughput_rps"], at_high[RAY_1]["throughput_rps"]
        ),
        "ray_1_vs_uvicorn_throughput": ratio(
            at_high[RAY_1]["throughput_rps"], at_high[UVICORN]["throughput_rps"]
        ),
        "latency_concurrency": int(low),
        "proxy_overhead_ms_p50": None if p50_ray is None or p50_plain is None
        else p50_ray - p50_plain,
        "ray_1_vs_uvicorn_p50": ratio(p50_ray, p50_plain),
        "valid": all(w["valid"] for by_way in results.values() for w in by_way.values()),
    }  # fmt: skip


def render(section: dict[str, Any]) -> str:
    """The figures as a Markdown table and two lines of verdict."""
    if "skipped" in section:
        return f"Ray Serve replicas: skipped ({section['skipped']})"
    settings, s = section["settings"], section["summary"]
    rows = []
    for c, by_way in section["results"].items():
        base = by_way[UVICORN]["throughput_rps"] or math.nan
        for way, f in by_way.items():
            cpu = f.get("ray_cpu_ms_per_request") or {}
            server = (
                f["server_cpu_ms_per_request"]
                if way == UVICORN
                else sum(v for v in cpu.values() if v is not None)
                if cpu
                else None
            )
            rows.append([c, way, f"{f['throughput_rps']:.1f}", f"{f['throughput_rps'] / base:.2f}",
                         f"{f['p50_ms']:.1f}" if f["p50_ms"] is not None else "-",
                         f"{f['p99_ms']:.1f}" if f["p99_ms"] is not None else "-",
                         "-" if server is None else f"{server:.1f}",
                         "-" if cpu.get("proxy") is None else f"{cpu['proxy']:.1f}",
                         f"{f['errors']}", f"{f['accuracy']:.2f}"])  # fmt: skip

    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    return "\n".join([
        f"# Ray Serve replicas: `{settings['model']}`, 1 row x {settings['samples']} samples per "
        f"request, {settings['rounds']} interleaved round(s), 1 torch thread per process",
        "",
        format_table(["concurrency", "way", "req/s", "vs uvicorn", "p50 ms", "p99 ms",
                      "server CPU ms/req", "of it proxy", "errors", "accuracy"], rows),
        "",
        f"2 replicas vs 1 at concurrency {s['throughput_concurrency']}: "
        f"{num(s['replicas_2_vs_1_throughput'], '.2f')}x throughput; 1 Ray replica vs uvicorn: "
        f"{num(s['ray_1_vs_uvicorn_throughput'], '.2f')}x",
        f"Ray's proxy at concurrency {s['latency_concurrency']}: p50 "
        f"{num(s['proxy_overhead_ms_p50'], '+.1f')} ms per request "
        f"({num(s['ray_1_vs_uvicorn_p50'], '.2f')}x uvicorn's p50)"
        + ("" if s["valid"] else "  (INVALID: some requests failed)"),
    ])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run, print (table or JSON), return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="tiny counts (for tests)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--requests", type=int, help="per way and concurrency (default 600)")
    parser.add_argument("--duration-s", type=float, help="cap per way and concurrency (10)")
    parser.add_argument("--concurrency", type=int, nargs="+", help="levels (default 1 16)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or (args.requests is not None and args.requests < 1):
        parser.error("--rounds and --requests must be >= 1")
    if args.concurrency is not None and min(args.concurrency) < 1:
        parser.error(f"--concurrency levels must be >= 1, got {args.concurrency}")
    report = measure(args.quick, args.rounds, args.concurrency, args.requests, args.duration_s)
    emit(report, render, args.json)
    return report


if __name__ == "__main__":
    main()
