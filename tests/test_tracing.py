"""The trace lock: fx tracing never overlaps a model running in another thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from mcdrop.engine.core import MCEngine, MCOptions
from mcdrop.engine.tracing import TraceLock, symbolic_trace
from mcdrop.uncertainty import RegressionSummary


def _started(target: object) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


def test_a_trace_waits_for_running_models_and_holds_back_new_ones() -> None:
    lock = TraceLock()
    events: list[str] = []
    run_entered, release_run = threading.Event(), threading.Event()

    def run() -> None:
        with lock.running():
            run_entered.set()
            release_run.wait(5)
            with lock.running():  # nested in the same thread: allowed while a trace waits
                events.append("nested run")
            events.append("run ends")

    def trace() -> None:
        with lock.tracing():
            events.append("trace")

    def late_run() -> None:
        with lock.running():
            events.append("late run")

    runner = _started(run)
    assert run_entered.wait(5)
    tracer = _started(trace)
    time.sleep(0.05)
    late = _started(late_run)  # arrives while the trace waits: must go after it
    time.sleep(0.05)
    assert events == []
    release_run.set()
    for t in (runner, tracer, late):
        t.join(5)
    assert events == ["nested run", "run ends", "trace", "late run"]


def test_tracing_from_inside_a_run_is_refused() -> None:
    lock = TraceLock()
    with lock.running(), pytest.raises(RuntimeError, match="inside a model run"), lock.tracing():
        pass


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(self.drop(torch.relu(self.hidden(x))))
        return out


def test_tracing_while_another_thread_serves_neither_fails_nor_mixes_graphs() -> None:
    torch.manual_seed(0)
    engine = MCEngine(_Net(), task="regression", input_shape=(4,), tau=1.0)
    x = torch.randn(3, 4)

    def mean() -> torch.Tensor:
        summary = engine.run(x, MCOptions(samples=64, seed=1))
        assert isinstance(summary, RegressionSummary)
        return summary.mean

    expected = mean()
    stop = threading.Event()
    errors: list[BaseException] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                assert torch.equal(mean(), expected)
            except BaseException as exc:  # reported below, from the main thread
                errors.append(exc)
                return

    server = _started(serve)
    reference = len(symbolic_trace(_Net()).graph.nodes)
    try:
        sizes = [len(symbolic_trace(_Net()).graph.nodes) for _ in range(40)]
    finally:
        stop.set()
        server.join(10)
    assert errors == []
    assert sizes == [reference] * 40
