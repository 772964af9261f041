"""ASGI gate in front of the routers: token, model and size are checked before the body is read.

An inference request is refused (401 token, 400/404 model name, 413 size) before any byte of
its body is read, so an unauthenticated or oversized body costs a header parse, not a JSON
parse. The body cap of an inference route follows its model (max_rows x values per row, at a
generous JSON width per value), which bounds parsing memory by what the model can accept;
other routes have the server's max_body_bytes. Caps hold while streaming (chunked bodies).
"""

from __future__ import annotations

import math
import re

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcdrop.api.deps import MODEL_ENTRY, byte_count, check_token
from mcdrop.api.errors import error_response
from mcdrop.config import Settings
from mcdrop.errors import ServiceError
from mcdrop.repository.manifest import ModelSpec
from mcdrop.serving.registry import ModelRegistry

# POST routes that run a model: the model name is the path's third segment.
INFERENCE_PATH = re.compile(
    r"^/(?:v1/models/(?P<v1>[^/]+)/(?:predict|evaluate)"
    r"|v2/models/(?P<v2>[^/]+)(?:/versions/[^/]+)?/infer)$"
)
# Widest JSON number a client plausibly sends ("-1.2345678901234567e-05") with its separator
# and a line of pretty-printing indentation (indent=4, seven levels deep as OIP nests rows);
# binary tensors (8 bytes a value at most) fit well within it.
JSON_BYTES_PER_VALUE = 64
ENVELOPE_BYTES = 64 << 10  # parameters, output lists, ids, headers of binary requests


def body_budget(spec: ModelSpec) -> int:
    """Largest body a request to this model needs: max_rows of inputs and of targets."""
    targets = math.prod(spec.output_shape) if spec.is_map else spec.n_outputs
    per_row = math.prod(spec.input.shape) + targets
    return ENVELOPE_BYTES + spec.mc.max_rows * per_row * JSON_BYTES_PER_VALUE


class BodyTooLarge(HTTPException):
    """The body passed its cap while streaming (an HTTPException, so body parsers re-raise it)."""

    def __init__(self, limit: int, why: str) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes{why}")


class RequestGate:
    """Authenticate and route inference requests, and cap every body, before the app reads it."""

    def __init__(self, app: ASGIApp, settings: Settings, registry: ModelRegistry) -> None:
        self.app = app
        self.settings = settings
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        limit, why = self.settings.max_body_bytes, ""
        match = INFERENCE_PATH.match(scope["path"]) if scope["method"] == "POST" else None
        if match is not None:
            try:
                check_token(headers.get("authorization"), self.settings.inference_token,
                            "inference")  # fmt: skip
                entry = self.registry.get(match["v1"] or match["v2"])
            except ServiceError as exc:
                await error_response(exc.status_code, str(exc))(scope, receive, send)
                return
            scope.setdefault("state", {})[MODEL_ENTRY] = entry  # the request's one lookup
            spec = entry.model.spec
            budget = body_budget(spec)
            if budget < limit:
                limit = budget
                why = f" of model '{spec.name}' ({spec.mc.max_rows} rows at most)"
        declared = headers.get("content-length")
        size = None if declared is None else byte_count(declared)
        if declared is not None and size is None:
            message = f"content-length: {declared!r} is not a byte count"
            await error_response(400, message)(scope, receive, send)
            return
        if size is not None and size > limit:
            await error_response(413, str(BodyTooLarge(limit, why).detail))(scope, receive, send)
            return
        await self.app(scope, _capped(receive, limit, why), send)


def _capped(receive: Receive, limit: int, why: str) -> Receive:
    """`receive` that raises BodyTooLarge once the body passes `limit` bytes."""
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise BodyTooLarge(limit, why)
        return message

    return counted
