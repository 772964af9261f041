"""The bytes shard workers exchange: a JSON header and the tensors as safetensors, never pickle.

A message is `len(header)` (4 bytes, big-endian), the UTF-8 JSON header, then a safetensors
blob. Decoding runs no code from the message, so a worker or a server that reads a corrupt
or hostile message can at worst refuse it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from mcdrop.engine.core import MCOptions, MCRequest
from mcdrop.engine.partials import PartialStats, Shard
from mcdrop.shards.executor import ModelRef

_LENGTH_BYTES = 4
_STATS_TENSORS = ("mean", "m2", "kept", "kept_aleatoric", "log_sum_exp")


def encode(header: dict[str, Any], tensors: dict[str, Tensor | None] | None = None) -> bytes:
    """One message: the JSON-able header and the tensors that are not None."""
    present = {k: v.contiguous() for k, v in (tensors or {}).items() if v is not None}
    head = json.dumps(header).encode()
    return len(head).to_bytes(_LENGTH_BYTES, "big") + head + save_tensors(present)


def decode(message: bytes) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(header, tensors) of one message; ValueError if it is not one."""
    n = int.from_bytes(message[:_LENGTH_BYTES], "big")
    try:
        header = json.loads(message[_LENGTH_BYTES : _LENGTH_BYTES + n])
        tensors = load_tensors(message[_LENGTH_BYTES + n :])
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"not a shard message: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
        raise ValueError("not a shard message: the header has no kind")
    return header, tensors


def encode_work(
    kind: str, model: ModelRef, request: MCRequest | None, shard: Shard | None
) -> bytes:
    """A "run" (request and shard) or "load" (model only) message."""
    header: dict[str, Any] = {
        "kind": kind,
        "model": {
            "name": model.name,
            "folder": str(model.folder),
            "fingerprint": model.fingerprint,
        },
    }
    tensors: dict[str, Tensor | None] = {}
    if request is not None:
        header["options"] = dataclasses.asdict(request.options)
        tensors = {"x": request.x, "targets": request.targets}
    if shard is not None:
        header["shard"] = {"first": shard.first, "count": shard.count}
    return encode(header, tensors)


def decode_work(
    header: dict[str, Any], tensors: dict[str, Tensor]
) -> tuple[ModelRef, MCRequest | None, Shard | None]:
    """The model, request and shard of a decoded "run" or "load" message."""
    m = header["model"]
    model = ModelRef(str(m["name"]), Path(m["folder"]), str(m["fingerprint"]))
    request = None
    if "options" in header:
        opts = dict(header["options"])
        opts["interval_levels"] = tuple(opts["interval_levels"])
        request = MCRequest(tensors["x"], MCOptions(**opts), tensors.get("targets"))
    shard = Shard(**header["shard"]) if "shard" in header else None
    return model, request, shard


def encode_stats(stats: PartialStats | None, cpu_s: float) -> bytes:
    """An "ok" reply: a shard's statistics (None after a load) and the CPU seconds it took."""
    if stats is None:
        return encode({"kind": "ok", "cpu_s": cpu_s})
    header = {"kind": "ok", "cpu_s": cpu_s, "first": stats.first, "count": stats.count}
    return encode(header, {name: getattr(stats, name) for name in _STATS_TENSORS})


def decode_stats(header: dict[str, Any], tensors: dict[str, Tensor]) -> PartialStats | None:
    """The statistics of a decoded "ok" reply (None if it carried none)."""
    if "first" not in header:
        return None
    return PartialStats(
        first=int(header["first"]),
        count=int(header["count"]),
        **{name: tensors.get(name) for name in _STATS_TENSORS},  # type: ignore[arg-type]
    )


def stats_of(reply: bytes) -> PartialStats:
    """The statistics an "ok" reply to a "run" message carries; ValueError for anything else."""
    header, tensors = decode(reply)
    stats = decode_stats(header, tensors) if header["kind"] == "ok" else None
    if stats is None:
        raise ValueError(f"expected a shard's statistics, got a {header['kind']!r} message")
    return stats
