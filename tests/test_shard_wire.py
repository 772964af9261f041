"""shard_wire: shard messages round-trip exactly, and nothing in them is ever unpickled."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from mcdrop.engine.core import MCOptions, MCRequest
from mcdrop.engine.partials import PartialStats, Shard
from mcdrop.shards.executor import ModelRef
from mcdrop.shards.wire import (
    decode,
    decode_stats,
    decode_work,
    encode,
    encode_stats,
    encode_work,
    stats_of,
)

MODEL = ModelRef("reg", Path("/models/reg"), "abc123")


@pytest.mark.parametrize("targets", [None, torch.tensor([[1.5], [-2.0]], dtype=torch.float64)])
def test_run_messages_round_trip(targets: torch.Tensor | None) -> None:
    options = MCOptions(samples=512, seed=7, mask_mode="shared", interval_levels=(0.5, 0.9),
                        return_samples=3)  # fmt: skip
    request = MCRequest(torch.arange(6.0).view(2, 3), options, targets)
    model, got, shard = decode_work(*decode(encode_work("run", MODEL, request, Shard(256, 200))))
    assert model == MODEL
    assert shard == Shard(256, 200)
    assert got is not None
    assert got.options == options
    assert torch.equal(got.x, request.x)
    if targets is None:
        assert got.targets is None
    else:
        assert got.targets is not None
        assert torch.equal(got.targets, targets)


def test_load_messages_carry_only_the_model() -> None:
    header, tensors = decode(encode_work("load", MODEL, None, None))
    assert header["kind"] == "load"
    assert decode_work(header, tensors) == (MODEL, None, None)


def test_statistics_round_trip_bit_for_bit_with_absent_parts() -> None:
    stats = PartialStats(first=8, count=16, mean=torch.rand(2, 3, dtype=torch.float64),
                         m2=torch.rand(2, 3, dtype=torch.float64),
                         log_sum_exp=torch.tensor([0.25, -1.0], dtype=torch.float64))  # fmt: skip
    got = stats_of(encode_stats(stats, 0.5))
    assert (got.first, got.count, got.kept, got.kept_aleatoric) == (8, 16, None, None)
    assert torch.equal(got.mean, stats.mean)
    assert torch.equal(got.m2, stats.m2)
    assert got.log_sum_exp is not None
    assert torch.equal(got.log_sum_exp, stats.log_sum_exp)  # type: ignore[arg-type]
    assert decode_stats(*decode(encode_stats(None, 0.0))) is None


def test_a_reply_without_statistics_is_refused_where_statistics_are_due() -> None:
    with pytest.raises(ValueError, match="got a 'error' message"):
        stats_of(encode({"kind": "error", "reason": "boom"}))


class _Marker:
    """Unpickling this would create the marker file: proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, int]]:
        return (os.open, (self.path, os.O_CREAT | os.O_WRONLY))


@pytest.mark.parametrize("framed", [False, True])
def test_a_pickle_is_refused_and_never_executed(tmp_path: Path, framed: bool) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(str(marker)))
    if framed:  # a valid header followed by a pickle where the tensors belong
        head = encode({"kind": "run"})
        payload = head[: 4 + int.from_bytes(head[:4], "big")] + pickle.dumps(_Marker(str(marker)))
    with pytest.raises(ValueError, match="not a shard message"):
        decode(payload)
    assert not marker.exists()
