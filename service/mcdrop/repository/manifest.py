"""The model manifest (`models/<name>/model.toml`) as a validated, typed ModelSpec."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mcdrop.errors import ModelLoadError

Task = Literal["regression", "classification"]
MaskMode = Literal["independent", "shared"]
MANIFEST_NAME = "model.toml"
# A model name is a folder name and a URL path segment: no separators, no leading dot (so
# never "." or ".."), bounded length. Routes check request names against it before any lookup.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """Shape of one input row (without the batch dimension) and its dtype."""

    shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    dtype: Literal["float32", "float64"] = "float32"
    names: list[str] | None = None
    training_ranges: list[tuple[float, float]] | None = Field(
        None, description="1-D inputs: the intervals the training data covered (for plots)"
    )


InputDtype = Literal["float32", "float64", "float16", "bfloat16", "int64", "int32", "bool"]
INTEGER_DTYPES = frozenset({"int64", "int32"})
EXACT_INTEGER = 2**24  # inputs travel to the engine as float32: integers exact up to this


class NamedInput(_Strict):
    """One of several named inputs: the model's forward takes it as a keyword argument."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    dtype: InputDtype = "float32"
    shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    range: tuple[float, float] | None = Field(
        None, description="the values allowed, inclusive (token ids: [0, vocab_size - 1])"
    )
    default: float | None = Field(None, description="optional input: this value when absent")
    pad: float | None = Field(
        None, description="rows may be shorter along the first axis, padded with this value"
    )
    mask_for: str | None = Field(
        None,
        description="this input is the padding mask of the named input: when a request "
        "leaves it out, 1 over that input's own values and 0 over its padding",
    )

    @model_validator(mode="after")
    def _values(self) -> NamedInput:
        if self.range is not None and self.range[0] > self.range[1]:
            raise ValueError(f"inputs '{self.name}': range {list(self.range)} is empty")
        if (
            self.dtype in INTEGER_DTYPES
            and self.range is not None
            and max(abs(self.range[0]), abs(self.range[1])) > EXACT_INTEGER
        ):
            raise ValueError(f"inputs '{self.name}': range {list(self.range)} goes past "
                             f"±{EXACT_INTEGER} (integers are exact only up to there)")  # fmt: skip
        for what in ("default", "pad"):
            value = getattr(self, what)
            if value is not None and not self.allows(value):
                raise ValueError(f"inputs '{self.name}': {what} {value} is not an allowed value")
        return self

    def allows(self, value: float) -> bool:
        """Whether one value fits this input's dtype and range."""
        if self.dtype in INTEGER_DTYPES and value != int(value):
            return False
        if self.dtype == "bool" and value not in (0, 1):
            return False
        return self.range is None or self.range[0] <= value <= self.range[1]


class OutputSpec(_Strict):
    """Names of the outputs (regression targets, or class labels) and their shape per row.

    Without `shape` the model returns one value per name. With it, a classifier's `names`
    label the axis `class_axis` of `shape` (segmentation [C, H, W]: class_axis 0; per-token
    tags [T, C]: 1) and every summary is per element of the other axes; a regression map's
    `names` label its last axis, or one name labels the whole map.
    """

    names: list[str] = Field(min_length=1)
    heteroscedastic: bool = Field(
        False, description="regression head emits [mean..., log-variance...] (2 x outputs)"
    )
    shape: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, description="the model's output per row; default [len(names)]"
    )
    class_axis: int | None = Field(
        None, description="classification with a shape of several axes: the axis of the classes"
    )

    @model_validator(mode="after")
    def _shape(self) -> OutputSpec:
        shape = self.shape
        if shape is None:
            if self.class_axis is not None:
                raise ValueError("output.class_axis needs output.shape")
            return self
        if self.heteroscedastic and len(shape) > 1:
            raise ValueError("output.heteroscedastic needs a flat output.shape")
        if self.class_axis is not None and not -len(shape) <= self.class_axis < len(shape):
            raise ValueError(f"output.class_axis {self.class_axis} is not an axis of {shape}")
        return self


class NormalizationSpec(_Strict):
    """Affine standardisation: clients send raw features and get answers in raw units."""

    input_mean: list[float] | None = None
    input_std: list[float] | None = None
    target_mean: list[float] | None = None
    target_std: list[float] | None = None

    @model_validator(mode="after")
    def _pairs(self) -> NormalizationSpec:
        for a, b in (("input_mean", "input_std"), ("target_mean", "target_std")):
            if (getattr(self, a) is None) != (getattr(self, b) is None):
                raise ValueError(f"{a} and {b} must be given together")
            std = getattr(self, b)
            if std is not None and any(s <= 0 for s in std):
                raise ValueError(f"{b} must be positive")
            if std is not None and len(std) != len(getattr(self, a)):
                raise ValueError(f"{a} and {b} must have the same length")
        return self


class ArchitectureSpec(_Strict):
    """How to rebuild the network: a built-in architecture, a user factory, or TorchScript."""

    format: Literal["builtin", "entrypoint", "torchscript"]
    architecture: Literal["mlp", "cnn", "fcn"] | None = None
    entrypoint: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    weights: str = Field(
        "weights.safetensors", description="a path inside the model folder (relative, no '..')"
    )
    config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("weights")
    @classmethod
    def _inside_folder(cls, value: str) -> str:
        path = PurePosixPath(value)
        if not value or path.is_absolute() or "\\" in value or ".." in path.parts:
            raise ValueError(f"{value!r} must be a relative path inside the model folder")
        return value

    @model_validator(mode="after")
    def _format_fields(self) -> ArchitectureSpec:
        if self.format == "builtin" and self.architecture is None:
            raise ValueError("format 'builtin' needs 'architecture' (mlp, cnn or fcn)")
        if self.format == "entrypoint" and self.entrypoint is None:
            raise ValueError("format 'entrypoint' needs 'entrypoint' = 'package.module:factory'")
        return self


class MCSpec(_Strict):
    """Monte Carlo defaults and limits for the model."""

    default_samples: int = Field(100, ge=1)
    max_samples: int = Field(100_000, ge=1)
    mask_mode: MaskMode = "independent"
    tolerance: float = Field(0.01, gt=0, description="standard-error target for samples='auto'")
    tau: float | None = Field(
        None, gt=0, description="model precision; aleatoric variance 1/tau in raw target units"
    )
    sample: Literal["all", "last"] | list[str] = Field(
        "all", description="which stochastic ops sample: all, the last, or these site names"
    )
    max_rows: int = Field(1024, ge=1)
    audit: Literal["refuse", "warn", "off"] = Field(
        "refuse",
        description="at load, the engine's variance against the model's own training-mode "
        "passes: refuse a clear shortfall, only warn, or skip the check",
    )
    ignore: list[str] = Field(
        default_factory=list,
        description="module paths whose stochastic training branch stays in eval, not sampled "
        "(e.g. train-only augmentation noise); listed as not sampled in the model's metadata",
    )

    @model_validator(mode="after")
    def _limits(self) -> MCSpec:
        if self.default_samples > self.max_samples:
            raise ValueError("default_samples must not exceed max_samples")
        return self


class BatchingSpec(_Strict):
    """Dynamic batching of concurrent requests (overridable by settings)."""

    max_batch_rows: int = Field(64, ge=1, description="rows merged into one engine call")
    max_batch_delay_ms: float = Field(2.0, ge=0, description="wait for more requests this long")


class RuntimeSpec(_Strict):
    """Where and how the engine runs the model."""

    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compile: bool = False


class ModelSpec(_Strict):
    """Everything a model folder declares about itself."""

    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field("1", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    task: Task
    description: str = ""
    input: InputSpec
    inputs: list[NamedInput] | None = Field(
        None,
        description="several named inputs (the model takes keyword arguments); then "
        "`input` is their packed row, filled in",
    )
    output: OutputSpec
    model: ArchitectureSpec
    normalization: NormalizationSpec = NormalizationSpec()
    mc: MCSpec = MCSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    batching: BatchingSpec = BatchingSpec()

    @model_validator(mode="before")
    @classmethod
    def _packed_input(cls, data: Any) -> Any:
        """With [[inputs]], `input` is their packed row (the engine's one tensor)."""
        if not isinstance(data, dict) or data.get("inputs") is None:
            return data
        if "input" in data:
            raise ValueError("give either [input] or [[inputs]], not both")
        named = data["inputs"]
        if not isinstance(named, list) or not named:
            raise ValueError("inputs must be a non-empty list of tables")
        total = 0
        for item in named:
            shape = item.get("shape") if isinstance(item, dict) else None
            if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
                return data  # the field validators name what is wrong
            total += math.prod(shape)
        return {**data, "input": {"shape": [total]}}

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.inputs is not None:
            names = [item.name for item in self.inputs]
            if len(set(names)) != len(names):
                raise ValueError(f"inputs: names repeat: {names}")
            by_name = {item.name: item for item in self.inputs}
            for item in self.inputs:
                target = by_name.get(item.mask_for or "")
                if item.mask_for is not None and (target is None or target.pad is None
                                                  or target.shape != item.shape):  # fmt: skip
                    raise ValueError(f"inputs '{item.name}': mask_for must name another input "
                                     "of the same shape that has a pad value")  # fmt: skip
            if self.normalization.input_mean is not None:
                raise ValueError("normalization.input_mean applies to a single [input] only")
        if self.task == "classification" and self.output.heteroscedastic:
            raise ValueError("output.heteroscedastic applies only to regression")
        self._output_shape_fits_names()
        n_in = 1
        for d in self.input.shape:
            n_in *= d
        norm = self.normalization
        if norm.input_mean is not None and len(norm.input_mean) not in (
            1,
            n_in,
            self.input.shape[0],
        ):
            raise ValueError(
                f"normalization.input_mean has {len(norm.input_mean)} values; expected 1, "
                f"{self.input.shape[0]} (per channel) or {n_in} (per feature)"
            )
        if norm.target_mean is not None:
            if self.task != "regression":
                raise ValueError("target normalisation applies only to regression")
            if len(norm.target_mean) not in (1, len(self.output.names)):
                raise ValueError(
                    f"normalization.target_mean has {len(norm.target_mean)} values; "
                    f"expected 1 or {len(self.output.names)}"
                )
        return self

    def _output_shape_fits_names(self) -> None:
        out, n = self.output, len(self.output.names)
        shape = out.shape
        if shape is None:
            return
        if self.task == "classification":
            if len(shape) > 1 and out.class_axis is None:
                raise ValueError(f"output.shape {shape} has several axes: say which one holds "
                                 "the classes (output.class_axis)")  # fmt: skip
            axis = out.class_axis or 0
            if shape[axis] != n:
                raise ValueError(f"output.names lists {n} classes but axis {axis} of "
                                 f"output.shape {shape} has {shape[axis]}")  # fmt: skip
        else:
            if out.class_axis is not None:
                raise ValueError("output.class_axis applies only to classification")
            per_name = 2 if out.heteroscedastic else 1
            if len(shape) == 1 and shape[0] != n * per_name:
                raise ValueError(f"output.shape {shape} does not hold {n} output(s)"
                                 + (" x2 (heteroscedastic)" if per_name == 2 else ""))  # fmt: skip
            if len(shape) > 1 and n not in (1, shape[-1]):
                raise ValueError(f"output.names lists {n} names: a map {shape} takes one name, "
                                 f"or {shape[-1]} for its last axis")  # fmt: skip

    @property
    def n_outputs(self) -> int:
        """Outputs per row the client sees (targets, or classes)."""
        return len(self.output.names)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The model's output per row: output.shape, or one value per name (two if
        heteroscedastic)."""
        if self.output.shape is not None:
            return tuple(self.output.shape)
        return (self.n_outputs * (2 if self.output.heteroscedastic else 1),)

    @property
    def is_map(self) -> bool:
        """Whether the output per row has several axes (per-element summaries)."""
        return len(self.output_shape) > 1


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_manifest(path: Path) -> ModelSpec:
    """Parse and validate one manifest; errors name the file, the field and what was expected."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: manifest not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return ModelSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{_field_path(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ModelLoadError(f"{path}: {problems}") from exc
