"""Streaming per-row statistics over MC samples, bit-identical however the samples are chunked.

Samples are grouped in fixed blocks of BLOCK consecutive sample indices. Within a block
values are summed in a fixed order; blocks are added to the running totals strictly in
sample order. Sums are shifted by each row's first-block mean and kept in float64, which
keeps the one-pass variance stable (the shifted-data form of Chan et al.'s merge).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BLOCK = 8


def round_up(n: int, multiple: int = BLOCK) -> int:
    """Smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def _block_sum(values: Tensor) -> Tensor:
    """[R, nb, BLOCK, F] -> [R, nb, F], summed left to right."""
    total = values[:, :, 0]
    for j in range(1, values.shape[2]):
        total = total + values[:, :, j]
    return total


def _valid(first: int, n_samples: int, total: int, device: torch.device) -> Tensor:
    """[S] bool: which of samples first .. first+S-1 are below the requested total."""
    return torch.arange(first, first + n_samples, device=device) < total


class StreamingMoments:
    """Running count, mean and variance per row and feature of values [R, S, F]."""

    def __init__(self, rows: int, features: int, device: torch.device, start: int = 0) -> None:
        self.start = start  # first sample index this instance sees (a shard's first sample)
        self.count = torch.zeros(rows, dtype=torch.int64, device=device)
        self.shift = torch.zeros(rows, features, dtype=torch.float64, device=device)
        self.sum1 = torch.zeros(rows, features, dtype=torch.float64, device=device)
        self.sum2 = torch.zeros(rows, features, dtype=torch.float64, device=device)

    def update(self, rows: slice, first: int, values: Tensor, total: int) -> None:
        """Fold samples first .. first+S-1 of `rows` in; samples at index >= total are ignored.

        `first` and S must be multiples of BLOCK, and each row must see its samples in order,
        beginning at `start`.
        """
        r, s, f = values.shape
        valid = _valid(first, s, total, values.device)
        n_valid = int(valid.sum())
        v = values.to(torch.float64)
        if first == self.start:
            k = min(BLOCK, n_valid)
            self.shift[rows] = _block_sum(v[:, None, :k]).squeeze(1) / k
        d = (v - self.shift[rows].unsqueeze(1)) * valid.view(1, s, 1)
        d = d.view(r, s // BLOCK, BLOCK, f)
        self.sum1[rows] = torch.cat([self.sum1[rows].unsqueeze(1), _block_sum(d)], 1).cumsum(1)[
            :, -1
        ]
        self.sum2[rows] = torch.cat([self.sum2[rows].unsqueeze(1), _block_sum(d * d)], 1).cumsum(1)[
            :, -1
        ]
        self.count[rows] += n_valid

    @property
    def mean(self) -> Tensor:
        """[B, F] mean of the samples seen."""
        return self.shift + self.sum1 / self.count.unsqueeze(1)

    @property
    def variance(self) -> Tensor:
        """[B, F] unbiased sample variance (0 with a single sample)."""
        n = self.count.unsqueeze(1).to(torch.float64)
        var = (self.sum2 - self.sum1 * self.sum1 / n) / (n - 1).clamp_min(1)
        return var.clamp_min(0.0)

    @property
    def m2(self) -> Tensor:
        """[B, F] sum of squared deviations from the mean (the M2 of Chan et al.'s merge)."""
        return self.sum2 - self.sum1 * self.sum1 / self.count.unsqueeze(1).to(torch.float64)


class StreamingLogMeanExp:
    """Running log(mean_t exp(x_t)) per row over samples [R, S], in fixed block order."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.log_sum = torch.full((rows,), -math.inf, dtype=torch.float64, device=device)
        self.count = torch.zeros(rows, dtype=torch.int64, device=device)

    def update(self, rows: slice, first: int, values: Tensor, total: int) -> None:
        """Fold samples first .. first+S-1 of `rows` in (same contract as StreamingMoments)."""
        r, s = values.shape
        valid = _valid(first, s, total, values.device)
        v = values.to(torch.float64).masked_fill(~valid.view(1, s), -math.inf)
        blocks = v.view(r, s // BLOCK, BLOCK, 1)
        peak = blocks.amax(dim=2).clamp_min(torch.finfo(torch.float64).min)
        block_lse = peak + _block_sum((blocks - peak.unsqueeze(2)).exp()).log()
        folded = torch.cat([self.log_sum[rows, None], block_lse[..., 0]], dim=1)
        if folded.device.type == "cpu":  # a sequential scan: the same fold however it is chunked
            self.log_sum[rows] = torch.logcumsumexp(folded, dim=1)[:, -1]
        else:  # GPU scans associate by length, so fold block by block
            acc = folded[:, 0]
            for b in range(1, folded.shape[1]):
                acc = torch.logaddexp(acc, folded[:, b])
            self.log_sum[rows] = acc
        self.count[rows] += int(valid.sum())

    @property
    def value(self) -> Tensor:
        """[B] log of the mean of exp over the samples seen."""
        return self.log_sum - self.count.to(torch.float64).log()
