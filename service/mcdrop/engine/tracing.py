"""One lock between fx tracing and running models in the same process.

`torch.fx.symbolic_trace` patches `nn.Module.__call__` and `__getattr__` for the whole process
while it traces, so a model running in another thread at that moment is routed into the tracer
(it fails, or worse, adds its calls to the graph being traced). Tracing therefore waits for
running models to finish and holds new ones back until it is done; runs share the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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


class OpaqueLeafTracer(fx.Tracer):
    """A tracer that keeps a submodule it cannot trace through as one opaque call.

    When a submodule's forward fails to trace, the nodes it left are removed and the call is
    recorded as a leaf instead, so only the innermost untraceable modules stay opaque and the
    rest of the model is still a graph. `opaque` maps each such path to the tracing error.
    """

    def __init__(self) -> None:
        super().__init__()
        self.opaque: dict[str, str] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.opaque or super().is_leaf_module(
            m, module_qualified_name
        )

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        last = next(reversed(self.graph.nodes), None)
        stack, calls = dict(self.module_stack), dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # this module is kept whole; the tracer's state rolled back
            self._erase_after(last)
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls = calls
            self.opaque[path] = f"{type(exc).__name__}: {exc}"
            return super().call_module(m, forward, args, kwargs)

    def _erase_after(self, last: fx.Node | None) -> None:
        """Remove what a failed forward added; attribute reads stay (the tracer caches them)."""
        added = []
        for node in reversed(self.graph.nodes):
            if node is last:
                break
            added.append(node)
        for node in added:
            if node.op != "get_attr" and not node.users:
                self.graph.erase_node(node)


def symbolic_trace(module: nn.Module) -> tuple[fx.GraphModule, dict[str, str]]:
    """Trace `module`, its untraceable submodules kept opaque; never overlaps a running model.

    Returns the graph module and the opaque submodules' paths with the reason for each.
    Raises if even the model's own forward cannot be traced.
    """
    with TRACE_LOCK.tracing():
        tracer = OpaqueLeafTracer()
        graph = tracer.trace(module)
        name = type(module).__name__
        return fx.GraphModule(tracer.root, graph, name), tracer.opaque
