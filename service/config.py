"""Process-wide settings: read once from MCDROP_* environment variables, overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DeviceName = Literal["cpu", "cuda", "auto"]


class Settings(BaseSettings):
    """Validated service settings; the only place the environment is read."""

    model_config = SettingsConfigDict(env_prefix="MCDROP_", extra="forbid")

    model_repository: Path = Field(Path("models"), description="one subfolder per model")
    device: DeviceName | None = Field(None, description="overrides every manifest's device")
    chunk_elements: int = Field(
        1 << 24, ge=1024, description="largest activation (elements) one forward chunk may hold"
    )
    compile: bool | None = Field(None, description="overrides every manifest's compile flag")
