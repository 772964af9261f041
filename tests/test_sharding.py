"""Sharding: shard plans, Chan's merge against direct computation, split runs equal whole runs."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from mcdrop.engine.core import MCEngine, MCOptions, MCRequest
from mcdrop.engine.partials import PartialStats, Shard, finish, merge_partials
from mcdrop.engine.streaming import BLOCK
from mcdrop.repository.architectures import build_mlp
from mcdrop.shards.executor import ModelRef, SerialExecutor, plan_shards, run_sharded
from mcdrop.uncertainty import ClassificationSummary, RegressionSummary, Summary

REF = ModelRef("m", Path("."), "fingerprint")


# -- plans -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("samples", "workers"), [(20_000, 2), (203, 3), (100, 7), (8, 4), (5, 1)])
def test_plans_cover_every_sample_once_in_aligned_balanced_shards(
    samples: int, workers: int
) -> None:
    shards = plan_shards(samples, workers, min_shard=1)
    assert shards[0].first == 0
    assert all(a.end == b.first for a, b in itertools.pairwise(shards))
    assert shards[-1].end == samples
    assert all(s.first % BLOCK == 0 for s in shards)
    assert len(shards) == min(workers, math.ceil(samples / BLOCK))
    sizes = [s.count for s in shards]
    assert max(sizes) - min(sizes) <= BLOCK


def test_plans_prefer_fewer_shards_to_tiny_ones() -> None:
    assert plan_shards(20_000, 2) == [Shard(0, 10_000), Shard(10_000, 10_000)]
    assert plan_shards(100, 4, min_shard=64) == [Shard(0, 100)]
    assert len(plan_shards(256, 8, min_shard=64)) == 4


def test_bad_plans_and_shards_are_refused_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="samples must be positive"):
        plan_shards(0, 2)
    with pytest.raises(ValueError, match="workers must be positive"):
        plan_shards(10, 0)
    with pytest.raises(ValueError, match="multiple of 8"):
        Shard(4, 10)
    with pytest.raises(ValueError, match="count must be positive"):
        Shard(8, 0)


# -- Chan's merge ------------------------------------------------------------------------------


def _stats(values: Tensor, first: int) -> PartialStats:
    """Direct statistics of samples values [B, S, F] (numbered from `first`)."""
    mean = values.mean(1)
    return PartialStats(
        first=first,
        count=values.shape[1],
        mean=mean,
        m2=((values - mean.unsqueeze(1)) ** 2).sum(1),
        kept=values,
        log_sum_exp=torch.logsumexp(values[..., 0], dim=1),
    )


def test_merging_two_halves_by_hand() -> None:
    # samples 1, 2 | 3, 4: means 1.5 and 3.5, M2 0.5 each -> mean 2.5, M2 0.5+0.5+2^2*2*2/4 = 5
    a = _stats(torch.tensor([[[1.0], [2.0]]], dtype=torch.float64), 0)
    b = _stats(torch.tensor([[[3.0], [4.0]]], dtype=torch.float64), 2)
    merged = merge_partials([a, b])
    assert merged.count == 4
    assert merged.mean.item() == 2.5
    assert merged.m2.item() == 5.0
    assert merged.kept is not None
    assert merged.kept.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]


def test_merging_uneven_shards_in_any_order_equals_the_direct_statistics() -> None:
    values = torch.randn(3, 203, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    values[1] += 1e6  # a large offset: the naive sum-of-squares formula would lose digits
    cuts = [0, 8, 96, 200, 203]
    parts = [_stats(values[:, a:b], a) for a, b in itertools.pairwise(cuts)]
    merged = merge_partials(parts[::-1])
    direct = _stats(values, 0)
    torch.testing.assert_close(merged.mean, direct.mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(merged.m2, direct.m2, rtol=1e-9, atol=0)
    assert merged.log_sum_exp is not None
    assert direct.log_sum_exp is not None
    torch.testing.assert_close(merged.log_sum_exp, direct.log_sum_exp)
    assert merged.kept is not None
    assert torch.equal(merged.kept, values)


def test_merging_refuses_gaps_overlaps_and_mismatched_shapes() -> None:
    a = _stats(torch.zeros(1, 8, 2, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="contiguous"):
        merge_partials([a, _stats(torch.zeros(1, 8, 2, dtype=torch.float64), 16)])
    with pytest.raises(ValueError, match="shape"):
        merge_partials([a, _stats(torch.zeros(2, 8, 2, dtype=torch.float64), 8)])
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_partials([])


# -- split runs equal whole runs ------------------------------------------------------------


def _engine(task: str, heteroscedastic: bool = False) -> MCEngine:
    torch.manual_seed(0)
    outputs = 3 if task == "classification" else (4 if heteroscedastic else 2)
    module = build_mlp(5, outputs, [16, 16], 0.3, 0.1, "relu")
    return MCEngine(
        module,
        task=task,  # type: ignore[arg-type]
        input_shape=(5,),
        heteroscedastic=heteroscedastic,
        tau=None if heteroscedastic or task == "classification" else 4.0,
        chunk_elements=4096,  # several chunks per shard, unlike the whole run's layout
        output_scale=None if task == "classification" else torch.tensor([2.0, 0.5]),
        output_shift=None if task == "classification" else torch.tensor([1.0, -1.0]),
    )


def _split(
    engine: MCEngine, x: Tensor, opts: MCOptions, shards: int, targets: Tensor | None = None
) -> Summary:
    executor = SerialExecutor(lambda _: engine, workers=shards)
    return run_sharded(executor, REF, engine.head, MCRequest(x, opts, targets), min_shard=BLOCK)


def _assert_same(split: Summary, whole: Summary) -> None:
    """Every field equal up to summation order (kept samples and seeds exactly)."""
    assert type(split) is type(whole)
    for f in dataclasses.fields(whole):
        a, b = getattr(split, f.name), getattr(whole, f.name)
        if isinstance(b, Tensor):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f.name)
        elif isinstance(b, dict):
            assert a.keys() == b.keys()
            for level in b:
                torch.testing.assert_close(a[level].lower, b[level].lower, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(a[level].upper, b[level].upper, rtol=1e-12, atol=1e-12)
        else:
            assert a == b, f.name


CASES = [("regression", False), ("regression", True), ("classification", False)]


@pytest.mark.parametrize("shards", [1, 2, 3, 5])
@pytest.mark.parametrize("mask_mode", ["independent", "shared"])
@pytest.mark.parametrize(("task", "hetero"), CASES)
def test_split_answer_equals_the_single_run(
    shards: int, mask_mode: str, task: str, hetero: bool
) -> None:
    engine = _engine(task, hetero)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    opts = MCOptions(
        samples=203, seed=11, mask_mode=mask_mode,  # type: ignore[arg-type]
        interval_levels=(0.5, 0.9), return_samples=40,
    )  # fmt: skip
    whole = engine.run(x, opts)
    split = _split(engine, x, opts, shards)
    _assert_same(split, whole)
    if shards == 1:  # one shard is the single run's own arithmetic
        for f in ("mean", "probabilities"):
            if hasattr(whole, f):
                assert torch.equal(getattr(split, f), getattr(whole, f))


def test_split_log_likelihood_and_kept_samples_across_the_kept_limit() -> None:
    engine = _engine("regression")
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([[0.5, -1.0], [1.0, 0.0]], dtype=torch.float64)
    opts = MCOptions(samples=6000, seed=4, return_samples=10)  # 4,096 kept for the quantiles
    whole = engine.run(x, opts, targets=y)
    split = _split(engine, x, opts, 3, targets=y)  # shards 0..1999 | 2000..3999 | 4000..5999
    assert isinstance(split, RegressionSummary)
    assert split.log_likelihood is not None
    _assert_same(split, whole)


def test_a_split_without_seed_draws_one_and_reports_it() -> None:
    engine = _engine("classification")
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(5))
    split = _split(engine, x, MCOptions(samples=64), 2)
    assert isinstance(split, ClassificationSummary)
    again = engine.run(x, MCOptions(samples=64, seed=split.seed))
    _assert_same(split, again)


def test_shards_must_be_seeded_fixed_and_inside_the_request() -> None:
    engine = _engine("classification")
    x = torch.zeros(1, 5)
    with pytest.raises(ValueError, match="seeded"):
        engine.run_shard(MCRequest(x, MCOptions(samples=64)), Shard(0, 64))
    with pytest.raises(ValueError, match="run past"):
        engine.run_shard(MCRequest(x, MCOptions(samples=64, seed=0)), Shard(8, 64))
    with pytest.raises(ValueError, match="auto"):
        _split(engine, x, MCOptions(samples="auto", seed=0), 2)
    part = engine.run_shard(MCRequest(x, MCOptions(samples=64, seed=0)), Shard(8, 8))
    with pytest.raises(ValueError, match="every sample from 0"):
        finish(engine.head, part, 0, (0.95,), 0)


def test_shard_statistics_are_those_of_their_own_samples_only() -> None:
    """A shard's moments equal the direct moments of the samples it owns in a whole run."""
    engine = _engine("classification")
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(6))
    whole = engine.run(x, MCOptions(samples=64, seed=3, return_samples=64))
    assert isinstance(whole, ClassificationSummary)
    assert whole.samples is not None
    part = engine.run_shard(MCRequest(x, MCOptions(samples=64, seed=3)), Shard(24, 16))
    torch.testing.assert_close(part.mean[:, :3], whole.samples[:, 24:40].mean(1))


def test_without_interval_levels_no_samples_are_kept_and_the_moments_are_unchanged() -> None:
    """Kept samples only serve empirical intervals; a request asking for none skips them."""
    engine = _engine("regression")
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(7))
    y = torch.randn(3, 2, generator=torch.Generator().manual_seed(8))
    with_levels = MCRequest(x, MCOptions(samples=64, seed=4), targets=y)
    without = MCRequest(x, MCOptions(samples=64, seed=4, interval_levels=()), targets=y)
    assert engine.run_shard(with_levels, Shard(0, 64)).kept is not None
    part = engine.run_shard(without, Shard(0, 64))
    assert part.kept is None
    plain, full = engine.run_many([without])[0], engine.run_many([with_levels])[0]
    assert isinstance(plain, RegressionSummary)
    assert isinstance(full, RegressionSummary)
    assert plain.empirical_intervals == {}
    assert set(full.empirical_intervals) == {0.95}
    assert torch.equal(plain.mean, full.mean)
    assert torch.equal(plain.epistemic_variance, full.epistemic_variance)
    assert plain.log_likelihood is not None
    assert full.log_likelihood is not None
    assert torch.equal(plain.log_likelihood, full.log_likelihood)
