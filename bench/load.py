"""The server benchmark's load: bounded bursts of async HTTP requests and their statistics.

Load comes from async httpx clients (one connection per concurrent worker) on 127.0.0.1; a
slice's latencies, wall time, CPU times and checked answers become JSON-ready figures.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.common import collector_paused
from bench.servers import group_cpu_s
from bench.workload import MODEL, Digits

JSON_HEADERS = {"content-type": "application/json"}
ENGINE_METRICS = ("mcdrop_batch_rows", "mcdrop_compute_seconds", "mcdrop_queue_seconds")


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


def http_slice(
    endpoint: Endpoint, digits: Digits, concurrency: int, first: int, count: int, seconds: float
) -> Slice:
    """_http_slice on a fresh event loop, with the collector paused."""
    with collector_paused():
        return asyncio.run(_http_slice(endpoint, digits, concurrency, first, count, seconds))


# -- statistics -------------------------------------------------------------------------------


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
