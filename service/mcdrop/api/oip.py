"""Open Inference Protocol v2 (REST): health, metadata, infer (JSON and binary), repository."""

from __future__ import annotations

from typing import Any

import torch
from fastapi import APIRouter, Depends, Request, Response

from mcdrop import __version__
from mcdrop.api.deps import (
    byte_count,
    deadline,
    model_entry,
    registry_of,
    require_control_token,
    require_inference_token,
    unless_disconnected,
)
from mcdrop.api.errors import ERROR_RESPONSES, error_response
from mcdrop.api.oip_codec import DATATYPES, encode_infer_response, parse_infer_request
from mcdrop.api.outputs import (
    input_metadata,
    output_metadata,
    parse_levels,
    select_outputs,
    summary_outputs,
)
from mcdrop.engine.core import MCOptions
from mcdrop.engine.masks import MASK_STREAM
from mcdrop.errors import InvalidInput
from mcdrop.model import ServedModel
from mcdrop.uncertainty import Summary

router = APIRouter(tags=["open inference protocol"], responses=ERROR_RESPONSES)
HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data", "model_repository", "parameters"]

_PARAMETERS = {"type": "object", "additionalProperties": True}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "examples": ["input"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": list(DATATYPES)},
        "parameters": _PARAMETERS,
        "data": {"type": "array", "description": "row-major values, flat or nested"},
    },
}
# The OIP v2 inference request (JSON part; binary tensors follow it when the
# Inference-Header-Content-Length header says where the JSON ends).
INFER_REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": _PARAMETERS,
                    "inputs": {"type": "array", "minItems": 1, "items": _TENSOR},
                    "outputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {"name": {"type": "string"}, "parameters": _PARAMETERS},
                        },
                    },
                },
            },
            "example": {
                "inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32", "data": [0.5]}],
                "parameters": {"mc_samples": 100, "seed": 7},
            },
        },
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"},
            "description": "JSON header, then raw tensors (binary tensor extension)",
        },
    },
}


@router.get("/v2")
async def server_metadata() -> dict[str, Any]:
    """Server name, version and protocol extensions."""
    return {"name": "mcdrop", "version": __version__, "extensions": EXTENSIONS}


@router.get("/v2/health/live")
async def live() -> dict[str, Any]:
    """The process is up."""
    return {"live": True}


@router.get("/v2/health/ready", response_model=None)
async def ready(request: Request) -> dict[str, Any] | Response:
    """Ready once the repository has been loaded (503 before)."""
    if not registry_of(request).ready:
        return error_response(503, "the model repository is still loading")
    return {"ready": True}


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def model_metadata(name: str, request: Request, version: str | None = None) -> dict[str, Any]:
    """Inputs, every output the model can produce, and its MC defaults."""
    model = registry_of(request).get(name, version).model
    spec = model.spec
    return {
        "name": spec.name,
        "versions": [spec.version],
        "platform": "pytorch_mcdropout",
        "inputs": input_metadata(spec),
        "outputs": output_metadata(spec),
        "parameters": {
            "task": spec.task,
            "mc_samples": spec.mc.default_samples,
            "max_samples": spec.mc.max_samples,
            "mask_mode": spec.mc.mask_mode,
            "mask_stream": MASK_STREAM,
            "max_rows": spec.mc.max_rows,
            "coverage": model.engine.coverage(),
        },
    }


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(name: str, request: Request, version: str | None = None) -> dict[str, Any]:
    """200 when the model (version) is loaded and serving; 404 otherwise."""
    registry_of(request).get(name, version)
    return {"name": name, "ready": True}


def _int_param(params: dict[str, Any], key: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidInput(f"parameter '{key}': expected an integer, got {value!r}")
    try:
        return int(value)
    except ValueError as exc:
        raise InvalidInput(f"parameter '{key}': expected an integer, got {value!r}") from exc


def mc_options(model: ServedModel, params: dict[str, Any]) -> MCOptions:
    """MC options from request parameters (mc_samples, mc_tolerance, seed, mask_mode, ...)."""
    raw_samples = params.get("mc_samples")
    samples = "auto" if raw_samples == "auto" else _int_param(params, "mc_samples")
    tolerance = params.get("mc_tolerance")
    if tolerance is not None and (
        isinstance(tolerance, bool) or not isinstance(tolerance, int | float)
    ):
        raise InvalidInput(f"parameter 'mc_tolerance': expected a number, got {tolerance!r}")
    mask_mode = params.get("mask_mode")
    if mask_mode is not None and mask_mode not in ("independent", "shared"):
        raise InvalidInput(
            f"parameter 'mask_mode': expected 'independent' or 'shared', got {mask_mode!r}"
        )
    try:
        return model.options(
            samples,  # type: ignore[arg-type]
            seed=_int_param(params, "seed"),
            mask_mode=mask_mode,
            tolerance=None if tolerance is None else float(tolerance),
            interval_levels=parse_levels(params.get("interval_levels", 0.95)),
            return_samples=_int_param(params, "return_samples") or 0,
        )
    except InvalidInput as exc:  # name the OIP parameter, not the library's argument
        message = str(exc)
        if message.startswith("samples:"):
            message = "parameter 'mc_samples':" + message.removeprefix("samples:")
        raise type(exc)(message) from exc


@router.post(
    "/v2/models/{name}/infer",
    dependencies=[Depends(require_inference_token)],
    openapi_extra={"requestBody": INFER_REQUEST_BODY},
)
@router.post(
    "/v2/models/{name}/versions/{version}/infer",
    dependencies=[Depends(require_inference_token)],
    openapi_extra={"requestBody": INFER_REQUEST_BODY},
)
async def infer(name: str, request: Request, version: str | None = None) -> Response:
    """MC inference over the rows of the single input tensor 'input', or of the model's
    named inputs (one tensor each, any OIP datatype; optional ones may be left out)."""
    entry = model_entry(request, name, version)
    model = entry.model
    request.state.metric = (name, "oip_infer")  # only known models get series
    header = request.headers.get(HEADER_LENGTH)
    header_length = None if header is None else byte_count(header)
    if header is not None and header_length is None:
        raise InvalidInput(f"{HEADER_LENGTH}: '{header}' is not a byte count")
    parsed = parse_infer_request(await request.body(), header_length)
    if model.spec.inputs is not None:
        named = {t.name: torch.from_numpy(t.data.astype("float64")) for t in parsed.inputs}
        if len(named) != len(parsed.inputs):
            raise InvalidInput(f"inputs: names repeat: {[t.name for t in parsed.inputs]}")
        rows = model.pack_named(named)
    elif len(parsed.inputs) != 1 or parsed.inputs[0].name != "input":
        names = [t.name for t in parsed.inputs]
        raise InvalidInput(f"inputs: this model takes one tensor named 'input', got {names}")
    else:
        rows = torch.from_numpy(parsed.inputs[0].data.astype("float64", copy=False))
    options = mc_options(model, parsed.parameters)
    timeout_us = _int_param(parsed.parameters, "timeout")
    if timeout_us is not None and timeout_us <= 0:
        raise InvalidInput(f"parameter 'timeout': {timeout_us} is not a positive microsecond count")
    limit = deadline(request, None if timeout_us is None else timeout_us / 1000.0)
    work = registry_of(request).infer(entry, rows, options, deadline=limit, version=version)
    answer = await unless_disconnected(request, work)
    summary: Summary = answer.result
    chosen, binary = select_outputs(
        summary_outputs(summary), parsed.outputs, name, parsed.binary_output_default
    )
    params = {"mc_samples": summary.samples_used, "seed": summary.seed, "mask_stream": MASK_STREAM}
    body, headers = encode_infer_response(
        name, answer.model.spec.version, parsed.id, chosen, params, binary
    )
    return Response(body, headers=headers)


@router.post("/v2/repository/index", dependencies=[Depends(require_control_token)])
async def repository_index(request: Request) -> list[dict[str, Any]]:
    """Rescan the repository (loading new and changed models) and list every model."""
    statuses = await registry_of(request).index()
    return [
        {"name": s.name, "version": s.version, "state": s.state, "reason": s.error or ""}
        for s in statuses
    ]


@router.post("/v2/repository/models/{name}/load", dependencies=[Depends(require_control_token)])
async def repository_load(name: str, request: Request) -> dict[str, Any]:
    """(Re)load a model; a failure leaves any serving version in place."""
    await registry_of(request).load(name)
    return {}


@router.post("/v2/repository/models/{name}/unload", dependencies=[Depends(require_control_token)])
async def repository_unload(name: str, request: Request) -> dict[str, Any]:
    """Stop serving a model once its queued requests are done."""
    await registry_of(request).unload(name)
    return {}
