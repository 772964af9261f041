"""One place that turns errors into the protocol's error body: {"error": "..."} with a status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from mcdrop.errors import ServiceError

log = logging.getLogger(__name__)
RETRY_AFTER_S = "1"


class ErrorBody(BaseModel):
    """The body of every error response, whatever the route or protocol."""

    error: str = Field(description="what went wrong, naming the field, input or model")


def _documented(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


# The error statuses any route may answer, documented once for every router's OpenAPI entry.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _documented("malformed request, invalid model name, or a model that failed to load"),
    401: _documented("a bearer token is required and was missing or wrong"),
    403: _documented("repository control is off for this caller (see docs/security.md)"),
    404: _documented("no such model, version, or report"),
    413: _documented("the body is larger than the model's or the server's limit"),
    422: _documented("a field is out of range, or the model cannot give a finite answer"),
    503: _documented("queue full, repository loading, or server shutting down (Retry-After)"),
    504: _documented("the request's deadline passed"),
    500: _documented("an unexpected failure (logged by the server, never with its details)"),
}


def error_response(status: int, message: str) -> JSONResponse:
    """The error body every endpoint uses."""
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _field(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    """Service errors keep their status; validation errors name the field; the rest is a 500."""

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status_code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        broken = [e for e in errors if e.get("type") == "json_invalid"]
        if broken:  # not JSON at all: a malformed request, not an out-of-range field
            where = broken[0]["loc"][-1] if broken[0].get("loc") else "?"
            detail = broken[0].get("ctx", {}).get("error", broken[0]["msg"])
            return error_response(400, f"malformed JSON at character {where}: {detail}")
        problems = "; ".join(f"{_field(tuple(e['loc']))}: {e['msg']}" for e in errors)
        return error_response(422, problems)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _: ClientDisconnect) -> JSONResponse:
        # Nobody reads this answer; an ordinary event, not a server fault worth a traceback.
        log.info("client left before sending the whole body of %s %s", request.method,
                 request.url.path)  # fmt: skip
        return error_response(400, "the client disconnected before sending the whole body")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error")
