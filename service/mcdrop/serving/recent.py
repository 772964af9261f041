"""The uncertainty of a model's recent answers: a bounded, thread-safe ring buffer, for live views.

One entry per answered inference request (oldest first), JSON-ready:

    regression      {"time", "version", "rows", "samples", "mean_std", "max_std"}
    classification  {"time", "version", "rows", "samples", "mean_entropy",
                     "mean_mutual_information", "mean_variation_ratio", "max_mutual_information"}

time is unix seconds; std is the total predictive std in raw target units, averaged over the
request's rows and outputs; entropies are in nats. Non-finite values are left out of the
means and maxima (None when nothing finite is left), as the Prometheus histograms do. The
buffer also keeps the last evaluation report sent for the model, with the time it arrived.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import torch
from torch import Tensor

from mcdrop.uncertainty import ClassificationSummary, Summary

RECENT_CAPACITY = 1000  # entries per model


def _mean_max(values: Tensor) -> tuple[float | None, float | None]:
    """Mean and maximum of the finite values (float64, on the CPU); None for none."""
    flat = values.detach().to("cpu", torch.float64).flatten()
    finite = flat[torch.isfinite(flat)]
    if finite.numel() == 0:
        return None, None
    return float(finite.mean()), float(finite.max())


def summary_entry(summary: Summary, now: float, version: str | None = None) -> dict[str, Any]:
    """The entry of one answered request (see the module docstring for its keys)."""
    entry: dict[str, Any] = {"time": float(now), "version": version}
    if isinstance(summary, ClassificationSummary):
        mean_entropy, _ = _mean_max(summary.entropy)
        mean_mi, max_mi = _mean_max(summary.mutual_information)
        mean_vr, _ = _mean_max(summary.variation_ratio)
        entry |= {
            "rows": len(summary.probabilities),
            "samples": summary.samples_used,
            "mean_entropy": mean_entropy,
            "mean_mutual_information": mean_mi,
            "mean_variation_ratio": mean_vr,
            "max_mutual_information": max_mi,
        }
    else:
        mean_std, max_std = _mean_max(summary.std)
        entry |= {
            "rows": len(summary.mean),
            "samples": summary.samples_used,
            "mean_std": mean_std,
            "max_std": max_std,
        }
    return entry


class RecentUncertainty:
    """The last `capacity` answers' uncertainty of one model, and its latest evaluation report.

    record() runs on the model's worker thread, snapshot() on the event loop: a lock keeps
    them apart. `task` is the model's ("regression" | "classification").
    """

    def __init__(self, task: str, capacity: int = RECENT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 entry, got {capacity}")
        self.task = task
        self.capacity = capacity
        self._entries: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._calibration: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def record(
        self, summary: Summary, now: float | None = None, *, version: str | None = None
    ) -> None:
        """Append the entry of one answer (at unix time `now`, default the clock's); the
        oldest entry goes when the buffer is full."""
        entry = summary_entry(summary, time.time() if now is None else now, version)
        with self._lock:
            self._entries.append(entry)

    def snapshot(
        self, since: float | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Copies of the entries recorded after unix time `since` (strictly), oldest first;
        with `limit`, only the newest `limit` of them."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        with self._lock:
            entries = list(self._entries)
        if since is not None:
            entries = [e for e in entries if e["time"] > since]
        if limit is not None:
            entries = entries[-limit:] if limit else []
        return [dict(e) for e in entries]

    def record_calibration(self, report: dict[str, Any], now: float | None = None) -> None:
        """Keep `report` (an EvaluationReport.as_dict()) as the latest, received at `now`."""
        slot = {"time": float(time.time() if now is None else now), "report": report}
        with self._lock:
            self._calibration = slot

    @property
    def latest_calibration(self) -> dict[str, Any] | None:
        """{"time": unix seconds, "report": the report} of the latest evaluation, or None."""
        with self._lock:
            slot = self._calibration
        return None if slot is None else dict(slot)
