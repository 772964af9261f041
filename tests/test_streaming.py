"""Streaming moments: exact against direct formulas, identical for every chunking."""

from __future__ import annotations

import math

import pytest
import torch

from mcdrop.engine.streaming import BLOCK, StreamingLogMeanExp, StreamingMoments, round_up

CPU = torch.device("cpu")


def _stream(
    values: torch.Tensor, total: int, chunk: int
) -> tuple[StreamingMoments, StreamingLogMeanExp]:
    rows, _, feats = values.shape
    moments, lme = StreamingMoments(rows, feats, CPU), StreamingLogMeanExp(rows, CPU)
    for first in range(0, round_up(total), chunk):
        part = values[:, first : min(first + chunk, round_up(total))]
        moments.update(slice(0, rows), first, part, total)
        lme.update(slice(0, rows), first, part[..., 0], total)
    return moments, lme


@pytest.mark.parametrize("total", [1, 7, 8, 13, 100])
def test_moments_match_direct_formulas(total: int) -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3, round_up(total), 2, generator=gen, dtype=torch.float64) * 5 + 100
    moments, lme = _stream(values, total, BLOCK)
    used = values[:, :total]
    torch.testing.assert_close(moments.mean, used.mean(1))
    expected_var = used.var(1) if total > 1 else torch.zeros(3, 2, dtype=torch.float64)
    torch.testing.assert_close(moments.variance, expected_var)
    torch.testing.assert_close(lme.value, torch.logsumexp(used[..., 0], 1) - math.log(total))
    assert moments.count.tolist() == [total] * 3


def test_chunking_does_not_change_a_single_bit() -> None:
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(4, 200, 3, generator=gen)
    reference = _stream(values, 197, 8)
    for chunk in (16, 40, 64, 200):
        moments, lme = _stream(values, 197, chunk)
        assert torch.equal(moments.mean, reference[0].mean)
        assert torch.equal(moments.variance, reference[0].variance)
        assert torch.equal(lme.value, reference[1].value)


def test_large_offset_keeps_variance_precise() -> None:
    values = torch.full((1, 64, 1), 1e9, dtype=torch.float64)
    values[0, ::2] += 1.0
    moments, _ = _stream(values, 64, 16)
    torch.testing.assert_close(
        moments.variance, torch.full((1, 1), 64 / 63 * 0.25, dtype=torch.float64)
    )
