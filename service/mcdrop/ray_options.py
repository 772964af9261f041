"""How the service runs on Ray Serve: replicas, their resources, autoscaling, the cluster.

Pure configuration (no Ray import): validated here so that `mcdrop serve --ray` and KubeRay's
application arguments fail early with the field that is wrong, on machines without Ray too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mcdrop.config import Settings

APP_NAME = "mcdrop"
DEPLOYMENT_NAME = "mcdrop"
RAY_MISSING = "Ray Serve is not installed: pip install '.[ray]'"


class Autoscaling(BaseModel):
    """Replica bounds for Ray Serve's autoscaler, and the load per replica it aims at."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="replicas kept when idle (0: scale to zero)")
    max_replicas: int = Field(..., ge=1, description="most replicas under load")
    # Each replica merges concurrent requests into one engine call: a few in flight each is
    # what batching wants, so aim higher than Ray's default of 2.
    target_ongoing_requests: float = Field(8.0, gt=0, description="requests per replica")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> Self:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        return self

    @classmethod
    def parse(cls, text: str) -> Autoscaling:
        """`MIN:MAX` (e.g. "1:4") as given to `--autoscale`."""
        low, sep, high = text.partition(":")
        if not sep or not low.strip().isdigit() or not high.strip().isdigit():
            raise ValueError(f"autoscale: expected MIN:MAX replicas such as 1:4, got {text!r}")
        return cls(min_replicas=int(low), max_replicas=int(high))


class RayOptions(BaseModel):
    """Where and how many replicas of the app run; each replica loads every model itself."""

    model_config = ConfigDict(extra="forbid")

    replicas: int | None = Field(None, ge=1, description="fixed replica count (default 1)")
    autoscaling: Autoscaling | None = Field(None, description="instead of a fixed count")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica (fractions ok)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica (fractions ok)")
    max_ongoing_requests: int = Field(
        64, ge=1, description="requests one replica takes at once (its batching needs several)"
    )
    address: str | None = Field(None, description="an existing cluster ('auto', HOST:PORT)")
    shard_actors: int = Field(
        0, ge=0, description="Ray actors per replica that run large-N requests in shards; 0 = none"
    )
    shard_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per shard actor")

    @model_validator(mode="before")
    @classmethod
    def _autoscaling_text(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("autoscaling"), str):
            return {**data, "autoscaling": Autoscaling.parse(data["autoscaling"])}
        return data

    @model_validator(mode="after")
    def _count_or_autoscaling(self) -> Self:
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("give either replicas or autoscaling, not both")
        return self

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of `serve.deployment(...)` for the app's replicas."""
        options: dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            options["num_replicas"] = self.replicas or 1
        return options


def settings_and_options(args: Mapping[str, Any]) -> tuple[Settings, RayOptions]:
    """A Ray Serve application's `args` -> (the service's Settings, the Ray options).

    Keys of RayOptions go there, every other key is a Settings field (model_repository,
    device, max_batch_rows, ...); an unknown key is an error naming it.
    """
    ray_keys = set(RayOptions.model_fields)
    unknown = sorted(set(args) - ray_keys - set(Settings.model_fields))
    if unknown:
        known = ", ".join(sorted(ray_keys | set(Settings.model_fields)))
        raise ValueError(f"unknown application argument(s) {', '.join(unknown)}; known: {known}")
    options = RayOptions.model_validate({k: v for k, v in args.items() if k in ray_keys})
    settings = Settings(**{k: v for k, v in args.items() if k not in ray_keys})
    return settings, options
