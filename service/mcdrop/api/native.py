"""Native JSON API: rows in, one object per row out; evaluation; the model list; live views.

The live views (recent uncertainty, latest calibration) are open like /metrics: they hold
aggregates only, never rows, answers or targets, and run no model. Routes that run a model,
and the model list (it names the repository's folders and their load errors), need the
inference token when one is set.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from mcdrop.api.deps import (
    deadline,
    model_entry,
    registry_of,
    require_inference_token,
    unless_disconnected,
)
from mcdrop.api.errors import ERROR_RESPONSES
from mcdrop.engine.masks import MASK_STREAM
from mcdrop.errors import InvalidInput
from mcdrop.evaluation import evaluate
from mcdrop.model import ServedModel
from mcdrop.render import summary_meta, summary_rows
from mcdrop.serving.registry import ModelStatus
from mcdrop.uncertainty import Summary

router = APIRouter(tags=["native"], responses=ERROR_RESPONSES)
Rows = list[Any]


class MCParameters(BaseModel):
    """Monte Carlo options; omitted ones take the model's defaults."""

    model_config = ConfigDict(extra="forbid")

    samples: int | Literal["auto"] | None = Field(None, description="MC samples, or 'auto'")
    tolerance: float | None = Field(None, gt=0, description="standard-error target for 'auto'")
    seed: int | None = Field(None, ge=0, lt=2**63, description="same seed, same answer")
    mask_mode: Literal["independent", "shared"] | None = None
    interval_levels: list[float] = Field([0.95], description="central interval levels in (0, 1)")
    return_samples: int = Field(0, ge=0, description="raw samples to return per row")
    timeout_ms: float | None = Field(None, gt=0, description="deadline for this request")


class PredictRequest(MCParameters):
    """Rows of raw features: each row has the model's input shape."""

    rows: Rows = Field(min_length=1)

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"rows": [[0.0], [2.5]], "samples": 200, "seed": 7}]},
    )


class PredictResponse(BaseModel):
    """One object per row with the summaries of the model's task."""

    model: str
    version: str
    samples_used: int
    seed: int
    mask_stream: str = Field(description="the mask-stream version that drew the answer")
    predictions: list[dict[str, Any]]


class EvaluateRequest(MCParameters):
    """Rows with their true targets (regression values, or class indices)."""

    rows: Rows = Field(min_length=1)
    targets: list[Any] = Field(min_length=1)

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"rows": [[1.5], [-2.0]], "targets": [1.2, -0.4]}]},
    )


class ModelInfo(BaseModel):
    """A model of the repository: its state, and its limits when loaded."""

    name: str
    state: str
    version: str | None = None
    task: str | None = None
    input_shape: list[int] | None = None
    input_names: list[str] | None = None
    training_ranges: list[tuple[float, float]] | None = None
    description: str | None = None
    outputs: list[str] | None = None
    output_shape: list[int] | None = Field(
        None, description="the model's output per row; several axes: a map, answered per element"
    )
    class_axis: int | None = Field(None, description="a classifier map: the axis of its classes")
    default_samples: int | None = None
    max_samples: int | None = None
    max_rows: int | None = None
    mask_mode: str | None = None
    mask_stream: str | None = Field(
        None, description="the mask-stream version: (seed, mask_stream) reproduces an answer"
    )
    coverage: dict[str, Any] | None = Field(
        None, description="stochastic ops sampled and not sampled (with why), how it runs"
    )
    error: str | None = None


def _tensor(values: Rows, field: str) -> torch.Tensor:
    try:
        return torch.tensor(values, dtype=torch.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{field}: must be a rectangular array of numbers ({exc})") from exc


def _rows(model: ServedModel, rows: Rows) -> torch.Tensor:
    """Rows of the single input, or (a model with named inputs) objects keyed by input name."""
    if model.spec.inputs is None:
        return _tensor(rows, "rows")
    if not all(isinstance(row, dict) for row in rows):
        known = [item.name for item in model.spec.inputs]
        raise InvalidInput(f"rows: this model takes named inputs: send objects keyed by {known}")
    values = {}
    for name in sorted({name for row in rows for name in row}):
        missing = [r for r, row in enumerate(rows) if name not in row]
        if missing:
            raise InvalidInput(f"rows: input '{name}' is missing from rows {missing[:8]}")
        values[name] = [_tensor(row[name], f"rows[{r}].{name}") for r, row in enumerate(rows)]
    return model.pack_named(values)


def _options(model: ServedModel, body: MCParameters) -> Any:
    return model.options(
        body.samples,
        seed=body.seed,
        mask_mode=body.mask_mode,
        tolerance=body.tolerance,
        interval_levels=tuple(body.interval_levels),
        return_samples=body.return_samples,
    )


@router.post(
    "/v1/models/{name}/predict",
    dependencies=[Depends(require_inference_token)],
    response_model=PredictResponse,
)
async def predict(name: str, body: PredictRequest, request: Request) -> Response:
    """MC prediction: mean and uncertainty per row, in the model's raw units."""
    entry = model_entry(request, name)
    request.state.metric = (name, "predict")  # only known models get series
    rows = _rows(entry.model, body.rows)
    work = registry_of(request).infer(entry, rows, _options(entry.model, body),
                                      deadline=deadline(request, body.timeout_ms))  # fmt: skip
    answer = await unless_disconnected(request, work)
    summary: Summary = answer.result
    spec = answer.model.spec  # the version that computed it (a swap may have passed it on)
    document = {"model": name, "version": spec.version, **summary_meta(summary),
                "predictions": summary_rows(summary, spec)}  # fmt: skip
    # Built by hand: validating the response model again would cost more than the engine.
    return Response(json.dumps(document, allow_nan=False), media_type="application/json")


@router.post("/v1/models/{name}/evaluate", dependencies=[Depends(require_inference_token)])
async def evaluate_model(name: str, body: EvaluateRequest, request: Request) -> dict[str, Any]:
    """Score the model on rows with known targets: the metrics of `mcdrop evaluate`."""
    entry = model_entry(request, name)
    model, recent = entry.model, entry.recent
    request.state.metric = (name, "evaluate")
    rows, targets = _tensor(body.rows, "rows"), _tensor(body.targets, "targets")
    if len(rows) != len(targets):
        raise InvalidInput(f"targets: {len(targets)} given for {len(rows)} rows")
    options = _options(model, body)
    work = registry_of(request).call(
        entry, lambda m: evaluate(m, rows, targets, options).as_dict(),
        deadline(request, body.timeout_ms))  # fmt: skip
    report: dict[str, Any] = (await unless_disconnected(request, work)).result
    recent.record_calibration(report)  # kept for GET .../calibration (live view)
    return report


def model_info(status: ModelStatus) -> ModelInfo:
    """The public description of one repository entry."""
    spec = status.spec
    if spec is None:
        return ModelInfo(name=status.name, state=status.state, error=status.error)
    return ModelInfo(
        name=status.name,
        state=status.state,
        version=spec.version,
        task=spec.task,
        input_shape=list(spec.input.shape),
        input_names=spec.input.names,
        training_ranges=spec.input.training_ranges,
        description=spec.description,
        outputs=list(spec.output.names),
        output_shape=list(spec.output_shape),
        class_axis=spec.output.class_axis,
        default_samples=spec.mc.default_samples,
        max_samples=spec.mc.max_samples,
        max_rows=spec.mc.max_rows,
        mask_mode=spec.mc.mask_mode,
        mask_stream=MASK_STREAM,
        coverage=status.coverage,
        error=status.error,
    )


@router.get("/v1/models", dependencies=[Depends(require_inference_token)])
async def list_models(request: Request) -> list[ModelInfo]:
    """Every model of the repository with its version, task, state, limits and last error.

    Errors name files relative to the repository; the list needs the inference token if set.
    """
    return [model_info(s) for s in registry_of(request).statuses()]


@router.get("/v1/models/{name}/recent")
async def recent_uncertainty(
    name: str,
    request: Request,
    since: Annotated[
        float | None,
        Query(ge=0, allow_inf_nan=False, description="only entries after this unix time (s)"),
    ] = None,
    limit: Annotated[int | None, Query(ge=1, description="at most the newest n entries")] = None,
) -> dict[str, Any]:
    """The uncertainty of the model's recent answered inferences (native and OIP; evaluations
    are not traffic), oldest first; kept across new versions, dropped when it is unloaded."""
    recent = registry_of(request).get(name).recent
    return {
        "model": name,
        "task": recent.task,
        "capacity": recent.capacity,
        "entries": recent.snapshot(since, limit),
    }


@router.get("/v1/models/{name}/calibration")
async def latest_calibration(name: str, request: Request) -> dict[str, Any]:
    """The latest report of POST /v1/models/{name}/evaluate and when it was made (unix s).

    Before any evaluation: time and report are null (a 200: a dashboard polling it is not an
    error); an unknown model is still a 404.
    """
    latest = registry_of(request).get(name).recent.latest_calibration
    if latest is None:
        return {"model": name, "time": None, "report": None}
    return {"model": name, **latest}
