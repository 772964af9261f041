"""Soak benchmark: one mcdrop server under a long mixed load; statuses, latencies and its RSS.

`python bench/soak.py` runs 60 s at concurrency 64 and prints a table; `--json-out PATH` also
saves the figures. The server is a uvicorn subprocess over a temporary copy of the shipped
models; load comes from async httpx clients (one connection per concurrent worker) on
127.0.0.1 only: OIP v2 JSON and binary infer on `digits`, /v1 predict on `toy-regression`,
half of them seeded (a seed's answer must come back byte for byte the same, whatever it was
batched with), and a few malformed ones (each must get its 400). The RSS of the server's
process group is read from /proc every second. Bounded: at most --max-requests requests, no
new request after --seconds, each one cut off after --timeout-s. Exit status 1 unless clean.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import random
import shutil
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, format_table, machine
from bench.load import percentile
from bench.servers import (
    free_port,
    group_cpu_s,
    group_stats,
    launched,
    server_env,
    uvicorn_command,
    wait_ready,
)
from bench.workload import HOST, ROOT, Digits

MODELS = ("digits", "toy-regression")
DIGITS_INFER = "/v2/models/digits/infer"
TOY_PREDICT = "/v1/models/toy-regression/predict"
HCL = "Inference-Header-Content-Length"
JSON_HEADERS = {"content-type": "application/json"}
INPUTS = 64  # distinct inputs per kind; seeded requests reuse SEEDS of them
SEEDS = INPUTS // 2  # inputs 0..SEEDS-1 of each good kind go with seed = their index
SCHEDULE_SEED = 0  # the order of kinds is the same on every run


@dataclass(frozen=True)
class Request:
    """One request body ready to send: where, what, and which headers."""

    path: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Kind:
    """A kind of request in the mix: its share, the status it must get, its bodies."""

    name: str
    weight: int
    expected: int
    what: str


KINDS = (
    Kind("oip_json", 30, 200, "OIP infer on digits, JSON in and out"),
    Kind("oip_binary", 30, 200, "OIP infer on digits, binary tensors in and out"),
    Kind("v1_predict", 30, 200, "/v1 predict on toy-regression"),
    Kind("bad_json", 3, 400, "/v1 predict with a truncated JSON body"),
    Kind("bad_shape", 4, 400, "OIP infer on digits, shape [1, 1, 8, 7]"),
    Kind("bad_binary", 3, 400, "OIP infer on digits, binary_data_size larger than the bytes"),
)
BY_NAME = {k.name: k for k in KINDS}


# -- the requests -----------------------------------------------------------------------------


def oip_json(pixels: list[float], seed: int | None) -> Request:
    """One digit [1, 1, 8, 8] as OIP JSON data."""
    doc: dict[str, Any] = {
        "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": pixels}]
    }
    if seed is not None:
        doc["parameters"] = {"seed": seed}
    return Request(DIGITS_INFER, json.dumps(doc).encode(), JSON_HEADERS)


def oip_binary(pixels: list[float], seed: int | None, size: int | None = None) -> Request:
    """One digit as a binary FP32 tensor, outputs asked in binary; `size` overrides its length."""
    blob = struct.pack(f"<{len(pixels)}f", *pixels)
    params: dict[str, Any] = {"binary_data_output": True}
    if seed is not None:
        params["seed"] = seed
    entry = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
             "parameters": {"binary_data_size": len(blob) if size is None else size}}  # fmt: skip
    header = json.dumps({"inputs": [entry], "parameters": params}).encode()
    headers = {HCL: str(len(header)), "content-type": "application/octet-stream"}
    return Request(DIGITS_INFER, header + blob, headers)


def bad_shape(values: list[float]) -> Request:
    """OIP JSON on digits whose shape [1, 1, 8, 7] is not the model's [1, 8, 8]."""
    entry = {"name": "input", "shape": [1, 1, 8, 7], "datatype": "FP32", "data": values}
    return Request(DIGITS_INFER, json.dumps({"inputs": [entry]}).encode(), JSON_HEADERS)


def v1_predict(x: float, seed: int | None) -> Request:
    """One toy-regression row through the native API."""
    doc: dict[str, Any] = {"rows": [[x]]}
    if seed is not None:
        doc["seed"] = seed
    return Request(TOY_PREDICT, json.dumps(doc).encode(), JSON_HEADERS)


def build_requests(digits: Digits) -> dict[str, list[Request]]:
    """INPUTS bodies per kind; index i < SEEDS of a good kind carries seed i (its input fixed)."""
    pixels = [digits.row(i).reshape(-1).tolist() for i in range(INPUTS)]
    xs = [-6.0 + 12.0 * i / (INPUTS - 1) for i in range(INPUTS)]
    seed_of = [i if i < SEEDS else None for i in range(INPUTS)]
    return {
        "oip_json": [oip_json(pixels[i], seed_of[i]) for i in range(INPUTS)],
        "oip_binary": [oip_binary(pixels[i], seed_of[i]) for i in range(INPUTS)],
        "v1_predict": [v1_predict(xs[i], seed_of[i]) for i in range(INPUTS)],
        "bad_json": [Request(TOY_PREDICT, b'{"rows": [[1.0]', JSON_HEADERS)],
        "bad_shape": [bad_shape(pixels[0][:56])],
        "bad_binary": [oip_binary(pixels[0], None, size=512)],
    }


def schedule() -> list[str]:
    """One round of kinds in their weights, in a fixed shuffled order (cycled by the run)."""
    kinds = [k.name for k in KINDS for _ in range(k.weight)]
    random.Random(SCHEDULE_SEED).shuffle(kinds)
    return kinds


def answer_problem(kind: str, response: httpx.Response) -> str | None:
    """What is wrong with a 200 answer of a good kind (None: it is a well-formed answer)."""
    try:
        if kind == "oip_binary":
            length = int(response.headers[HCL])
            doc = json.loads(response.content[:length])
            sizes = [o["parameters"]["binary_data_size"] for o in doc["outputs"]]
            if length + sum(sizes) != len(response.content):
                return "binary outputs do not add up to the body"
        else:
            doc = response.json()
        if kind == "v1_predict":
            if len(doc["predictions"]) != 1:
                return f"{len(doc['predictions'])} predictions for one row"
        elif not doc["outputs"]:
            return "no outputs"
    except (KeyError, ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Figures:
    """What the load saw, per kind, and the server's RSS over time."""

    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    problems: Counter[str] = field(default_factory=Counter)  # "kind: what" -> count
    first_problem: dict[str, str] = field(default_factory=dict)
    seeded: dict[tuple[str, int], str] = field(default_factory=dict)  # (kind, input) -> sha
    seed_checks: int = 0
    rss: list[dict[str, float]] = field(default_factory=list)  # {"t_s", "rss_mb", "processes"}
    sent: int = 0

    def problem(self, kind: str, what: str, detail: str) -> None:
        """Count a problem of `kind`; keep the first detail of each."""
        key = f"{kind}: {what}"
        self.problems[key] += 1
        self.first_problem.setdefault(key, detail[:300])


def group_rss_kb(pgid: int) -> tuple[int, int]:
    """Summed VmRSS (kB) of a process group's live members, and how many there are."""
    total, count = 0, 0
    for pid, fields in (group_stats(pgid) or {}).items():
        if fields[0] == "Z":
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # exited meanwhile
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                count += 1
    return total, count


async def sample_rss(pgid: int, figures: Figures, start: float, stop: asyncio.Event) -> None:
    """Every second until `stop`, and once more then: the server group's RSS into figures.rss."""
    while True:
        kb, count = group_rss_kb(pgid)
        sample = {"t_s": time.perf_counter() - start, "rss_mb": kb / 1024, "processes": count}
        figures.rss.append(sample)
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


async def drive(
    base_url: str, pgid: int, args: argparse.Namespace, requests: dict[str, list[Request]]
) -> tuple[Figures, float]:
    """`args.concurrency` workers, one connection each, until time or count runs out."""
    figures = Figures(
        latencies_ms={k.name: [] for k in KINDS}, statuses={k.name: Counter() for k in KINDS}
    )
    order = schedule()
    one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [
        httpx.AsyncClient(base_url=base_url, limits=one, timeout=args.timeout_s, trust_env=False)
        for _ in range(args.concurrency)
    ]
    counters: dict[str, int] = Counter()
    try:
        await asyncio.gather(*(c.get("/v2/health/ready") for c in clients))  # open connections
        start = time.perf_counter()
        stop_at = start + args.seconds
        stop_sampling = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(pgid, figures, start, stop_sampling))

        async def worker(client: httpx.AsyncClient) -> None:
            while figures.sent < args.max_requests and time.perf_counter() < stop_at:
                kind = order[figures.sent % len(order)]
                figures.sent += 1
                bodies = requests[kind]
                index = counters[kind] % len(bodies)
                counters[kind] += 1
                req = bodies[index]
                t0 = time.perf_counter()
                try:
                    response = await client.post(req.path, content=req.body, headers=req.headers)
                except httpx.HTTPError as exc:
                    figures.problem(kind, "transport error", f"{type(exc).__name__}: {exc}")
                    continue
                figures.latencies_ms[kind].append((time.perf_counter() - t0) * 1e3)
                figures.statuses[kind][response.status_code] += 1
                check(figures, kind, index, response)

        await asyncio.gather(*(worker(c) for c in clients))
        wall_s = time.perf_counter() - start
        stop_sampling.set()
        await sampler
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return figures, wall_s


def check(figures: Figures, kind: str, index: int, response: httpx.Response) -> None:
    """The status the kind must get; a well-formed answer; a seed's answer always the same."""
    expected = BY_NAME[kind].expected
    if response.status_code != expected:
        detail = f"HTTP {response.status_code}: {response.content[:200]!r}"
        figures.problem(kind, f"HTTP {response.status_code} (expected {expected})", detail)
        return
    if expected != 200:
        return
    problem = answer_problem(kind, response)
    if problem is not None:
        figures.problem(kind, "malformed answer", problem)
    elif index < SEEDS:
        figures.seed_checks += 1
        digest = hashlib.sha256(response.content).hexdigest()
        if figures.seeded.setdefault((kind, index), digest) != digest:
            figures.problem(kind, "seeded answer changed", f"input {index}, seed {index}")


def summarize(figures: Figures, wall_s: float, cpu_s: float | None) -> dict[str, Any]:
    """JSON-ready figures: per kind, RSS, totals and the verdict."""
    kinds: dict[str, Any] = {}
    for k in KINDS:
        lat = figures.latencies_ms[k.name]
        kinds[k.name] = {
            "what": k.what,
            "expected_status": k.expected,
            "requests": len(lat),
            "statuses": {str(s): n for s, n in sorted(figures.statuses[k.name].items())},
            "unexpected": sum(n for s, n in figures.statuses[k.name].items() if s != k.expected),
            "p50_ms": percentile(lat, 50) if lat else None,
            "p99_ms": percentile(lat, 99) if lat else None,
            "max_ms": max(lat) if lat else None,
        }
    rss = [s["rss_mb"] for s in figures.rss]
    times = [s["t_s"] for s in figures.rss]
    late = len(rss) // 2  # the second half: past the warm-up (allocator, caches, first batches)
    completed = sum(len(v) for v in figures.latencies_ms.values())
    return {
        "kinds": kinds,
        "rss": {
            "samples": figures.rss,
            "first_mb": rss[0] if rss else None,
            "peak_mb": max(rss) if rss else None,
            "last_mb": rss[-1] if rss else None,
            "growth_mb": rss[-1] - rss[0] if rss else None,
            "slope_mb_per_min": slope(times, rss) * 60 if len(rss) >= 2 else None,
            "late_slope_mb_per_min": slope(times[late:], rss[late:]) * 60
            if len(rss) - late >= 2
            else None,
        },
        "totals": {
            "sent": figures.sent,
            "completed": completed,
            "wall_s": wall_s,
            "throughput_rps": completed / wall_s if wall_s > 0 else 0.0,
            "server_cpu_s": cpu_s,
            "seed_checks": figures.seed_checks,
            "problems": dict(figures.problems),
            "first_problem": figures.first_problem,
        },
        "clean": not figures.problems and completed > 0,
    }


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs (0 when xs do not vary)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Copy the models, start the server, drive it, stop it; the figures."""
    requests = build_requests(Digits.load())
    with tempfile.TemporaryDirectory(prefix="mcdrop-soak-") as tmp:
        repository = Path(tmp) / "models"
        for name in MODELS:
            shutil.copytree(ROOT / "models" / name, repository / name)
        env = {**server_env(args.threads), "MCDROP_MODEL_REPOSITORY": str(repository)}
        port = free_port()
        command = uvicorn_command("mcdrop.app:create_app", port, factory=True)
        with launched("mcdrop", command, env, port, TOY_PREDICT, "/v2/health/ready") as server:
            wait_ready([server], args.start_timeout_s)
            pgid = server.process.pid
            cpu_before = group_cpu_s(pgid)
            figures, wall_s = asyncio.run(drive(server.url(""), pgid, args, requests))
            cpu_after = group_cpu_s(pgid)
            alive = server.process.poll() is None
            log_tail = server.log_tail(4000)
    cpu_s = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    report = summarize(figures, wall_s, cpu_s)
    report["server_alive_at_end"] = alive
    report["server"] = {"pid": pgid, "port": port}
    report["clean"] = report["clean"] and alive
    if not report["clean"]:
        report["server_log_tail"] = log_tail
    report["machine"] = machine()
    report["settings"] = {
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "max_requests": args.max_requests,
        "timeout_s": args.timeout_s,
        "threads": args.threads,
        "models": list(MODELS),
        "host": HOST,
        "device": "cpu",
        "mix": {k.name: k.weight for k in KINDS},
        "seeded_inputs": SEEDS,
    }
    return report


# -- the report ---------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(report: dict[str, Any]) -> str:
    """The figures as text: one line per kind, the RSS, the totals and the verdict."""
    s, t, r = report["settings"], report["totals"], report["rss"]
    rows = [
        [name, str(k["requests"]), str(k["expected_status"]),
         ", ".join(f"{code}: {n}" for code, n in k["statuses"].items()) or "-",
         str(k["unexpected"]), _num(k["p50_ms"]), _num(k["p99_ms"]), _num(k["max_ms"])]
        for name, k in report["kinds"].items()
    ]  # fmt: skip
    headers = ["kind", "requests", "expected", "statuses", "unexpected", "p50 ms", "p99 ms",
               "max ms"]  # fmt: skip
    lines = [
        f"soak: {s['seconds']:g} s at concurrency {s['concurrency']} on {s['host']} "
        f"({report['machine']['cpus']} CPUs), models {', '.join(s['models'])}",
        "",
        format_table(headers, rows),
        "",
        f"server RSS (process group, {len(r['samples'])} samples, 1/s): "
        f"first {_num(r['first_mb'])} MB, peak {_num(r['peak_mb'])} MB, "
        f"last {_num(r['last_mb'])} MB, growth {_num(r['growth_mb'])} MB; "
        f"slope {_num(r['slope_mb_per_min'], 2)} MB/min over the run, "
        f"{_num(r['late_slope_mb_per_min'], 2)} MB/min over its second half",
        f"requests: {t['sent']} sent, {t['completed']} answered in {t['wall_s']:.1f} s "
        f"({t['throughput_rps']:.0f}/s); server CPU {_num(t['server_cpu_s'])} s; "
        f"{t['seed_checks']} seeded answers compared",
    ]
    for problem, n in t["problems"].items():
        lines.append(f"  PROBLEM x{n}  {problem}: {t['first_problem'][problem]}")
    alive = "server alive" if report["server_alive_at_end"] else "SERVER DIED"
    lines.append(f"verdict: {'clean' if report['clean'] else 'NOT CLEAN'} ({alive})")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration (default 60)")
    parser.add_argument("--concurrency", type=int, default=64, help="workers (default 64)")
    parser.add_argument(
        "--max-requests", type=int, default=1_000_000, help="cap on requests sent (default 1e6)"
    )
    parser.add_argument(
        "--timeout-s", type=float, default=30.0, help="per-request timeout (default 30)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    parser.add_argument(
        "--start-timeout-s", type=float, default=120.0, help="how long the server may take to start"
    )
    parser.add_argument("--json-out", type=Path, default=None, help="save the figures here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    for name in ("seconds", "timeout_s", "start_timeout_s"):
        if not (getattr(args, name) > 0 and math.isfinite(getattr(args, name))):
            parser.error(f"--{name.replace('_', '-')} must be a positive number")
    for name in ("concurrency", "max_requests", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the soak, print it (table or JSON), save the JSON where asked; the figures."""
    args = parse_args(argv)
    report = measure(args)
    emit(report, render, args.json, args.json_out)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["clean"] else 1)
