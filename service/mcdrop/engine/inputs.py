"""Several named inputs (token ids, masks, features) as one packed row for the engine.

The engine's machinery (prefix once per row, padding, batching, keyed masks) works on one
tensor [rows, F]. A model with named inputs gets its rows packed: each input flattened and
laid side by side (as float32: integers exact up to 2^24, bounded at the API), and unpacked
in front of the model, which is called with keyword arguments of their own shapes and dtypes.
Integer inputs are rounded and clamped to their declared range there: a no-op for requests
(the API refuses values outside it), and what makes the engine's probe rows valid indices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class InputLayout:
    """One named input of a packed row: its name, its shape per row and its dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    low: float | None = None  # integer inputs: the range the API admits
    high: float | None = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def packed_size(layout: Sequence[InputLayout]) -> int:
    """Values per packed row."""
    return sum(item.size for item in layout)


def pack(layout: Sequence[InputLayout], values: dict[str, Tensor]) -> Tensor:
    """Rows [B, *shape] of every input (any dtype) -> packed rows [B, F] float64."""
    rows = len(next(iter(values.values())))
    return torch.cat(
        [values[item.name].reshape(rows, item.size).to(torch.float64) for item in layout], dim=1
    )


class NamedInputs(nn.Module):
    """The model behind named inputs: packed rows [B, F] -> model(**{name: [B, *shape]}).

    It stands in for the model with the model's own submodules, parameters and buffers (not a
    wrapper around it), so module paths, site names, mc.sample and mc.ignore read as the
    model's; the model's own training flag follows this module's.
    """

    inner: nn.Module

    def __init__(self, model: nn.Module, layout: Sequence[InputLayout]) -> None:
        super().__init__()
        object.__setattr__(self, "inner", model)  # not a child: its children are ours
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self.layout = tuple(layout)
        self.training = model.training

    def forward(self, packed: Tensor) -> Any:
        self.inner.training = self.training  # the root's training branch, as decided at load
        inputs = {}
        start = 0
        for item in self.layout:
            values = packed[:, start : start + item.size]
            if not item.dtype.is_floating_point and item.dtype != torch.bool:
                # requests are checked at the API; the engine's probe rows (zeros, noise)
                # become valid indices here, so the model traces and is probed as served
                values = values.round().clamp(item.low, item.high)
            inputs[item.name] = values.reshape(-1, *item.shape).to(item.dtype)
            start += item.size
        return self.inner.forward(**inputs)
