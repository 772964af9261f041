"""The per-chunk sampling context: applies keyed dropout masks at each stochastic site.

Expanded activations are laid out row-major: row r, sample s sits at index r * S + s of
the batch dimension, so every row's samples form one contiguous, aligned block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcdrop.engine.masks import keep_mask, quantized_drop_probability
from mcdrop.engine.random_ops import keyed_uniform

SiteKind = Literal[
    "dropout", "channel", "alpha", "feature_alpha", "attention", "sdpa", "random", "dropconnect"
]
_SELU_ALPHA_PRIME = -1.7580993408473766


@dataclass(frozen=True)
class Site:
    """One stochastic op of a model: its name, kind and drop probability.

    kind "random" is a random op of a training branch (e.g. DropPath's bernoulli_), drawn
    from keyed uniforms; `op` names it and p is 0 (its rate is the op's own argument).
    """

    name: str
    kind: SiteKind
    p: float
    module: nn.Module | None = None  # the nn.MultiheadAttention for attention sites
    op: str | None = None  # random sites: the aten op family, e.g. "bernoulli_"


@dataclass(frozen=True)
class RowKeys:
    """Random-stream keys of the rows in one chunk: (seed, row index within its request)."""

    seeds: list[int]
    rows: list[int]
    shared_seeds: list[int]  # shared mode: one key per request ...
    shared_index: Tensor | None  # ... and, when several requests share a chunk, each row's request


class SamplingContext:
    """Mask source for one forward chunk: R rows x S samples starting at sample `first`."""

    def __init__(
        self,
        sites: list[Site],
        keys: RowKeys,
        first: int,
        samples: int,
        mask_mode: Literal["independent", "shared"],
        device: torch.device,
    ) -> None:
        self.sites = sites
        self.keys = keys
        self.first = first
        self.samples = samples
        self.mask_mode = mask_mode
        self.device = device
        self.n_rows = len(keys.rows)

    def expand(self, value: Tensor) -> Tensor:
        """[R, ...] -> [R * S, ...]: each row repeated S times, row-major."""
        rest = value.shape[1:]
        return value.unsqueeze(1).expand(self.n_rows, self.samples, *rest).reshape(-1, *rest)

    @torch.compiler.disable  # type: ignore[untyped-decorator]  # masks come from numpy
    def keep(
        self, site: int, elem_shape: tuple[int, ...], p: float, scale: float | None = None
    ) -> Tensor:
        """Keep-mask broadcastable to [R, S, *elem_shape] (bool, or float 0/scale)."""
        if self.mask_mode == "independent":
            seeds, rows = self.keys.seeds, self.keys.rows
        else:
            seeds, rows = self.keys.shared_seeds, [0] * len(self.keys.shared_seeds)
        args = (seeds, rows, site, self.first, self.samples, elem_shape, p, self.device, scale)
        mask = keep_mask(*args)
        if self.mask_mode == "shared" and self.keys.shared_index is not None:
            mask = mask[self.keys.shared_index.to(mask.device)]
        return mask

    def uniform(self, site: int, elems: int) -> Tensor:
        """Keyed uniforms [R*S, elems] (float64 in (0, 1)) for a random op at site `site`."""
        if self.mask_mode == "independent":
            u = keyed_uniform(self.keys.seeds, self.keys.rows, site, self.first, self.samples,
                              elems, self.device)  # fmt: skip
        else:
            shared = len(self.keys.shared_seeds)
            u = keyed_uniform(self.keys.shared_seeds, [0] * shared, site, self.first,
                              self.samples, elems, self.device)  # fmt: skip
            if self.keys.shared_index is not None:
                u = u[self.keys.shared_index.to(u.device)]
            else:
                u = u.expand(self.n_rows, self.samples, elems)
        return u.reshape(self.n_rows * self.samples, elems)

    def _rows_by_sample(self, x: Tensor) -> Tensor:
        """View x ([R*S, ...] expanded, or [R, ...] not yet expanded) as [R, S or 1, ...]."""
        if x.shape[0] == self.n_rows * self.samples:
            return x.view(self.n_rows, self.samples, *x.shape[1:])
        if x.shape[0] == self.n_rows:
            return x.unsqueeze(1)
        raise RuntimeError(
            f"stochastic site input has batch size {x.shape[0]}; expected {self.n_rows} rows "
            f"or {self.n_rows * self.samples} expanded rows (is the batch dimension first?)"
        )

    def _merge(self, y: Tensor) -> Tensor:
        return y.reshape(self.n_rows * self.samples, *y.shape[2:])

    def dropout(self, index: int, x: Tensor) -> Tensor:
        """Element-wise (or channel-wise) dropout at site `index`, inverted scaling."""
        site = self.sites[index]
        return self.apply(index, x, site.kind, site.p)

    def apply(self, index: int, x: Tensor, kind: SiteKind, p: float) -> Tensor:
        """Dropout of `kind` with drop probability p, masks keyed by site `index`."""
        xs = self._rows_by_sample(x)
        row_shape = tuple(xs.shape[2:])
        if kind in ("channel", "feature_alpha"):
            elem_shape = row_shape[:1] + (1,) * (len(row_shape) - 1)
        else:
            elem_shape = row_shape
        q = quantized_drop_probability(p)
        if kind in ("alpha", "feature_alpha"):
            keep = self.keep(index, elem_shape, p)
            a = ((1 - q) * (1 + q * _SELU_ALPHA_PRIME**2)) ** -0.5
            b = -a * _SELU_ALPHA_PRIME * q
            return self._merge(torch.where(keep, xs, _SELU_ALPHA_PRIME) * a + b)
        scaled = self.keep(index, elem_shape, p, scale=1.0 / (1.0 - q)).to(xs.dtype)
        return self._merge(xs * scaled)

    def drop_connect(self, index: int, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """F.linear(x, dropout(weight), bias) with its own weight mask per row and sample.

        x [R or R*S, ..., in], weight [out, in] -> [R*S, ..., out]: the masked weights are
        [R, S, out, in], so each MC sample of each row sees an independent DropConnect mask
        (a batch of rows sharing one mask, as in training, would correlate their answers).
        """
        site = self.sites[index]
        scale = 1.0 / (1.0 - quantized_drop_probability(site.p))
        keep = self.keep(index, tuple(weight.shape), site.p, scale).to(weight.dtype)
        xs = self._rows_by_sample(x)
        lead = xs.shape[2:-1]
        flat = xs.reshape(self.n_rows, xs.shape[1], -1, xs.shape[-1])  # [R, S or 1, N, in]
        y: Tensor = flat @ (weight * keep).transpose(-1, -2)  # [R, S, N, out]
        if bias is not None:
            y = y + bias
        return y.reshape(self.n_rows * self.samples, *lead, weight.shape[0])

    def attention_dropout(self, index: int, weights: Tensor) -> Tensor:
        """Dropout on attention probabilities [R*S, ...] (batch first) at site `index`."""
        site = self.sites[index]
        ws = self._rows_by_sample(weights)
        scale = 1.0 / (1.0 - quantized_drop_probability(site.p))
        return self._merge(ws * self.keep(index, tuple(ws.shape[2:]), site.p, scale).to(ws.dtype))

    def sdpa(
        self,
        index: int,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        """scaled_dot_product_attention with this context's masks on the attention weights."""
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            reps = query.shape[-3] // key.shape[-3]
            key = key.repeat_interleave(reps, dim=-3)
            value = value.repeat_interleave(reps, dim=-3)
        weights = _attention_weights(query, key, attn_mask, is_causal, scale)
        return self.attention_dropout(index, weights) @ value

    def multihead_attention(
        self,
        index: int,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """nn.MultiheadAttention's forward with this context's masks on the attention weights."""
        mha = self.sites[index].module
        assert isinstance(mha, nn.MultiheadAttention)
        return multihead_attention(
            mha, query, key, value, key_padding_mask, need_weights, attn_mask,
            average_attn_weights, is_causal, lambda w: self.attention_dropout(index, w),
        )  # fmt: skip


def _attention_weights(
    query: Tensor, key: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float | None
) -> Tensor:
    """softmax(q kᵀ · scale + mask) over the last dimension, as in the SDPA reference."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        causal = torch.ones(
            query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device
        ).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.softmax(scores, dim=-1)


def multihead_attention(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    average_attn_weights: bool,
    is_causal: bool,
    drop: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor | None]:
    """Explicit MultiheadAttention forward whose attention-weight dropout is `drop`."""
    if not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    n, tgt, embed = query.shape
    heads, head_dim = mha.num_heads, mha.head_dim
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q = b_k = b_v = None
    if mha.in_proj_bias is not None:
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).view(n, tgt, heads, head_dim).transpose(1, 2)
    k = F.linear(key, w_k, b_k).view(n, key.shape[1], heads, head_dim).transpose(1, 2)
    v = F.linear(value, w_v, b_v).view(n, value.shape[1], heads, head_dim).transpose(1, 2)
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dim() == 2 else attn_mask.view(n, heads, tgt, -1)
        mask = ~mask if mask.dtype == torch.bool else mask  # nn.MHA: True means "masked out"
    if key_padding_mask is not None:
        pad = key_padding_mask.view(n, 1, 1, -1)
        pad = pad if pad.dtype == torch.bool else pad != 0
        pad_add = torch.zeros(pad.shape, dtype=q.dtype, device=q.device).masked_fill(pad, -math.inf)
        if mask is None:
            mask = pad_add
        elif mask.dtype == torch.bool:
            mask = (
                torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                    ~mask, -math.inf
                )
                + pad_add
            )
        else:
            mask = mask + pad_add
    weights = _attention_weights(q, k, mask, is_causal and attn_mask is None, None)
    weights = drop(weights)
    out = (weights @ v).transpose(1, 2).reshape(n, tgt, embed)
    out = mha.out_proj(out)
    if not mha.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, weights.mean(dim=1) if average_attn_weights else weights
