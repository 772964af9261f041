"""Built-in dropout architectures (MLP, small CNN, tiny segmentation FCN), rebuilt from the
manifest's `[model.config]`.

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


@_validated
def build_fcn(
    in_channels: PositiveInt,
    classes: PositiveInt,
    widths: Annotated[Sequence[PositiveInt], Field(min_length=1)] = (8, 16),
    dropout: Probability = 0.2,
    kernel_size: PositiveInt = 3,
    downsample: bool = True,
    batchnorm: bool = False,
    image_size: ImageSize | None = None,
) -> nn.Sequential:
    """Fully convolutional segmenter [B, in_channels, H, W] -> per-pixel logits [B, classes, H, W].

    Encoder {conv, (bn), relu, (maxpool2)}* over `widths` (a 2x2 max-pool between stages
    when `downsample`), channel dropout (nn.Dropout2d) on the bottleneck, then one
    {upsample2, conv, relu} per pool back to widths[0] and a 1x1 conv to the classes.
    Odd kernels with padding k // 2 keep every convolution's size, so with `downsample` the
    output matches the input when H and W are multiples of 2 ** (len(widths) - 1);
    `image_size`, when given (the manifest's input shape), is checked for that.
    """
    if kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size: must be odd so convolutions keep the size, got {kernel_size}"
        )
    pools = len(widths) - 1 if downsample else 0
    if image_size is not None and any(s % 2**pools for s in image_size):
        raise ValueError(
            f"image_size: {list(image_size)} must be multiples of {2**pools} for {pools} 2x2 "
            f"pooling stages, or the upsampled logits would not match the input's size"
        )
    pad = kernel_size // 2
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c_prev = in_channels
    for i, c in enumerate(widths):
        if i > 0 and downsample:
            layers[f"pool{i - 1}"] = nn.MaxPool2d(2)
        layers[f"conv{i}"] = nn.Conv2d(c_prev, c, kernel_size, padding=pad, bias=not batchnorm)
        if batchnorm:
            layers[f"bn{i}"] = nn.BatchNorm2d(c)
        layers[f"act{i}"] = nn.ReLU()
        c_prev = c
    if dropout > 0:
        layers["dropout"] = nn.Dropout2d(dropout)
    for j in reversed(range(pools)):
        layers[f"up{j}"] = nn.Upsample(scale_factor=2, mode="nearest")
        layers[f"conv_up{j}"] = nn.Conv2d(c_prev, widths[j], kernel_size, padding=pad)
        layers[f"act_up{j}"] = nn.ReLU()
        c_prev = widths[j]
    layers["out"] = nn.Conv2d(c_prev, classes, 1)
    return nn.Sequential(layers)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "fcn": build_fcn,
}


def _derived_config(spec: ModelSpec) -> dict[str, Any]:
    """Constructor arguments implied by the manifest's input/output sections."""
    arch = spec.model.architecture
    shape = spec.input.shape
    n_out = spec.n_outputs * (2 if spec.output.heteroscedastic else 1)
    if arch == "mlp":
        return {"in_features": math.prod(shape), "out_features": n_out, "flatten": len(shape) > 1}
    if len(shape) != 3:
        raise ModelLoadError(
            f"input.shape: the {arch} architecture needs [channels, height, width], got {shape}"
        )
    if arch == "cnn":
        return {"in_channels": shape[0], "image_size": list(shape[1:]), "out_features": n_out}
    _check_per_pixel_output(spec)  # fcn
    return {"in_channels": shape[0], "image_size": list(shape[1:]), "classes": n_out}


def _check_per_pixel_output(spec: ModelSpec) -> None:
    """An fcn returns [classes, height, width] per row: the manifest must say so, or the
    engine would read the map as one long vector (one softmax over every pixel)."""
    expected = [spec.n_outputs, *spec.input.shape[1:]]
    out = spec.output
    if out.shape is None or list(out.shape) != expected:
        raise ModelLoadError(
            f"output.shape: the fcn architecture returns per-pixel logits [classes, height, "
            f"width] = {expected} per row, got {out.shape}"
        )
    if out.class_axis not in (0, -3):
        raise ModelLoadError(
            f"output.class_axis: the fcn architecture holds the classes on axis 0, "
            f"got {out.class_axis}"
        )


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
