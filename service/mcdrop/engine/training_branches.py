"""Which modules sample only in training mode, and which train differently but deterministically.

A module whose forward reads `self.training` is probed at load: with only it in training
mode, does the model issue random ops it did not issue in eval? Then its training branch
is a stochastic op (DropPath, locked or Gaussian dropout, attention dropout gated on the
flag, a hand-written mask) and it runs in that branch for good, its draws keyed. Otherwise,
if its output changes (BatchNorm's batch statistics, a train-only auxiliary head), its
training branch is deterministic: it stays in eval, and the load report says so. Buffers the
probes touch (running statistics) are restored, bit for bit.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mcdrop.engine.random_ops import ModulePaths, RandomCall, RandomRecorder, batch_dimension
from mcdrop.engine.sites import module_kind
from mcdrop.engine.tracing import TRACE_LOCK
from mcdrop.errors import ModelLoadError


@dataclass(frozen=True)
class TrainingBranches:
    """Module paths run in their (stochastic) training branch, and those kept in eval."""

    sampled: list[str] = field(default_factory=list)
    deterministic: list[str] = field(default_factory=list)  # training differs, but not randomly
    ignored: list[str] = field(default_factory=list)  # stochastic, kept in eval by mc.ignore


_READS_TRAINING: dict[type[nn.Module], bool] = {}


def reads_training_flag(cls: type[nn.Module]) -> bool:
    """Whether the class's forward mentions `training` (unknown source: assume it does)."""
    if cls not in _READS_TRAINING:
        try:
            _READS_TRAINING[cls] = "training" in inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _READS_TRAINING[cls] = True
    return _READS_TRAINING[cls]


def probe_input(
    input_shape: tuple[int, ...], rows: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Zero rows [rows, *input_shape] for the load-time probes (as the fallback's probe)."""
    return torch.zeros((rows, *input_shape), dtype=dtype, device=device)


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (e.g. BatchNorm running statistics) when the block ends."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _run(model: nn.Module, x: Tensor) -> tuple[list[tuple[str, str, tuple[int, ...]]], int, object]:
    """The random ops one forward issues, how many dropout ops it samples, and its output.

    The global generator is reseeded for the run and restored after it, so two runs draw the
    same numbers: an op that samples in eval too (DropConnect's dropout with training=True)
    does not make the outputs differ, and the caller's random state is left as it was.
    """
    paths = ModulePaths()
    recorder = RandomRecorder(paths)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        with torch.inference_mode(), TRACE_LOCK.running(), paths.watching(model), recorder:
            out = model(x)
    return recorder.calls, recorder.dropouts, out


def same_outputs(a: object, b: object) -> bool:
    """Whether two model outputs (tensors, or tuples, lists, dicts of them) are bit-identical."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(same_outputs(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_outputs(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def find_training_branches(
    model: nn.Module,
    input_shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    ignore: Sequence[str] = (),
) -> TrainingBranches:
    """Probe each module that reads its training flag (model in eval; restored afterwards).

    Stochastic modules named in `ignore` (e.g. train-only augmentation noise) stay in eval.
    """
    x = probe_input(input_shape, 2, dtype, device)
    sampled: list[str] = []
    deterministic: list[str] = []
    ignored: list[str] = []
    with buffers_kept(model):
        base_calls, base_drops, base_out = _run(model, x)
        for path, module in model.named_modules():
            if module_kind(module) is not None or not reads_training_flag(type(module)):
                continue  # dropout modules sample in eval already; the rest ignore the flag
            module.training = True
            try:
                calls, drops, out = _run(model, x)
            except Exception:  # a training branch that cannot run on its own: leave it
                calls, drops, out = base_calls, base_drops, None
            finally:
                module.training = False
            if len(calls) > len(base_calls) or drops > base_drops:
                (ignored if path in ignore else sampled).append(path)
            elif out is not None and not same_outputs(out, base_out):
                deterministic.append(path)
    return TrainingBranches(sampled, deterministic, ignored)


def random_calls(
    model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> list[RandomCall]:
    """The random ops one forward issues, in order, each with the dimension holding the rows."""
    runs = []
    with buffers_kept(model):
        for rows in (2, 3):
            calls, _, _ = _run(model, probe_input(input_shape, rows, dtype, device))
            runs.append(calls)
    small, large = runs
    if [(m, op) for m, op, _ in small] != [(m, op) for m, op, _ in large]:
        raise ModelLoadError("the model's random ops change with the batch size; cannot key them")
    return [RandomCall(module, op, shape, batch_dimension(shape, big, (2, 3)))
            for (module, op, shape), (_, _, big) in zip(small, large, strict=True)]  # fmt: skip
