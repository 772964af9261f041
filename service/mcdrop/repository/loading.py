"""ModelSpec + model folder -> nn.Module in eval mode on CPU, float32.

Three formats: a built-in architecture or a user factory (`package.module:factory`), each with
safetensors weights, or a TorchScript archive. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import struct
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mcdrop.errors import ModelLoadError
from mcdrop.repository.architectures import build_architecture
from mcdrop.repository.manifest import MANIFEST_NAME, ModelSpec
from mcdrop.repository.scan import inside

log = logging.getLogger(__name__)
_MAX_HEADER = 100_000_000  # the safetensors format's own cap on the JSON header
_LISTED = 8  # names shown in an error before "... and N more"


def load_module(spec: ModelSpec, folder: Path) -> nn.Module:
    """Build the network a manifest describes and load its weights; eval mode, CPU, float32."""
    manifest = folder / MANIFEST_NAME
    weights = folder / spec.model.weights
    inside(folder, weights, f"{manifest}: model.weights")
    module: nn.Module
    if spec.model.format == "torchscript":
        module = _load_torchscript(weights)
    else:
        if spec.model.format == "builtin":
            try:
                module = build_architecture(spec)
            except ModelLoadError as exc:
                raise ModelLoadError(f"{manifest}: {exc}") from exc
        else:
            module = _build_from_entrypoint(spec, folder)
        load_weights(module, weights)
    module = module.to(device="cpu", dtype=torch.float32).eval()
    check_finite_tensors(module, weights)
    return module


def save_weights(module: nn.Module, path: Path) -> None:
    """Write the module's state dict as safetensors (CPU, contiguous, storage-independent)."""
    # clone(): tied parameters share storage, which safetensors refuses to write.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_weights(module: nn.Module, path: Path) -> None:
    """Load safetensors weights into `module` strictly: no key missing or extra, same shapes."""
    state = read_safetensors(path)
    expected = module.state_dict()
    problems: list[str] = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    mismatched = [
        f"{k}: file has {list(state[k].shape)}, model expects {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if mismatched:
        problems.append(f"shape mismatch ({'; '.join(mismatched[:_LISTED])})")
    if problems:
        raise ModelLoadError(f"{path}: weights do not fit the model: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)


def check_finite_tensors(module: nn.Module, path: Path) -> None:
    """Refuse a module with NaN or inf in a floating parameter or buffer (as served, float32).

    Such weights load without complaint and then fail every request; `path` is the file named.
    """
    tensors = [*module.named_parameters(), *module.named_buffers()]
    bad = [
        name
        for name, t in tensors
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())
    ]
    if bad:
        raise ModelLoadError(
            f"{path}: NaN or infinite values (as float32) in tensors {_names(bad)}"
        )


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file onto the CPU after checking that it is one (never unpickles)."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            size = path.stat().st_size
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: weights file not found") from exc
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read weights file: {exc}") from exc
    not_safetensors = f"{path}: not a safetensors file"
    if len(head) < 8:
        raise ModelLoadError(f"{not_safetensors} (only {size} bytes)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > min(_MAX_HEADER, size - 8):
        raise ModelLoadError(f"{not_safetensors}{_guess_format(head)}")
    try:
        with path.open("rb") as f:
            f.seek(8)
            json.loads(f.read(header_len))
        return load_file(str(path), device="cpu")
    except (ValueError, SafetensorError) as exc:
        raise ModelLoadError(f"{not_safetensors}: {exc}") from exc


def _guess_format(head: bytes) -> str:
    """A hint for the usual wrong files: a torch.save zip archive or a raw pickle."""
    if head.startswith(b"PK\x03\x04"):
        return " (it is a zip archive, as torch.save and TorchScript write; refused)"
    if head[:1] == b"\x80":
        return " (it looks like a Python pickle; refused, pickles are never loaded)"
    return ""


def _load_torchscript(path: Path) -> nn.Module:
    """Load a TorchScript archive onto the CPU; the zip magic is checked before torch sees it."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: TorchScript archive not found") from exc
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read TorchScript archive: {exc}") from exc
    if not head.startswith(b"PK\x03\x04"):
        raise ModelLoadError(
            f"{path}: not a TorchScript archive (expected a zip file as torch.jit.save writes)"
            f"{_guess_format(head)}"
        )
    try:
        # torch 2.13 deprecates TorchScript; the format is still supported and served.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r".*torch\.jit\.load", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except (RuntimeError, ValueError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[0] if lines else type(exc).__name__
        raise ModelLoadError(f"{path}: not a loadable TorchScript archive: {reason}") from exc
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"{path}: TorchScript archive did not hold a module")
    return module


def _build_from_entrypoint(spec: ModelSpec, folder: Path) -> nn.Module:
    """Call the user factory `package.module:factory` with `model.config` as keyword arguments."""
    manifest = folder / MANIFEST_NAME
    entrypoint = spec.model.entrypoint
    if entrypoint is None:  # the manifest validator guarantees it; keep mypy and readers honest
        raise ModelLoadError(f"{manifest}: model.entrypoint: required for format 'entrypoint'")
    module_name, factory_name = entrypoint.split(":")
    log.warning("model '%s' runs Python code (format 'entrypoint', %s): the model repository "
                "is trusted code, see docs/security.md", spec.name, entrypoint)  # fmt: skip
    user_module = _import_user_module(module_name, folder, manifest)
    factory = getattr(user_module, factory_name, None)
    if not callable(factory):
        raise ModelLoadError(
            f"{manifest}: model.entrypoint: {module_name!r} has no callable {factory_name!r}"
        )
    _check_factory_arguments(factory, spec.model.config, f"{manifest}: model.config", entrypoint)
    try:
        built = factory(**spec.model.config)
    except Exception as exc:
        raise ModelLoadError(
            f"{manifest}: model.entrypoint: {entrypoint}(**model.config) failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(built, nn.Module):
        raise ModelLoadError(
            f"{manifest}: model.entrypoint: {entrypoint} returned {type(built).__name__}, "
            "expected a torch.nn.Module"
        )
    return built


def _check_factory_arguments(
    factory: Callable[..., object], config: Mapping[str, object], where: str, entrypoint: str
) -> None:
    """Refuse config keys the factory does not accept, and required arguments left out."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # no introspectable signature (a C callable): the call itself will decide
    params = signature.parameters
    kinds = {p.kind for p in params.values()}
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        accepted = [
            n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        for key in config:
            if key not in accepted:
                raise ModelLoadError(
                    f"{where}.{key}: unknown argument for {entrypoint} "
                    f"(expected one of {', '.join(accepted) or 'no arguments'})"
                )
    try:
        signature.bind(**config)
    except TypeError as exc:
        raise ModelLoadError(f"{where}: arguments do not fit {entrypoint}: {exc}") from exc


def _import_user_module(module_name: str, folder: Path, manifest: Path) -> ModuleType:
    """Import `module_name` from the model folder if it has that file, else from sys.path.

    A folder-local file is imported under a name unique to its folder, so two model folders
    that both ship an `arch.py` do not clash in sys.modules.
    """
    local = folder.joinpath(*module_name.split(".")).with_suffix(".py")
    if local.is_file():
        inside(folder, local, f"{manifest}: model.entrypoint")
    try:
        if not local.is_file():
            return importlib.import_module(module_name)
        digest = hashlib.sha1(str(local.resolve()).encode()).hexdigest()[:12]
        unique = f"_mcdrop_model_{digest}_{module_name.replace('.', '_')}"
        import_spec = importlib.util.spec_from_file_location(unique, local)
        if import_spec is None or import_spec.loader is None:
            raise ImportError(f"cannot create an import spec for {local}")
        module = importlib.util.module_from_spec(import_spec)
        sys.modules[unique] = module
        try:
            import_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(unique, None)
            raise
        return module
    except Exception as exc:
        where = local if local.is_file() else f"{module_name!r} (no {local.name} in the folder)"
        raise ModelLoadError(
            f"{manifest}: model.entrypoint: cannot import {where}: {type(exc).__name__}: {exc}"
        ) from exc


def _names(keys: Iterable[str]) -> str:
    listed = list(keys)
    shown = ", ".join(listed[:_LISTED])
    more = f" ... and {len(listed) - _LISTED} more" if len(listed) > _LISTED else ""
    return f"[{shown}{more}]"
