"""Tiny models whose stochastic ops are written exactly as their libraries write them.

The acceptance harness of "the engine samples the whole dropout family" (tests/test_zoo.py):
timm's DropPath and fused attention, AWD-LSTM's LockedDropout, hand-written Bernoulli and
Gaussian dropout, nn.LSTM inter-layer dropout, Hugging Face's attention dropout gated on
`self.training`, DropConnect (a weight mask per call), a U-Net with Dropout2d and a model with a
deterministic training-only branch. No library is imported: each module is rewritten here.
Also the reference every engine answer is held to: the model's own training-mode passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Expected = Literal["sampled", "refused"]
Task = Literal["regression", "classification"]


# -- timm (pytorch-image-models): layers/drop.py, vision_transformer.py, layers/mlp.py ---------


def drop_path(
    x: Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True
) -> Tensor:
    """Stochastic depth per sample (timm's `drop_path`): one keep/drop draw per batch row."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # work with diff dim tensors, not just 2D ConvNets
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    """Drop paths (stochastic depth) per sample, as timm writes it."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


class Mlp(nn.Module):
    """timm's transformer MLP: fc1, act, drop1, norm, fc2, drop2."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


class Attention(nn.Module):
    """timm's ViT attention; the fused path gates SDPA's dropout on `self.training`."""

    fused_attn: Final[bool]

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        assert dim % num_heads == 0, "dim should be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = True  # timm's use_fused_attn() on torch >= 2.0
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape  # noqa: N806  (timm writes it so)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=self.attn_drop.p if self.training else 0.0,
            )
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v

        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class Block(nn.Module):
    """timm's pre-norm ViT block: x + drop_path(attn(norm(x))), x + drop_path(mlp(norm(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, True, attn_drop, proj_drop)
        self.ls1 = nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class PatchEmbed(nn.Module):
    """Image [B, C, H, W] -> patch tokens [B, H*W/patch², dim] by a strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
        return self.norm(x)  # type: ignore[no-any-return]


class VisionTransformer(nn.Module):
    """A timm-style ViT on an 8x8 single-channel image: cls token, 2 blocks, token-pool head.

    Drop-path rates are linearly spaced over depth as timm does, so block 0 has none. DropPath
    and the gated SDPA dropout each carry a quarter to a third of the logits' variance, so an
    engine missing either shows a ratio below 0.8.
    """

    def __init__(
        self,
        img_size: int = 8,
        patch_size: int = 4,
        in_chans: int = 1,
        num_classes: int = 10,
        embed_dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        drop_rate: float = 0.05,
        pos_drop_rate: float = 0.05,
        proj_drop_rate: float = 0.05,
        attn_drop_rate: float = 0.5,
        drop_path_rate: float = 0.5,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        self.norm_pre = nn.Identity()
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]  # stochastic depth
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, 4.0, proj_drop_rate, attn_drop_rate, dpr[i])
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.fc_norm = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)

    def _pos_embed(self, x: Tensor) -> Tensor:
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        return self.pos_drop(x)  # type: ignore[no-any-return]

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, 1, 8, 8] -> logits [B, num_classes]."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.norm_pre(x)
        x = self.blocks(x)
        x = self.norm(x)
        x = x[:, 0]  # global_pool == 'token'
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return self.head(x)  # type: ignore[no-any-return]


# -- salesforce/awd-lstm-lm: locked_dropout.py (batch-first here) ---------------------------------


class LockedDropout(nn.Module):
    """Variational dropout: one mask per sequence, the same at every step.

    AWD-LSTM's code on batch-first [B, T, H] input: mask [B, 1, H] instead of [1, B, H].
    """

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: Tensor, dropout: float = 0.5) -> Tensor:
        if not self.training or not dropout:
            return x
        m = x.data.new(x.size(0), 1, x.size(2)).bernoulli_(1 - dropout)
        mask = m / (1 - dropout)
        mask = mask.expand_as(x)
        return mask * x


class LockedDropoutLSTM(nn.Module):
    """Float sequences [B, T, F] -> Linear -> LockedDropout -> LSTM -> LockedDropout -> head."""

    def __init__(
        self, features: int = 4, hidden: int = 16, outputs: int = 2, dropouti: float = 0.4
    ) -> None:
        super().__init__()
        self.dropouti = dropouti
        self.dropout = 0.3
        self.encoder = nn.Linear(features, hidden)
        self.lockdrop = LockedDropout()
        self.rnn = nn.LSTM(hidden, hidden, num_layers=1, batch_first=True)
        self.decoder = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, F] -> [B, outputs] from the last step."""
        emb = self.lockdrop(self.encoder(x), self.dropouti)
        output, _ = self.rnn(emb)
        output = self.lockdrop(output, self.dropout)
        return self.decoder(output[:, -1])  # type: ignore[no-any-return]


# -- hand-written and Gaussian dropout -----------------------------------------------------------


class HandDropoutMLP(nn.Module):
    """An MLP whose dropout is written out by hand with torch.bernoulli behind `self.training`."""

    def __init__(self, features: int = 6, hidden: int = 32, outputs: int = 3, p: float = 0.3):
        super().__init__()
        self.p = p
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.fc1(x))
        if self.training:
            x = x * torch.bernoulli(torch.full_like(x, 1 - self.p)) / (1 - self.p)
        return self.fc2(x)  # type: ignore[no-any-return]


class GaussianDropout(nn.Module):
    """Multiplicative Gaussian noise (Srivastava et al. 2014): x * (1 + sigma * eps)."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            x = x * (1 + self.sigma * torch.randn_like(x))
        return x


class GaussianDropoutMLP(nn.Module):
    """An MLP with Gaussian dropout on its hidden layer."""

    def __init__(self, features: int = 6, hidden: int = 32, outputs: int = 3, sigma: float = 0.5):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.noise = GaussianDropout(sigma)
        self.fc2 = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.noise(torch.relu(self.fc1(x))))  # type: ignore[no-any-return]


class GaussianLinear(nn.Module):
    """y = w·(x ⊙ (1 + σε)) + b on rows [B, F] -> [B, 1]: variance σ² Σ w² x² in closed form."""

    def __init__(self, weight: list[float], bias: float, sigma: float) -> None:
        super().__init__()
        self.noise = GaussianDropout(sigma)
        self.linear = nn.Linear(len(weight), 1)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([weight]))
            self.linear.bias.fill_(bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.noise(x))  # type: ignore[no-any-return]


class DropPathResidual(nn.Module):
    """y = x + drop_path(f(x)) with f a fixed Linear, [B, F] -> [B, F].

    Closed form: mean x + f(x), variance f(x)² p / (1 - p) (one keep draw per row).
    """

    def __init__(self, features: int = 4, p: float = 0.25) -> None:
        super().__init__()
        self.f = nn.Linear(features, features)
        self.drop_path = DropPath(p)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.f(x))  # type: ignore[no-any-return]


# -- nn.LSTM inter-layer dropout ----------------------------------------------------------------


class StackedLSTM(nn.Module):
    """nn.LSTM(num_layers=2, dropout=0.3): dropout only between the layers, in training."""

    def __init__(self, features: int = 3, hidden: int = 12, outputs: int = 2) -> None:
        super().__init__()
        self.rnn = nn.LSTM(features, hidden, num_layers=2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, F] -> [B, outputs] from the last step."""
        output, _ = self.rnn(x)
        return self.head(output[:, -1])  # type: ignore[no-any-return]


# -- huggingface/transformers: models/bert/modeling_bert.py --------------------------------------


@dataclass(frozen=True)
class BertConfig:
    """The few BertConfig fields the layer reads.

    Attention dropout is large and hidden dropout small, so the gated attention dropout carries
    most of the variance: an engine that misses it shows a ratio near 0.6, not 0.97.
    """

    hidden_size: int = 16
    num_attention_heads: int = 2
    intermediate_size: int = 32
    hidden_dropout_prob: float = 0.02
    attention_probs_dropout_prob: float = 0.5
    layer_norm_eps: float = 1e-12
    num_labels: int = 3
    attn_implementation: Literal["eager", "sdpa"] = "eager"
    num_hidden_layers: int = 1
    classifier_dropout: float | None = None  # None: hidden_dropout_prob, as in HF


class BertSelfAttention(nn.Module):
    """HF self-attention; attention dropout is functional and gated on `self.training`."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = int(config.hidden_size / config.num_attention_heads)
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout_prob = config.attention_probs_dropout_prob
        self.attn_implementation = config.attn_implementation
        self.scaling = self.attention_head_size**-0.5

    def forward(self, hidden_states: Tensor) -> Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        query_layer = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
        key_layer = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
        value_layer = self.value(hidden_states).view(hidden_shape).transpose(1, 2)

        if self.attn_implementation == "sdpa":
            attn_output = F.scaled_dot_product_attention(
                query_layer,
                key_layer,
                value_layer,
                attn_mask=None,
                dropout_p=self.dropout_prob if self.training else 0.0,
                scale=self.scaling,
            )
        else:
            attention_scores = torch.matmul(query_layer, key_layer.transpose(2, 3)) * self.scaling
            attention_probs = nn.functional.softmax(attention_scores, dim=-1)
            attention_probs = nn.functional.dropout(
                attention_probs,
                p=self.dropout_prob if self.training else 0.0,
                training=self.training,
            )
            attn_output = torch.matmul(attention_probs, value_layer)
        attn_output = attn_output.transpose(1, 2).contiguous()
        return attn_output.reshape(*input_shape, -1)


class BertSelfOutput(nn.Module):
    """dense -> nn.Dropout -> LayerNorm(+ residual)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        hidden_states = self.dense(hidden_states)
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.LayerNorm(hidden_states + input_tensor)
        return hidden_states


class BertIntermediate(nn.Module):
    """dense -> GELU."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))  # type: ignore[no-any-return]


class BertOutput(nn.Module):
    """dense -> nn.Dropout -> LayerNorm(+ residual)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        hidden_states = self.dense(hidden_states)
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.LayerNorm(hidden_states + input_tensor)
        return hidden_states


class BertLayer(nn.Module):
    """Self-attention block then feed-forward block, each with a residual LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self_attention = BertSelfAttention(config)
        self.attention_output = BertSelfOutput(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states: Tensor) -> Tensor:
        attention_output = self.attention_output(self.self_attention(hidden_states), hidden_states)
        layer_output: Tensor = self.output(self.intermediate(attention_output), attention_output)
        return layer_output


class BertPooler(nn.Module):
    """The first token's hidden state -> dense -> tanh."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: Tensor) -> Tensor:
        first_token_tensor = hidden_states[:, 0]
        return self.activation(self.dense(first_token_tensor))  # type: ignore[no-any-return]


class BertForSequenceClassification(nn.Module):
    """Float token features [B, T, D] -> encoder layers -> pooler -> dropout -> logits [B, C]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = BertPooler(config)
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.encoder:
            x = layer(x)
        pooled_output = self.pooler(x)
        pooled_output = self.dropout(pooled_output)
        return self.classifier(pooled_output)  # type: ignore[no-any-return]


# -- DropConnect (baal's weight_drop, AWD-LSTM's WeightDrop): masks on a weight ------------------


class DropConnectLinear(nn.Linear):
    """A Linear whose weight is dropped out on every call: the mask has no batch dimension."""

    def __init__(self, in_features: int, out_features: int, p: float = 0.3) -> None:
        super().__init__(in_features, out_features)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.dropout(self.weight, self.p, training=True), self.bias)


class DropConnectNet(nn.Module):
    """Linear -> ReLU -> DropConnectLinear at module path `dc_fc`."""

    def __init__(self, features: int = 6, hidden: int = 16, outputs: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.dc_fc = DropConnectLinear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.dc_fc(torch.relu(self.fc1(x)))  # type: ignore[no-any-return]


class InputDropoutLinear(nn.Module):
    """The same linear layer with dropout on its input instead: one mask shared by the outputs."""

    def __init__(self, weight: list[list[float]], bias: list[float], p: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight))
        self.bias = nn.Parameter(torch.tensor(bias))
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.dropout(x, self.p, training=True), self.weight, self.bias)


# weight [2 outputs, 4 inputs], bias, p: for the closed forms of DropConnect and input dropout
DROPCONNECT_LINEAR = ([[0.5, -1.0, 0.25, 2.0], [1.5, 0.5, -0.75, 1.0]], [0.1, -0.2], 0.3)


def build_dropconnect_linear() -> nn.Module:
    weight, bias, p = DROPCONNECT_LINEAR
    layer = DropConnectLinear(4, 2, p)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer.eval()


def build_input_dropout_linear() -> nn.Module:
    return InputDropoutLinear(*DROPCONNECT_LINEAR).eval()


# -- a small U-Net with Dropout2d in the bottleneck -----------------------------------------------


def _conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()
    )


class TinyUNet(nn.Module):
    """Two-level U-Net on [B, 1, 16, 16]; per-pixel logits [B, 3, 16, 16] flattened to [B, 768].

    Flattened because MCEngine takes [rows, D] outputs today.
    """

    def __init__(self, classes: int = 3, p: float = 0.3) -> None:
        super().__init__()
        self.enc1 = _conv_block(1, 4)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _conv_block(4, 8)
        self.drop = nn.Dropout2d(p)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.dec1 = _conv_block(8, 4)
        self.out = nn.Conv2d(4, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        b = self.drop(self.bottleneck(self.pool(e1)))
        d = self.dec1(torch.cat([self.up(b), e1], dim=1))
        return self.out(d).flatten(1)  # type: ignore[no-any-return]


# -- deterministic training-only branch (Inception-style auxiliary head) -------------------------


class AuxHeadNet(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Dropout -> head; in training also an auxiliary head.

    Training returns [logits, aux_logits] (as Inception's aux logits); eval returns logits
    [B, 3]. The training branch differs deterministically, so it must not be taken.
    """

    def __init__(self, features: int = 6, hidden: int = 16, outputs: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(hidden, outputs)
        self.aux_head = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        h = self.drop(torch.relu(self.bn(self.fc1(x))))
        logits: Tensor = self.head(h)
        if self.training:
            return [logits, self.aux_head(h)]
        return logits


class DropoutMLP(nn.Module):
    """A plain nn.Dropout MLP, sampled correctly by today's engine: the recipe's sanity check."""

    def __init__(self, features: int = 6, hidden: int = 32, outputs: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, outputs),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # type: ignore[no-any-return]


# -- factories (seeded init, eval mode) -------------------------------------------------------


def _settle_batchnorm(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Move BatchNorm running statistics off their defaults with a few training passes."""
    gen = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn((16, *input_shape), generator=gen) * 2 + 0.5)
    model.eval()


def build_vit_tiny() -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer().eval()


def build_locked_dropout_lstm() -> nn.Module:
    torch.manual_seed(1)
    return LockedDropoutLSTM().eval()


def build_hand_bernoulli_mlp() -> nn.Module:
    torch.manual_seed(2)
    return HandDropoutMLP().eval()


def build_gaussian_mlp() -> nn.Module:
    torch.manual_seed(3)
    return GaussianDropoutMLP().eval()


GAUSSIAN_LINEAR = ([0.5, -1.0, 2.0, 0.25], 0.3, 0.4)  # weight, bias, sigma


def build_gaussian_linear() -> nn.Module:
    torch.manual_seed(4)
    weight, bias, sigma = GAUSSIAN_LINEAR
    return GaussianLinear(weight, bias, sigma).eval()


def build_stacked_lstm() -> nn.Module:
    torch.manual_seed(5)
    return StackedLSTM().eval()


def build_bert_eager() -> nn.Module:
    torch.manual_seed(6)
    return BertForSequenceClassification(BertConfig(attn_implementation="eager")).eval()


def build_bert_deep_head() -> nn.Module:
    """Four encoder layers without dropout, dropout only before the classifier: the model whose
    deterministic prefix (the whole encoder) a partitioned program runs once per row."""
    torch.manual_seed(9)
    config = BertConfig(hidden_size=32, intermediate_size=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_hidden_layers=4,
                        classifier_dropout=0.2)  # fmt: skip
    return BertForSequenceClassification(config).eval()


def build_bert_sdpa() -> nn.Module:
    torch.manual_seed(6)  # the same weights as the eager variant
    return BertForSequenceClassification(BertConfig(attn_implementation="sdpa")).eval()


def build_dropconnect() -> nn.Module:
    torch.manual_seed(7)
    return DropConnectNet().eval()


def build_unet() -> nn.Module:
    torch.manual_seed(8)
    model = TinyUNet()
    _settle_batchnorm(model, (1, 16, 16))
    return model


def build_aux_head() -> nn.Module:
    torch.manual_seed(9)
    model = AuxHeadNet()
    _settle_batchnorm(model, (6,))
    return model


DROP_PATH_P = 0.25  # exact in the engine's 16-bit thresholds


def build_drop_path_residual() -> nn.Module:
    torch.manual_seed(10)
    return DropPathResidual(4, DROP_PATH_P).eval()


def build_dropout_mlp() -> nn.Module:
    torch.manual_seed(11)
    return DropoutMLP().eval()


class ZooEntry(NamedTuple):
    """How to build a zoo model, its per-row input shape, natural task and expected verdict."""

    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    task: Task
    expected: Expected


ZOO: dict[str, ZooEntry] = {
    "dropout_mlp": ZooEntry(build_dropout_mlp, (6,), "regression", "sampled"),
    "vit_tiny": ZooEntry(build_vit_tiny, (1, 8, 8), "classification", "sampled"),
    "locked_dropout_lstm": ZooEntry(build_locked_dropout_lstm, (6, 4), "regression", "sampled"),
    "hand_bernoulli_mlp": ZooEntry(build_hand_bernoulli_mlp, (6,), "classification", "sampled"),
    "gaussian_mlp": ZooEntry(build_gaussian_mlp, (6,), "regression", "sampled"),
    "gaussian_linear": ZooEntry(build_gaussian_linear, (4,), "regression", "sampled"),
    "drop_path_residual": ZooEntry(build_drop_path_residual, (4,), "regression", "sampled"),
    "stacked_lstm": ZooEntry(build_stacked_lstm, (5, 3), "regression", "sampled"),
    "bert_eager": ZooEntry(build_bert_eager, (5, 16), "classification", "sampled"),
    "bert_sdpa": ZooEntry(build_bert_sdpa, (5, 16), "classification", "sampled"),
    "bert_deep_head": ZooEntry(build_bert_deep_head, (16, 32), "classification", "sampled"),
    "unet": ZooEntry(build_unet, (1, 16, 16), "regression", "sampled"),
    "aux_head_bn": ZooEntry(build_aux_head, (6,), "classification", "sampled"),
    "dropconnect": ZooEntry(build_dropconnect, (6,), "regression", "sampled"),
}

# Modules (qualified names, "" the root) whose training branch is deterministic: the recipe,
# like the engine, keeps them in eval mode.
DETERMINISTIC: Mapping[str, tuple[str, ...]] = {"aux_head_bn": ("",)}
# Models drawing one mask per forward call (a weight mask), shared by every row of the call:
# their training-mode reference needs one pass per call (`training_mode_samples`).
MASK_PER_CALL: frozenset[str] = frozenset({"dropconnect"})


# -- the reference: the model's own training-mode passes ------------------------------------


def _has_running_stats(module: nn.Module) -> bool:
    """BatchNorm / InstanceNorm / SyncBatchNorm tracking running statistics."""
    return isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats


def training_mode_samples(
    module: nn.Module,
    x: Tensor,
    samples: int,
    seed: int,
    *,
    deterministic: Collection[str] = (),
    passes_per_call: int = 250,
) -> Tensor:
    """Outputs [samples, B, D] of `samples` training-mode passes of rows x [B, ...].

    Every module is in train mode except norms with running statistics and the modules named
    in `deterministic` (qualified names, "" the root), which stay in eval; torch's global RNG
    is seeded inside a fork, so the caller's RNG state is untouched. `passes_per_call` passes
    are stacked along the batch dimension of one call: independent passes for every model
    whose random draws are per batch row (all the zoo's sampled models); a model drawing one
    mask per call (DropConnect) needs passes_per_call=1. Training flags are restored after.
    """
    flags = {m: m.training for m in module.modules()}
    keep_eval = set(deterministic)
    outputs: list[Tensor] = []
    try:
        for name, m in module.named_modules():
            m.training = not (_has_running_stats(m) or name in keep_eval)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            done = 0
            while done < samples:
                k = min(passes_per_call, samples - done)
                out = module(x.repeat(k, *([1] * (x.dim() - 1))))
                if not isinstance(out, Tensor):
                    raise TypeError(
                        f"{type(module).__name__} returns {type(out).__name__} in training mode; "
                        "name its deterministic training branch in `deterministic`"
                    )
                outputs.append(out.reshape(k, len(x), -1).to(torch.float64))
                done += k
    finally:
        for m, flag in flags.items():
            m.training = flag
    return torch.cat(outputs)


def training_mode_recipe(
    module: nn.Module,
    x: Tensor,
    samples: int,
    seed: int,
    *,
    deterministic: Collection[str] = (),
) -> tuple[Tensor, Tensor]:
    """Per-row mean [B, D] and unbiased variance [B, D] of the model's own training passes.

    The reference for the engine's epistemic variance; see `training_mode_samples`.
    """
    out = training_mode_samples(module, x, samples, seed, deterministic=deterministic)
    return out.mean(dim=0), out.var(dim=0, unbiased=True)


def excess_kurtosis(samples: Tensor) -> float:
    """Excess kurtosis κ of the statistic Σ s² pools: z = Σ (y - ȳ)² over every output.

    samples [S, ...]: κ = Var(z) / E(z)² - 2, which for one output is the ordinary m4/m2² - 3,
    and for a sum of variances over outputs is the κ that makes Var(Σ s²) = (Σσ²)² ·
    (2/(N-1) + κ/N) hold to first order, correlations between the outputs included
    (independent outputs drive it towards -2, i.e. less noise; fully correlated ones keep it).
    """
    flat = samples.to(torch.float64).flatten(1)
    z = (flat - flat.mean(dim=0)).pow(2).sum(dim=1)
    mean = float(z.mean())
    return float(z.var(unbiased=False)) / mean**2 - 2.0 if mean > 0 else 0.0


def variance_tolerance(samples: int, excess_kurtosis: float = 0.0, sigmas: float = 4.0) -> float:
    """Relative `sigmas`-sigma band of one unbiased sample variance s² of N draws around σ².

    Exactly Var(s²) = σ⁴ (2/(N-1) + κ/N), κ the excess kurtosis (0 for Gaussian outputs,
    κ >= -2 always), so |s²/σ² - 1| <= sigmas · sqrt(2/(N-1) + κ/N); a sum of variances over
    outputs obeys the same law with the pooled κ of `excess_kurtosis`.
    """
    kappa = max(excess_kurtosis, -2.0)
    return sigmas * math.sqrt(2.0 / (samples - 1) + kappa / samples)


def variance_ratio_tolerance(
    samples: int, excess_kurtosis: float = 0.0, sigmas: float = 4.0
) -> float:
    """Band for |s₁²/s₂² - 1|, two independent sample variances of N draws each of one σ².

    Each s² has relative std r = sqrt(2/(N-1) + κ/N) (`variance_tolerance`); to first order
    s₁²/s₂² ≈ 1 + δ₁ - δ₂, so the ratio's std is √2·r: ≈ 2/√N for Gaussian outputs (κ = 0),
    0.045 at N = 2000, a 4-sigma band of ±0.18. Heavy tails (κ > 0) widen it; a ratio of sums
    Σs₁²/Σs₂² over several rows and outputs takes the pooled κ (`excess_kurtosis`), which is
    negative when the outputs are not fully correlated, and narrows it.
    """
    return math.sqrt(2.0) * variance_tolerance(samples, excess_kurtosis, sigmas)
