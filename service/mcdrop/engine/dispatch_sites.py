"""Dropout calls caught at the dispatcher, for code fx cannot see into.

Models fx cannot trace (fallback.py) and the submodules a trace keeps opaque (partition.py)
run eagerly in eval; every aten dropout call and SDPA with dropout_p is seen here, whatever
its training flag, and either recorded (probing at load), made the identity (not sampled:
as in eval), or given keyed masks from the SamplingContext.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from mcdrop.engine.random_ops import KEYED, UNSUPPORTED, ModulePaths
from mcdrop.engine.sampling import SamplingContext, SiteKind

_ATEN_KINDS: dict[Any, SiteKind] = {
    torch.ops.aten.dropout.default: "dropout",
    torch.ops.aten.feature_dropout.default: "channel",
    torch.ops.aten.alpha_dropout.default: "alpha",
    torch.ops.aten.feature_alpha_dropout.default: "feature_alpha",
}


class DropoutCalls(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Sees every aten dropout call and SDPA with dropout; records them, or applies keyed masks.

    site_index maps a call's number within one forward to its site in ctx.sites; calls not in
    it (and every call without a ctx) are the identity, as in eval. Without a ctx it records
    what it sees (probing at load) unless `probing` is False (a served forward).
    """

    def __init__(
        self,
        ctx: SamplingContext | None,
        site_index: dict[int, int] | None = None,
        paths: ModulePaths | None = None,
        probing: bool | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ctx = ctx
        self.probing = ctx is None if probing is None else probing
        self.site_index = site_index or {}
        self.paths = paths
        self.seen: list[tuple[SiteKind, float]] = []
        self.where: list[tuple[str, tuple[int, ...]]] = []  # probing: module path, input shape
        self.inputs: list[Tensor] = []  # probing: each call's input, to name a dropped weight
        self.largest = 0  # elements of the largest op output seen (while probing)
        self.random_ops: list[str] = []  # other random ops issued (bernoulli, randn, ...)

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
            if not self.probing:
                return func(*args, **kwargs)
            op = KEYED.get(func) or UNSUPPORTED.get(func)
            if op is not None:
                self.random_ops.append(op)
            out = func(*args, **kwargs)
            if isinstance(out, Tensor):
                self.largest = max(self.largest, out.numel())
            return out
        call = len(self.seen)
        self.seen.append((kind, p))
        if self.probing:
            path = "" if self.paths is None else self.paths.current
            module_call = self.paths is not None and self.paths.current_is_dropout
            self.where.append((path if module_call else f"{path}.{kind}".lstrip("."),
                               tuple(args[0].shape)))  # fmt: skip
            self.inputs.append(args[0])
        index = self.site_index.get(call)
        if self.ctx is None or index is None:
            if kind == "sdpa":  # probing, or not sampled: attention without its dropout
                return func(*args[:4], 0.0, *args[5:], **kwargs)
            return args[0]  # probing, or a site that does not sample: identity, as in eval
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


def call_names(
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


def dropped_parameters(model: nn.Module, probe: DropoutCalls) -> list[str | None]:
    """The parameter each probed call drops (DropConnect on a weight), by name, else None."""
    params = {id(p): name for name, p in model.named_parameters()}
    return [params.get(id(t)) for t in probe.inputs]


def unbatched(
    parameter: str | None, shapes: tuple[tuple[int, ...], ...], rows: tuple[int, ...]
) -> str | None:
    """What a call drops if it has no batch dimension (its shapes at probe `rows`), else None."""
    if parameter is not None:
        return f"parameter '{parameter}'"
    if any(shape[:1] != (n,) for shape, n in zip(shapes, rows, strict=True)):
        return f"a tensor of shape {list(shapes[0])}"
    return None


class DispatchLeaf(nn.Module):
    """Runs a submodule fx kept opaque with its dropout calls caught at the dispatcher.

    Called as leaf(ctx, *args, **kwargs): ctx None runs it with every call the identity (the
    prefix, or a leaf with no sampled call), else call i draws for site site_index[i].
    """

    def __init__(self, module: nn.Module, site_index: dict[int, int], n_calls: int) -> None:
        super().__init__()
        self.module = module
        self.site_index = site_index
        self.n_calls = n_calls

    def forward(self, ctx: SamplingContext | None, *args: Any, **kwargs: Any) -> Any:
        calls = DropoutCalls(ctx, self.site_index if ctx is not None else None, probing=False)
        with calls:
            out = self.module(*args, **kwargs)
        if len(calls.seen) != self.n_calls:
            raise RuntimeError(
                f"a submodule made {len(calls.seen)} dropout calls; {self.n_calls} were found "
                "at load"
            )
        return out
