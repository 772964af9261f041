"""Partial statistics of a sample range (a shard) and their exact merge into one summary.

A shard owns a range of sample indices. Its masks are keyed by those absolute indices (see
masks.py), so the shards together draw exactly the masks of a single run; their partial
statistics merge by Chan et al.'s parallel formulas into the single run's answer, up to
floating-point summation order. Pure tensor code: where shards run is mcdrop.shards' concern.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mcdrop.engine.accumulators import Accumulators, OutputHead, summarize
from mcdrop.engine.streaming import BLOCK
from mcdrop.uncertainty import Summary, validate_levels


@dataclass(frozen=True)
class Shard:
    """Samples first .. first+count-1 of one request; `first` is a multiple of BLOCK."""

    first: int
    count: int

    def __post_init__(self) -> None:
        if self.first < 0 or self.first % BLOCK:
            raise ValueError(f"shard first sample must be a multiple of {BLOCK}, got {self.first}")
        if self.count < 1:
            raise ValueError(f"shard count must be positive, got {self.count}")

    @property
    def end(self) -> int:
        """One past the last sample index."""
        return self.first + self.count


@dataclass(frozen=True)
class PartialStats:
    """What one shard contributes to a request's summary (CPU tensors, picklable).

    Per row and feature of the per-sample features (regression: means [and predicted
    variances]; classification: probabilities, entropy and one-hot argmax, so their sums are
    the class-probability sums, entropy sums and vote counts): the sample mean and M2, the
    sum of squared deviations from it, [B, F] float64. `kept` [B, K, F] holds the samples
    with index first .. first+K-1 that fall below the kept-sample limit (for empirical
    intervals and returned samples), `log_sum_exp` [B] log sum_t exp(loglik_t) of targets.
    """

    first: int
    count: int
    mean: Tensor
    m2: Tensor
    kept: Tensor | None = None
    kept_aleatoric: Tensor | None = None
    log_sum_exp: Tensor | None = None

    @property
    def end(self) -> int:
        """One past the last sample index."""
        return self.first + self.count

    @classmethod
    def from_accumulators(cls, acc: Accumulators, shard: Shard) -> PartialStats:
        """The statistics `acc` gathered over exactly the samples of `shard`, moved to CPU."""
        assert acc.moments is not None
        moments = acc.moments
        kept = kept_aleatoric = None
        stop = min(shard.end, acc.keep)
        if acc.kept is not None and stop > shard.first:
            kept = acc.kept[:, shard.first : stop].cpu()
            if acc.kept_aleatoric is not None:
                kept_aleatoric = acc.kept_aleatoric[:, shard.first : stop].cpu()
        return cls(
            first=shard.first,
            count=shard.count,
            mean=moments.mean.cpu(),
            m2=moments.m2.cpu(),
            kept=kept,
            kept_aleatoric=kept_aleatoric,
            log_sum_exp=None if acc.loglik is None else acc.loglik.log_sum.cpu(),
        )


def merge_pair(a: PartialStats, b: PartialStats) -> PartialStats:
    """Statistics of a's samples followed by b's (b must start where a ends).

    Chan et al.: with delta = mean_b - mean_a and n = n_a + n_b,
    mean = mean_a + delta * n_b / n and M2 = M2_a + M2_b + delta^2 * n_a * n_b / n.
    """
    if b.first != a.end:
        raise ValueError(f"shards must be contiguous: one ends at {a.end}, the next starts at "
                         f"{b.first}")  # fmt: skip
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"shards disagree on shape: {list(a.mean.shape)} vs {list(b.mean.shape)}")
    n_a, n_b = float(a.count), float(b.count)
    n = n_a + n_b
    delta = b.mean - a.mean
    lse = None
    if a.log_sum_exp is not None and b.log_sum_exp is not None:
        lse = torch.logaddexp(a.log_sum_exp, b.log_sum_exp)
    return PartialStats(
        first=a.first,
        count=a.count + b.count,
        mean=a.mean + delta * (n_b / n),
        m2=a.m2 + b.m2 + delta * delta * (n_a * n_b / n),
        kept=_concat(a.kept, b.kept),
        kept_aleatoric=_concat(a.kept_aleatoric, b.kept_aleatoric),
        log_sum_exp=lse,
    )


def _concat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    return torch.cat([a, b], dim=1)


def merge_partials(parts: Sequence[PartialStats]) -> PartialStats:
    """Merge shards covering one contiguous sample range (any order given), left to right."""
    if not parts:
        raise ValueError("nothing to merge: no partial statistics given")
    ordered = sorted(parts, key=lambda p: p.first)
    merged = ordered[0]
    for part in ordered[1:]:
        merged = merge_pair(merged, part)
    return merged


def finish(
    head: OutputHead, stats: PartialStats, seed: int, levels: tuple[float, ...], returned: int
) -> Summary:
    """The summary a single run of samples 0 .. stats.count-1 with `seed` would answer."""
    if stats.first != 0:
        raise ValueError(f"a summary needs every sample from 0; these start at {stats.first}")
    n = stats.count
    variance = (stats.m2 / max(n - 1, 1)).clamp_min(0.0)
    loglik = None if stats.log_sum_exp is None else stats.log_sum_exp - torch.log(
        torch.tensor(float(n), dtype=torch.float64))  # fmt: skip
    return summarize(
        head, stats.mean, variance, n, seed, validate_levels(levels), returned,
        stats.kept, stats.kept_aleatoric, loglik,
    )  # fmt: skip
