"""A servable model: manifest + network + engine, answering in the client's raw units."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from mcdrop.config import Settings
from mcdrop.engine.core import MCEngine, MCOptions, MCRequest
from mcdrop.engine.inputs import InputLayout, NamedInputs, pack
from mcdrop.errors import InvalidInput, LimitExceeded, ModelLoadError, NonFiniteOutput
from mcdrop.repository.loading import load_module
from mcdrop.repository.manifest import (
    EXACT_INTEGER,
    INTEGER_DTYPES,
    MANIFEST_NAME,
    ModelSpec,
    NamedInput,
    load_manifest,
)
from mcdrop.uncertainty import NonFinite, Summary, first_non_finite

CANARY_ROWS = 2  # probe rows a new version must answer before it is swapped in
CANARY_SAMPLES = 8
CANARY_SEED = 0
_LISTED = 8  # rows named in a non-finite error before "... and N more"


def _affine(values: list[float] | None, shape: tuple[int, ...], what: str) -> Tensor | None:
    """Normalisation vector shaped to broadcast over one row of `shape`."""
    if values is None:
        return None
    t = torch.tensor(values, dtype=torch.float32)
    if len(values) == 1:
        return t.view((1,) * len(shape))
    if len(values) == math.prod(shape):
        return t.view(shape)
    if len(values) == shape[0]:
        return t.view((shape[0],) + (1,) * (len(shape) - 1))
    raise ModelLoadError(
        f"normalization.{what}: {len(values)} values do not fit shape {list(shape)}"
    )


def _target_affine(values: list[float] | None, spec: ModelSpec) -> Tensor | None:
    """Target normalisation as flat [F] values for the engine: one value, or one per name
    (a map's names label its last axis), broadcast over the output shape."""
    if values is None:
        return None
    shape = spec.output_shape if spec.is_map else (spec.n_outputs,)
    return torch.tensor(values).expand(*shape).reshape(-1)


def _check_outputs(spec: ModelSpec, shape: tuple[int, ...], manifest: Path) -> None:
    """The model returns what the manifest declares per row (output.shape, else one value per
    output name, two if heteroscedastic), or it is refused naming both."""
    expected = spec.output_shape
    if spec.is_map and shape != expected:
        raise ModelLoadError(
            f"{manifest}: output.shape is {list(expected)}, but the model returns {list(shape)} "
            "per row"
        )
    if math.prod(shape) != math.prod(expected):
        what = "class" if spec.task == "classification" else "output"
        heteroscedastic = spec.output.heteroscedastic
        raise ModelLoadError(
            f"{manifest}: output.names lists {spec.n_outputs} {what} name(s)"
            + (" (x2: heteroscedastic means and log-variances)" if heteroscedastic else "")
            + f", but the model returns {list(shape)} per row ({math.prod(shape)} values)"
        )


_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                 "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
                 "bool": torch.bool}  # fmt: skip


def input_layout(spec: ModelSpec) -> list[InputLayout]:
    """The packed row of a model with named inputs, in manifest order."""
    assert spec.inputs is not None
    return [InputLayout(item.name, tuple(item.shape), _TORCH_DTYPES[item.dtype],
                        *(item.range if item.range is not None else (None, None)))
            for item in spec.inputs]  # fmt: skip


def _named_rows(item: NamedInput, value: Tensor | Sequence[Tensor]) -> tuple[Tensor, list[int]]:
    """One named input's rows [B, *shape] (float64), rows shorter on axis 0 padded if allowed,
    and each row's own length on axis 0 (before padding)."""
    rows = list(value) if not isinstance(value, Tensor) else [value[i] for i in range(len(value))]
    shape = tuple(item.shape)
    padded = []
    lengths = []
    for r, row in enumerate(rows):
        row = torch.as_tensor(row, dtype=torch.float64)
        lengths.append(row.shape[0] if row.dim() else 0)
        if row.dim() == len(shape) and item.pad is not None and row.shape[1:] == shape[1:] \
                and row.shape[0] < shape[0]:  # fmt: skip
            fill = torch.full((shape[0] - row.shape[0], *shape[1:]), item.pad, dtype=row.dtype)
            row = torch.cat([row, fill])
        if tuple(row.shape) != shape:
            hint = (
                f" (or shorter on axis 0: padded with {item.pad:g})" if item.pad is not None else ""
            )
            raise InvalidInput(f"inputs '{item.name}': row {r} has shape {list(row.shape)}; "
                               f"expected {list(shape)}{hint}")  # fmt: skip
        padded.append(row)
    values = torch.stack(padded)
    _check_values(item, values)
    return values, lengths


def _check_values(item: NamedInput, values: Tensor) -> None:
    """Every value fits the input's dtype and range, or a 400 names the first that does not."""
    bad = ~torch.isfinite(values)
    what = "finite"
    if item.dtype in INTEGER_DTYPES or item.dtype == "bool":
        bad |= values != values.round()
        what = "an integer" if item.dtype != "bool" else "0 or 1"
        if item.dtype == "bool":
            bad |= (values != 0) & (values != 1)
        else:
            bad |= values.abs() > EXACT_INTEGER
    if item.range is not None:
        bad |= (values < item.range[0]) | (values > item.range[1])
        what += f" in [{item.range[0]:g}, {item.range[1]:g}]"
    if bool(bad.any()):
        index = [int(i) for i in bad.nonzero()[0]]
        raise InvalidInput(f"inputs '{item.name}': value {float(values[tuple(index)]):g} at row "
                           f"{index[0]}, position {index[1:]} is not {what}")  # fmt: skip


@dataclass
class ServedModel:
    """One loaded model version, ready to answer requests from any thread."""

    spec: ModelSpec
    folder: Path
    engine: MCEngine
    input_mean: Tensor | None
    input_std: Tensor | None

    @classmethod
    def load(cls, folder: Path, settings: Settings | None = None) -> ServedModel:
        """Read the manifest, rebuild the network and prepare its engine."""
        settings = settings or Settings()
        spec = load_manifest(folder / MANIFEST_NAME)
        module = load_module(spec, folder)
        if spec.inputs is not None:
            module = NamedInputs(module, input_layout(spec))
        shape = tuple(spec.input.shape)
        norm = spec.normalization
        scale = _target_affine(norm.target_std, spec)
        shift = _target_affine(norm.target_mean, spec)
        try:
            engine = MCEngine(
                module,
                task=spec.task,
                input_shape=shape,
                heteroscedastic=spec.output.heteroscedastic,
                tau=spec.mc.tau,
                sample=spec.mc.sample,
                ignore=spec.mc.ignore,
                audit=spec.mc.audit,
                device=settings.device or spec.runtime.device,
                dtype=spec.runtime.dtype,
                compile=spec.runtime.compile if settings.compile is None else settings.compile,
                chunk_elements=settings.chunk_elements,
                output_scale=scale,
                output_shift=shift,
                class_axis=spec.output.class_axis if spec.task == "classification" else None,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{folder / MANIFEST_NAME}: {exc}") from exc
        _check_outputs(spec, engine.output_shape, folder / MANIFEST_NAME)
        return cls(
            spec=spec,
            folder=folder,
            engine=engine,
            input_mean=_affine(norm.input_mean, shape, "input_mean"),
            input_std=_affine(norm.input_std, shape, "input_std"),
        )

    def options(
        self,
        samples: int | Literal["auto"] | None = None,
        *,
        seed: int | None = None,
        mask_mode: Literal["independent", "shared"] | None = None,
        tolerance: float | None = None,
        interval_levels: tuple[float, ...] = (0.95,),
        return_samples: int = 0,
    ) -> MCOptions:
        """MC options with the manifest's defaults filled in and its limits enforced."""
        mc = self.spec.mc
        n = mc.default_samples if samples is None else samples
        if n != "auto" and n > mc.max_samples:
            raise LimitExceeded(f"samples: {n} is above this model's maximum of {mc.max_samples}")
        if return_samples > mc.max_samples:
            raise LimitExceeded(f"return_samples: {return_samples} is above {mc.max_samples}")
        try:
            return MCOptions(
                samples=n,
                tolerance=mc.tolerance if tolerance is None else tolerance,
                max_samples=mc.max_samples,
                mask_mode=mask_mode or mc.mask_mode,
                seed=seed,
                interval_levels=interval_levels,
                return_samples=return_samples,
            ).validated()
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc

    def pack_named(self, values: Mapping[str, Tensor | Sequence[Tensor]]) -> Tensor:
        """Named inputs ({name: rows [B, *shape], or a list of rows}) -> packed rows [B, F].

        Unknown names, missing required inputs, row counts that differ, shapes and values
        outside the manifest's declaration each get a 400 naming the input.
        """
        named = self.spec.inputs
        if named is None:
            raise InvalidInput("inputs: this model takes one input, not named ones")
        known = [item.name for item in named]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InvalidInput(f"inputs: unknown input(s) {unknown}; this model takes {known}")
        tensors: dict[str, Tensor] = {}
        lengths: dict[str, list[int]] = {}
        for item in named:
            if item.name in values:
                tensors[item.name], lengths[item.name] = _named_rows(item, values[item.name])
            elif item.default is None and (item.mask_for is None or item.mask_for not in values):
                raise InvalidInput(f"inputs: '{item.name}' is required (this model takes {known})")
        counts = {name: len(t) for name, t in tensors.items()}
        if len(set(counts.values())) != 1:
            raise InvalidInput(f"inputs: every input needs the same number of rows, got {counts}")
        rows = next(iter(counts.values()))
        for item in named:
            if item.name in tensors:
                continue
            if item.mask_for is not None and item.mask_for in lengths:  # 1 over values, 0 pads
                own = torch.tensor(lengths[item.mask_for]).view(rows, *([1] * len(item.shape)))
                position = torch.arange(item.shape[0]).view(1, -1, *([1] * (len(item.shape) - 1)))
                tensors[item.name] = (position < own).expand(rows, *item.shape).to(torch.float64)
            else:
                assert item.default is not None
                tensors[item.name] = torch.full((rows, *item.shape), item.default,
                                                dtype=torch.float64)  # fmt: skip
        return pack(input_layout(self.spec), tensors)

    def prepare_input(self, rows: Tensor) -> Tensor:
        """Check raw rows [B, *input.shape] and normalise them for the network."""
        shape = tuple(self.spec.input.shape)
        if rows.dim() == len(shape) and len(shape) == 1 and rows.shape[0] == shape[0]:
            rows = rows.unsqueeze(0)
        if tuple(rows.shape[1:]) != shape or rows.shape[0] == 0:
            expected = ", ".join(map(str, shape))
            raise InvalidInput(f"input: expected shape [rows, {expected}], got {list(rows.shape)}")
        if rows.shape[0] > self.spec.mc.max_rows:
            raise LimitExceeded(f"input: {rows.shape[0]} rows is above this model's maximum of "
                                f"{self.spec.mc.max_rows}")  # fmt: skip
        x = rows.to(torch.float32)
        if not bool(torch.isfinite(x).all()):  # one check covers NaN, inf and float32 overflow
            if not bool(torch.isfinite(rows).all()):
                raise InvalidInput("input: contains NaN or infinite values")
            raise InvalidInput("input: values beyond the float32 range")
        if self.input_mean is not None and self.input_std is not None:
            x = (x - self.input_mean) / self.input_std
        return x

    def request(self, rows: Tensor, options: MCOptions, targets: Tensor | None = None) -> MCRequest:
        """An engine request for raw rows (validated and normalised)."""
        if targets is not None:
            targets = targets.reshape(len(rows), -1).to(torch.float64)
            if targets.shape[1] != self.spec.n_outputs:
                raise InvalidInput(
                    f"targets: expected {self.spec.n_outputs} per row, got {targets.shape[1]}"
                )
            if not bool(torch.isfinite(targets).all()):
                raise InvalidInput("targets: contains NaN or infinite values")
        return MCRequest(self.prepare_input(rows), options, targets)

    def predict(
        self, rows: Tensor, options: MCOptions | None = None, targets: Tensor | None = None
    ) -> Summary:
        """MC summary for raw rows; answers in raw target units."""
        req = self.request(rows, options or self.options(), targets)
        try:
            summary = self.engine.run_many([req])[0]
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        self.check_finite(summary)
        return summary

    def check_finite(self, summary: Summary) -> None:
        """Raise NonFiniteOutput naming the output and rows when the summary holds NaN or inf.

        Bare NaN is not JSON, and a NaN answer is no answer: the caller gets a clear 422 instead.
        """
        found = first_non_finite(summary)
        if found is not None:
            raise NonFiniteOutput(self._non_finite_message(found))

    def _non_finite_message(self, found: NonFinite) -> str:
        """Which output (regression: name and summary field; classification: field) and rows."""
        names = self.spec.output.names
        what = found.field
        if self.spec.task == "regression" and found.columns:
            outputs = [names[c] if c < len(names) else str(c) for c in found.columns]
            what = f"output {', '.join(map(repr, outputs))} ({found.field})"
        rows = ", ".join(map(str, found.rows[:_LISTED]))
        if len(found.rows) > _LISTED:
            rows += f" ... and {len(found.rows) - _LISTED} more"
        return (
            f"model '{self.spec.name}' cannot compute a finite answer for this input: "
            f"{what} is NaN or infinite in rows [{rows}]"
        )

    def canary(self) -> Summary:
        """Predict a probe input and demand a finite answer; ModelLoadError if it fails.

        The probe is the normalisation's input mean (else zeros): a version that cannot answer
        it must never replace a working one.
        """
        shape = tuple(self.spec.input.shape)
        mean = self.input_mean
        probe = torch.zeros(shape) if mean is None else mean.expand(shape)
        n = min(CANARY_ROWS, self.spec.mc.max_rows)
        rows = probe.unsqueeze(0).expand(n, *shape).contiguous()
        if self.spec.inputs is not None:  # a request as a client sends it: required inputs
            rows = self.pack_named({  # at their lowest allowed value, masks from their inputs
                item.name: torch.full((n, *item.shape), 0.0 if item.range is None
                                      else max(item.range[0], min(item.range[1], 0.0)))
                for item in self.spec.inputs if item.default is None and item.mask_for is None
            })  # fmt: skip
        try:
            options = self.options(min(CANARY_SAMPLES, self.spec.mc.max_samples), seed=CANARY_SEED)
            return self.predict(rows, options)
        except Exception as exc:
            raise ModelLoadError(
                f"{self.folder}: the canary prediction on {n} probe rows failed, so this version "
                f"is not served: {type(exc).__name__}: {exc}"
            ) from exc
