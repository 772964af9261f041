"""Benchmark: small requests' latency while one maximum-size request runs, interleaving on and off.

`python bench/fairness.py` starts a real server (uvicorn over create_app, what `mcdrop serve`
runs) on 127.0.0.1 over a copy of the shipped models, once with MCDROP_INTERLEAVE=true and
once with false. Each time it sends 1-row requests at the model's default samples at a steady
rate for --duration-s, (i) alone and (ii) while one max_rows x max_samples request runs on the
same model; that request's deadline ends it just after the window, and one more small request
then shows whether the worker really stopped computing it. Prints a table with ratios;
--out PATH saves the figures as JSON. Bounded: rate x duration requests per phase, 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.common import emit, format_table, machine, torch_threads
from bench.load import JSON_HEADERS, percentile
from bench.servers import free_port, launched, server_env, uvicorn_command, wait_ready
from bench.workload import HOST, ROOT
from mcdrop.config import Settings
from mcdrop.model import ServedModel

MODELS = ("digits", "toy-regression")  # the shipped repository the server loads
MODES = {"on": "true", "off": "false"}  # MCDROP_INTERLEAVE of each server
ALONE, WITH_BIG = "alone", "with max-size request"
MAX_CONNECTIONS = 256  # every small request in flight has its own connection (open loop)
MAX_PER_PHASE = 250  # all of a phase may queue behind the big request: below queue_size (256)
DEADLINE_GRACE_S = 2.0  # the max-size request's deadline: this long after the window ends


@dataclass(frozen=True)
class Workload:
    """What is asked of the server: the model, its small and max-size requests, the pace."""

    model: str
    input_shape: tuple[int, ...]
    default_samples: int
    big_rows: int
    big_samples: int
    rate: float
    duration_s: float
    settle_s: float

    def small(self, i: int) -> bytes:
        """Small request i: one row (values cycling in [-4, 4]), default samples, seed i."""
        value = -4.0 + (i * 0.37) % 8.0
        return json.dumps({"rows": [_row(self.input_shape, value)], "seed": i}).encode()

    def big(self, timeout_ms: float) -> bytes:
        """The max-size request: big_rows rows x big_samples samples, with a deadline."""
        rows = [
            _row(self.input_shape, -4.0 + 8.0 * r / self.big_rows) for r in range(self.big_rows)
        ]
        doc = {"rows": rows, "samples": self.big_samples, "seed": 0, "timeout_ms": timeout_ms}
        return json.dumps(doc).encode()

    @property
    def count(self) -> int:
        """Small requests per phase."""
        return max(1, math.ceil(self.rate * self.duration_s))


def _row(shape: Sequence[int], value: float) -> Any:
    """One input row of `shape` filled with `value`, as nested lists."""
    if not shape:
        return value
    return [_row(shape[1:], value) for _ in range(shape[0])]


@dataclass
class Phase:
    """Latencies (ms) of one phase's small requests and what went wrong."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None

    def figures(self) -> dict[str, Any]:
        """JSON-ready: count, errors, p50 and p99."""
        lat = self.latencies_ms
        return {
            "requests": len(lat),
            "errors": self.errors,
            "first_error": self.first_error,
            "p50_ms": percentile(lat, 50) if lat else None,
            "p99_ms": percentile(lat, 99) if lat else None,
            "max_ms": max(lat) if lat else None,
        }


async def _small(client: httpx.AsyncClient, url: str, body: bytes, samples: int) -> float:
    """Send one small request; its latency in ms (raises ValueError on a wrong answer)."""
    t0 = time.perf_counter()
    response = await client.post(url, content=body, headers=JSON_HEADERS)
    ms = (time.perf_counter() - t0) * 1e3
    if response.status_code != 200:
        raise ValueError(f"HTTP {response.status_code}: {response.content[:200]!r}")
    doc = response.json()
    if doc.get("samples_used") != samples or len(doc.get("predictions", [])) != 1:
        raise ValueError(f"unexpected answer: {response.content[:200]!r}")
    return ms


async def _phase(client: httpx.AsyncClient, url: str, work: Workload, first: int) -> Phase:
    """Small requests first .. first+count-1 sent open loop at a steady rate; wait for all."""
    phase = Phase()

    async def one(i: int) -> None:
        try:
            phase.latencies_ms.append(
                await _small(client, url, work.small(i), work.default_samples)
            )
        except (httpx.HTTPError, ValueError) as exc:
            phase.errors += 1
            phase.first_error = phase.first_error or f"request {i}: {type(exc).__name__}: {exc}"

    start = time.perf_counter()
    tasks = []
    for k in range(work.count):
        await asyncio.sleep(max(0.0, start + k / work.rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one(first + k)))
    await asyncio.gather(*tasks)
    return phase


async def _mode(url: str, work: Workload) -> dict[str, Any]:
    """Both phases against one server, then the max-size request's outcome and a probe."""
    limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=64)
    # trust_env=False: no proxy from the environment may route 127.0.0.1 elsewhere.
    async with httpx.AsyncClient(limits=limits, timeout=600.0, trust_env=False) as client:
        for i in range(5):  # untimed: connections, allocator, first-call paths
            await _small(client, url, work.small(10**6 + i), work.default_samples)
        alone = await _phase(client, url, work, 0)
        timeout_ms = (work.settle_s + work.duration_s + DEADLINE_GRACE_S) * 1e3
        sent = time.perf_counter()
        big = asyncio.create_task(client.post(url, content=work.big(timeout_ms),
                                              headers=JSON_HEADERS))  # fmt: skip
        await asyncio.sleep(work.settle_s)  # it has arrived and started
        during = await _phase(client, url, work, work.count)
        response = await big
        big_s = time.perf_counter() - sent
        probe_ms = await _small(client, url, work.small(2 * work.count), work.default_samples)
    return {
        "phases": {ALONE: alone.figures(), WITH_BIG: during.figures()},
        "big": {"status": response.status_code, "seconds": big_s, "deadline_ms": timeout_ms},
        "probe_after_big_ms": probe_ms,
    }


def _workload(args: argparse.Namespace) -> Workload:
    """The model's limits from its manifest (the shipped folder), scaled by the flags."""
    model = ServedModel.load(ROOT / "models" / args.model, Settings(device="cpu"))
    mc = model.spec.mc
    return Workload(
        model=args.model,
        input_shape=tuple(model.spec.input.shape),
        default_samples=mc.default_samples,
        big_rows=args.big_rows or mc.max_rows,
        big_samples=args.big_samples or mc.max_samples,
        rate=args.rate,
        duration_s=args.duration_s,
        settle_s=args.settle_s,
    )


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One server per interleave setting, in turn; both phases against each."""
    work = _workload(args)
    results: dict[str, Any] = {}
    servers: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="mcdrop-fairness-") as tmp:
        repository = Path(tmp) / "models"
        for name in MODELS:
            shutil.copytree(ROOT / "models" / name, repository / name)
        for mode, flag in MODES.items():
            env = server_env(args.threads) | {
                "MCDROP_MODEL_REPOSITORY": str(repository),
                "MCDROP_INTERLEAVE": flag,
            }
            port = free_port()
            command = uvicorn_command("mcdrop.app:create_app", port, factory=True)
            path = f"/v1/models/{work.model}/predict"
            with launched(f"mcdrop-{mode}", command, env, port, path, "/v2/health/ready") as s:
                wait_ready([s], args.start_timeout_s)
                servers[mode] = {"pid": s.process.pid, "port": port}
                results[mode] = asyncio.run(_mode(s.url(path), work))
            if not args.json:
                print(f"  interleave {mode}: done", file=sys.stderr)
    return {
        "machine": machine(),
        "settings": {
            "host": HOST,
            "model": work.model,
            "small": {"rows": 1, "samples": work.default_samples},
            "big": {"rows": work.big_rows, "samples": work.big_samples},
            "rate_per_s": work.rate,
            "duration_s": work.duration_s,
            "requests_per_phase": work.count,
            "settle_s": work.settle_s,
            "threads": args.threads,
            "quick": args.quick,
        },
        "servers": servers,
        "results": results,
        "ratios": ratios(results),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Each phase's p50/p99 over the same server's alone phase, and off over on."""
    out: dict[str, Any] = {}
    for mode, r in results.items():
        alone, busy = r["phases"][ALONE], r["phases"][WITH_BIG]
        out[f"{mode}: with big / alone"] = {
            q: _ratio(busy[f"{q}_ms"], alone[f"{q}_ms"]) for q in ("p50", "p99")
        }
    if set(MODES) <= set(results):
        on, off = results["on"]["phases"], results["off"]["phases"]
        for phase in (ALONE, WITH_BIG):
            out[f"{phase}: off / on"] = {
                q: _ratio(off[phase][f"{q}_ms"], on[phase][f"{q}_ms"]) for q in ("p50", "p99")
            }
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}x"


def render(report: dict[str, Any]) -> str:
    """The text report: one row per (interleave, phase), ratios, the max-size request's fate."""
    s = report["settings"]
    headers = ["interleave", "phase", "requests", "errors", "p50 ms", "p99 ms",
               "p50 vs alone", "p99 vs alone"]  # fmt: skip
    rows = []
    for mode, r in report["results"].items():
        alone = r["phases"][ALONE]
        for phase, f in r["phases"].items():
            rows.append([mode, phase, str(f["requests"]), str(f["errors"]), _ms(f["p50_ms"]),
                         _ms(f["p99_ms"]), _x(_ratio(f["p50_ms"], alone["p50_ms"])),
                         _x(_ratio(f["p99_ms"], alone["p99_ms"]))])  # fmt: skip
    lines = [
        f"Small requests (1 row, {s['small']['samples']} samples, {s['rate_per_s']:g}/s for "
        f"{s['duration_s']:g} s) to {s['model']}, with and without one "
        f"{s['big']['rows']:,} x {s['big']['samples']:,} request running",
        "",
        format_table(headers, rows),
        "",
    ]
    for key, q in report["ratios"].items():
        if key.endswith("off / on"):
            lines.append(f"{key}: p50 {_x(q['p50'])}, p99 {_x(q['p99'])}")
    for mode, r in report["results"].items():
        big = r["big"]
        lines.append(
            f"interleave {mode}: max-size request answered HTTP {big['status']} after "
            f"{big['seconds']:.1f} s (deadline {big['deadline_ms'] / 1e3:.1f} s); the next "
            f"small request took {_ms(r['probe_after_big_ms'])} ms"
        )
    for f in (f for r in report["results"].values() for f in r["phases"].values()):
        if f["first_error"]:
            lines.append(f"first error: {f['first_error']}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags (--quick: short phases for the smoke test)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, default=None, help="also save the JSON here")
    parser.add_argument("--quick", action="store_true", help="short phases (default 2 s)")
    parser.add_argument("--model", choices=MODELS, default="toy-regression")
    parser.add_argument("--rate", type=float, default=20.0, help="small requests per second")
    parser.add_argument(
        "--duration-s", type=float, default=None, help="seconds per phase (default 10; quick 2)"
    )
    parser.add_argument(
        "--big-rows", type=int, default=None, help="rows of the big request (default max_rows)"
    )
    parser.add_argument(
        "--big-samples", type=int, default=None, help="its samples (default max_samples)"
    )
    parser.add_argument("--settle-s", type=float, default=1.0, help="head start of the big request")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    parser.add_argument(
        "--start-timeout-s", type=float, default=120.0, help="how long a server may take to start"
    )
    args = parser.parse_args(argv)
    if args.duration_s is None:
        args.duration_s = 2.0 if args.quick else 10.0
    if not 0 < args.rate <= 200:
        parser.error(f"--rate must be in (0, 200], got {args.rate}")
    if not 0 < args.duration_s <= 120:
        parser.error(f"--duration-s must be in (0, 120], got {args.duration_s}")
    if not args.settle_s >= 0 or not args.start_timeout_s > 0:
        parser.error("--settle-s must be >= 0 and --start-timeout-s > 0")
    for flag in ("big_rows", "big_samples", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if math.ceil(args.rate * args.duration_s) > MAX_PER_PHASE:
        parser.error(f"--rate x --duration-s: more than {MAX_PER_PHASE} requests in a phase")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print it (table or JSON), save it with --out, return the figures."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        report = measure(args)
    emit(report, render, args.json, args.out)
    return report


if __name__ == "__main__":
    main()
