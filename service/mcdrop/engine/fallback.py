"""Fallback for models fx cannot trace and for TorchScript: run whole on expanded rows.

Sites are the model's dropout calls in execution order, caught at the dispatcher whatever
their training flag, so these models too stay in eval mode and draw keyed masks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from mcdrop.engine.sampling import SamplingContext, Site, SiteKind
from mcdrop.engine.sites import SampleSelection, select_sites
from mcdrop.engine.tracing import TRACE_LOCK

PROBE_ROWS = 8

_ATEN_KINDS: dict[Any, SiteKind] = {
    torch.ops.aten.dropout.default: "dropout",
    torch.ops.aten.feature_dropout.default: "channel",
    torch.ops.aten.alpha_dropout.default: "alpha",
    torch.ops.aten.feature_alpha_dropout.default: "feature_alpha",
}


class _DropoutCalls(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Sees every aten dropout call; records them, or replaces them with keyed masks."""

    def __init__(self, ctx: SamplingContext | None, selected: set[int] | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ctx = ctx
        self.selected = selected
        self.seen: list[tuple[SiteKind, float]] = []
        self.largest = 0  # elements of the largest op output seen (while probing)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kind = _ATEN_KINDS.get(func)
        if kind is None or float(args[1]) <= 0:
            out = func(*args, **(kwargs or {}))
            if self.ctx is None and isinstance(out, Tensor):
                self.largest = max(self.largest, out.numel())
            return out
        call = len(self.seen)
        self.seen.append((kind, float(args[1])))
        if self.ctx is None or self.selected is None or call not in self.selected:
            return args[0]  # probing, or a site that does not sample: identity, as in eval
        index = sorted(self.selected).index(call)
        return self.ctx.apply(index, args[0], kind, float(args[1]))


@dataclass
class WholeProgram:
    """Fallback for untraceable models and TorchScript: the whole model runs on R*S rows.

    Its sites are the model's dropout calls in execution order, caught at the dispatcher
    (whatever their training flag), so the model stays in eval mode here too.
    """

    module: Callable[..., Any]
    sites: list[Site]
    selected: set[int]
    n_calls: int  # dropout calls per forward, as probed at load
    row_elements: int
    batched: tuple[bool, ...] = (True,)

    def run_prefix(self, x: Tensor) -> list[Any]:
        """No prefix: the input itself is the only boundary value."""
        return [x]

    def run_suffix(self, boundary: list[Any], ctx: SamplingContext) -> Tensor:
        """Whole model on expanded rows, masks supplied at each dropout call."""
        calls = _DropoutCalls(ctx, self.selected)
        with calls:
            out: Tensor = self.module(ctx.expand(boundary[0]))
        if len(calls.seen) != self.n_calls:
            raise RuntimeError(
                f"the model made {len(calls.seen)} dropout calls; {self.n_calls} were found at load"
            )
        return out


def whole_program(
    module: nn.Module, input_shape: tuple[int, ...], sample: SampleSelection, dtype: torch.dtype
) -> WholeProgram:
    """Probe the model once to list its dropout calls and their kinds."""
    probe = _DropoutCalls(None)
    x = torch.zeros((PROBE_ROWS, *input_shape), dtype=dtype, device=_device_of(module))
    with torch.inference_mode(), TRACE_LOCK.running(), probe:
        module(x)
    names = [f"dropout_call{i}" for i in range(len(probe.seen))]
    chosen = select_sites(names, sample)
    sites = [Site(names[i], *probe.seen[i]) for i in chosen]
    row_elements = max(x[0].numel(), probe.largest // PROBE_ROWS, 1)
    return WholeProgram(module, sites, set(chosen), len(probe.seen), row_elements)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")
