"""Request plumbing shared by the routers: auth, deadlines, disconnects, the registry."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from service.config import Settings
from service.errors import ClientGone, InvalidInput, Unauthorized
from service.registry import ModelRegistry

T = TypeVar("T")
TIMEOUT_HEADER = "x-request-timeout-ms"


def registry_of(request: Request) -> ModelRegistry:
    """The app's model registry."""
    registry: ModelRegistry = request.app.state.registry
    return registry


def _check_token(request: Request, expected: str | None, what: str) -> None:
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), expected):
        raise Unauthorized(f"{what} needs 'Authorization: Bearer <token>'")


def require_inference_token(request: Request) -> None:
    """Dependency: inference endpoints, when MCDROP_INFERENCE_TOKEN is set."""
    settings: Settings = request.app.state.settings
    _check_token(request, settings.inference_token, "inference")


def require_control_token(request: Request) -> None:
    """Dependency: repository control endpoints, when MCDROP_CONTROL_TOKEN is set."""
    settings: Settings = request.app.state.settings
    _check_token(request, settings.control_token, "repository control")


def deadline(request: Request, timeout_ms: float | None = None) -> float | None:
    """Monotonic deadline from a timeout (ms) or the X-Request-Timeout-Ms header."""
    header = request.headers.get(TIMEOUT_HEADER)
    if timeout_ms is None and header is not None:
        try:
            timeout_ms = float(header)
        except ValueError as exc:
            raise InvalidInput(f"header {TIMEOUT_HEADER}: '{header}' is not a number") from exc
    if timeout_ms is None:
        return None
    if not timeout_ms > 0:
        raise InvalidInput(f"timeout must be positive milliseconds, got {timeout_ms}")
    return time.monotonic() + timeout_ms / 1000.0


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (so queued work is dropped) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientGone("the client disconnected")


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
