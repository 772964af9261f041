"""The load-time safety net: the engine's variance against the model's own training-mode passes.

On probe rows, the engine's variance (regression outputs, or class probabilities) is divided
by the variance of the model run in training mode (every module, except normalisation with
running statistics and the deterministic training branches found at load, which stay in
eval). Sampling every stochastic op gives 1 within the Monte Carlo error; a clear shortfall
means an op the engine does not sample, and the model is refused (or warned about, as its
manifest says). The figure is part of the model's metadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from mcdrop.engine.tracing import TRACE_LOCK
from mcdrop.engine.training_branches import buffers_kept

AuditPolicy = Literal["refuse", "warn", "off"]
AUDIT_SAMPLES = 1000
AUDIT_ROWS = 2
PASS_ROWS = 512  # rows x samples per training-mode forward


@dataclass(frozen=True)
class AuditReport:
    """engine variance / training-mode variance on the probe, and the band it must fall in."""

    ratio: float | None  # None: the probe's outputs do not vary (nothing to compare)
    tolerance: float
    samples: int
    verdict: Literal["ok", "shortfall", "no variance on the probe", "off"]

    def as_dict(self) -> dict[str, object]:
        return {"ratio": self.ratio, "tolerance": self.tolerance, "samples": self.samples,
                "verdict": self.verdict}  # fmt: skip


def ratio_tolerance(samples: int, kurtosis: float) -> float:
    """4 sigma of the ratio of two independent N-sample variances (excess kurtosis kappa).

    Var(s^2) = sigma^4 (2/(N-1) + kappa/N) for one variance; the ratio of two independent
    estimates has sqrt(2) times its relative spread (tests/model_zoo.py measures this).
    """
    return 4.0 * math.sqrt(2.0) * math.sqrt(max(2.0 / (samples - 1) + kurtosis / samples, 0.0))


@contextmanager
def training_mode(module: nn.Module, kept_in_eval: list[str]) -> Iterator[None]:
    """The model in training mode but normalisation and `kept_in_eval`; every flag restored."""
    flags = [(m, m.training) for m in module.modules()]
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.eval()
    for path in kept_in_eval:
        module.get_submodule(path).training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def training_mode_features(
    module: nn.Module,
    x: Tensor,
    samples: int,
    features: Callable[[Tensor], Tensor],
    kept_in_eval: list[str],
    one_sample_per_pass: bool = False,
) -> Tensor:
    """The model's own training-mode passes on rows x [B, ...]: features [B, samples, F].

    Many samples share a forward call unless one_sample_per_pass: a weight mask (DropConnect)
    is drawn once per call, so samples sharing a call would share it.
    """
    per_pass = 1 if one_sample_per_pass else max(1, PASS_ROWS // len(x))
    chunks = []
    with buffers_kept(module), training_mode(module, kept_in_eval), torch.inference_mode(), \
            TRACE_LOCK.running():  # fmt: skip
        done = 0
        while done < samples:
            count = min(per_pass, samples - done)
            out = module(x.repeat_interleave(count, dim=0))
            chunks.append(features(out.double()).view(len(x), count, -1))
            done += count
    return torch.cat(chunks, dim=1)


def compare(engine_variance: Tensor, reference: Tensor, samples: int) -> AuditReport:
    """engine variance [B, F] against reference features [B, N, F] (a pooled ratio)."""
    deviations = (reference - reference.mean(dim=1, keepdim=True)).square().sum(dim=(0, 2))
    ref_var = reference.var(dim=1).sum()
    if not float(ref_var) > 0:
        return AuditReport(None, 0.0, samples, "no variance on the probe")
    mean_z = float(deviations.mean())
    kurtosis = float(deviations.var()) / mean_z**2 - 2.0 if mean_z > 0 else 0.0
    tolerance = ratio_tolerance(samples, kurtosis)
    ratio = float(engine_variance.double().sum() / ref_var)
    return AuditReport(ratio, tolerance, samples, "shortfall" if ratio < 1 - tolerance else "ok")
