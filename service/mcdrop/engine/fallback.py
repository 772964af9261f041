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
from torch.utils._python_dispatch import TorchDispatchMode

from mcdrop.engine.random_ops import KeyedRandom, ModulePaths, RandomCall, UniformSource
from mcdrop.engine.sampling import SamplingContext, Site, SiteKind
from mcdrop.engine.sites import SampleSelection, select_sites
from mcdrop.engine.tracing import TRACE_LOCK
from mcdrop.engine.training_branches import TrainingBranches
from mcdrop.errors import ModelLoadError

PROBE_ROWS = 8

_ATEN_KINDS: dict[Any, SiteKind] = {
    torch.ops.aten.dropout.default: "dropout",
    torch.ops.aten.feature_dropout.default: "channel",
    torch.ops.aten.alpha_dropout.default: "alpha",
    torch.ops.aten.feature_alpha_dropout.default: "feature_alpha",
}


class _DropoutCalls(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Sees every aten dropout call and SDPA with dropout; records them, or applies keyed masks."""

    def __init__(
        self,
        ctx: SamplingContext | None,
        selected: set[int] | None = None,
        paths: ModulePaths | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ctx = ctx
        self.selected = selected
        self.paths = paths
        self.seen: list[tuple[SiteKind, float]] = []
        self.where: list[tuple[str, tuple[int, ...]]] = []  # probing: module path, input shape
        self.largest = 0  # elements of the largest op output seen (while probing)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        kind, p = _site_of(func, args)
        if kind is None:
            out = func(*args, **kwargs)
            if self.ctx is None and isinstance(out, Tensor):
                self.largest = max(self.largest, out.numel())
            return out
        call = len(self.seen)
        self.seen.append((kind, p))
        if self.ctx is None:  # probing
            path = "" if self.paths is None else self.paths.current
            module_call = self.paths is not None and self.paths.current_is_dropout
            self.where.append((path if module_call else f"{path}.{kind}".lstrip("."),
                               tuple(args[0].shape)))  # fmt: skip
        if self.ctx is None or self.selected is None or call not in self.selected:
            if kind == "sdpa":  # probing, or not sampled: attention without its dropout
                return func(*args[:4], 0.0, *args[5:], **kwargs)
            return args[0]  # probing, or a site that does not sample: identity, as in eval
        index = sorted(self.selected).index(call)
        if kind == "sdpa":
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            causal = bool(args[5]) if len(args) > 5 else bool(kwargs.get("is_causal", False))
            return self.ctx.sdpa(index, q, k, v, mask, p, causal, kwargs.get("scale"),
                                 bool(kwargs.get("enable_gqa", False)))  # fmt: skip
        return self.ctx.apply(index, args[0], kind, p)


def _site_of(func: Any, args: tuple[Any, ...]) -> tuple[SiteKind | None, float]:
    """The site kind and drop probability of a dispatcher call, or (None, 0) for other ops."""
    if func is torch.ops.aten.scaled_dot_product_attention.default:
        p = float(args[4]) if len(args) > 4 else 0.0
        return ("sdpa", p) if p > 0 else (None, 0.0)
    kind = _ATEN_KINDS.get(func)
    if kind is None or float(args[1]) <= 0:
        return None, 0.0
    return kind, float(args[1])


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

    def run_prefix(self, x: Tensor) -> list[Any]:
        """No prefix: the input itself is the only boundary value."""
        return [x]

    def run_suffix(self, boundary: list[Any], ctx: SamplingContext) -> Tensor:
        """Whole model on expanded rows, masks supplied at each dropout call."""
        calls = _DropoutCalls(ctx, self.selected)
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
    probe = _DropoutCalls(None, paths=None if scripted else paths)
    x = torch.zeros((PROBE_ROWS, *input_shape), dtype=dtype, device=_device_of(module))
    watching = contextlib.nullcontext() if scripted else paths.watching(module)  # fmt: skip
    with torch.inference_mode(), TRACE_LOCK.running(), watching, probe:
        module(x)
    names = _names(probe.where, probe.seen, numbered=scripted)
    for name, (_, shape) in zip(names, probe.where, strict=True):
        if not shape or shape[0] != PROBE_ROWS:
            raise ModelLoadError(
                f"{name}: drops a tensor of shape {list(shape)} without the batch in dimension 0 "
                "(DropConnect on a weight?): one mask would be shared by every row and sample; "
                "a weight mask per MC sample is not supported, so this model is refused"
            )
    chosen = select_sites(names, sample) if names or not random_calls else []
    sites = [Site(names[i], *probe.seen[i]) for i in chosen]
    sites += [Site(c.name, "random", 0.0, op=c.op) for c in random_calls]
    row_elements = max(x[0].numel(), probe.largest // PROBE_ROWS, 1)
    return WholeProgram(module, sites, set(chosen), len(probe.seen), row_elements,
                        random_calls=list(random_calls), reason=reason)  # fmt: skip


def _names(
    where: list[tuple[str, tuple[int, ...]]], seen: list[tuple[SiteKind, float]], numbered: bool
) -> list[str]:
    """Module-path names of the probed calls (`encoder.attention.dropout`), numbered if repeated.

    TorchScript archives have no module hooks to watch: their calls are dropout_call0, ...
    """
    if numbered:
        return [f"dropout_call{i}" for i in range(len(seen))]
    base = [name for name, _ in where]  # a dropout module's path, or path.kind for a call
    counts: dict[str, int] = {}
    names = []
    for name in base:
        counts[name] = counts.get(name, 0) + 1
        names.append(name if base.count(name) == 1 else f"{name}{counts[name] - 1}")
    return names


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")
