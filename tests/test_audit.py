"""The load-time sampling audit: it passes models sampled in full, and catches a missed op."""

from __future__ import annotations

import logging

import pytest
import torch
from model_zoo import ZOO

from mcdrop.engine import program as program_module
from mcdrop.engine.audit import compare, ratio_tolerance
from mcdrop.engine.core import MCEngine
from mcdrop.engine.training_branches import TrainingBranches


def _vit() -> MCEngine:
    factory, shape, _, _ = ZOO["vit_tiny"]
    return MCEngine(factory(), task="regression", input_shape=shape)


def test_a_model_sampled_in_full_passes_and_reports_its_figure() -> None:
    audit = _vit().audit
    assert audit.verdict == "ok"
    assert audit.ratio is not None
    assert abs(audit.ratio - 1.0) <= audit.tolerance


def test_an_op_the_engine_misses_is_refused_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """As before DropPath and gated attention dropout were sampled: the audit names it."""
    monkeypatch.setattr(program_module, "find_training_branches",
                        lambda *_args, **_kw: TrainingBranches())  # fmt: skip
    with pytest.raises(ValueError, match=r"sampling audit: the engine's variance is 0\.\d+"):
        _vit()


def test_the_manifest_may_ask_for_a_warning_instead(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(program_module, "find_training_branches",
                        lambda *_args, **_kw: TrainingBranches())  # fmt: skip
    factory, shape, _, _ = ZOO["vit_tiny"]
    with caplog.at_level(logging.WARNING):
        engine = MCEngine(factory(), task="regression", input_shape=shape, audit="warn")
    assert engine.audit.verdict == "shortfall"
    assert engine.coverage()["audit"]["verdict"] == "shortfall"
    assert any("sampling audit" in r.getMessage() for r in caplog.records)


def test_the_comparison_and_its_band() -> None:
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 4000, 3, generator=gen, dtype=torch.float64)
    full = compare(torch.ones(2, 3, dtype=torch.float64), reference, 4000)
    half = compare(torch.full((2, 3), 0.5, dtype=torch.float64), reference, 4000)
    assert full.verdict == "ok"
    assert half.verdict == "shortfall"
    assert half.ratio == pytest.approx(0.5, rel=0.05)
    flat = compare(torch.zeros(2, 3), torch.zeros(2, 10, 3), 10)
    assert flat.verdict == "no variance on the probe"
    assert ratio_tolerance(2000, 0.0) == pytest.approx(4 * 2**0.5 * (2 / 1999) ** 0.5)
