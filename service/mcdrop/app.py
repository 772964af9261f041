"""create_app(settings): the FastAPI application; its lifespan loads and drains the repository."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from mcdrop import __version__
from mcdrop.api import admin, dashboard, native, oip
from mcdrop.api.errors import install_error_handlers
from mcdrop.api.gate import RequestGate
from mcdrop.api.middleware import CancelledAsUnavailable, RequestMetrics
from mcdrop.config import Settings
from mcdrop.serving.metrics import Metrics
from mcdrop.serving.registry import ModelRegistry
from mcdrop.shards.executor import ShardExecutor


def create_app(
    settings: Settings | None = None, *, shard_executor: ShardExecutor | None = None
) -> FastAPI:
    """A new application over settings.model_repository; nothing loads until startup.

    shard_executor runs large-N requests in shards (e.g. Ray actors); without one, the
    settings' shard_workers start local processes, or nothing is sharded.
    """
    settings = settings or Settings()
    metrics = Metrics()
    registry = ModelRegistry(settings, metrics, shard_executor)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        # Everything loaded so far lives as long as the process: keep it out of the garbage
        # collector's full scans, which otherwise stall every request for ~250 ms at a time.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await registry.close()

    app = FastAPI(
        title="mcdrop",
        version=__version__,
        summary="Monte Carlo dropout predictions with their uncertainty.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.registry = registry
    install_error_handlers(app)
    app.include_router(oip.router)
    app.include_router(native.router)
    app.include_router(admin.router)
    app.include_router(dashboard.router)
    # The last added runs first: CORS headers on every answer, then a 503 for requests cut at
    # shutdown, then the gate (token, model, body cap) before anything reads a body.
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(RequestGate, settings=settings, registry=registry)
    app.add_middleware(CancelledAsUnavailable)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    return app
