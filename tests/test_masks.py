"""Keyed mask bits: rate, independence of keys, and offset consistency."""

from __future__ import annotations

import math

import pytest
import torch

from mcdrop.engine.masks import drop_threshold, keep_mask, quantized_drop_probability

CPU = torch.device("cpu")


def test_keep_rate_matches_p_within_binomial_error() -> None:
    p = 0.3
    mask = keep_mask([5] * 4, [0, 1, 2, 3], 0, 0, 2000, (64,), p, CPU)
    n = mask.numel()
    rate = 1 - mask.float().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_any_sample_range_gives_the_same_bits() -> None:
    whole = keep_mask([9, 9], [0, 1], 2, 0, 48, (3, 5), 0.5, CPU)
    for first, count in [(0, 8), (8, 16), (24, 24), (40, 8)]:
        part = keep_mask([9, 9], [0, 1], 2, first, count, (3, 5), 0.5, CPU)
        assert torch.equal(part, whole[:, first : first + count])


def test_rows_sites_and_seeds_draw_different_masks() -> None:
    base = keep_mask([1], [0], 0, 0, 64, (32,), 0.5, CPU)
    for seeds, rows, site in [([2], [0], 0), ([1], [1], 0), ([1], [0], 1)]:
        other = keep_mask(seeds, rows, site, 0, 64, (32,), 0.5, CPU)
        assert not torch.equal(base, other)


def test_each_row_draws_from_its_own_key_alone() -> None:
    rows = list(range(16))
    together = keep_mask([3] * 16, rows, 0, 0, 64, (512,), 0.1, CPU)
    single = torch.stack([keep_mask([3], [r], 0, 0, 64, (512,), 0.1, CPU)[0] for r in rows])
    assert torch.equal(together, single)


def test_scaled_masks_hold_zero_or_the_scale() -> None:
    keep = keep_mask([4], [0], 1, 0, 32, (16,), 0.25, CPU)
    scaled = keep_mask([4], [0], 1, 0, 32, (16,), 0.25, CPU, scale=4 / 3)
    assert scaled.dtype == torch.float32
    assert torch.equal(scaled, keep.float() * torch.tensor(4 / 3, dtype=torch.float32))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.25])
def test_threshold_quantisation(p: float) -> None:
    q = quantized_drop_probability(p)
    assert abs(q - p) <= 2**-17
    assert drop_threshold(p) == round(q * 65536) - 32768
