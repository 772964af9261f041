"""Fallback for models fx cannot trace and for TorchScript: run whole on expanded rows.

Sites are the model's dropout calls in execution order, caught at the dispatcher whatever
their training flag, so these models too stay in eval mode and draw keyed masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mcdrop.engine.dispatch_sites import DropoutCalls, call_names, dropped_parameters, unbatched
from mcdrop.engine.random_ops import KeyedRandom, ModulePaths, RandomCall, UniformSource
from mcdrop.engine.sampling import SamplingContext, Site
from mcdrop.engine.sites import SampleSelection, refused_unbatched, select_sites
from mcdrop.engine.tracing import TRACE_LOCK
from mcdrop.engine.training_branches import TrainingBranches

PROBE_ROWS = 8


@dataclass
class WholeProgram:
    """Fallback for untraceable models and TorchScript: the whole model runs on R*S rows.

    Its sites are the model's dropout and attention-dropout calls in execution order, caught
    at the dispatcher (whatever their training flag), named by the module issuing them; the
    random ops of training branches draw keyed too (random_ops.py).
    """

    module: Callable[..., Any]
    sites: list[Site]
    selected: set[int]
    n_calls: int  # dropout calls per forward, as probed at load
    row_elements: int
    batched: tuple[bool, ...] = (True,)
    random_calls: list[RandomCall] = field(default_factory=list)
    reason: str = ""  # why the model runs whole
    branches: TrainingBranches = field(default_factory=TrainingBranches)  # set by the loader
    rewritten: list[str] = field(default_factory=list)  # recurrent modules unstacked at load

    def __post_init__(self) -> None:
        # dropout call number -> its site in `sites`, decided once at load
        self.site_index = {call: i for i, call in enumerate(sorted(self.selected))}

    def run_prefix(self, x: Tensor) -> list[Any]:
        """No prefix: the input itself is the only boundary value."""
        return [x]

    def run_suffix(self, boundary: list[Any], ctx: SamplingContext) -> Tensor:
        """Whole model on expanded rows, masks supplied at each dropout call."""
        calls = DropoutCalls(ctx, self.site_index)
        first = len(self.sites) - len(self.random_calls)
        source = UniformSource(ctx.uniform, ctx.n_rows * ctx.samples)
        keyed = KeyedRandom(self.random_calls, first, source)
        with calls, keyed:
            out: Tensor = self.module(ctx.expand(boundary[0]))
        if len(calls.seen) != self.n_calls:
            raise RuntimeError(
                f"the model made {len(calls.seen)} dropout calls; {self.n_calls} were found at load"
            )
        return out


def whole_program(
    module: nn.Module,
    input_shape: tuple[int, ...],
    sample: SampleSelection,
    dtype: torch.dtype,
    random_calls: Sequence[RandomCall] = (),
    reason: str = "",
) -> WholeProgram:
    """Probe the model to list its dropout calls by module path, and check their batch dim."""
    paths = ModulePaths()
    scripted = isinstance(module, torch.jit.ScriptModule)  # no module hooks: calls are numbered
    probe = DropoutCalls(None, paths=None if scripted else paths)
    x = torch.zeros((PROBE_ROWS, *input_shape), dtype=dtype, device=_device_of(module))
    watching = contextlib.nullcontext() if scripted else paths.watching(module)  # fmt: skip
    with torch.inference_mode(), TRACE_LOCK.running(), watching, probe:
        module(x)
    names = call_names(probe.where, probe.seen, numbered=scripted)
    parameters = dropped_parameters(module, probe)
    for name, (_, shape), parameter in zip(names, probe.where, parameters, strict=True):
        what = unbatched(parameter, (shape,), (PROBE_ROWS,))
        if what is not None:
            raise refused_unbatched(name, what)
    chosen = select_sites(names, sample) if names or not random_calls else []
    sites = [Site(names[i], *probe.seen[i]) for i in chosen]
    sites += [Site(c.name, "random", 0.0, op=c.op) for c in random_calls]
    row_elements = max(x[0].numel(), probe.largest // PROBE_ROWS, 1)
    return WholeProgram(module, sites, set(chosen), len(probe.seen), row_elements,
                        random_calls=list(random_calls), reason=reason)  # fmt: skip


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")
