"""Benchmark: the HTTP server under concurrent load, next to the in-process ceiling and LitServe.

`python bench/server.py` prints a table; `--json` prints the same figures as one JSON object.
Load comes from async httpx clients (one connection per concurrent worker) on 127.0.0.1 only:
the shipped `digits` model, 1 row per request, 100 MC samples, at concurrency 1, 16 and 64.
See docs/performance.md ("Server").
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import Tensor

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import format_table, machine, set_threads
from service.config import Settings
from service.model import ServedModel
from service.uncertainty import ClassificationSummary

ROOT = Path(__file__).resolve().parents[1]
MODEL = "digits"
MODEL_DIR = ROOT / "models" / MODEL
HOST = "127.0.0.1"  # the only address this benchmark ever talks to
SAMPLES = 100
CLASSES = 10
JSON_HEADERS = {"content-type": "application/json"}
MCDROP, CEILING, LITSERVE, FLOOR = "mcdrop", "ceiling", "litserve", "http_floor"
WAYS: dict[str, str] = {
    MCDROP: "this server: uvicorn subprocess, POST /v1/models/digits/predict with a seed",
    CEILING: "in-process ceiling: ServedModel + engine.run_many on groups of c rows, no HTTP",
    LITSERVE: "LitServe subprocess, batching on, repeat_interleave + one forward (usual way)",
    FLOOR: "bare ASGI app under uvicorn, canned answer, no model: the client + HTTP limit",
}
TARGET_CONCURRENCY = 64
MIN_VS_CEILING = 0.7
MIN_VS_LITSERVE = 2.0
LITSERVE_BATCH_TIMEOUT_S = 0.002


# -- the requests --------------------------------------------------------------------------


@dataclass(frozen=True)
class Digits:
    """Held-out digits of the shipped model (index % 4 == 0): raw 0..16 pixels and labels."""

    images: Tensor  # [K, 1, 8, 8] float32
    labels: list[int]

    @classmethod
    def load(cls) -> Digits:
        """scikit-learn's bundled digits (no download), the test split of models/digits."""
        from sklearn.datasets import load_digits

        data = load_digits()
        images = torch.tensor(data.images[::4], dtype=torch.float32).unsqueeze(1)
        return cls(images, [int(v) for v in data.target[::4]])

    def row(self, i: int) -> Tensor:
        """Request i's single row [1, 1, 8, 8] (cycling through the test set)."""
        k = i % len(self.labels)
        return self.images[k : k + 1]

    def label(self, i: int) -> int:
        """True class of request i's digit."""
        return self.labels[i % len(self.labels)]

    def body(self, i: int) -> bytes:
        """Request i's JSON body, the same for every HTTP way: one row, 100 samples, seed i."""
        doc = {"rows": self.row(i).tolist(), "samples": SAMPLES, "seed": i}
        return json.dumps(doc).encode()


# -- checking the answers (so that every way is timed doing real work) ----------------------


def check_probabilities(values: Sequence[float], what: str) -> int:
    """The predicted class of a valid probability vector [10]; ValueError otherwise."""
    if len(values) != CLASSES:
        raise ValueError(f"{what}: {len(values)} probabilities, expected {CLASSES}")
    if not all(isinstance(v, float | int) and math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{what}: probabilities must be finite and >= 0")
    if abs(sum(values) - 1.0) > 1e-4:
        raise ValueError(f"{what}: probabilities sum to {sum(values):.6f}, not 1")
    return max(range(CLASSES), key=lambda c: values[c])


def mcdrop_answer(body: bytes, seed: int) -> int:
    """The predicted class of a native predict answer for one row and `seed`; else ValueError."""
    doc = json.loads(body)
    if doc.get("samples_used") != SAMPLES or doc.get("seed") != seed:
        raise ValueError(
            f"mcdrop: samples_used/seed {doc.get('samples_used')}/{doc.get('seed')}"
            f", expected {SAMPLES}/{seed}"
        )
    predictions = doc.get("predictions")
    if not isinstance(predictions, list) or len(predictions) != 1:
        raise ValueError("mcdrop: expected one prediction")
    probs = predictions[0].get("probabilities", {})
    values = [probs.get(str(c), math.nan) for c in range(CLASSES)]
    predicted = check_probabilities(values, "mcdrop")
    if predictions[0].get("predicted") != str(predicted):
        raise ValueError("mcdrop: 'predicted' is not the most probable class")
    return predicted


def litserve_answer(body: bytes, seed: int) -> int:
    """The predicted class of a LitServe answer (unseeded: `seed` is unused); else ValueError."""
    probs = json.loads(body).get("probabilities")
    if not isinstance(probs, list):
        raise ValueError("litserve: no 'probabilities' list")
    return check_probabilities(probs, "litserve")


ANSWER_CHECKS: dict[str, Callable[[bytes, int], int]] = {
    MCDROP: mcdrop_answer,
    LITSERVE: litserve_answer,
    FLOOR: litserve_answer,
}


# -- one measured slice of load ---------------------------------------------------------------


@dataclass
class Slice:
    """What one bounded burst of requests gave: latencies (ms), wall time, checked answers."""

    latencies_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    requests: int = 0  # requests (mcdrop, litserve) or rows (ceiling) completed
    errors: int = 0
    correct: int = 0
    first_error: str | None = None
    server: dict[str, float] = field(default_factory=dict)  # mcdrop's /metrics deltas
    client_cpu_s: float = 0.0  # this process (the load generator, or the in-process engine)
    server_cpu_s: float | None = None  # the server's whole process group

    def add(self, other: Slice) -> None:
        """Pool another slice of the same way and concurrency into this one."""
        for name, value in other.server.items():
            self.server[name] = self.server.get(name, 0.0) + value
        self.client_cpu_s += other.client_cpu_s
        if other.server_cpu_s is not None:
            self.server_cpu_s = (self.server_cpu_s or 0.0) + other.server_cpu_s
        self.latencies_ms += other.latencies_ms
        self.wall_s += other.wall_s
        self.requests += other.requests
        self.errors += other.errors
        self.correct += other.correct
        self.first_error = self.first_error or other.first_error

    def fail(self, message: str) -> None:
        """Count one failed request, keeping the first message."""
        self.errors += 1
        self.first_error = self.first_error or message


ENGINE_METRICS = ("mcdrop_batch_rows", "mcdrop_compute_seconds", "mcdrop_queue_seconds")


def engine_counters(text: str) -> dict[str, float]:
    """The _sum and _count of mcdrop's batching histograms for MODEL, from /metrics text."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in ENGINE_METRICS:
            continue
        for sample in family.samples:
            if sample.labels.get("model") == MODEL and sample.name.endswith(("_sum", "_count")):
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


def group_stats(pgid: int) -> dict[int, list[str]] | None:
    """/proc/PID/stat fields (from field 3, the state, on) of each member of a process group.

    None where there is no /proc (not Linux).
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    members: dict[int, list[str]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:  # field 5: pgrp
            members[int(entry.name)] = fields
    return members


def group_cpu_s(pgid: int) -> float | None:
    """User + system CPU seconds of the live processes of a process group (Linux /proc)."""
    members = group_stats(pgid)
    if members is None:
        return None
    ticks = sum(int(f[11]) + int(f[12]) for f in members.values())  # fields 14, 15
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Endpoint:
    """Where one HTTP way is asked, how its answers are checked, and what else to read."""

    url: str
    check: Callable[[bytes, int], int]
    pgid: int | None = None  # the server's process group, for its CPU time
    metrics_url: str | None = None  # mcdrop's /metrics, for its batching counters


async def _http_slice(
    endpoint: Endpoint, digits: Digits, concurrency: int, first: int, count: int, seconds: float
) -> Slice:
    """Requests first.. first+count-1 from `concurrency` workers, one connection each.

    Each worker owns a single-connection client: one shared httpx pool of 64 connections
    costs the client itself ~5x its throughput (its pool bookkeeping grows with the pool).
    Stops early after `seconds`; each connection is warmed by one untimed request first.
    CPU times and the server's /metrics counters are read before and after (untimed).
    """
    url, metrics_url = endpoint.url, endpoint.metrics_url
    bodies = [digits.body(first + i) for i in range(count)]
    one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    answers: list[tuple[int, int, bytes]] = []  # (request index, status, body)
    result = Slice()
    async with AsyncExitStack() as stack:
        # trust_env=False: no proxy from the environment may route 127.0.0.1 elsewhere.
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(limits=one, timeout=60.0, trust_env=False)
            )
            for _ in range(concurrency)
        ]
        await asyncio.gather(
            *(c.post(url, content=bodies[0], headers=JSON_HEADERS) for c in clients)
        )
        before = engine_counters((await clients[0].get(metrics_url)).text) if metrics_url else {}
        server_cpu = None if endpoint.pgid is None else group_cpu_s(endpoint.pgid)
        client_cpu = time.process_time()
        next_index = 0
        start = time.perf_counter()
        stop_at = start + seconds

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal next_index
            while next_index < count and time.perf_counter() < stop_at:
                i = next_index
                next_index += 1
                t0 = time.perf_counter()
                try:
                    response = await client.post(url, content=bodies[i], headers=JSON_HEADERS)
                except httpx.HTTPError as exc:
                    result.fail(f"request {first + i}: {type(exc).__name__}: {exc}")
                    continue
                result.latencies_ms.append((time.perf_counter() - t0) * 1e3)
                answers.append((first + i, response.status_code, response.content))

        await asyncio.gather(*(worker(c) for c in clients))
        result.wall_s = time.perf_counter() - start
        result.client_cpu_s = time.process_time() - client_cpu
        if endpoint.pgid is not None and server_cpu is not None:
            after_cpu = group_cpu_s(endpoint.pgid)
            result.server_cpu_s = None if after_cpu is None else after_cpu - server_cpu
        if metrics_url:
            after = engine_counters((await clients[0].get(metrics_url)).text)
            result.server = {k: v - before.get(k, 0.0) for k, v in after.items()}
    for i, status, body in answers:
        if status != 200:
            result.fail(f"request {i}: HTTP {status}: {body[:300]!r}")
            continue
        try:
            predicted = endpoint.check(body, i)
        except (ValueError, AttributeError, TypeError) as exc:
            result.fail(f"request {i}: {exc}")
            continue
        result.requests += 1
        result.correct += predicted == digits.label(i)
    return result


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


def http_slice(
    endpoint: Endpoint, digits: Digits, concurrency: int, first: int, count: int, seconds: float
) -> Slice:
    """_http_slice on a fresh event loop, with the collector paused."""
    with collector_paused():
        return asyncio.run(_http_slice(endpoint, digits, concurrency, first, count, seconds))


def ceiling_slice(
    model: ServedModel, digits: Digits, group: int, first: int, count: int, seconds: float
) -> Slice:
    """The same requests straight into the engine, `group` of them per run_many (no HTTP).

    Latencies are per engine call; request building (validation, normalisation) is timed.
    """
    result = Slice()

    def run(indices: range) -> list[ClassificationSummary]:
        requests = [model.request(digits.row(i), model.options(SAMPLES, seed=i)) for i in indices]
        summaries = []
        for summary in model.engine.run_many(requests):
            if not isinstance(summary, ClassificationSummary):
                raise TypeError(f"{MODEL} must be a classification model")
            summaries.append(summary)
        return summaries

    run(range(first, first + min(group, count)))  # warm-up, untimed
    with collector_paused():
        client_cpu = time.process_time()
        start = time.perf_counter()
        done = 0
        while done < count and time.perf_counter() < start + seconds:
            indices = range(first + done, first + min(done + group, count))
            t0 = time.perf_counter()
            summaries = run(indices)
            result.latencies_ms.append((time.perf_counter() - t0) * 1e3)
            for i, summary in zip(indices, summaries, strict=True):
                try:
                    predicted = check_probabilities(summary.probabilities[0].tolist(), CEILING)
                except ValueError as exc:
                    result.fail(f"request {i}: {exc}")
                    continue
                result.requests += 1
                result.correct += predicted == digits.label(i)
            done += len(indices)
        result.wall_s = time.perf_counter() - start
        result.client_cpu_s = time.process_time() - client_cpu
    return result


# -- the servers under test --------------------------------------------------------------------


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    """A server subprocess (leader of its own process group) and where it answers."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    predict_path: str
    ready_path: str
    log: IO[bytes]

    def url(self, path: str) -> str:
        """Full URL of a path on this server (always 127.0.0.1)."""
        return f"http://{HOST}:{self.port}{path}"

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's stdout/stderr."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]


def group_alive(server: Server) -> bool:
    """Whether any process of the server's group still runs (zombies do not count)."""
    server.process.poll()  # reap the leader once it has exited
    members = group_stats(server.process.pid)
    if members is None:  # no /proc: only the leader can be checked
        return server.process.returncode is None
    return any(fields[0] != "Z" for fields in members.values())


def stop(server: Server) -> None:
    """SIGTERM to the server's process group, SIGKILL 10 s later; wait until none of it is left.

    The group's id is the PID of the process we started. It is signalled only while a member
    still runs, so the id cannot have been reused by anything else.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_alive(server):
            break
        with suppress(ProcessLookupError):
            os.killpg(server.process.pid, sig)
        deadline = time.monotonic() + 10.0
        while group_alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
    server.process.wait(timeout=10.0)


@contextmanager
def launched(
    name: str,
    command: list[str],
    env: dict[str, str],
    port: int,
    predict_path: str,
    ready_path: str,
) -> Iterator[Server]:
    """Start `command` in its own process group; stop the group on the way out, errors too."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = Server(name, process, port, predict_path, ready_path, log)
        try:
            yield server
        finally:
            stop(server)


def wait_ready(servers: Sequence[Server], timeout_s: float) -> None:
    """Poll every server's readiness URL until all answer 200; raise with the log otherwise."""
    pending = list(servers)
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while pending:
            for server in list(pending):
                if server.process.poll() is not None:
                    raise RuntimeError(
                        f"{server.name} exited with code "
                        f"{server.process.returncode}:\n{server.log_tail()}"
                    )
                try:
                    if client.get(server.url(server.ready_path)).status_code == 200:
                        pending.remove(server)
                except httpx.HTTPError:
                    pass
            if pending and time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                raise RuntimeError(
                    f"not ready after {timeout_s:g} s: {names}\n"
                    + "\n".join(s.log_tail() for s in pending)
                )
            if pending:
                time.sleep(0.2)


CANNED = json.dumps({"probabilities": [1.0] + [0.0] * (CLASSES - 1)}).encode()
Scope = dict[str, Any]
Message = dict[str, Any]


async def canned_app(
    scope: Scope,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """ASGI app that reads the whole body and answers CANNED: the HTTP floor (no model)."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body", False):
        pass
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": CANNED})


def uvicorn_command(app: str, port: int, factory: bool = False) -> list[str]:
    """uvicorn on 127.0.0.1 without access log (for every uvicorn-served way alike)."""
    flags = ["--factory"] if factory else []
    return [
        *(sys.executable, "-m", "uvicorn", *flags, app, "--host", HOST, "--port", str(port)),
        *("--log-level", "warning", "--no-access-log"),
    ]


def server_specs(
    ports: dict[str, int], max_batch_rows: int
) -> dict[str, tuple[list[str], str, str]]:
    """Per served way: (command, predict path, readiness path)."""
    litserve = [sys.executable, str(ROOT / "bench" / "litserve_digits.py")]
    litserve += ["--port", str(ports[LITSERVE]), "--model", str(MODEL_DIR)]
    litserve += ["--samples", str(SAMPLES), "--max-batch-size", str(max_batch_rows)]
    litserve += ["--batch-timeout", str(LITSERVE_BATCH_TIMEOUT_S)]
    return {
        # settings come from MCDROP_* (the model repository): what `mcdrop serve` does
        MCDROP: (
            uvicorn_command("service.app:create_app", ports[MCDROP], factory=True),
            f"/v1/models/{MODEL}/predict",
            "/v2/health/ready",
        ),
        LITSERVE: (litserve, "/predict", "/health"),
        FLOOR: (uvicorn_command("bench.server:canned_app", ports[FLOOR]), "/predict", "/"),
    }


def free_ports(names: Sequence[str]) -> dict[str, int]:
    """A distinct free 127.0.0.1 port per name."""
    ports: dict[str, int] = {}
    while len(ports) < len(names):
        port = free_port()
        if port not in ports.values():
            ports[names[len(ports)]] = port
    return ports


# -- the run -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def figures(result: Slice, per: str) -> dict[str, Any]:
    """JSON-ready figures of one way at one concurrency."""
    lat = result.latencies_ms

    def per_request(cpu_s: float | None) -> float | None:
        return None if cpu_s is None or not result.requests else cpu_s / result.requests * 1e3

    return {
        "requests": result.requests,
        "errors": result.errors,
        "first_error": result.first_error,
        "valid": result.errors == 0 and result.requests > 0,
        "accuracy": result.correct / result.requests if result.requests else 0.0,
        "wall_s": result.wall_s,
        "throughput_rps": result.requests / result.wall_s if result.wall_s > 0 else 0.0,
        "latency_per": per,
        "p50_ms": percentile(lat, 50) if lat else None,
        "p99_ms": percentile(lat, 99) if lat else None,
        "server": server_figures(result.server),
        "client_cpu_ms_per_request": per_request(result.client_cpu_s),
        "server_cpu_ms_per_request": per_request(result.server_cpu_s),
    }


def server_figures(counters: dict[str, float]) -> dict[str, float | None] | None:
    """mcdrop's own view from /metrics: engine calls, mean rows per call, compute and queue ms."""
    if not counters:
        return None

    def mean(name: str, scale: float = 1.0) -> float | None:
        count = counters.get(f"{name}_count", 0.0)
        return counters.get(f"{name}_sum", 0.0) / count * scale if count else None

    return {
        "engine_calls": counters.get("mcdrop_batch_rows_count"),
        "mean_batch_rows": mean("mcdrop_batch_rows"),
        "compute_ms_per_call": mean("mcdrop_compute_seconds", 1e3),
        "queue_ms_mean": mean("mcdrop_queue_seconds", 1e3),
    }


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


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Start the servers, drive every way at every concurrency (interleaved), stop them."""
    digits = Digits.load()
    settings = Settings(device="cpu")  # LitServe runs on the CPU too; MCDROP_* apply otherwise
    model = ServedModel.load(MODEL_DIR, settings)
    gc.collect()
    gc.freeze()  # torch, sklearn and the model: never worth a collector's scan
    max_rows = settings.max_batch_rows or model.spec.batching.max_batch_rows
    env = {
        **os.environ,
        "MCDROP_MODEL_REPOSITORY": str(ROOT / "models"),
        "MCDROP_DEVICE": "cpu",
        "FASTAPI_OTEL_AUTO_CONFIGURE": "false",  # no OTLP exporter, whatever the environment says
    }
    if args.threads is not None:  # torch's intra-op threads in every server process too
        env["OMP_NUM_THREADS"] = str(args.threads)
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


# -- output ----------------------------------------------------------------------------------


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
    threads = torch.get_num_threads()
    try:
        set_threads(args.threads)
        report = measure(args)
    finally:
        torch.set_num_threads(threads)
        gc.unfreeze()  # measure() froze the heap; an importing caller gets its collector back
    print(json.dumps(report, indent=2) if args.json else render(report))
    return report


if __name__ == "__main__":
    main()
