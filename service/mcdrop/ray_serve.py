"""The same FastAPI app served as Ray Serve replicas behind Ray's HTTP proxy (`serve --ray`).

Each replica builds `create_app(settings)` itself (its lifespan loads every model there), so
every endpoint answers as under uvicorn. `build_app` is the application builder that KubeRay's
RayService imports as `mcdrop.ray_serve:build_app`. Needs the `ray` extra.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from mcdrop.app import create_app
from mcdrop.config import Settings
from mcdrop.ray_options import APP_NAME, RayOptions, settings_and_options
from mcdrop.server import urls
from mcdrop.shards.ray_actors import RayShardExecutor


class McdropReplica:
    """One replica: the whole service (models, batching queues, metrics) in a Ray actor."""

    def __init__(self, settings: dict[str, Any], shard_actors: int, shard_num_cpus: float) -> None:
        self._settings = Settings(**settings)
        self._shards = (shard_actors, shard_num_cpus)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this inside the replica, then runs the app's lifespan there."""
        actors, num_cpus = self._shards
        executor = None  # large-N requests in shards on Ray actors instead of local processes
        if actors:
            executor = RayShardExecutor(actors, self._settings, num_cpus=num_cpus)
        return create_app(self._settings, shard_executor=executor)


def application(settings: Settings, options: RayOptions) -> Application:
    """The Serve application: replicas of create_app(settings) as `options` ask."""
    deployment = serve.deployment(**options.deployment_options())(serve.ingress()(McdropReplica))
    # Plain JSON values cross to the replicas; each rebuilds (and revalidates) its Settings.
    values = settings.model_dump(mode="json", exclude_none=True)
    return deployment.bind(values, options.shard_actors, options.shard_num_cpus)


def build_app(args: Mapping[str, Any]) -> Application:
    """KubeRay / `serve run` builder: args are Settings fields plus RayOptions fields.

    e.g. {"model_repository": "/models", "replicas": 2, "num_cpus": 0.5, "num_gpus": 0} or
    {"autoscaling": "1:4"}; an unknown or invalid argument is an error naming it. The
    cluster's proxy, not these settings, decides where the app listens, so `host` defaults to
    0.0.0.0 here: repository control then needs a control token (docs/security.md).
    """
    settings, options = settings_and_options({"host": "0.0.0.0", **args})
    if options.address is not None:
        raise ValueError("address: not an application argument (the cluster is already chosen)")
    return application(settings, options)


def connect(
    address: str | None,
    num_cpus: int | None = None,
    object_store_bytes: int | None = None,
    log_to_driver: bool = True,
) -> None:
    """Join the cluster at `address`, or start a local one with no dashboard and no usage stats.

    num_cpus and object_store_bytes size a local cluster (Ray's defaults: every core, and 30%
    of memory for objects); log_to_driver echoes the replicas' logs here (on stdout).
    """
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # read by the Ray processes ray.init starts
    if address is not None:
        ray.init(address=address, configure_logging=False, log_to_driver=log_to_driver)
        return
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=object_store_bytes,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=log_to_driver,
    )


def start_proxy(host: str, port: int) -> tuple[str, int]:
    """Start Serve with its HTTP proxy on host:port; where the proxy really listens.

    On a cluster whose Serve already runs, Ray keeps the proxy it has: its address is returned.
    """
    serve.start(http_options={"host": host, "port": port})
    try:
        from ray.serve.context import _get_global_client

        config = _get_global_client().http_config
        return str(config.host), int(config.port)
    except (ImportError, AttributeError):  # a Ray without this private helper: trust the ask
        return host, port


def run(settings: Settings, options: RayOptions) -> None:
    """`mcdrop serve --ray`: deploy, print where, serve until SIGTERM/SIGINT, then take it down."""
    connect(options.address)
    # Ours, not Ray's crash handler (which aborts): SIGTERM while deploying stops cleanly too.
    # SIGINT stays a KeyboardInterrupt, which the finally below turns into the same clean-up.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    host, port = start_proxy(settings.host, settings.port)
    try:
        serve.run(application(settings, options), name=APP_NAME, route_prefix="/")
        where = urls(settings.model_copy(update={"host": host, "port": port}))
        scaling = options.autoscaling
        count = (
            f"{options.replicas or 1} replica(s)"
            if scaling is None
            else f"{scaling.min_replicas} to {scaling.max_replicas} replicas, autoscaled"
        )
        print(
            f"mcdrop: serving {settings.model_repository} with Ray Serve ({count}, "
            f"{options.num_cpus:g} CPU and {options.num_gpus:g} GPU each) on {where['api']}\n"
            f"  dashboard: {where['dashboard']}\n  API docs:  {where['docs']}\n"
            f"  health:    {where['health']}\n  metrics:   {where['metrics']} (one replica's)",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(1.0):
            pass
    finally:
        if options.address is None:
            serve.shutdown()  # our own local cluster: nothing else runs on it
        else:
            serve.delete(APP_NAME)  # a shared cluster: remove only our application
        ray.shutdown()
