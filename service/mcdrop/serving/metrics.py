"""Prometheus collectors of the service, on a per-app registry (never the global one).

Every app owns a `Metrics`, so several apps in one process (tests) never clash. Names:

| metric                           | type      | labels                  | meaning
| -------------------------------- | --------- | ----------------------- | -------------------------
| mcdrop_requests_total            | counter   | model, endpoint, status | answered requests
| mcdrop_request_seconds           | histogram | model, endpoint         | total latency, s
| mcdrop_queue_seconds             | histogram | model                   | wait for the worker, s
| mcdrop_compute_seconds           | histogram | model                   | s per engine call
| mcdrop_batch_rows                | histogram | model                   | rows per engine call
| mcdrop_batch_requests            | histogram | model                   | requests per engine call
| mcdrop_samples                   | histogram | model                   | MC samples per call
| mcdrop_queue_depth               | gauge     | model                   | requests waiting now
| mcdrop_models_loaded             | gauge     |                         | models ready to serve
| mcdrop_model_load_failures_total | counter   | model                   | failed (re)loads
| mcdrop_predictive_std            | histogram | model                   | std per row and output
| mcdrop_entropy_nats              | histogram | model                   | entropy per row, nats
| mcdrop_mutual_information_nats   | histogram | model                   | mutual info per row, nats

status is the HTTP status code; endpoint e.g. "oip_infer", "predict", "evaluate". The
predictive std is the total (epistemic + aleatoric) in raw target units, one observation per
output of every answered row. Histograms also expose `_bucket`, `_sum` and `_count`; counters
and histograms a `_created` timestamp. The standard `process_*` and `python_*` collectors are
registered too.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

from mcdrop.uncertainty import ClassificationSummary, Summary, is_map

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)  # fmt: skip
POWERS_OF_TWO = tuple(float(2**k) for k in range(11))  # 1 .. 1024
SAMPLE_BUCKETS = (*(float(m * 10**e) for e in range(5) for m in (1, 2, 5)), 1e5)  # 1 .. 1e5
STD_BUCKETS = (*(float(f"{m}e{e}") for e in range(-4, 5) for m in (1, 2.5, 5)), 1e5)  # 1e-4 .. 1e5


def _nats_buckets() -> tuple[float, ...]:
    """Fine near 0 (confident rows), with ln 2, ln 10, ln 100, ln 1000 rounded up as edges.

    Rounded up so the maximum entropy of 2, 10, 100 or 1000 classes falls in that bucket.
    """
    edges = {0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.5}
    edges |= {math.ceil(math.log(c) * 1e4) / 1e4 for c in (2, 10, 100, 1000)}
    return tuple(sorted(edges))


NATS_BUCKETS = _nats_buckets()


class Metrics:
    """The service's collectors, registered on `registry` (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "mcdrop_requests",
            "Requests answered, by model, endpoint and HTTP status code.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "mcdrop_request_seconds",
            "Total request latency in seconds, as seen by the server.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = self._histogram(
            "mcdrop_queue_seconds",
            "Seconds a request waited for its model's worker.",
            LATENCY_BUCKETS,
        )
        self.compute_seconds = self._histogram(
            "mcdrop_compute_seconds", "Engine seconds per engine call (one merged batch).",
            LATENCY_BUCKETS,
        )  # fmt: skip
        self.batch_rows = self._histogram(
            "mcdrop_batch_rows", "Input rows per engine call.", POWERS_OF_TWO
        )
        self.batch_requests = self._histogram(
            "mcdrop_batch_requests", "Requests merged into one engine call.", POWERS_OF_TWO
        )
        self.samples = self._histogram(
            "mcdrop_samples", "Monte Carlo samples per engine call.", SAMPLE_BUCKETS
        )
        self.queue_depth = Gauge(
            "mcdrop_queue_depth", "Requests waiting for the model's worker.", ["model"], registry=r
        )
        self.models_loaded = Gauge(
            "mcdrop_models_loaded", "Models loaded and ready to serve.", registry=r
        )
        self.load_failures = Counter(
            "mcdrop_model_load_failures",
            "Failed model loads (a version already serving keeps serving).",
            ["model"],
            registry=r,
        )
        self.predictive_std = self._histogram(
            "mcdrop_predictive_std",
            "Regression: total predictive std of every output of every row, raw target units.",
            STD_BUCKETS,
        )
        self.entropy = self._histogram(
            "mcdrop_entropy_nats", "Classification: predictive entropy per row, nats.", NATS_BUCKETS
        )
        self.mutual_information = self._histogram(
            "mcdrop_mutual_information_nats",
            "Classification: mutual information (epistemic part of the entropy) per row, nats.",
            NATS_BUCKETS,
        )
        self._lock = threading.Lock()
        self._endpoints: dict[str, set[tuple[str, str]]] = {}  # model -> {(endpoint, status)}
        self._per_model: tuple[MetricWrapperBase, ...] = (  # labelled by model alone
            self.queue_seconds,
            self.compute_seconds,
            self.batch_rows,
            self.batch_requests,
            self.samples,
            self.queue_depth,
            self.load_failures,
            self.predictive_std,
            self.entropy,
            self.mutual_information,
        )

    def _histogram(self, name: str, documentation: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(name, documentation, ["model"], buckets=buckets, registry=self.registry)

    def observe_request(self, model: str, endpoint: str, status: int | str, seconds: float) -> None:
        """One answered request: endpoint e.g. "oip_infer", "predict", "evaluate"."""
        with self._lock:
            self._endpoints.setdefault(model, set()).add((endpoint, str(status)))
        self.requests.labels(model, endpoint, str(status)).inc()
        self.request_seconds.labels(model, endpoint).observe(seconds)

    def observe_batch(
        self,
        model: str,
        rows: int,
        requests: int,
        samples: int,
        queue_seconds: Iterable[float],
        compute_seconds: float,
    ) -> None:
        """One engine call that merged `requests` requests (their queue waits) into `rows` rows."""
        self.batch_rows.labels(model).observe(rows)
        self.batch_requests.labels(model).observe(requests)
        self.samples.labels(model).observe(samples)
        self.compute_seconds.labels(model).observe(compute_seconds)
        waited = self.queue_seconds.labels(model)
        for seconds in queue_seconds:
            waited.observe(seconds)

    def set_queue_depth(self, model: str, n: int) -> None:
        """Requests of `model` waiting now."""
        self.queue_depth.labels(model).set(n)

    def set_models_loaded(self, n: int) -> None:
        """Models ready to serve now."""
        self.models_loaded.set(n)

    def observe_load_failure(self, model: str) -> None:
        """A load (or reload) of `model` failed."""
        self.load_failures.labels(model).inc()

    def observe_summary(self, model: str, summary: Summary) -> None:
        """The uncertainty of one answer: std [B, D] (regression) or entropy, MI [B].

        A map counts once per row, by its mean over the map (a 256 x 256 mask is one
        observation, not 65,536). Non-finite values are skipped: one NaN would poison the
        histogram's sum forever.
        """
        if isinstance(summary, ClassificationSummary):
            entropy, mi = summary.entropy, summary.mutual_information
            if is_map(summary):
                entropy, mi = entropy.flatten(1).mean(dim=1), mi.flatten(1).mean(dim=1)
            _observe_all(self.entropy.labels(model), entropy.tolist())
            _observe_all(self.mutual_information.labels(model), mi.tolist())
        else:
            std = summary.std.flatten(1).mean(dim=1) if is_map(summary) else summary.std.flatten()
            _observe_all(self.predictive_std.labels(model), std.tolist())

    def remove_model(self, model: str) -> None:
        """Drop every series labelled with `model` (it was unloaded)."""
        with self._lock:
            seen = self._endpoints.pop(model, set())
        for endpoint, status in seen:
            self.requests.remove(model, endpoint, status)
            self.request_seconds.remove(model, endpoint)
        for metric in self._per_model:
            metric.remove(model)

    def render(self) -> tuple[bytes, str]:
        """The text exposition of the registry and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _observe_all(histogram: Histogram, values: list[float]) -> None:
    for value in values:
        if math.isfinite(value):
            histogram.observe(value)
