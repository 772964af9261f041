"""Built-in dropout architectures (MLP, small CNN), rebuilt from the manifest's `[model.config]`.

Child modules get readable names (`fc0`, `dropout0`, `conv1`, ...) so a manifest can pick
which dropout sites sample by name, and so weights files have stable, legible keys.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, PositiveInt, ValidationError, validate_call
from torch import nn

from mcdrop.errors import ModelLoadError
from mcdrop.repository.manifest import ModelSpec

Activation = Literal["relu", "tanh", "gelu", "silu", "elu", "leaky_relu", "sigmoid"]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
ImageSize = Annotated[Sequence[PositiveInt], Field(min_length=2, max_length=2)]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
}

# Strict: a manifest's `hidden = "64"` or `dropout = true` is an error, not a silent coercion.
_validated = validate_call(config=ConfigDict(strict=True))


@_validated
def build_mlp(
    in_features: PositiveInt,
    out_features: PositiveInt,
    hidden: Sequence[PositiveInt],
    dropout: Probability = 0.1,
    input_dropout: Probability = 0.0,
    activation: Activation = "relu",
    flatten: bool = False,
) -> nn.Sequential:
    """MLP [B, in_features] -> [B, out_features]: (flatten) (input_dropout) {fc, act, dropout}* out.

    `flatten` prepends an nn.Flatten for rows with more than one dimension (e.g. [B, 1, 8, 8]).
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if flatten:
        layers["flatten"] = nn.Flatten()
    if input_dropout > 0:
        layers["input_dropout"] = nn.Dropout(input_dropout)
    width = in_features
    for i, h in enumerate(hidden):
        layers[f"fc{i}"] = nn.Linear(width, h)
        layers[f"act{i}"] = _ACTIVATIONS[activation]()
        if dropout > 0:
            layers[f"dropout{i}"] = nn.Dropout(dropout)
        width = h
    layers["out"] = nn.Linear(width, out_features)
    return nn.Sequential(layers)


@_validated
def build_cnn(
    in_channels: PositiveInt,
    image_size: ImageSize,
    out_features: PositiveInt,
    channels: Annotated[Sequence[PositiveInt], Field(min_length=1)] = (16, 32),
    kernel_size: PositiveInt = 3,
    hidden: PositiveInt = 64,
    dropout: Probability = 0.25,
    conv_dropout: Probability = 0.0,
    batchnorm: bool = False,
) -> nn.Sequential:
    """CNN [B, C, H, W] -> [B, out_features]: {conv, (bn), relu, maxpool2, (dropout2d)}* + head.

    Convolutions (odd kernel) keep the spatial size; each 2x2 max-pool halves it (floor).
    The head is flatten, dropout, fc0, relu, dropout, out.
    """
    if kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size: must be odd so convolutions keep the size, got {kernel_size}"
        )
    height, width = image_size
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c_prev = in_channels
    for i, c in enumerate(channels):
        if height < 2 or width < 2:
            raise ValueError(
                f"image_size: {list(image_size)} is too small for {len(channels)} 2x2 pooling "
                f"stages (each halves height and width)"
            )
        layers[f"conv{i}"] = nn.Conv2d(
            c_prev, c, kernel_size, padding=kernel_size // 2, bias=not batchnorm
        )
        if batchnorm:
            layers[f"bn{i}"] = nn.BatchNorm2d(c)
        layers[f"act{i}"] = nn.ReLU()
        layers[f"pool{i}"] = nn.MaxPool2d(2)
        if conv_dropout > 0:
            layers[f"conv_dropout{i}"] = nn.Dropout2d(conv_dropout)
        height, width, c_prev = height // 2, width // 2, c
    layers["flatten"] = nn.Flatten()
    if dropout > 0:
        layers["dropout_head0"] = nn.Dropout(dropout)
    layers["fc0"] = nn.Linear(c_prev * height * width, hidden)
    layers["act_fc0"] = nn.ReLU()
    if dropout > 0:
        layers["dropout_head1"] = nn.Dropout(dropout)
    layers["out"] = nn.Linear(hidden, out_features)
    return nn.Sequential(layers)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"mlp": build_mlp, "cnn": build_cnn}


def _derived_config(spec: ModelSpec) -> dict[str, Any]:
    """Constructor arguments implied by the manifest's input/output sections."""
    shape = spec.input.shape
    n_out = spec.n_outputs * (2 if spec.output.heteroscedastic else 1)
    if spec.model.architecture == "mlp":
        return {"in_features": math.prod(shape), "out_features": n_out, "flatten": len(shape) > 1}
    if len(shape) != 3:
        raise ModelLoadError(
            f"input.shape: the cnn architecture needs [channels, height, width], got {shape}"
        )
    return {"in_channels": shape[0], "image_size": list(shape[1:]), "out_features": n_out}


def build_architecture(spec: ModelSpec) -> nn.Module:
    """Rebuild a built-in architecture from `spec.model.config`, filling in shape-derived defaults.

    Arguments the manifest also states (input shape, output count) must agree with it.
    Raises ModelLoadError naming the offending `model.config.<field>`.
    """
    arch = spec.model.architecture
    if arch is None or arch not in _BUILDERS:
        raise ModelLoadError(
            f"model.architecture: expected one of {sorted(_BUILDERS)}, got {arch!r}"
        )
    builder = _BUILDERS[arch]
    allowed = list(inspect.signature(builder).parameters)
    config = dict(spec.model.config)
    for key in config:
        if key not in allowed:
            raise ModelLoadError(
                f"model.config.{key}: unknown argument for {arch} "
                f"(expected one of {', '.join(allowed)})"
            )
    for key, value in _derived_config(spec).items():
        if key not in config:
            config[key] = value
        elif config[key] != value:
            raise ModelLoadError(
                f"model.config.{key}: {config[key]!r} disagrees with the manifest's input/output "
                f"sections, which imply {value!r}"
            )
    try:
        return builder(**config)
    except ValidationError as exc:
        problems = "; ".join(
            f"model.config.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ModelLoadError(problems) from exc
    except ValueError as exc:
        raise ModelLoadError(f"model.config.{exc}") from exc
