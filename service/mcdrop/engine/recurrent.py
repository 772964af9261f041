"""Make the inter-layer dropout of nn.LSTM / nn.GRU / nn.RNN visible: unstack the layers.

`nn.LSTM(num_layers=L, dropout=p)` drops the output sequence of every layer but the last
inside the fused C++ kernel, and only in training mode; to torch.fx the module is one opaque
leaf, so the engine cannot key those masks. `unstack_recurrent` replaces such a module by a
`StackedRecurrent`: L single-layer modules of the same class that share the original
parameters, with an `nn.Dropout(p)` on each layer's output sequence but the last's, exactly
where the kernel applies it. In eval mode it computes what the original computes (the fused
CPU kernel runs the same per-layer code; see tests/test_recurrent.py for what is
bit-identical), and the dropouts are ordinary `nn.Dropout` call_module nodes for fx.

The state_dict keeps the original key names (`weight_ih_l1`, `bias_hh_l0_reverse`, ...), both
ways, so saved weights load into either form. Run it after the weights are loaded all the same:
a `named_parameters()` walk sees the layers' own names (`layers.1.weight_ih_l0`).
PackedSequence inputs are not supported (TypeError at forward): the loader refuses such models.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from mcdrop.errors import ModelLoadError

__all__ = ["StackedRecurrent", "unstack_recurrent"]

# Exact classes only: a subclass may override forward, which a rewrite would silently drop.
_REWRITABLE: tuple[type[nn.RNNBase], ...] = (nn.LSTM, nn.GRU, nn.RNN)

HiddenState = Tensor | tuple[Tensor, Tensor]


def _param_names(layer: int, bias: bool, proj_size: int, directions: int) -> Iterator[str]:
    """The names of one layer's parameters in nn.RNNBase's order (forward, then _reverse)."""
    for suffix in ("", "_reverse")[:directions]:
        yield f"weight_ih_l{layer}{suffix}"
        yield f"weight_hh_l{layer}{suffix}"
        if bias:
            yield f"bias_ih_l{layer}{suffix}"
            yield f"bias_hh_l{layer}{suffix}"
        if proj_size > 0:
            yield f"weight_hr_l{layer}{suffix}"


def _needs_unstacking(module: nn.Module, path: str) -> bool:
    """True for an nn.LSTM/GRU/RNN with dropout between layers; refuses subclasses of them."""
    if not isinstance(module, nn.RNNBase) or module.num_layers < 2 or module.dropout <= 0:
        return False
    if type(module) not in _REWRITABLE:
        raise ModelLoadError(
            f"module {path or '<root>'!r} ({type(module).__name__}) is a subclass of "
            f"nn.RNNBase with dropout={module.dropout} between its {module.num_layers} layers; "
            "only plain nn.LSTM, nn.GRU and nn.RNN can be unstacked so that this dropout is "
            "sampled (use one of those, or single-layer modules with nn.Dropout between them)"
        )
    return True


class StackedRecurrent(nn.Module):
    """An nn.LSTM/GRU/RNN run as `num_layers` single-layer modules with nn.Dropout between them.

    Same call and return as the original (output of the last layer, final states stacked over
    layers as [num_layers * num_directions, N, H]); parameters are the original's objects.
    """

    def __init__(self, recurrent: nn.RNNBase) -> None:
        super().__init__()
        if type(recurrent) not in _REWRITABLE:
            raise TypeError(f"expected nn.LSTM, nn.GRU or nn.RNN, got {type(recurrent).__name__}")
        self.mode: str = recurrent.mode
        self.input_size: int = recurrent.input_size
        self.hidden_size: int = recurrent.hidden_size
        self.num_layers: int = recurrent.num_layers
        self.bias: bool = recurrent.bias
        self.batch_first: bool = recurrent.batch_first
        self.dropout: float = float(recurrent.dropout)
        self.bidirectional: bool = recurrent.bidirectional
        self.proj_size: int = recurrent.proj_size
        directions = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        # layers.{k}.{name}_l0{suffix} <-> {name}_l{k}{suffix}: the state_dict's original keys.
        self._original_names: dict[str, str] = {}
        self._inner_names: dict[str, tuple[int, str]] = {}
        layers: list[nn.RNNBase] = []
        for k in range(self.num_layers):
            originals = list(_param_names(k, self.bias, self.proj_size, directions))
            params = [recurrent._parameters.get(name) for name in originals]
            if not all(isinstance(p, nn.Parameter) for p in params):
                raise ModelLoadError(
                    f"{type(recurrent).__name__} layer {k}: its weights are not plain "
                    "parameters (replaced at forward time, e.g. by a weight-drop wrapper), "
                    "so it cannot be unstacked"
                )
            layer = self._single_layer(recurrent, k, out_size * directions, params[0])
            for original, inner, param in zip(
                originals, _param_names(0, self.bias, self.proj_size, directions), params,
                strict=True,
            ):  # fmt: skip
                setattr(layer, inner, param)  # RNNBase.__setattr__ keeps _flat_weights in step
                self._original_names[f"layers.{k}.{inner}"] = original
                self._inner_names[original] = (k, inner)
            layer.flatten_parameters()
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.dropouts = nn.ModuleList(nn.Dropout(self.dropout) for _ in range(self.num_layers - 1))
        # torch leaves these two unannotated
        self.register_state_dict_post_hook(_save_original_names)  # type: ignore[no-untyped-call]
        self.register_load_state_dict_pre_hook(_load_original_names)  # type: ignore[no-untyped-call]
        self.train(recurrent.training)

    @staticmethod
    def _single_layer(
        recurrent: nn.RNNBase, k: int, stacked_size: int, like: Tensor | None
    ) -> nn.RNNBase:
        """One single-layer module with `recurrent`'s options, on the meta device (no init, no RNG).

        Its parameters are replaced by the original's right after.
        """
        options: dict[str, Any] = {
            "input_size": recurrent.input_size if k == 0 else stacked_size,
            "hidden_size": recurrent.hidden_size,
            "num_layers": 1,
            "bias": recurrent.bias,
            "batch_first": recurrent.batch_first,
            "bidirectional": recurrent.bidirectional,
            "device": "meta",
            "dtype": None if like is None else like.dtype,
        }
        if isinstance(recurrent, nn.LSTM):
            return nn.LSTM(proj_size=recurrent.proj_size, **options)
        if isinstance(recurrent, nn.GRU):
            return nn.GRU(**options)
        assert isinstance(recurrent, nn.RNN)
        return nn.RNN(nonlinearity=recurrent.nonlinearity, **options)

    def forward(self, input: Tensor, hx: HiddenState | None = None) -> tuple[Tensor, HiddenState]:
        """input [T, N, H_in] ([N, T, H_in] if batch_first; unbatched [T, H_in]) -> (output, h_n).

        output is the last layer's [T, N, D * H_out]; hx and h_n are [num_layers * D, N, H_out]
        (D = 2 if bidirectional; for LSTM the pair (h, c), c with H = hidden_size).
        """
        if isinstance(input, PackedSequence):
            raise TypeError(
                f"{self.mode} unstacked for MC dropout does not accept PackedSequence inputs "
                "(the rewrite supports padded batch-first or sequence-first tensors only)"
            )
        lstm = self.mode == "LSTM"
        directions = 2 if self.bidirectional else 1
        if hx is not None:
            self._check_hx(hx, lstm, directions)
        out = input
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        for k, layer in enumerate(self.layers):
            if k > 0:
                out = self.dropouts[k - 1](out)  # what the fused kernel does, in training only
            lo, hi = k * directions, (k + 1) * directions
            layer_hx: HiddenState | None = None
            if hx is not None:
                layer_hx = (hx[0][lo:hi], hx[1][lo:hi]) if lstm else cast(Tensor, hx)[lo:hi]
            result = layer(out, layer_hx)
            out = result[0]
            if lstm:
                h_n.append(result[1][0])
                c_n.append(result[1][1])
            else:
                h_n.append(result[1])
        if lstm:
            return out, (torch.cat(h_n, 0), torch.cat(c_n, 0))
        return out, torch.cat(h_n, 0)

    def _check_hx(self, hx: HiddenState, lstm: bool, directions: int) -> None:
        """Refuse initial states whose dim 0 is not num_layers * num_directions (the slices would
        silently come out short); fx proxies pass unchecked."""
        states = [hx[0], hx[1]] if lstm else [hx]
        expected = self.num_layers * directions
        for state in states:
            if isinstance(state, Tensor) and (state.dim() == 0 or state.size(0) != expected):
                raise RuntimeError(
                    f"{self.mode}: expected initial states with {expected} "
                    f"(num_layers * num_directions) entries on dim 0, got {list(state.shape)}"
                )

    def flatten_parameters(self) -> None:
        """Each layer's cuDNN flattening (a no-op on CPU), for models that call it in forward."""
        for layer in self.layers:
            assert isinstance(layer, nn.RNNBase)
            layer.flatten_parameters()

    def __getattr__(self, name: str) -> Tensor | nn.Module:
        """The original's parameter names read through: `weight_hh_l1` is layers[1].weight_hh_l0."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_inner_names", {}).get(name)
            if inner is None:
                raise
            return getattr(self.layers[inner[0]], inner[1])  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return (
            f"{self.mode}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"dropout={self.dropout}, bidirectional={self.bidirectional}"
        )


def _save_original_names(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
) -> None:
    """state_dict post-hook: `layers.{k}.weight_ih_l0` is saved as the original `weight_ih_l{k}`."""
    assert isinstance(module, StackedRecurrent)
    for inner, original in module._original_names.items():
        if prefix + inner in state_dict:  # re-inserted in the original's key order
            state_dict[prefix + original] = state_dict.pop(prefix + inner)


def _load_original_names(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """load_state_dict pre-hook: the original keys (`weight_ih_l{k}`) load into the layers."""
    assert isinstance(module, StackedRecurrent)
    for inner, original in module._original_names.items():
        if prefix + original in state_dict:
            state_dict[prefix + inner] = state_dict.pop(prefix + original)


def unstack_recurrent(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """Replace, in place, every nn.LSTM/GRU/RNN with num_layers > 1 and dropout > 0 by a
    StackedRecurrent; returns (the module to use, the replaced paths, '' for the root).

    The module returned is `module` itself unless `module` is such a recurrent module. A module
    registered at several paths is replaced by one shared StackedRecurrent. Raises
    ModelLoadError for subclasses with inter-layer dropout and for weights that are not
    parameters, which cannot be unstacked faithfully.
    """
    if _needs_unstacking(module, ""):
        assert isinstance(module, nn.RNNBase)
        return StackedRecurrent(module), [""]
    replacements: dict[int, StackedRecurrent] = {}
    paths: list[str] = []
    for path, child in list(module.named_modules(remove_duplicate=False)):
        if not path or not _needs_unstacking(child, path):
            continue
        assert isinstance(child, nn.RNNBase)
        stacked = replacements.get(id(child))
        if stacked is None:
            stacked = replacements[id(child)] = StackedRecurrent(child)
        parent, _, name = path.rpartition(".")
        setattr(module.get_submodule(parent), name, stacked)
        paths.append(path)
    return module, paths
