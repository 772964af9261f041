"""Choose how a model is sampled: partitioned by fx when traceable, else run whole.

The model is put in eval mode once, here, and never toggled again.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mcdrop.engine.fallback import WholeProgram, whole_program
from mcdrop.engine.partition import PartitionedProgram, partition_program
from mcdrop.engine.sites import SampleSelection
from mcdrop.errors import ModelLoadError

log = logging.getLogger(__name__)

Program = PartitionedProgram | WholeProgram


def prepare_program(
    module: nn.Module, input_shape: tuple[int, ...], sample: SampleSelection, dtype: torch.dtype
) -> Program:
    """The best program for this model: partitioned by fx when traceable, else whole."""
    module.eval()
    if not isinstance(module, torch.jit.ScriptModule):
        try:
            return partition_program(module, input_shape, sample, dtype)
        except ModelLoadError:
            raise
        except Exception as exc:  # any tracing failure means: use the fallback
            log.info("fx cannot trace %s (%s); running it whole", type(module).__name__, exc)
    return whole_program(module, input_shape, sample, dtype)
