"""Counter-based, keyed random bits for dropout masks.

Every mask element is a pure function of (seed, site, row, sample index, element), drawn
from a Philox stream keyed by (seed, site, row) at a counter offset set by the sample
index. So a seeded request gets the same masks however the work is chunked and whatever
else shares its batch, and no global RNG state is touched.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# The version of the mask streams: a seeded answer is reproducible by (seed, this). It names
# the generator and how its bits become masks and uniforms; any change to the bits bumps it.
MASK_STREAM = "philox4x64-numpy/1"
_UINT16_PER_COUNTER = 16  # Philox4x64: one counter step yields 4 x 64 random bits
_ROW_BITS = 40


def quantized_drop_probability(p: float) -> float:
    """The drop probability the 16-bit thresholds really realise: round(p * 2^16) / 2^16."""
    return round(p * 65536) / 65536


def drop_threshold(p: float) -> int:
    """Signed 16-bit threshold: an element is kept when its random int16 is >= this value."""
    return round(p * 65536) - 32768


def _row_bits(
    seed: int, site: int, row: int, first_sample: int, n_samples: int, elems: int
) -> np.ndarray:
    """Random int16 values [n_samples, elems] for one (seed, site, row) key.

    Sample s always reads counters [s * c, (s + 1) * c) with c = ceil(elems / 16),
    so any sample range can be drawn independently and gives identical bits.
    """
    per_sample = -(-elems // _UINT16_PER_COUNTER)
    key = [seed & 0xFFFF_FFFF_FFFF_FFFF, (site << _ROW_BITS) | row]
    gen = np.random.Philox(key=key, counter=[first_sample * per_sample, 0, 0, 0])
    raw = gen.random_raw(n_samples * per_sample * 4).view(np.int16)
    return raw.reshape(n_samples, per_sample * _UINT16_PER_COUNTER)[:, :elems]


def keep_mask(
    seeds: list[int],
    rows: list[int],
    site: int,
    first_sample: int,
    n_samples: int,
    elem_shape: tuple[int, ...],
    p: float,
    device: torch.device,
    scale: float | None = None,
) -> Tensor:
    """Keep-mask [len(rows), n_samples, *elem_shape] for one stochastic site.

    Boolean, or with `scale` float32 holding 0 or `scale` (the inverted-dropout factor
    folded in, so applying it is one multiply). Row i uses key (seeds[i], site, rows[i]);
    shared-mask mode passes one key per request.
    """
    elems = math.prod(elem_shape)
    threshold = drop_threshold(p)
    dtype = np.bool_ if scale is None else np.float32
    keep: np.ndarray = np.empty((len(rows), n_samples, elems), dtype=dtype)

    factor = np.float32(1.0 if scale is None else scale)
    for i, (seed, row) in enumerate(zip(seeds, rows, strict=True)):
        bits = _row_bits(seed, site, row, first_sample, n_samples, elems)
        if scale is None:
            np.greater_equal(bits, threshold, out=keep[i])
        else:  # scaled while this row's bits are still in cache
            np.multiply(bits >= threshold, factor, out=keep[i])
    mask = torch.from_numpy(keep).view(len(rows), n_samples, *elem_shape)
    return mask if device.type == "cpu" else mask.to(device, non_blocking=True)
