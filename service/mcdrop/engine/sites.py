"""Find the stochastic ops of a model: dropout modules, functional dropout, attention dropout."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from mcdrop.engine.random_ops import FUNCTIONS, METHODS
from mcdrop.engine.sampling import Site, SiteKind
from mcdrop.errors import ModelLoadError

SampleSelection = Literal["all", "last"] | list[str]

_MODULE_KINDS: tuple[tuple[type[nn.Module], SiteKind], ...] = (
    (nn.FeatureAlphaDropout, "feature_alpha"),
    (nn.AlphaDropout, "alpha"),
    (nn.Dropout1d, "channel"),
    (nn.Dropout2d, "channel"),
    (nn.Dropout3d, "channel"),
    (nn.Dropout, "dropout"),
)
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
ELEMENTWISE: frozenset[str] = frozenset({"dropout", "channel", "alpha", "feature_alpha"})


def module_kind(module: nn.Module) -> SiteKind | None:
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    return None


def bind_arguments(
    names: Sequence[str], args: Sequence[Any], kwargs: dict[str, Any]
) -> dict[str, Any]:
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


@dataclass
class FoundSite:
    node: fx.Node
    site: Site
    bound: dict[str, Any]


def find_sites(gm: fx.GraphModule) -> list[FoundSite]:
    """Every stochastic op in execution order, with its arguments bound to names."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            kind = module_kind(module)
            if kind == "attention":
                assert isinstance(module, nn.MultiheadAttention)
                if module.dropout > 0:
                    if module.bias_k is not None or module.add_zero_attn:
                        raise ModelLoadError(
                            f"{node.target}: MultiheadAttention with add_bias_kv or "
                            "add_zero_attn is not supported for sampling"
                        )
                    site = Site(str(node.target), kind, float(module.dropout), module)
                    found.append(
                        FoundSite(node, site, bind_arguments(_MHA_ARGS, node.args, node.kwargs))
                    )
            elif kind is not None and getattr(module, "p", 0) > 0:
                site = Site(str(node.target), kind, float(module.p))  # type: ignore[arg-type]
                found.append(FoundSite(node, site, {"input": node.args[0]}))
        elif is_random_node(node):
            found.append(FoundSite(node, Site(node.name, "random", 0.0), {}))
        elif node.op == "call_function" and node.target in _FUNCTIONAL:
            kind, names = _FUNCTIONAL[node.target]
            bound = bind_arguments(names, node.args, node.kwargs)
            p = bound.get("dropout_p" if kind == "sdpa" else "p", 0.5 if kind != "sdpa" else 0.0)
            if not isinstance(p, float | int):
                raise ModelLoadError(f"{node.name}: dropout probability must be a constant")
            if p > 0:
                found.append(FoundSite(node, Site(_node_path(node), kind, float(p)), bound))
    return found


def _node_path(node: fx.Node) -> str:
    """A functional site's name: the path of the module calling it, then the graph node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values()] if isinstance(stack, dict) else []
    return f"{paths[-1]}.{node.name}" if paths and paths[-1] else node.name


def is_random_node(node: fx.Node) -> bool:
    """A torch call that draws random numbers (a training branch's bernoulli_, randn_like, ...)."""
    if node.op == "call_function":
        return node.target in FUNCTIONS
    return node.op == "call_method" and node.target in METHODS


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


def refused_unbatched(name: str, what: str) -> ModelLoadError:
    """The load-time refusal of a site whose input has no batch dimension (a weight mask)."""
    return ModelLoadError(
        f"{name}: drops {what}, which has no batch dimension (DropConnect?): one mask would be "
        "shared by every row and sample; a weight mask per MC sample is supported only for a "
        "parameter fed straight to F.linear in a traceable forward, so this model is refused"
    )
