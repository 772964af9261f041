"""Request plumbing shared by the routers: auth, deadlines, disconnects, the registry."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import secrets
import time
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from mcdrop.config import Settings
from mcdrop.errors import ClientGone, Forbidden, InvalidInput, Unauthorized
from mcdrop.serving.registry import ModelEntry, ModelRegistry

T = TypeVar("T")
TIMEOUT_HEADER = "x-request-timeout-ms"


MODEL_ENTRY = "model_entry"  # request.state key: the entry the gate looked up for this request


def model_entry(request: Request, name: str, version: str | None = None) -> ModelEntry:
    """The request's model, looked up once: the gate's lookup when it made one, else now."""
    entry: ModelEntry | None = getattr(request.state, MODEL_ENTRY, None)
    if entry is None or entry.model.spec.name != name:
        return registry_of(request).get(name, version)
    if version is not None and version != entry.model.spec.version:
        return registry_of(request).get(name, version)  # raises, naming what is served
    return entry


def registry_of(request: Request) -> ModelRegistry:
    """The app's model registry."""
    registry: ModelRegistry = request.app.state.registry
    return registry


def check_token(authorization: str | None, expected: str | None, what: str) -> None:
    """Unauthorized unless `authorization` is 'Bearer <expected>' (nothing to check if None)."""
    if expected is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        raise Unauthorized(f"{what} needs 'Authorization: Bearer <token>'")


def byte_count(text: str) -> int | None:
    """A header's non-negative decimal integer, or None (str.isdigit alone accepts '²')."""
    return int(text) if text.isascii() and text.isdigit() else None


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def require_inference_token(request: Request) -> None:
    """Dependency: inference endpoints, when MCDROP_INFERENCE_TOKEN is set."""
    settings: Settings = request.app.state.settings
    check_token(request.headers.get("authorization"), settings.inference_token, "inference")


def require_control_token(request: Request) -> None:
    """Dependency: repository control needs MCDROP_CONTROL_TOKEN, or loopback on both ends.

    Without a token, control answers only when the server listens on loopback and the peer
    is a loopback address: no unauthenticated caller from the network can ever index, load
    or unload (docs/security.md).
    """
    settings: Settings = request.app.state.settings
    if settings.control_token is not None:
        check_token(request.headers.get("authorization"), settings.control_token,
                    "repository control")  # fmt: skip
        return
    enable = "set MCDROP_CONTROL_TOKEN and send 'Authorization: Bearer <token>' to enable it"
    if not is_loopback(settings.host):
        raise Forbidden(
            f"repository control is off: the server listens on {settings.host}, beyond "
            f"loopback, and has no control token; {enable}"
        )
    peer = request.client.host if request.client is not None else None
    if peer is not None and _is_ip(peer) and not is_loopback(peer):
        raise Forbidden(f"repository control without a token is for loopback clients; {enable}")


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
    if not 0 < timeout_ms < math.inf:
        raise InvalidInput(f"timeout must be a finite positive millisecond count, got {timeout_ms}")
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
