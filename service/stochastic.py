"""Find a model's stochastic ops and compile it into a deterministic prefix and a sampled suffix.

The model stays in eval mode for good. With torch.fx, every stochastic op is rewritten to
draw its masks from a SamplingContext, and the graph is split: nodes that no sampled op
influences form the prefix (run once per input row); the rest form the suffix (run on
rows x samples). Models fx cannot trace (and TorchScript archives) run whole on expanded
inputs with their dropout modules sampling through a dispatch-level mask hook instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from service.errors import ModelLoadError
from service.sampling import SamplingContext, Site, SiteKind

log = logging.getLogger(__name__)

SampleSelection = Literal["all", "last"] | list[str]

_MODULE_KINDS: tuple[tuple[type[nn.Module], SiteKind], ...] = (
    (nn.FeatureAlphaDropout, "feature_alpha"),
    (nn.AlphaDropout, "alpha"),
    (nn.Dropout1d, "channel"),
    (nn.Dropout2d, "channel"),
    (nn.Dropout3d, "channel"),
    (nn.Dropout, "dropout"),
)
_SCRIPT_KINDS: dict[str, SiteKind] = {
    "Dropout": "dropout",
    "Dropout1d": "channel",
    "Dropout2d": "channel",
    "Dropout3d": "channel",
    "AlphaDropout": "alpha",
    "FeatureAlphaDropout": "feature_alpha",
}
# Functional targets, their kind, and the names of their leading parameters.
_FUNCTIONAL: dict[Callable[..., Any], tuple[SiteKind, tuple[str, ...]]] = {
    F.dropout: ("dropout", ("input", "p", "training", "inplace")),
    F.dropout1d: ("channel", ("input", "p", "training", "inplace")),
    F.dropout2d: ("channel", ("input", "p", "training", "inplace")),
    F.dropout3d: ("channel", ("input", "p", "training", "inplace")),
    F.alpha_dropout: ("alpha", ("input", "p", "training", "inplace")),
    F.feature_alpha_dropout: ("feature_alpha", ("input", "p", "training", "inplace")),
    torch.dropout: ("dropout", ("input", "p", "train")),
    torch.feature_dropout: ("channel", ("input", "p", "train")),
    torch.alpha_dropout: ("alpha", ("input", "p", "train")),
    torch.feature_alpha_dropout: ("feature_alpha", ("input", "p", "train")),
    F.scaled_dot_product_attention: (
        "sdpa",
        ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
    ),
}
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")  # fmt: skip
_ELEMENTWISE: frozenset[str] = frozenset({"dropout", "channel", "alpha", "feature_alpha"})


def _module_kind(module: nn.Module) -> SiteKind | None:
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    return None


def _bind(names: Sequence[str], args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


@dataclass
class _FoundSite:
    node: fx.Node
    site: Site
    bound: dict[str, Any]


def _find_sites(gm: fx.GraphModule) -> list[_FoundSite]:
    """Every stochastic op in execution order, with its arguments bound to names."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            kind = _module_kind(module)
            if kind == "attention":
                assert isinstance(module, nn.MultiheadAttention)
                if module.dropout > 0:
                    if module.bias_k is not None or module.add_zero_attn:
                        raise ModelLoadError(
                            f"{node.target}: MultiheadAttention with add_bias_kv or "
                            "add_zero_attn is not supported for sampling"
                        )
                    site = Site(str(node.target), kind, float(module.dropout), module)
                    found.append(_FoundSite(node, site, _bind(_MHA_ARGS, node.args, node.kwargs)))
            elif kind is not None and getattr(module, "p", 0) > 0:
                site = Site(str(node.target), kind, float(module.p))  # type: ignore[arg-type]
                found.append(_FoundSite(node, site, {"input": node.args[0]}))
        elif node.op == "call_function" and node.target in _FUNCTIONAL:
            kind, names = _FUNCTIONAL[node.target]
            bound = _bind(names, node.args, node.kwargs)
            p = bound.get("dropout_p" if kind == "sdpa" else "p", 0.5 if kind != "sdpa" else 0.0)
            if not isinstance(p, float | int):
                raise ModelLoadError(f"{node.name}: dropout probability must be a constant")
            if p > 0:
                found.append(_FoundSite(node, Site(node.name, kind, float(p)), bound))
    return found


def select_sites(names: list[str], sample: SampleSelection) -> list[int]:
    """Indices of the sites that sample: all, the last one, or those named."""
    if not names:
        raise ModelLoadError(
            "the model has no stochastic op (no dropout with p > 0): MC dropout needs one"
        )
    if sample == "all":
        return list(range(len(names)))
    if sample == "last":
        return [len(names) - 1]
    unknown = [n for n in sample if n not in names]
    if unknown:
        raise ModelLoadError(f"mc.sample names unknown sites {unknown}; the model has {names}")
    return [i for i, n in enumerate(names) if n in sample]


@dataclass
class _Example:
    """What one node produced in the two probe runs (batch 2 and batch 3)."""

    values: dict[fx.Node, tuple[Any, Any]] = field(default_factory=dict)

    def is_tensor(self, node: fx.Node) -> bool:
        return isinstance(self.values[node][0], Tensor)

    def batched(self, node: fx.Node) -> bool:
        a, b = self.values[node]
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() > 0
                and a.shape[0] == 2 and b.shape[0] == 3)  # fmt: skip

    def row_elements(self, node: fx.Node) -> int:
        a = self.values[node][0]
        return a.numel() // 2 if isinstance(a, Tensor) and a.dim() > 0 else 0


def _probe(gm: fx.GraphModule, input_shape: tuple[int, ...], dtype: torch.dtype) -> _Example:
    example = _Example()
    runs = []
    for batch in (2, 3):
        seen: dict[fx.Node, Any] = {}

        class _Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node, seen: dict[fx.Node, Any] = seen) -> Any:
                out = super().run_node(n)
                seen[n] = out
                return out

        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            _Recorder(gm).run(torch.randn((batch, *input_shape), generator=gen, dtype=dtype))
        runs.append(seen)
    for node in gm.graph.nodes:
        if node in runs[0]:
            example.values[node] = (runs[0][node], runs[1][node])
    return example


def _closure(starts: list[fx.Node]) -> set[fx.Node]:
    """The nodes that depend on any of `starts` (inclusive)."""
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(u for u in n.users if u.op != "output")
    return seen


@dataclass
class SplitProgram:
    """A traced model split at its first sampled op; see the module docstring."""

    prefix: nn.Module  # x [B, *input] -> tuple of boundary values
    suffix: nn.Module  # (*boundary values, ctx) -> outputs for R*S rows
    batched: list[bool]  # boundary values with the batch in dim 0
    sites: list[Site]
    row_elements: int  # largest activation per (row, sample) in the suffix

    def run_prefix(self, x: Tensor) -> list[Any]:
        """Deterministic prefix, once per input row."""
        return list(self.prefix(x))

    def run_suffix(self, boundary: list[Any], ctx: SamplingContext) -> Tensor:
        """Sampled suffix on R rows x S samples; boundary already sliced to those R rows."""
        out: Tensor = self.suffix(*boundary, ctx)
        return out


def split_program(
    module: nn.Module, input_shape: tuple[int, ...], sample: SampleSelection, dtype: torch.dtype
) -> SplitProgram:
    """Trace `module` with fx and split it into prefix and suffix (raises if it cannot)."""
    gm = fx.symbolic_trace(module)
    found = _find_sites(gm)
    chosen = {found[i].node for i in select_sites([f.site.name for f in found], sample)}
    sites = [f.site for f in found if f.node in chosen]
    by_node = {f.node: f for f in found}
    example = _probe(gm, input_shape, dtype)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    sampled = _closure(list(chosen))
    depends_on_input = _closure([placeholder])

    # Non-tensor values (sizes, shapes) that the suffix needs are recomputed there.
    pulled: set[fx.Node] = set()
    stack = [a for n in sampled for a in n.all_input_nodes if a not in sampled]
    while stack:
        n = stack.pop()
        if n in pulled or n in sampled or n.op == "placeholder":
            continue
        if n in depends_on_input and not example.is_tensor(n):
            pulled.add(n)
            stack.extend(n.all_input_nodes)
    suffix_nodes = sampled | pulled
    boundary = [n for n in gm.graph.nodes if n not in suffix_nodes and n.op != "output"
                and any(u in suffix_nodes or u.op == "output" for u in n.users)]  # fmt: skip
    for n in boundary:
        if n in depends_on_input and not example.batched(n):
            raise ModelLoadError(f"{n.name}: cannot find the batch in dim 0 of this value")

    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n in suffix_nodes or n.op == "output":
            continue
        if n in by_node and n not in chosen and by_node[n].site.kind in _ELEMENTWISE:
            env[n] = env[n.args[0]]  # unselected dropout: identity
            continue
        env[n] = prefix_graph.node_copy(n, lambda a: env[a])
    prefix_graph.output(tuple(env[n] for n in boundary))
    prefix = fx.GraphModule(gm, prefix_graph)
    prefix.graph.eliminate_dead_code()
    prefix.recompile()

    graph = fx.Graph()
    raw = {n: graph.placeholder(f"b_{n.name}") for n in boundary}
    ctx = graph.placeholder("mc_ctx")
    expanded: dict[fx.Node, fx.Node] = {}

    def value(n: fx.Node, fusable: bool = False) -> fx.Node:
        if n not in raw:
            return senv[n]
        if fusable or n not in depends_on_input:
            return raw[n]
        if n not in expanded:
            expanded[n] = graph.call_method("expand", (ctx, raw[n]))
        return expanded[n]

    senv: dict[fx.Node, fx.Node] = {}
    index = {f.node: i for i, f in enumerate(f for f in found if f.node in chosen)}
    for n in gm.graph.nodes:
        if n not in suffix_nodes:
            continue
        f = by_node.get(n)
        if f is not None and f.site.kind in _ELEMENTWISE:
            src = f.bound["input"]
            if n in chosen:
                senv[n] = graph.call_method("dropout", (ctx, index[n], value(src, fusable=True)))
            else:
                senv[n] = value(src)
        elif f is not None and n in chosen:
            bound = {k: (value(v) if isinstance(v, fx.Node) else v) for k, v in f.bound.items()}
            bound.pop("dropout_p", None)
            q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
            method = "sdpa" if f.site.kind == "sdpa" else "multihead_attention"
            senv[n] = graph.call_method(method, (ctx, index[n], q, k, v), bound)
        else:
            senv[n] = graph.node_copy(n, value)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    graph.output(fx.node.map_arg(out_node.args[0], value))

    row_elements = max([example.row_elements(n) for n in suffix_nodes] + [1])
    return SplitProgram(
        prefix=prefix,
        suffix=fx.GraphModule(gm, graph),
        batched=[n in depends_on_input for n in boundary],
        sites=sites,
        row_elements=row_elements,
    )


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

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kind = _ATEN_KINDS.get(func)
        if kind is None or float(args[1]) <= 0:
            return func(*args, **(kwargs or {}))
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

    module: nn.Module
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
    x = torch.zeros((BLOCK_ROWS, *input_shape), dtype=dtype, device=_device_of(module))
    with torch.inference_mode(), probe:
        out = module(x)
    names = [f"dropout_call{i}" for i in range(len(probe.seen))]
    chosen = select_sites(names, sample)
    sites = [Site(names[i], *probe.seen[i]) for i in chosen]
    row_elements = max(x[0].numel(), out[0].numel() if isinstance(out, Tensor) else 1) * 64
    return WholeProgram(module, sites, set(chosen), len(probe.seen), row_elements)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


BLOCK_ROWS = 8


def prepare(
    module: nn.Module, input_shape: tuple[int, ...], sample: SampleSelection, dtype: torch.dtype
) -> SplitProgram | WholeProgram:
    """The best program for this model: split by fx when traceable, else whole."""
    module.eval()
    if not isinstance(module, torch.jit.ScriptModule):
        try:
            return split_program(module, input_shape, sample, dtype)
        except ModelLoadError:
            raise
        except Exception as exc:  # any tracing failure means: use the fallback
            log.info("fx cannot trace %s (%s); running it whole", type(module).__name__, exc)
    return whole_program(module, input_shape, sample, dtype)
