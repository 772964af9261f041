"""Write a trained network as a complete model folder: model.toml + weights.safetensors.

The folder is staged beside its destination and read back through the same loader the
server uses before it replaces anything, so a folder that would not serve is never left.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mcdrop.repository.loading import load_module, save_weights
from mcdrop.repository.manifest import MANIFEST_NAME, ModelSpec, load_manifest
from mcdrop.training.recipe import TrainConfig, TrainedModel


def write_model_folder(
    folder: Path,
    name: str,
    trained: TrainedModel,
    *,
    task: Literal["regression", "classification"] | None = None,
    input_shape: Sequence[int],
    output_names: Sequence[str],
    architecture: str | None = None,
    config: Mapping[str, Any] | None = None,
    input_names: Sequence[str] | None = None,
    training_ranges: Sequence[tuple[float, float]] | None = None,
    description: str = "",
    version: str = "1",
    mc: Mapping[str, Any] | None = None,
    runtime: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete built-in model folder (model.toml + weights.safetensors); returns it.

    architecture/config default to what the trainer recorded (the MLP's constructor kwargs);
    mc overrides the written MC section (default_samples 100, tau for a homoscedastic
    regressor). Both files are first written to a staging folder beside it and read back
    through load_manifest and load_module; only when that reproduces the trained weights bit
    for bit do they replace the folder's files, so a folder that would not serve is never left.
    """
    folder = Path(folder)
    regression = isinstance(trained.config, TrainConfig)
    task = task or ("regression" if regression else "classification")
    architecture = architecture or trained.architecture
    if architecture is None:
        raise ValueError("architecture: the trainer recorded none; pass 'mlp' or 'cnn'")
    arch_config = dict(config if config is not None else trained.architecture_config)
    heteroscedastic = isinstance(trained.config, TrainConfig) and trained.config.heteroscedastic

    normalization: dict[str, Any] = {
        "input_mean": trained.input_mean.tolist(),
        "input_std": trained.input_std.tolist(),
    }
    if trained.target_mean is not None and trained.target_std is not None:
        normalization["target_mean"] = trained.target_mean.tolist()
        normalization["target_std"] = trained.target_std.tolist()
    mc_section: dict[str, Any] = {"default_samples": 100}
    if isinstance(trained.config, TrainConfig) and not heteroscedastic:
        mc_section["tau"] = trained.config.tau
    mc_section.update(mc or {})
    input_section: dict[str, Any] = {"shape": list(input_shape), "dtype": "float32"}
    if input_names is not None:
        input_section["names"] = list(input_names)
    if training_ranges is not None:
        input_section["training_ranges"] = [list(r) for r in training_ranges]
    document: dict[str, Any] = {
        "name": name,
        "version": version,
        "task": task,
        "description": description,
        "input": input_section,
        "output": {"names": list(output_names), "heteroscedastic": heteroscedastic},
        "model": {
            "format": "builtin",
            "architecture": architecture,
            "weights": "weights.safetensors",
            "config": arch_config,
        },
        "normalization": normalization,
        "mc": mc_section,
    }
    if runtime:
        document["runtime"] = dict(runtime)
    spec = ModelSpec.model_validate(document)

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_weights(trained.module, staging / spec.model.weights)
        (staging / MANIFEST_NAME).write_text(dumps_toml(document), encoding="utf-8")
        rebuilt = load_module(load_manifest(staging / MANIFEST_NAME), staging)
        expected = trained.module.state_dict()
        for key, value in rebuilt.state_dict().items():
            if not torch.equal(value, expected[key].detach().to("cpu", value.dtype)):
                raise ValueError(f"{folder}: weights {key!r} did not round-trip through the folder")
        folder.mkdir(exist_ok=True)
        for file_name in (spec.model.weights, MANIFEST_NAME):
            (staging / file_name).chmod(0o644)  # safetensors writes 0600; servers must read it
            os.replace(staging / file_name, folder / file_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# --- a small TOML writer (tomllib only reads) ---------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def dumps_toml(document: Mapping[str, Any]) -> str:
    """Serialise a mapping to TOML: str, int, float, bool, lists, nested tables; None skipped.

    Nested mappings become [section] tables; mappings inside lists become inline tables.
    """
    lines: list[str] = []
    _write_table(document, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _write_table(table: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    if path:
        lines.append("")
        lines.append("[" + ".".join(_key(part) for part in path) + "]")
    subtables = []
    for key, value in table.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            subtables.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in subtables:
        _write_table(value, [*path, key], lines)


def _key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"TOML keys must be strings, got {key!r}")
    return key if _BARE_KEY.match(key) else _string(key)


def _string(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _value(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        items = (f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list | tuple):
        if any(item is None for item in value):
            raise TypeError("TOML arrays cannot hold None")
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")
