"""Random ops of training branches (bernoulli, rand, randn, normal_, ...) drawn from keyed streams.

Modules that sample only in training mode (DropPath, locked dropout, Gaussian dropout,
hand-written Bernoulli masks) run in their training branch; every random op they issue is
seen at the dispatcher and replaced by a draw that is a pure function of (seed, site, row,
sample, element), so seeds, batching, chunking and sharding invariance hold for them as for
dropout. A draw must have the expanded rows x samples in one dimension (found at load with
two probe batch sizes); one without it (DropConnect's weight mask, a constant drawn once)
would be shared by every row and sample, and is refused at load, naming the op.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _overloads(*names: str) -> dict[Any, str]:
    """Every non-`out` overload of these aten ops, mapped to the op's name."""
    found: dict[Any, str] = {}
    for name in names:
        packet = getattr(aten, name)
        for overload in packet.overloads():
            if not overload.endswith("out"):
                found[getattr(packet, overload)] = name
    return found


# aten overloads that draw random numbers, by family: bernoulli (u < p), uniform (u), normal.
BERNOULLI: dict[Any, str] = _overloads("bernoulli", "bernoulli_")
UNIFORM: dict[Any, str] = _overloads("rand", "rand_like", "uniform_")
NORMAL: dict[Any, str] = _overloads("randn", "randn_like", "normal_")
# Random ops the engine does not draw keyed; a model that uses one is refused at load.
UNSUPPORTED: dict[Any, str] = _overloads(
    "randint",
    "randint_like",
    "randperm",
    "multinomial",
    "poisson",
    "random_",
    "exponential_",
    "geometric_",
    "cauchy_",
    "log_normal_",
    "normal",
)
KEYED: dict[Any, str] = {**BERNOULLI, **UNIFORM, **NORMAL}
# Python-level names of the same ops as fx records them (call_function / call_method nodes).
FUNCTIONS: frozenset[Any] = frozenset(
    {
        torch.bernoulli,
        torch.rand,
        torch.rand_like,
        torch.randn,
        torch.randn_like,
        torch.normal,
        torch.randint,
        torch.randint_like,
        torch.randperm,
        torch.multinomial,
        torch.poisson,
    }
)
METHODS: frozenset[str] = frozenset(
    {
        "bernoulli",
        "bernoulli_",
        "normal_",
        "uniform_",
        "random_",
        "exponential_",
        "geometric_",
        "cauchy_",
        "log_normal_",
    }
)
_U32 = 2.0**-32


@dataclass(frozen=True)
class RandomCall:
    """One random op of a forward pass, as probed at load: where, which, and its batch dim."""

    module: str  # path of the innermost module running when it was issued ("" = the model)
    op: str
    shape: tuple[int, ...]  # of the draw, at the probe's first batch size
    batch_dim: int | None  # the dimension holding the expanded rows; None: not per row

    @property
    def name(self) -> str:
        """The site name: module path and op, e.g. `blocks.0.drop_path.bernoulli_`."""
        return f"{self.module}.{self.op}" if self.module else self.op


def keyed_uniform(
    seeds: list[int],
    rows: list[int],
    site: int,
    first_sample: int,
    n_samples: int,
    elems: int,
    device: torch.device,
) -> Tensor:
    """Uniforms in (0, 1) [len(rows), n_samples, elems] (float64, 32-bit resolution).

    Like the dropout masks (masks.py): Philox keyed by (seed, site, row), sample s at counter
    offset s * ceil(elems / 8), so any sample range draws the same numbers.
    """
    per_sample = -(-elems // 8)  # a counter step gives 4 x 64 bits = 8 x 32 bits
    out = np.empty((len(rows), n_samples, elems), dtype=np.float64)
    for i, (seed, row) in enumerate(zip(seeds, rows, strict=True)):
        key = [seed & 0xFFFF_FFFF_FFFF_FFFF, (site << 40) | row]
        gen = np.random.Philox(key=key, counter=[first_sample * per_sample, 0, 0, 0])
        bits = gen.random_raw(n_samples * per_sample * 4).view(np.uint32)
        bits = bits.reshape(n_samples, per_sample * 8)[:, :elems]
        np.multiply(bits.astype(np.float64) + 0.5, _U32, out=out[i])
    values = torch.from_numpy(out)
    return values if device.type == "cpu" else values.to(device)


class UniformSource:
    """What a keyed random op needs from the sampling context: uniforms for one site."""

    def __init__(self, draw: Callable[[int, int], Tensor], rows_times_samples: int) -> None:
        self.draw = draw  # (site, elements per row-sample) -> [R*S, elements] float64
        self.rows_times_samples = rows_times_samples


def keyed_draw(
    call: RandomCall,
    site: int,
    source: UniformSource,
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Tensor:
    """The op `func(*args, **kwargs)` with its randomness from `source`, for site `site`."""
    shape, like = _output_shape(func, args, kwargs)
    if call.batch_dim is None or call.batch_dim >= len(shape):
        raise RuntimeError(f"{call.name}: this draw has no batch dimension")
    batch = call.batch_dim
    if shape[batch] != source.rows_times_samples:
        raise RuntimeError(
            f"{call.name}: dimension {batch} of this draw has {shape[batch]} entries; expected "
            f"the {source.rows_times_samples} expanded rows"
        )
    rest = [d for i, d in enumerate(shape) if i != batch]
    family = "normal" if func in NORMAL else "uniform"
    elems = math.prod(rest) * (2 if family == "normal" else 1)
    u = source.draw(site, elems).view(source.rows_times_samples, *rest, -1)
    if family == "normal":
        value = torch.sqrt(-2.0 * torch.log(u[..., 0])) * torch.cos(2.0 * math.pi * u[..., 1])
    else:
        value = u[..., 0]
    value = value.movedim(0, batch)
    dtype = kwargs.get("dtype") or (like.dtype if like is not None else torch.get_default_dtype())
    device = like.device if like is not None else value.device
    result = _finish(func, value, args, kwargs)
    if func in (
        aten.bernoulli_.float,
        aten.bernoulli_.Tensor,
        aten.uniform_.default,
        aten.normal_.default,
    ):
        target: Tensor = args[0]
        return target.copy_(result)
    return result.to(device=device, dtype=dtype)


def _output_shape(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[int, ...], Tensor | None]:
    """The shape of the op's draw and the tensor it is shaped like (None for factories)."""
    if KEYED[func] in ("rand", "randn"):  # factories: the size comes first
        return tuple(int(d) for d in args[0]), None
    like: Tensor = args[0]
    return tuple(like.shape), like


def _finish(func: Any, u: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """Turn keyed uniforms (or standard normals for the normal family) into the op's values."""
    name = KEYED[func]
    if name in ("bernoulli", "bernoulli_"):
        self_: Tensor = args[0]
        p = args[1] if len(args) > 1 and not isinstance(args[1], torch.Generator) else None
        p = kwargs.get("p", p)
        if p is None:  # torch.bernoulli(probs): the input holds the probabilities
            p = self_ if name == "bernoulli" else 0.5
        if isinstance(p, Tensor):
            return (u.to(p.device) < p.double()).to(self_.dtype)
        return (u < float(p)).to(self_.dtype)
    if func is aten.uniform_.default:
        low = float(args[1]) if len(args) > 1 else float(kwargs.get("from", 0.0))
        high = float(args[2]) if len(args) > 2 else float(kwargs.get("to", 1.0))
        return (low + (high - low) * u).to(args[0].dtype)
    if func is aten.normal_.default:
        mean = float(args[1]) if len(args) > 1 else float(kwargs.get("mean", 0.0))
        std = float(args[2]) if len(args) > 2 else float(kwargs.get("std", 1.0))
        return (mean + std * u).to(args[0].dtype)
    return u  # rand, rand_like, randn, randn_like


class ModulePaths:
    """The path of the innermost module running, kept by forward hooks (load-time probes only)."""

    def __init__(self) -> None:
        self.stack: list[str] = [""]
        self.dropout_paths: set[str] = set()  # paths of dropout-family modules

    @contextmanager
    def watching(self, model: nn.Module, prefix: str = "") -> Iterator[None]:
        """Track module entries and exits of `model` (at path `prefix`) while the block runs."""
        handles = []
        self.stack = [prefix]
        for inner, module in model.named_modules():
            if not inner:
                continue
            path = f"{prefix}.{inner}" if prefix else inner
            if isinstance(module, nn.modules.dropout._DropoutNd):
                self.dropout_paths.add(path)

            def enter(*_: Any, path: str = path) -> None:
                self.stack.append(path)

            def leave(*_: Any) -> None:
                self.stack.pop()

            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.stack = [""]

    @property
    def current(self) -> str:
        """The innermost module running ("" for the model's own forward)."""
        return self.stack[-1]

    @property
    def current_is_dropout(self) -> bool:
        """Whether the innermost module running is an nn.Dropout-family module."""
        return self.stack[-1] in self.dropout_paths


# Dropout ops that sample when their train flag is set, and attention with dropout_p: the
# engine samples these itself (fx rewrite or fallback), so they only tell a training branch.
_DROPOUT_OPS = frozenset(
    {
        aten.dropout.default,
        aten.feature_dropout.default,
        aten.alpha_dropout.default,
        aten.feature_alpha_dropout.default,
    }
)


def _samples_dropout(func: Any, args: tuple[Any, ...]) -> bool:
    if func in _DROPOUT_OPS:
        return len(args) > 2 and bool(args[2]) and float(args[1]) > 0
    if func is aten.scaled_dot_product_attention.default:
        return len(args) > 4 and float(args[4]) > 0
    return False


class RandomRecorder(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Records every random op (keyed kinds and unsupported ones) with the module issuing it.

    Dropout with its train flag set and attention with dropout_p > 0 are counted apart
    (`dropouts`): they tell a training branch, but the engine samples them itself.
    """

    def __init__(self, paths: ModulePaths) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.paths = paths
        self.calls: list[tuple[str, str, tuple[int, ...]]] = []  # (module, op, draw shape)
        self.dropouts = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        op = KEYED.get(func) or UNSUPPORTED.get(func)
        if op is not None:
            shape = tuple(out.shape) if isinstance(out, Tensor) else ()
            self.calls.append((self.paths.current, op, shape))
        elif _samples_dropout(func, args):
            self.dropouts += 1
        return out


def batch_dimension(
    small: tuple[int, ...], large: tuple[int, ...], rows: tuple[int, int]
) -> int | None:
    """The one dimension that holds `rows[0]` entries in `small` and `rows[1]` in `large`."""
    if len(small) != len(large):
        return None
    dims = [i for i, (a, b) in enumerate(zip(small, large, strict=True)) if (a, b) == rows]
    others_equal = all(
        a == b for i, (a, b) in enumerate(zip(small, large, strict=True)) if i not in dims
    )
    return dims[0] if len(dims) == 1 and others_equal else None


class KeyedRandom(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Replaces the random ops of one forward, in order, with draws keyed by their sites.

    calls are the random ops probed at load, in execution order; op i draws for site
    first_site + i. A forward that issues other random ops than probed is an error.
    """

    def __init__(self, calls: list[RandomCall], first_site: int, source: UniformSource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.calls = calls
        self.first_site = first_site
        self.source = source
        self.count = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        op = KEYED.get(func) or UNSUPPORTED.get(func)
        if op is None:
            return func(*args, **(kwargs or {}))
        index = self.count
        self.count += 1
        if index >= len(self.calls) or self.calls[index].op != op:
            expected = self.calls[index].name if index < len(self.calls) else "none"
            raise RuntimeError(
                f"random op {index} of this forward is {op}; at load it was {expected}"
            )
        return keyed_draw(
            self.calls[index], self.first_site + index, self.source, func, args, kwargs or {}
        )
