"""engine/allocator.py: the glibc thresholds are applied, and every CPU engine applies them."""

from __future__ import annotations

import ctypes.util
import platform

import pytest
import torch
from torch import nn

import mcdrop.engine.core
from mcdrop.engine.allocator import keep_freed_memory
from mcdrop.engine.core import MCEngine


@pytest.mark.skipif(
    platform.system() != "Linux" or ctypes.util.find_library("c") is None,
    reason="mallopt is glibc's (Linux)",
)
def test_thresholds_are_applied_on_glibc() -> None:
    assert keep_freed_memory() is True


def test_a_cpu_engine_keeps_freed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[None] = []
    monkeypatch.setattr(mcdrop.engine.core, "keep_freed_memory", lambda: calls.append(None))
    torch.manual_seed(0)
    MCEngine(nn.Sequential(nn.Dropout(0.1), nn.Linear(2, 1)), task="regression",
             input_shape=(2,))  # fmt: skip
    assert len(calls) == 1
