"""Partition a traced model into a deterministic prefix (once per row) and a sampled suffix.

With torch.fx every sampled op is rewritten to draw its masks from a SamplingContext;
nodes that no sampled op influences form the prefix, the rest the suffix, which runs on
rows x samples. Values crossing the boundary are expanded row-major; sizes and shapes the
suffix needs are recomputed there from the expanded values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from mcdrop.engine.dispatch_sites import (
    DispatchLeaf,
    DropoutCalls,
    call_names,
    dropped_parameters,
    unbatched,
)
from mcdrop.engine.random_ops import KeyedRandom, ModulePaths, RandomCall, UniformSource
from mcdrop.engine.sampling import SamplingContext, Site, SiteKind
from mcdrop.engine.sites import (
    ELEMENTWISE,
    FoundSite,
    SampleSelection,
    bind_arguments,
    find_sites,
    is_random_node,
    refused_unbatched,
    select_sites,
)
from mcdrop.engine.tracing import TRACE_LOCK, symbolic_trace
from mcdrop.engine.training_branches import TrainingBranches, same_outputs


@dataclass
class _LeafCalls:
    """What an opaque submodule did in the first probe run (batch 2), seen at the dispatcher."""

    names: list[str]  # its dropout calls by module path, in order
    seen: list[tuple[SiteKind, float]]
    shapes: list[tuple[tuple[int, ...], ...]]  # of each call's input, at batch 2 and 3
    parameters: list[str | None]  # the parameter each call drops (DropConnect), if any
    largest: int  # elements of its largest op output
    random_ops: list[str]  # other random ops it issued


@dataclass
class _Example:
    """What one node produced in the two probe runs (batch 2 and batch 3)."""

    values: dict[fx.Node, tuple[Any, Any]] = field(default_factory=dict)
    leaves: dict[fx.Node, _LeafCalls] = field(default_factory=dict)

    def is_tensor(self, node: fx.Node) -> bool:
        return isinstance(self.values[node][0], Tensor)

    def batched(self, node: fx.Node) -> bool:
        a, b = self.values[node]
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() > 0
                and a.shape[0] == 2 and b.shape[0] == 3)  # fmt: skip

    def row_elements(self, node: fx.Node) -> int:
        a = self.values[node][0]
        return a.numel() // 2 if isinstance(a, Tensor) and a.dim() > 0 else 0


def _probe(
    gm: fx.GraphModule, input_shape: tuple[int, ...], dtype: torch.dtype, opaque: set[str]
) -> _Example:
    """Run the graph at batch 2 and 3, recording every value; opaque calls are watched too."""
    example = _Example()
    runs: list[dict[fx.Node, Any]] = []
    for batch in (2, 3):
        seen: dict[fx.Node, Any] = {}

        class _Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node, seen: dict[fx.Node, Any] = seen) -> Any:
                if n.op == "call_module" and n.target in opaque:
                    out = _run_opaque(self, n, example, first=not runs)
                else:
                    out = super().run_node(n)
                seen[n] = out
                return out

        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode(), TRACE_LOCK.running():
            _Recorder(gm).run(torch.randn((batch, *input_shape), generator=gen, dtype=dtype))
        runs.append(seen)
    for node in gm.graph.nodes:
        if node in runs[0]:
            example.values[node] = (runs[0][node], runs[1][node])
    return example


def _run_opaque(interpreter: fx.Interpreter, n: fx.Node, example: _Example, first: bool) -> Any:
    """One opaque submodule call with its dropout calls the identity; recorded into example."""
    paths = ModulePaths()
    calls = DropoutCalls(None, paths=paths)
    with paths.watching(interpreter.module.get_submodule(str(n.target)), str(n.target)), calls:
        out = fx.Interpreter.run_node(interpreter, n)
    shapes = [shape for _, shape in calls.where]
    if first:
        names = call_names(calls.where, calls.seen, numbered=False)
        parameters = dropped_parameters(interpreter.module, calls)
        example.leaves[n] = _LeafCalls(names, calls.seen, [(s,) for s in shapes], parameters,
                                       calls.largest, calls.random_ops)  # fmt: skip
    elif n in example.leaves and len(shapes) == len(example.leaves[n].shapes):
        leaf = example.leaves[n]
        leaf.shapes = [(*before, now) for before, now in zip(leaf.shapes, shapes, strict=True)]
    return out


def _same_as_eager(gm: fx.GraphModule, module: nn.Module, x: Tensor) -> bool:
    """Whether the graph computes what the model does (dropout off in both), bit for bit."""
    with torch.inference_mode(), TRACE_LOCK.running():
        with DropoutCalls(None):
            graph_out = gm(x)
        with DropoutCalls(None):
            eager_out = module(x)
    return same_outputs(graph_out, eager_out)


def _drop_connects(found: list[FoundSite]) -> dict[fx.Node, fx.Node]:
    """Dropout of a parameter feeding only F.linear as its weight (DropConnect), to its linear.

    Such sites become kind "dropconnect": the engine draws a weight mask per row and sample.
    """
    connects = {}
    for f in found:
        src = f.bound.get("input")
        if f.site.kind != "dropout" or not isinstance(src, fx.Node) or src.op != "get_attr":
            continue
        users = list(f.node.users)
        if len(users) == 1 and users[0].op == "call_function" and users[0].target is F.linear:
            linear = bind_arguments(_LINEAR_ARGS, users[0].args, users[0].kwargs)
            if linear.get("weight") is f.node and linear.get("input") is not f.node:
                connects[f.node] = users[0]
                f.site = dataclasses.replace(f.site, kind="dropconnect")
    return connects


def _drop_unused_values(graph: fx.Graph) -> None:
    """Remove values nothing uses (an RNN's unused final states), keeping every op that may
    write in place or have effects: a value the model throws away must not decide the boundary.
    """
    changed = True
    while changed:
        changed = False
        for node in reversed(graph.nodes):
            if not node.users and _pure(node):
                graph.erase_node(node)
                changed = True


def _pure(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op not in ("call_function", "call_method"):
        return False  # placeholders, output, modules (hooks, state) stay
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    operator_in_place = getattr(node.target, "__module__", "") == "_operator" and name[:1] == "i"
    writes = (name.endswith("_") or "out" in node.kwargs or node.kwargs.get("inplace") is True
              or any(a is True for a in node.args) or operator_in_place)  # fmt: skip
    if writes or is_random_node(node):
        return False
    if isinstance(node.target, str):
        return True  # a method, not in place
    return not torch._library.utils.is_impure(
        node.target, args=node.args, kwargs=node.kwargs, impure_random=True
    )


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


_LINEAR_ARGS = ("input", "weight", "bias")
_MASKING = ELEMENTWISE | {"dropconnect"}  # sites that are the identity when not sampled


class _Untraceable(Exception):
    """The traced graph cannot stand for the model (the caller falls back to running it whole)."""


def _family(node: fx.Node) -> str:
    """The aten family name of a random node: torch.bernoulli and Tensor.bernoulli alike."""
    target = node.target
    return target if isinstance(target, str) else str(getattr(target, "__name__", target))


@dataclass
class PartitionedProgram:
    """A traced model partitioned at its first sampled op; see the module docstring."""

    prefix: Callable[..., Any]  # x [B, *input] -> tuple of boundary values (a GraphModule)
    suffix: Callable[..., Any]  # (*boundary values, ctx) -> outputs for R*S rows
    batched: list[bool]  # boundary values with the batch in dim 0
    sites: list[Site]  # rewritten sites, then the random ops of training branches
    row_elements: int  # largest activation per (row, sample) in the suffix
    random_calls: list[RandomCall] = field(default_factory=list)
    branches: TrainingBranches = field(default_factory=TrainingBranches)  # set by the loader
    rewritten: list[str] = field(default_factory=list)  # recurrent modules unstacked at load
    opaque: dict[str, str] = field(default_factory=dict)  # untraceable submodules: why

    def run_prefix(self, x: Tensor) -> list[Any]:
        """Deterministic prefix, once per input row."""
        return list(self.prefix(x))

    def run_suffix(self, boundary: list[Any], ctx: SamplingContext) -> Tensor:
        """Sampled suffix on R rows x S samples; boundary already sliced to those R rows."""
        if not self.random_calls:
            out: Tensor = self.suffix(*boundary, ctx)
            return out
        first = len(self.sites) - len(self.random_calls)
        source = UniformSource(ctx.uniform, ctx.n_rows * ctx.samples)
        with KeyedRandom(self.random_calls, first, source):
            keyed: Tensor = self.suffix(*boundary, ctx)
        return keyed


def partition_program(
    module: nn.Module,
    input_shape: tuple[int, ...],
    sample: SampleSelection,
    dtype: torch.dtype,
    random_calls: Sequence[RandomCall] = (),
) -> PartitionedProgram:
    """Trace `module` with fx and partition it into prefix and suffix (raises if it cannot).

    random_calls are the random ops of its training branches, in execution order, as probed
    eagerly; the graph must hold the same ones, in the same order, or it cannot be used.
    """
    gm, opaque = symbolic_trace(module)
    _drop_unused_values(gm.graph)
    found = find_sites(gm)
    randoms = [f for f in found if f.site.kind == "random"]
    if [_family(f.node) for f in randoms] != [c.op for c in random_calls]:
        raise _Untraceable("the traced graph's random ops differ from the model's own")
    found = [f for f in found if f.site.kind != "random"]
    connects = _drop_connects(found)  # dropout on a weight -> the linear using it
    by_node = {f.node: f for f in found}
    random_nodes = {f.node for f in randoms}
    example = _probe(gm, input_shape, dtype, set(opaque))
    for node, calls in example.leaves.items():
        if calls.random_ops:
            raise _Untraceable(f"{node.target}, which fx cannot trace, draws random numbers")
    if opaque and not random_calls:
        x = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(1), dtype=dtype)
        if not _same_as_eager(gm, module, x):
            raise _Untraceable("the graph with opaque submodules differs from the model")
    leaves = {n: c for n, c in example.leaves.items() if c.seen}

    # Every stochastic op in execution order: a traced site (node, None) or call j of an
    # opaque submodule (node, j).
    entries: list[tuple[fx.Node, int | None]] = []
    names: list[str] = []
    for n in gm.graph.nodes:
        if n in by_node:
            entries.append((n, None))
            names.append(by_node[n].site.name)
        elif n in leaves:
            entries += [(n, j) for j in range(len(leaves[n].seen))]
            names += leaves[n].names
    picked = select_sites(names, sample) if names or not randoms else []
    index = {entries[i]: k for k, i in enumerate(picked)}  # chosen op -> its site number
    chosen = {node for node, _ in index}
    sites = [by_node[n].site if j is None else Site(leaves[n].names[j], *leaves[n].seen[j])
             for n, j in index]  # fmt: skip
    for draw, call in zip(randoms, random_calls, strict=True):  # they always sample
        draw.site = Site(call.name, "random", 0.0, op=call.op)
        chosen.add(draw.node)
        sites.append(draw.site)
    for site in found:  # an element-wise site must drop something with the batch in dim 0
        if site.node in chosen and site.site.kind in ELEMENTWISE:
            src = site.bound["input"]
            if isinstance(src, fx.Node) and not example.batched(src):
                what = f"parameter '{src.target}'" if src.op == "get_attr" else f"'{src.name}'"
                raise refused_unbatched(site.site.name, what)
    for (n, j), number in index.items():
        if j is None:
            continue
        unkeyed = unbatched(leaves[n].parameters[j], leaves[n].shapes[j], (2, 3))
        if unkeyed is not None:
            raise refused_unbatched(sites[number].name, unkeyed)
    runners = {}  # opaque submodules with dropout calls run through a DispatchLeaf
    for number, (n, calls) in enumerate(leaves.items()):
        site_index = {j: index[(n, j)] for j in range(len(calls.seen)) if (n, j) in index}
        runners[n] = f"mc_opaque_{number}"
        leaf = DispatchLeaf(gm.get_submodule(str(n.target)), site_index, len(calls.seen))
        gm.add_submodule(runners[n], leaf)
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
            raise _Untraceable(f"{n.name}: cannot find the batch in dim 0 of this value")

    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n in suffix_nodes or n.op == "output":
            continue
        if n in by_node and n not in chosen and by_node[n].site.kind in _MASKING:
            env[n] = env[by_node[n].bound["input"]]  # unselected dropout: identity
            continue
        if n in runners:  # its dropout calls the identity, as in eval
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            env[n] = prefix_graph.call_module(runners[n], (None, *args), kwargs)
            continue
        env[n] = prefix_graph.node_copy(n, lambda a: env[a])
    prefix_graph.output(tuple(env[n] for n in boundary))
    prefix = fx.GraphModule(gm, prefix_graph)
    _drop_unused_values(prefix.graph)
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
    linear_of = {linear: site for site, linear in connects.items()}
    for n in gm.graph.nodes:
        if n not in suffix_nodes:
            continue
        f = by_node.get(n)
        if n in runners:
            args = fx.node.map_arg(n.args, value)
            kwargs = fx.node.map_arg(n.kwargs, value)
            leaf_ctx = ctx if n in chosen else None
            senv[n] = graph.call_module(runners[n], (leaf_ctx, *args), kwargs)
        elif f is not None and f.site.kind == "dropconnect":
            if n not in chosen:
                senv[n] = value(f.bound["input"])  # identity; its linear is copied as is
        elif n in linear_of and linear_of[n] in chosen:
            dropped = linear_of[n]
            bound = bind_arguments(_LINEAR_ARGS, n.args, n.kwargs)
            bias = bound.get("bias")
            args = (ctx, index[dropped, None], value(bound["input"], fusable=True),
                    value(by_node[dropped].bound["input"]),
                    value(bias) if isinstance(bias, fx.Node) else bias)  # fmt: skip
            senv[n] = graph.call_method("drop_connect", args)
        elif f is not None and f.site.kind in ELEMENTWISE:
            src = f.bound["input"]
            if n in chosen:
                senv[n] = graph.call_method(
                    "dropout", (ctx, index[n, None], value(src, fusable=True))
                )
            else:
                senv[n] = value(src)
        elif f is not None and n in chosen:
            bound = {k: (value(v) if isinstance(v, fx.Node) else v) for k, v in f.bound.items()}
            bound.pop("dropout_p", None)
            q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
            method = "sdpa" if f.site.kind == "sdpa" else "multihead_attention"
            senv[n] = graph.call_method(method, (ctx, index[n, None], q, k, v), bound)
        elif n.op == "call_method" and str(n.target).endswith("_") and n in random_nodes:
            # An in-place draw (bernoulli_) into an expanded boundary value, which may alias
            # one row's memory across its samples: draw into a copy instead.
            target = value(n.args[0]) if isinstance(n.args[0], fx.Node) else n.args[0]
            copied = graph.call_method("clone", (target,))
            rest = tuple(value(a) if isinstance(a, fx.Node) else a for a in n.args[1:])
            senv[n] = graph.call_method(str(n.target), (copied, *rest), dict(n.kwargs))
        else:
            senv[n] = graph.node_copy(n, value)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    graph.output(fx.node.map_arg(out_node.args[0], value))

    inner = [leaves[n].largest // 2 for n in leaves if n in suffix_nodes]
    inner += [_numel(example.values[by_node[n].bound["input"]][0]) for n in connects if n in chosen]
    row_elements = max([example.row_elements(n) for n in suffix_nodes] + inner + [1])
    return PartitionedProgram(
        prefix=prefix,
        suffix=fx.GraphModule(gm, graph),
        batched=[n in depends_on_input for n in boundary],
        sites=sites,
        row_elements=row_elements,
        random_calls=list(random_calls),
        opaque=opaque,
    )


def _numel(value: Any) -> int:
    return value.numel() if isinstance(value, Tensor) else 0
