"""One lock between fx tracing and running models in the same process.

`torch.fx.symbolic_trace` patches `nn.Module.__call__` and `__getattr__` for the whole process
while it traces, so a model running in another thread at that moment is routed into the tracer
(it fails, or worse, adds its calls to the graph being traced). Tracing therefore waits for
running models to finish and holds new ones back until it is done; runs share the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch.fx as fx
from torch import nn


class TraceLock:
    """Shared for running models, exclusive for tracing; a waiting trace goes before new runs.

    A thread already running a model may enter again (nested runs) even while a trace waits.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._runs: dict[int, int] = {}  # thread id -> nesting depth
        self._tracing = False
        self._traces_waiting = 0

    @contextmanager
    def running(self) -> Iterator[None]:
        """Hold while any nn.Module runs."""
        me = threading.get_ident()
        with self._cond:
            while self._tracing or (self._traces_waiting and me not in self._runs):
                self._cond.wait()
            self._runs[me] = self._runs.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._runs[me] -= 1
                if not self._runs[me]:
                    del self._runs[me]
                    self._cond.notify_all()

    @contextmanager
    def tracing(self) -> Iterator[None]:
        """Hold while fx patches nn.Module; no model runs meanwhile."""
        with self._cond:
            if threading.get_ident() in self._runs:
                raise RuntimeError("cannot trace a model from inside a model run")
            self._traces_waiting += 1
            try:
                while self._tracing or self._runs:
                    self._cond.wait()
            finally:
                self._traces_waiting -= 1
            self._tracing = True
        try:
            yield
        finally:
            with self._cond:
                self._tracing = False
                self._cond.notify_all()


TRACE_LOCK = TraceLock()


def symbolic_trace(module: nn.Module) -> fx.GraphModule:
    """`fx.symbolic_trace` that never overlaps a model running in another thread."""
    with TRACE_LOCK.tracing():
        return fx.symbolic_trace(module)
