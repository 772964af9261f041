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
    reference = len(symbolic_trace(_Net())[0].graph.nodes)
    try:
        sizes = [len(symbolic_trace(_Net())[0].graph.nodes) for _ in range(40)]
    finally:
        stop.set()
        server.join(10)
    assert errors == []
    assert sizes == [reference] * 40


# -- submodules fx cannot trace stay opaque ----------------------------------------------------


class _ScalesThenBranches(nn.Module):
    """Writes its input in place, then branches on a value: fx fails after the write."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x.mul_(2)
        if bool(x.sum() > 1e9):
            return x * 0
        return x + 1


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.inner = _ScalesThenBranches()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.inner(self.fc(x)))


def test_a_submodule_that_fails_to_trace_is_one_opaque_call_and_its_partial_trace_is_gone() -> None:
    model = _Outer()
    gm, opaque = symbolic_trace(model)
    assert list(opaque) == ["inner"]
    assert "TraceError" in opaque["inner"] or "bool" in opaque["inner"], opaque
    ops = [(n.op, str(n.target)) for n in gm.graph.nodes]
    assert ("call_module", "inner") in ops
    assert not any(target in ("mul_", "clone") for _, target in ops), ops  # rolled back
    x = torch.randn(4, 3)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_a_model_whose_own_forward_cannot_be_traced_still_raises() -> None:
    with pytest.raises(Exception, match=r"(?i)trace|proxy|bool"):
        symbolic_trace(_ScalesThenBranches())
