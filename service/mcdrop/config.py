"""Process-wide settings: read once from MCDROP_* environment variables, overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# 1 Mi float32 elements (4 MB) per activation: cache-sized chunks were fastest on UCI-sized
# evaluations and leave the engine benchmark unchanged (docs/engine.md).
DEFAULT_CHUNK_ELEMENTS = 1 << 20

DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0  # compose's stop_grace_period and the pods' grace cover it

DeviceName = Literal["cpu", "cuda", "auto"]


class Settings(BaseSettings):
    """Validated service settings; the only place the environment is read."""

    model_config = SettingsConfigDict(env_prefix="MCDROP_", extra="forbid")

    model_repository: Path = Field(Path("models"), description="one subfolder per model")
    device: DeviceName | None = Field(None, description="overrides every manifest's device")
    chunk_elements: int = Field(
        DEFAULT_CHUNK_ELEMENTS,
        ge=1024,
        description="largest activation (elements) one forward chunk may hold",
    )
    compile: bool | None = Field(None, description="overrides every manifest's compile flag")
    interleave: bool = Field(
        True,
        description="run waiting short requests between the chunks of a long one; "
        "off: strictly in arrival order (cancellation and deadlines apply either way)",
    )

    host: str = Field("127.0.0.1", description="address the HTTP server binds")
    port: int = Field(8000, ge=0, le=65535, description="port the HTTP server binds")
    workers: int = Field(1, ge=1, description="server processes, each with every model loaded")
    shutdown_timeout_s: float = Field(
        DEFAULT_SHUTDOWN_TIMEOUT_S,
        ge=0,
        description="on SIGTERM, in-flight requests get this long; then a 503",
    )
    max_body_bytes: int = Field(16 << 20, ge=1024, description="largest request body accepted")
    queue_size: int = Field(256, ge=1, description="requests waiting per model before 503")
    max_batch_rows: int | None = Field(None, ge=1, description="overrides the manifests' value")
    max_batch_delay_ms: float | None = Field(None, ge=0, description="overrides the manifests'")
    poll_interval_s: float = Field(0.0, ge=0, description="rescan the repository; 0 = never")
    control_token: str | None = Field(
        None,
        description="bearer token for repository control; without one, control answers only "
        "loopback clients of a server bound to loopback",
    )
    inference_token: str | None = Field(None, description="bearer token for inference")
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins")
    shard_workers: int = Field(
        0, ge=0, description="local processes that run large-N requests in shards; 0 = never"
    )
    shard_threshold: int = Field(
        10_000, ge=64, description="requests with more samples than this run in shards across them"
    )
