"""ASGI middleware: answers for requests cancelled at shutdown, per-request metrics (pure ASGI)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcdrop.api.errors import error_response
from mcdrop.serving.metrics import Metrics

log = logging.getLogger(__name__)


class CancelledAsUnavailable:
    """A request the server cancels (its shutdown window closed) gets a 503 JSON error.

    uvicorn cancels requests still running when `timeout_graceful_shutdown` ends and answers
    them with a bare text 500; the client should instead learn it may retry elsewhere.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except asyncio.CancelledError:
            if started:
                raise
            log.warning("answering %s %s with 503: cancelled at shutdown", scope["method"],
                        scope["path"])  # fmt: skip
            message = "the server shut down before this request finished; retry"
            await error_response(503, message)(scope, receive, send)


class RequestMetrics:
    """Count and time every request that an endpoint labelled with request.state.metric."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording)
        finally:
            label: Any = scope.get("state", {}).get("metric")
            if label is not None:
                model, endpoint = label
                self.metrics.observe_request(
                    model, endpoint, str(status), time.perf_counter() - start
                )
