"""Choose how a model is sampled: partitioned by fx when traceable, else run whole.

The model is put in eval mode once, here, and never toggled again; modules that sample only
in training mode are found by probing (training_branches.py) and left in their training
branch for good, their random ops drawn from keyed streams.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch
from torch import nn

from mcdrop.engine.fallback import WholeProgram, whole_program
from mcdrop.engine.partition import PartitionedProgram, partition_program
from mcdrop.engine.random_ops import UNSUPPORTED, RandomCall
from mcdrop.engine.recurrent import unstack_recurrent
from mcdrop.engine.sampling import Site
from mcdrop.engine.sites import SampleSelection
from mcdrop.engine.training_branches import (
    TrainingBranches,
    find_training_branches,
    random_calls,
)
from mcdrop.errors import ModelLoadError

log = logging.getLogger(__name__)

Program = PartitionedProgram | WholeProgram
_UNSUPPORTED_OPS = frozenset(UNSUPPORTED.values())


def prepare_program(
    module: nn.Module,
    input_shape: tuple[int, ...],
    sample: SampleSelection,
    dtype: torch.dtype,
    ignore: Sequence[str] = (),
) -> Program:
    """The best program for this model: partitioned by fx when traceable, else whole."""
    module.eval()
    if isinstance(module, torch.jit.ScriptModule):
        program: Program = whole_program(
            module,
            input_shape,
            sample,
            dtype,
            reason="a TorchScript archive cannot be traced by fx",
        )
        return program
    module, rewritten = unstack_recurrent(module)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    branches = find_training_branches(module, input_shape, dtype, device, ignore)
    for path in branches.sampled:
        module.get_submodule(path).training = True  # decided once, here, never per request
    calls = random_calls(module, input_shape, dtype, device)
    _refuse_unkeyable(calls)
    try:
        program = partition_program(module, input_shape, sample, dtype, calls)
    except ModelLoadError:
        raise
    except Exception as exc:  # any tracing failure means: use the fallback
        reason = f"fx cannot trace {type(module).__name__}: {type(exc).__name__}: {exc}"
        log.info("%s; running it whole", reason)
        program = whole_program(module, input_shape, sample, dtype, calls, reason=reason)
    program.branches = branches
    program.rewritten = rewritten
    program.sites = _numbered(program.sites)
    return program


def _numbered(sites: list[Site]) -> list[Site]:
    """Sites with unique names: repeats (a module drawing twice) get 0, 1, ... appended."""
    names = [s.name for s in sites]
    seen: dict[str, int] = {}
    out = []
    for site in sites:
        if names.count(site.name) == 1:
            out.append(site)
            continue
        seen[site.name] = seen.get(site.name, 0) + 1
        out.append(dataclasses.replace(site, name=f"{site.name}{seen[site.name] - 1}"))
    return out


def _refuse_unkeyable(calls: list[RandomCall]) -> None:
    """A random op the engine cannot key per row and sample is refused, named, at load."""
    for call in calls:
        if call.op in _UNSUPPORTED_OPS:
            raise ModelLoadError(
                f"{call.name}: the random op {call.op} is not sampled by the "
                "engine; list its module in mc.ignore to keep it in eval"
            )
        if call.batch_dim is None:
            raise ModelLoadError(
                f"{call.name}: draws a tensor of shape {list(call.shape)} with no batch "
                "dimension, one draw shared by every row and sample (DropConnect, or a constant "
                "drawn once); not supported: list its module in mc.ignore to keep it in eval"
            )


__all__ = ["Program", "TrainingBranches", "prepare_program"]
