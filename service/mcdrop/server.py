"""Run the HTTP service with uvicorn; SIGTERM stops accepting, drains in-flight work, then exits."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Any

import uvicorn

from mcdrop.api.deps import is_loopback
from mcdrop.app import create_app
from mcdrop.config import Settings


def urls(settings: Settings) -> dict[str, str]:
    """Where a person finds the API docs and the health endpoint."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"http://{host}:{settings.port}"
    return {"api": base, "docs": f"{base}/docs", "health": f"{base}/v2/health/ready",
            "metrics": f"{base}/metrics", "dashboard": f"{base}/dashboard"}  # fmt: skip


def serve(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests finish before the process exits."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    where = urls(settings)
    print(
        f"mcdrop: serving {settings.model_repository} on {where['api']}\n"
        f"  dashboard: {where['dashboard']}\n  API docs:  {where['docs']}\n"
        f"  health:    {where['health']}\n  metrics:   {where['metrics']}\n"
        f"  control:   {control_state(settings)}",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn re-raises the signal it caught once it has drained; a no-op handler turns that
    # into a clean exit 0 after the graceful shutdown.
    signal.signal(signal.SIGTERM, lambda *_: None)
    common: dict[str, Any] = {"host": settings.host, "port": settings.port, "log_level": "info",
              "timeout_graceful_shutdown": settings.shutdown_timeout_s}  # fmt: skip
    if settings.workers == 1:
        uvicorn.Server(uvicorn.Config(create_app(settings), **common)).run()
        return
    # Worker processes build their own app from the environment: hand them these settings.
    os.environ.update(settings_environment(settings))
    uvicorn.run("mcdrop.app:create_app", factory=True, workers=settings.workers, **common)


def control_state(settings: Settings) -> str:
    """How repository control (index, load, unload) is reachable, for the start-up banner."""
    if settings.control_token is not None:
        return "needs the control token (Authorization: Bearer)"
    if is_loopback(settings.host):
        return "open to loopback clients (no MCDROP_CONTROL_TOKEN)"
    return "off: listening beyond loopback without MCDROP_CONTROL_TOKEN (docs/security.md)"


def settings_environment(settings: Settings) -> dict[str, str]:
    """MCDROP_* variables that rebuild exactly these settings in another process."""
    env = {}
    for name, value in settings.model_dump(exclude_none=True).items():
        text = json.dumps(value) if isinstance(value, list | bool) else str(value)
        env[f"MCDROP_{name.upper()}"] = text
    return env
