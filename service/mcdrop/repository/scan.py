"""Scan a model repository: one subfolder per model, each with a `model.toml` manifest."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from mcdrop.errors import InvalidInput, ModelLoadError
from mcdrop.repository.manifest import MANIFEST_NAME, NAME_PATTERN, ModelSpec, load_manifest

_NAME = re.compile(NAME_PATTERN)


def check_model_name(name: str) -> str:
    """`name` if it follows the manifest's name rule; InvalidInput otherwise.

    Every route that takes a model name calls this before touching the file system, so no
    ".", "..", separator or encoded form of them ever reaches a path.
    """
    if not _NAME.fullmatch(name):
        shown = name if len(name) <= 64 else name[:61] + "..."
        raise InvalidInput(
            f"model name {shown!r} is not valid: letters, digits, '_', '.', '-', starting "
            "with a letter or digit, at most 128 characters"
        )
    return name


def inside(root: Path, path: Path, what: str) -> Path:
    """`path` with symlinks resolved, if it lies inside `root`; ModelLoadError otherwise."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ModelLoadError(f"{what}: resolves outside {root.name or root} (symlink?); refused")
    return resolved


def model_folder(root: Path, name: str) -> Path:
    """The folder of model `name`: a valid name, and inside the repository once resolved."""
    folder = root / check_model_name(name)
    inside(root, folder, name)
    return folder


@dataclass(frozen=True)
class RepositoryScan:
    """Valid manifests by model name (spec, folder) and, separately, why other folders failed."""

    models: dict[str, tuple[ModelSpec, Path]]
    errors: dict[str, str]


def scan_repository(root: Path) -> RepositoryScan:
    """Parse every `root/<name>/model.toml`; a broken folder is recorded, never fatal.

    Folders without a manifest and hidden folders are skipped. Both maps are sorted by name.
    """
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise ModelLoadError(f"{root}: model repository {what}")
    models: dict[str, tuple[ModelSpec, Path]] = {}
    errors: dict[str, str] = {}
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        manifest = folder / MANIFEST_NAME
        if folder.name.startswith(".") or not folder.is_dir() or not manifest.exists():
            continue
        try:
            check_model_name(folder.name)
            inside(root, folder, folder.name)
            inside(folder, manifest, f"{folder.name}/{MANIFEST_NAME}")
            spec = load_manifest(manifest)
        except (ModelLoadError, InvalidInput) as exc:
            errors[folder.name] = str(exc)
            continue
        except (OSError, ValueError) as exc:  # unreadable file, not UTF-8, ...
            errors[folder.name] = f"{manifest}: cannot read manifest: {exc}"
            continue
        if spec.name != folder.name:
            errors[folder.name] = (
                f"{manifest}: name: {spec.name!r} must equal the model's folder name "
                f"{folder.name!r}"
            )
            continue
        models[spec.name] = (spec, folder)
    return RepositoryScan(models=models, errors=errors)


def fingerprint(folder: Path) -> str:
    """Changes whenever a file of the model folder changes (manifest by content, rest by stat)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        if path.name == MANIFEST_NAME:
            digest.update(path.read_bytes())
    return digest.hexdigest()
