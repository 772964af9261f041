"""The named output tensors of a summary, shared by the OIP router and model metadata.

Regression outputs are [B, D] FP64 (samples [B, K, D]); classification outputs are [B, C] or
[B] (samples [B, K, C]); interval names carry the level as a percentage: lower_95, upper_99.5.
A model with a map output (output.shape of several axes) answers in its shape: [B, *shape]
(probabilities [B, C, H, W], the measures and predicted_class [B, H, W]), plus the map's
reductions: <measure>_map_mean [B], and for a classifier <measure>_by_class [B, C] (the
measure's mean over the elements predicted as each class, 0 for none) and class_elements
[B, C].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from numpy.typing import NDArray
from torch import Tensor

from mcdrop.api.oip_codec import OutputTensor, RequestedOutput, datatype_of
from mcdrop.engine.accumulators import quantile_samples
from mcdrop.errors import InvalidInput
from mcdrop.repository.manifest import ModelSpec
from mcdrop.uncertainty import (
    MAP_MEASURES,
    ClassificationSummary,
    RegressionSummary,
    is_map,
    map_reductions,
    validate_levels,
)

INPUT_NAME = "input"
MAX_LEVELS = 16
REGRESSION_MOMENTS = ("mean", "variance", "epistemic_variance", "aleatoric_variance", "std")
CLASS_VECTORS = ("probabilities", "probabilities_std")
CLASS_SCALARS = ("entropy", "expected_entropy", "mutual_information", "variation_ratio")


def interval_name(level: float, side: Literal["lower", "upper"], empirical: bool = False) -> str:
    """Output name of one interval bound: 0.95 -> lower_95, 0.995 -> upper_99.5_empirical."""
    pct = f"{level * 100.0:.10f}".rstrip("0").rstrip(".")
    return f"{side}_{pct}_empirical" if empirical else f"{side}_{pct}"


def _level(value: object) -> float:
    """One level as a fraction: 0.9 stays, 90 (a percentage) becomes 0.9."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            raise InvalidInput(f"interval_levels: {text!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise InvalidInput(f"interval_levels: {value!r} is not a number")
    if 0.0 < value < 1.0:
        return float(value)
    if 1.0 < value < 100.0:
        return round(value / 100.0, 12)
    raise InvalidInput(
        f"interval_levels: {value!r} must lie in (0, 1), or in (1, 100) as a percentage"
    )


def parse_levels(value: object) -> tuple[float, ...]:
    """The `interval_levels` request parameter: a list, a number, or "0.9, 0.95" / "90,95".

    Returns fractions in (0, 1), sorted, without repeats (levels that name alike count once).
    """
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        items = [items]
    levels: dict[str, float] = {}
    for item in items:
        level = _level(item)
        levels.setdefault(interval_name(level, "lower"), level)
    if not levels:
        raise InvalidInput("interval_levels: give at least one level, e.g. [0.9, 0.95]")
    if len(levels) > MAX_LEVELS:
        raise InvalidInput(f"interval_levels: {len(levels)} levels is above {MAX_LEVELS}")
    return tuple(sorted(levels.values()))


def _np(tensor: Tensor, dtype: torch.dtype = torch.float64) -> NDArray[Any]:
    return tensor.detach().to("cpu", dtype).numpy()


def summary_outputs(summary: RegressionSummary | ClassificationSummary) -> dict[str, NDArray[Any]]:
    """Every output tensor of a summary by name, in the order metadata lists them."""
    if isinstance(summary, ClassificationSummary):
        out = {name: _np(getattr(summary, name)) for name in CLASS_VECTORS}
        out["predicted_class"] = _np(summary.predicted_class, torch.int64)
        out.update({name: _np(getattr(summary, name)) for name in CLASS_SCALARS})
    else:
        out = {name: _np(getattr(summary, name)) for name in REGRESSION_MOMENTS}
        for empirical, intervals in ((False, summary.gaussian_intervals),
                                     (True, summary.empirical_intervals)):  # fmt: skip
            for level in sorted(intervals):
                out[interval_name(level, "lower", empirical)] = _np(intervals[level].lower)
                out[interval_name(level, "upper", empirical)] = _np(intervals[level].upper)
    if summary.samples is not None:
        out["samples"] = _np(summary.samples)
    if is_map(summary):
        out.update({name: _np(value) for name, value in map_reductions(summary).items()})
    return out


def _meta(name: str, shape: list[int], datatype: str = "FP64") -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def output_metadata(spec: ModelSpec, levels: tuple[float, ...] = (0.95,)) -> list[dict[str, Any]]:
    """Name, datatype and shape (-1: batch, or K for samples) of every output at `levels`.

    Samples appear when the request asks for them (`return_samples` > 0).
    """
    shape = list(spec.output_shape) if spec.is_map else [spec.n_outputs]
    if spec.task == "classification":
        axis = spec.output.class_axis or 0
        per_element = [d for i, d in enumerate(shape) if i != axis] if spec.is_map else []
        meta = [_meta(name, [-1, *shape]) for name in CLASS_VECTORS]
        meta.append(_meta("predicted_class", [-1, *per_element], "INT64"))
        meta += [_meta(name, [-1, *per_element]) for name in CLASS_SCALARS]
    else:
        meta = [_meta(name, [-1, *shape]) for name in REGRESSION_MOMENTS]
        kept = not spec.is_map or quantile_samples(math.prod(shape)) > 0  # engine/accumulators
        empirical_kinds = (False, True) if kept else (False,)
        for empirical in empirical_kinds:
            for level in validate_levels(levels):
                meta.append(_meta(interval_name(level, "lower", empirical), [-1, *shape]))
                meta.append(_meta(interval_name(level, "upper", empirical), [-1, *shape]))
    meta.append(_meta("samples", [-1, -1, *shape]))
    if spec.is_map:
        meta += _reduction_metadata(spec)
    return meta


def _reduction_metadata(spec: ModelSpec) -> list[dict[str, Any]]:
    if spec.task == "regression":
        return [_meta(f"{name}_map_mean", [-1])
                for name in ("mean", "epistemic_variance", "aleatoric_variance")]  # fmt: skip
    n = spec.n_outputs
    meta = [_meta("class_elements", [-1, n])]
    for name in MAP_MEASURES:
        meta += [_meta(f"{name}_map_mean", [-1]), _meta(f"{name}_by_class", [-1, n])]
    return meta


_OIP_DATATYPES = {"float32": "FP32", "float64": "FP64", "float16": "FP16", "bfloat16": "BF16",
                  "int64": "INT64", "int32": "INT32", "bool": "BOOL"}  # fmt: skip


def input_metadata(spec: ModelSpec) -> list[dict[str, Any]]:
    """The model's inputs: one 'input' of the manifest's shape as FP32, or its named inputs,
    each in its own datatype (optional ones say so, with their default and range)."""
    if spec.inputs is None:
        return [_meta(INPUT_NAME, [-1, *spec.input.shape], "FP32")]
    metadata = []
    for item in spec.inputs:
        meta = _meta(item.name, [-1, *item.shape], _OIP_DATATYPES[item.dtype])
        extra = {
            "optional": item.default is not None,
            "default": item.default,
            "range": None if item.range is None else list(item.range),
            "pad": item.pad,
        }
        meta["parameters"] = {k: v for k, v in extra.items() if v is not None}
        metadata.append(meta)
    return metadata


def _hint(name: str) -> str:
    if name == "samples":
        return " (samples need the request parameter return_samples > 0)"
    if name.startswith(("lower_", "upper_")):
        return " (interval levels follow the request parameter interval_levels)"
    return ""


def select_outputs(
    all_outputs: Mapping[str, NDArray[Any]],
    requested: Sequence[RequestedOutput],
    model_name: str,
    binary_default: bool = False,
) -> tuple[list[OutputTensor], set[str]]:
    """The requested outputs (all when none are named) and the names to send as binary.

    Unknown names raise InvalidInput listing what the model produces for this request.
    """
    if not requested:
        chosen = [OutputTensor(n, datatype_of(a), a) for n, a in all_outputs.items()]
        return chosen, {t.name for t in chosen} if binary_default else set()
    for req in requested:
        if req.name not in all_outputs:
            raise InvalidInput(
                f"output {req.name!r} is not produced by model {model_name!r}; it produces: "
                f"{', '.join(all_outputs)}{_hint(req.name)}"
            )
    chosen = [OutputTensor(r.name, datatype_of(all_outputs[r.name]), all_outputs[r.name])
              for r in requested]  # fmt: skip
    return chosen, {r.name for r in requested if r.binary}
