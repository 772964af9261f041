"""MCEngine: exact MC estimates, untouched models, seeds, chunking, batching, summaries."""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import summary_tensors
from test_program import Attention, DataDependent, FunctionalDropout
from torch import Tensor, nn

from mcdrop.engine.accumulators import LOG_VARIANCE_BOUND, MAX_VARIANCE, Accumulators, OutputHead
from mcdrop.engine.core import MCEngine, MCOptions, MCRequest
from mcdrop.engine.masks import quantized_drop_probability
from mcdrop.engine.sampling import multihead_attention
from mcdrop.uncertainty import (
    ClassificationSummary,
    Interval,
    NonFinite,
    RegressionSummary,
    first_non_finite,
)


def _linear(weights: list[float], bias: float, p: float) -> nn.Sequential:
    lin = nn.Linear(len(weights), 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([weights]))
        lin.bias.fill_(bias)
    return nn.Sequential(nn.Dropout(p), lin)


def _regression(model: nn.Module, shape: tuple[int, ...], **kw: object) -> MCEngine:
    return MCEngine(model, task="regression", input_shape=shape, **kw)  # type: ignore[arg-type]


def _reg(summary: object) -> RegressionSummary:
    assert isinstance(summary, RegressionSummary)
    return summary


def _cls(summary: object) -> ClassificationSummary:
    assert isinstance(summary, ClassificationSummary)
    return summary


def test_linear_layer_mean_and_variance_converge_to_the_closed_form() -> None:
    w, b, p = [0.5, -1.0, 2.0, 0.25], 0.3, 0.25  # p is exact in 16-bit thresholds
    x = torch.tensor([[1.0, 2.0, -0.5, 4.0]])
    engine = _regression(_linear(w, b, p), (4,))
    n = 20_000
    out = _reg(engine.run(x, MCOptions(samples=n, seed=11)))
    wx = [wi * xi for wi, xi in zip(w, x[0].tolist(), strict=True)]
    mean = sum(wx) + b
    var = p / (1 - p) * sum(v * v for v in wx)
    # Exact fourth central moment by enumerating all 2^4 masks: the tolerance follows from N.
    mu4 = 0.0
    for keep in itertools.product([0, 1], repeat=4):
        prob = math.prod((1 - p) if k else p for k in keep)
        y = sum(k * v / (1 - p) for k, v in zip(keep, wx, strict=True)) + b
        mu4 += prob * (y - mean) ** 4
    assert abs(out.mean.item() - mean) < 5 * math.sqrt(var / n)
    assert abs(out.epistemic_variance.item() - var) < 5 * math.sqrt((mu4 - var**2) / n)
    assert out.samples_used == n


def test_parameters_buffers_and_batchnorm_stay_bit_for_bit_unchanged() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout2d(0.2),
        nn.Flatten(), nn.Linear(48, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(8, 3),
    )  # fmt: skip
    model.train()
    model(torch.randn(16, 1, 4, 4))  # move BatchNorm's running statistics off their defaults
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = MCEngine(model, task="classification", input_shape=(1, 4, 4), chunk_elements=4096)
    for seed in range(5):
        engine.run(torch.randn(3, 1, 4, 4), MCOptions(samples=40, seed=seed))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in model.modules())


def test_the_prefix_runs_once_per_row_and_chunks_respect_the_budget() -> None:
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))
    prefix_rows: list[int] = []
    suffix_rows: list[int] = []
    engine = _regression(model, (6,), chunk_elements=16 * 64)
    model[0].register_forward_hook(lambda m, i, o: prefix_rows.append(i[0].shape[0]))
    model[3].register_forward_hook(lambda m, i, o: suffix_rows.append(i[0].shape[0]))
    engine.run(torch.randn(3, 6), MCOptions(samples=1000, seed=0))
    assert prefix_rows == [8]  # one call; 3 rows padded to the 8-row alignment
    assert sum(suffix_rows) == 3 * 1000
    assert max(suffix_rows) * 16 <= 16 * 64  # no chunk holds more than the budget


def test_hundred_thousand_samples_stream_in_bounded_chunks() -> None:
    model = _linear([1.0, 1.0], 0.0, 0.5)
    rows_seen: list[int] = []
    engine = _regression(model, (2,), chunk_elements=1 << 14)
    model[1].register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[0]))
    out = _reg(engine.run(torch.tensor([[1.0, 1.0]]), MCOptions(samples=100_000, seed=1)))
    assert out.samples_used == 100_000
    assert max(rows_seen) <= (1 << 14) // 2
    assert abs(out.mean.item() - 2.0) < 0.02
    assert abs(out.epistemic_variance.item() - 2.0) < 0.05  # p/(1-p) * (1 + 1) = 2


@pytest.mark.parametrize(("mask_mode", "streams"), [("independent", 40 * 1), ("shared", 4)])
def test_chunks_draw_each_mask_stream_as_few_times_as_the_budget_allows(
    mask_mode: str, streams: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Independent masks: one keyed stream per row (all its samples fit a chunk); shared
    masks: one per chunk of samples, covering every row at once."""
    import mcdrop.engine.masks as masks

    calls: list[int] = []
    real = masks._row_bits

    def counted(*args: int) -> object:
        calls.append(args[2])
        return real(*args)

    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
    engine = _regression(model, (3,), chunk_elements=16 * 2560, tau=1.0)
    monkeypatch.setattr(masks, "_row_bits", counted)  # after the load-time audit's draws
    opts = MCOptions(samples=256, seed=0, mask_mode=mask_mode)  # type: ignore[arg-type]
    engine.run(torch.randn(40, 3), opts)  # 40 rows x 256 samples: four times the budget
    assert len(calls) == streams


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 32), nn.ReLU(),
                         nn.Dropout(0.3), nn.Linear(32, 4))  # fmt: skip


@pytest.mark.parametrize("mask_mode", ["independent", "shared"])
def test_seeded_results_are_identical_for_every_chunk_size(mask_mode: str) -> None:
    x = torch.randn(13, 5)
    opts = MCOptions(samples=203, seed=42, mask_mode=mask_mode)  # type: ignore[arg-type]
    results = []
    for chunk in (1 << 10, 1 << 13, 1 << 24):
        engine = MCEngine(_mlp(), task="classification", input_shape=(5,), chunk_elements=chunk)
        results.append(_cls(engine.run(x, opts)))
    for other in results[1:]:
        assert torch.equal(other.probabilities, results[0].probabilities)
        assert torch.equal(other.expected_entropy, results[0].expected_entropy)
        assert torch.equal(other.variation_ratio, results[0].variation_ratio)


def _counted_engine() -> tuple[MCEngine, list[int]]:
    """A fixed-weight Linear-Dropout-Linear engine of 64 (row, sample) pairs per chunk, and the
    row counts of its suffix's forward calls (one per chunk)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))
    engine = _regression(model, (3,), chunk_elements=16 * 64, tau=1.0)
    forwards: list[int] = []
    model[3].register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0]))
    return engine, forwards


@pytest.mark.parametrize(
    "options",
    [
        MCOptions(samples=1000, seed=0),
        MCOptions(samples=300, seed=0, mask_mode="shared"),
        MCOptions(samples="auto", tolerance=1e-9, max_samples=500, seed=0),  # runs to the max
    ],
    ids=["independent", "shared", "auto"],
)
def test_the_checkpoint_runs_once_per_chunk_and_leaves_the_numbers_alone(
    options: MCOptions,
) -> None:
    engine, forwards = _counted_engine()
    x = torch.randn(5, 3)
    plain = _reg(engine.run(x, options))
    forwards.clear()
    seen: list[int] = []  # forward calls done when the checkpoint was called
    request = MCRequest(x, options)
    checked = _reg(engine.run_many([request], checkpoint=lambda: seen.append(len(forwards)))[0])
    assert seen == list(range(1, len(forwards) + 1))  # once after every chunk, nowhere else
    assert len(seen) == engine.chunk_count(len(x), options) > 4
    assert torch.equal(checked.mean, plain.mean)
    assert torch.equal(checked.epistemic_variance, plain.epistemic_variance)
    assert checked.samples_used == plain.samples_used


def test_an_exception_from_the_checkpoint_abandons_the_run() -> None:
    engine, forwards = _counted_engine()
    x, options = torch.randn(5, 3), MCOptions(samples=1000, seed=0)

    class Stop(Exception):
        """The caller gave up."""

    def stop_after_three() -> None:
        if len(forwards) == 3:
            raise Stop

    with pytest.raises(Stop):
        engine.run_many([MCRequest(x, options)], checkpoint=stop_after_three)
    assert len(forwards) == 3 < engine.chunk_count(len(x), options)  # no chunk after it
    forwards.clear()
    again = _reg(engine.run(x, options))  # the engine is none the worse
    assert len(forwards) == engine.chunk_count(len(x), options)
    assert again.samples_used == 1000


@pytest.mark.parametrize("mask_mode", ["independent", "shared"])
def test_seeded_results_do_not_depend_on_what_else_is_in_the_batch(mask_mode: str) -> None:
    engine = _regression(_mlp(), (5,))
    x = torch.randn(5, 5)
    opts = MCOptions(samples=100, seed=7, mask_mode=mask_mode)  # type: ignore[arg-type]
    alone = _reg(engine.run(x, opts))
    other = MCOptions(samples=100, seed=8, mask_mode=mask_mode)  # type: ignore[arg-type]
    together = engine.run_many(
        [
            MCRequest(torch.randn(3, 5), other),
            MCRequest(x, opts),
            MCRequest(torch.randn(9, 5), other),
        ]
    )
    batched = _reg(together[1])
    assert torch.equal(batched.mean, alone.mean)
    assert torch.equal(batched.epistemic_variance, alone.epistemic_variance)


def test_seeds_matter_and_a_drawn_seed_is_reported_and_reproducible() -> None:
    engine = _regression(_mlp(), (5,))
    x = torch.randn(2, 5)
    a = _reg(engine.run(x, MCOptions(samples=50, seed=1)))
    b = _reg(engine.run(x, MCOptions(samples=50, seed=2)))
    assert not torch.equal(a.mean, b.mean)
    drawn = _reg(engine.run(x, MCOptions(samples=50)))
    again = _reg(engine.run(x, MCOptions(samples=50, seed=drawn.seed)))
    assert torch.equal(drawn.mean, again.mean)


def test_shared_masks_apply_one_network_draw_to_every_row() -> None:
    engine = _regression(_mlp(), (5,))
    x = torch.randn(1, 5).repeat(3, 1)
    shared = _reg(
        engine.run(x, MCOptions(samples=16, seed=3, mask_mode="shared", return_samples=16))
    )
    indep = _reg(engine.run(x, MCOptions(samples=16, seed=3, return_samples=16)))
    assert shared.samples is not None
    assert indep.samples is not None
    assert torch.equal(shared.samples[0], shared.samples[2])
    assert not torch.equal(indep.samples[0], indep.samples[2])


def test_concurrent_calls_from_threads_match_sequential_answers() -> None:
    engine = _regression(_mlp(), (5,))
    inputs = [torch.randn(4, 5) for _ in range(6)]
    expected = [
        _reg(engine.run(x, MCOptions(samples=64, seed=i))).mean for i, x in enumerate(inputs)
    ]
    got: dict[int, Tensor] = {}

    def work(i: int) -> None:
        got[i] = _reg(engine.run(inputs[i], MCOptions(samples=64, seed=i))).mean

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[i], expected[i]) for i in range(6))


def test_functional_and_attention_dropout_really_sample() -> None:
    for model, shape in [
        (FunctionalDropout(), (4,)),
        (Attention(), (5, 8)),
        (DataDependent(), (3,)),
    ]:
        engine = _regression(model, shape)
        out = _reg(engine.run(torch.randn(2, *shape), MCOptions(samples=64, seed=0)))
        assert bool((out.epistemic_variance > 0).all()), type(model).__name__
        model.eval()
        with torch.no_grad():
            deterministic = model(torch.zeros(1, *shape))
        assert deterministic.shape[-1] == out.mean.shape[-1]


def test_attention_rewrite_equals_multihead_attention_without_dropout() -> None:
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(8, 2, dropout=0.0, batch_first=batch_first).eval()
        q = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
        pad = torch.zeros(3, 5, dtype=torch.bool)
        pad[0, -2:] = True
        with torch.no_grad():
            ref, ref_w = mha(q, q, q, key_padding_mask=pad)
            out, w = multihead_attention(mha, q, q, q, pad, True, None, True, False, lambda t: t)
        torch.testing.assert_close(out, ref)
        assert w is not None
        torch.testing.assert_close(w, ref_w)


def test_channel_dropout_zeroes_whole_channels_and_alpha_dropout_keeps_the_mean() -> None:
    model = nn.Sequential(nn.Dropout2d(0.5), nn.Flatten())
    engine = _regression(model, (2, 2, 2))
    out = _reg(engine.run(torch.ones(1, 2, 2, 2), MCOptions(samples=64, seed=0, return_samples=64)))
    assert out.samples is not None
    per_channel = out.samples[0].view(64, 2, 4)
    assert bool((per_channel.amin(-1) == per_channel.amax(-1)).all())  # each channel kept or not
    assert set(torch.unique(per_channel).tolist()) == {0.0, 2.0}
    alpha = _regression(nn.Sequential(nn.AlphaDropout(0.2)), (1,))
    x = torch.tensor([[0.7]])
    res = _reg(alpha.run(x, MCOptions(samples=40_000, seed=0)))
    q = quantized_drop_probability(0.2)
    a = ((1 - q) * (1 + q * 1.7580993408473766**2)) ** -0.5
    # E[a(x·keep + α'(1-keep)) + b] = a(1-q)x: the affine correction cancels the α' term.
    assert abs(res.mean.item() - a * (1 - q) * 0.7) < 5 * math.sqrt(
        res.epistemic_variance.item() / 40_000
    )


def test_adaptive_sampling_stops_at_the_tolerance_or_the_maximum() -> None:
    engine = _regression(_linear([1.0, 1.0], 0.0, 0.5), (2,))
    x = torch.tensor([[1.0, 1.0]])
    loose = _reg(
        engine.run(x, MCOptions(samples="auto", tolerance=0.1, max_samples=50_000, seed=0))
    )
    assert loose.samples_used < 50_000
    assert math.sqrt(loose.epistemic_variance.item() / loose.samples_used) <= 0.1
    tight = _reg(engine.run(x, MCOptions(samples="auto", tolerance=1e-6, max_samples=3000, seed=0)))
    assert tight.samples_used == 3000
    cls = MCEngine(_mlp(), task="classification", input_shape=(5,))
    auto = _cls(cls.run(torch.randn(2, 5), MCOptions(samples="auto", tolerance=0.01, seed=0)))
    se = (auto.probabilities_std.max(-1).values ** 2 / auto.samples_used).sqrt()
    assert auto.samples_used >= 64
    assert bool((se < 0.02).all())


def test_regression_summary_with_tau_heteroscedastic_head_and_raw_units() -> None:
    lin = nn.Linear(1, 2)  # emits [mean, log-variance]
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0], [0.0]]))
        lin.bias.copy_(torch.tensor([0.0, math.log(0.25)]))
    scale, shift = torch.tensor([3.0]), torch.tensor([10.0])
    model = nn.Sequential(nn.Dropout(0.5), lin)
    hetero = _regression(model, (1,), heteroscedastic=True, output_scale=scale, output_shift=shift)
    out = _reg(hetero.run(torch.tensor([[1.0]]), MCOptions(samples=4000, seed=0)))
    torch.testing.assert_close(
        out.aleatoric_variance, torch.tensor([[0.25 * 9]], dtype=torch.float64)
    )
    # mean: 10 + 3 * 2 * E[x * keep / (1-p)] = 16; epistemic: 9 * 4 * p/(1-p) = 36
    assert abs(out.mean.item() - 16.0) < 5 * math.sqrt(36 / 4000)
    assert abs(out.epistemic_variance.item() - 36.0) < 4.0
    torch.testing.assert_close(out.variance, out.epistemic_variance + out.aleatoric_variance)
    low, high = out.gaussian_intervals[0.95].lower, out.gaussian_intervals[0.95].upper
    torch.testing.assert_close(high - out.mean, 1.959963984540054 * out.std)
    torch.testing.assert_close(out.mean - low, high - out.mean)
    assert 0.95 in out.empirical_intervals
    tau = _regression(_linear([1.0], 0.0, 0.5), (1,), tau=4.0)
    res = _reg(tau.run(torch.tensor([[1.0]]), MCOptions(samples=100, seed=0)))
    torch.testing.assert_close(res.aleatoric_variance, torch.tensor([[0.25]], dtype=torch.float64))


def test_log_likelihood_is_the_mc_mixture_density() -> None:
    engine = _regression(_linear([1.0, -1.0], 0.5, 0.3), (2,), tau=2.0)
    x = torch.tensor([[1.0, 2.0], [0.5, 0.0]])
    y = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    out = _reg(engine.run(x, MCOptions(samples=300, seed=5, return_samples=300), targets=y))
    assert out.samples is not None
    assert out.log_likelihood is not None
    t = out.samples[..., 0]
    direct = (
        torch.logsumexp(-1.0 * (y - t) ** 2, dim=1)
        - math.log(300)
        - 0.5 * math.log(2 * math.pi)
        + 0.5 * math.log(2.0)
    )
    torch.testing.assert_close(out.log_likelihood, direct)


def test_classification_summary_equals_direct_computation_from_samples() -> None:
    engine = MCEngine(_mlp(), task="classification", input_shape=(5,))
    out = _cls(engine.run(torch.randn(3, 5), MCOptions(samples=96, seed=0, return_samples=96)))
    assert out.samples is not None
    p = out.samples  # [3, 96, 4]
    torch.testing.assert_close(out.probabilities, p.mean(1))
    torch.testing.assert_close(out.probabilities_std, p.std(1))
    mean_entropy = -(p * p.log()).sum(-1).mean(1)
    torch.testing.assert_close(out.expected_entropy, mean_entropy)
    entropy = -(p.mean(1) * p.mean(1).log()).sum(-1)
    torch.testing.assert_close(out.entropy, entropy)
    torch.testing.assert_close(out.mutual_information, entropy - mean_entropy)
    votes = F.one_hot(p.argmax(-1), 4).sum(1).max(-1).values
    torch.testing.assert_close(out.variation_ratio, 1 - votes.double() / 96)
    assert torch.equal(out.predicted_class, p.mean(1).argmax(-1))


def test_torchscript_fallback_gives_the_same_numbers_as_the_traced_model() -> None:
    model = _mlp().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(_mlp())
    x = torch.randn(4, 5)
    traced = _reg(_regression(model, (5,)).run(x, MCOptions(samples=40, seed=9)))
    whole = _reg(_regression(scripted, (5,)).run(x, MCOptions(samples=40, seed=9)))
    torch.testing.assert_close(whole.mean, traced.mean)
    torch.testing.assert_close(whole.epistemic_variance, traced.epistemic_variance)


def test_bad_options_and_devices_are_refused_with_the_field_named() -> None:
    engine = _regression(_mlp(), (5,))
    with pytest.raises(ValueError, match="samples"):
        engine.run(torch.randn(1, 5), MCOptions(samples=0))
    with pytest.raises(ValueError, match=r"input must have shape \[rows, 5\]"):
        engine.run(torch.randn(1, 4))
    with pytest.raises(ValueError, match="interval level"):
        engine.run(torch.randn(1, 5), MCOptions(interval_levels=(1.5,)))
    with pytest.raises(ValueError, match="too close to 1 for a finite interval"):
        engine.run(torch.randn(1, 5), MCOptions(interval_levels=(0.9999999999999999,)))
    near = engine.run(torch.randn(1, 5), MCOptions(samples=8, interval_levels=(0.999999999999999,)))
    assert bool(torch.isfinite(_reg(near).gaussian_intervals[0.999999999999999].upper).all())
    with pytest.raises(ValueError, match="only supported on a CUDA device"):
        _regression(_mlp(), (5,), dtype="bfloat16", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            _regression(_mlp(), (5,), device="cuda")
    assert _regression(_mlp(), (5,), device="auto").device.type in ("cpu", "cuda")


@pytest.mark.slow
def test_compiled_engine_matches_eager() -> None:
    eager = _regression(_mlp(), (5,))
    compiled = _regression(_mlp(), (5,), compile=True)
    for rows, samples in [(3, 32), (9, 100)]:  # new shapes must not break the compiled graphs
        x = torch.randn(rows, 5)
        want = _reg(eager.run(x, MCOptions(samples=samples, seed=0)))
        got = _reg(compiled.run(x, MCOptions(samples=samples, seed=0)))
        torch.testing.assert_close(got.mean, want.mean)
        torch.testing.assert_close(got.epistemic_variance, want.epistemic_variance)


# -- numerics: a heteroscedastic variance never overflows; non-finite summaries are found ----------


def test_a_log_variance_beyond_float64_is_capped_and_every_statistic_stays_finite() -> None:
    lin = nn.Linear(1, 2)  # [mean, log-variance] = [x, 1000 x]: e^5000 overflows float64
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [1000.0]]))
        lin.bias.zero_()
    engine = _regression(nn.Sequential(nn.Dropout(0.5), lin), (1,), heteroscedastic=True,
                         output_scale=torch.tensor([2.0]))  # fmt: skip
    x = torch.tensor([[5.0], [-5.0], [1e30]])  # log-variance 1e4 (capped), -1e4 (floored), 2e33
    y = torch.zeros(3, 1, dtype=torch.float64)
    options = MCOptions(samples=64, seed=0, return_samples=8, interval_levels=(0.5, 0.95))
    out = _reg(engine.run(x, options, targets=y))
    tensors = summary_tensors(out)
    assert {"log_likelihood", "samples", "gaussian_intervals[0.95].upper"} <= set(tensors)
    for name, tensor in tensors.items():
        assert bool(torch.isfinite(tensor).all()), (name, tensor)
    # each sample's variance is 2^2 * e^0 (input dropped) or the cap (kept), never more
    aleatoric = out.aleatoric_variance[:, 0]
    assert bool((aleatoric[[0, 2]] <= MAX_VARIANCE).all())
    assert bool((aleatoric[[0, 2]] > MAX_VARIANCE / 64).all())
    assert 0.0 < aleatoric[1].item() < 4.0  # the dropped samples' 4, the kept ones' floor


def test_the_moments_of_a_capped_variance_feature_stay_finite() -> None:
    head = OutputHead("regression", heteroscedastic=True,
                      scale=torch.tensor([2.0], dtype=torch.float64))  # fmt: skip
    acc = Accumulators(head, 1, 16, 0, None, torch.device("cpu"), intervals=False)
    log_var = torch.tensor([3e38, 0.0, -3e38, 0.0]).repeat(4)  # float32 extremes among zeros
    acc.update(slice(0, 1), 0, torch.stack([torch.zeros(16), log_var], -1).unsqueeze(0), 16)
    assert acc.moments is not None
    values = torch.tensor([MAX_VARIANCE, 4.0, 4.0 * math.exp(-LOG_VARIANCE_BOUND), 4.0] * 4,
                          dtype=torch.float64)  # fmt: skip
    mean, variance = acc.moments.mean[0, 1].item(), acc.moments.variance[0, 1].item()
    assert mean == pytest.approx(values.mean().item(), rel=1e-12)
    assert variance == pytest.approx(values.var().item(), rel=1e-9)  # the variance's square
    assert math.isfinite(variance)
    assert LOG_VARIANCE_BOUND == 300.0


def test_first_non_finite_names_the_first_field_its_rows_and_columns() -> None:
    zeros, ones = torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64)
    finite = RegressionSummary(zeros, ones, ones, 8, 0, {0.95: Interval(zeros, ones)},
                               log_likelihood=torch.zeros(3, dtype=torch.float64))  # fmt: skip
    aleatoric, lower = ones.clone(), zeros.clone()
    aleatoric[1, 1], aleatoric[2, 1], lower[0, 0] = math.inf, math.nan, math.nan
    both = dataclasses.replace(
        finite, aleatoric_variance=aleatoric, gaussian_intervals={0.95: Interval(lower, ones)}
    )
    interval = dataclasses.replace(finite, gaussian_intervals={0.95: Interval(lower, ones)})
    loglik = dataclasses.replace(finite, log_likelihood=torch.tensor([0.0, -math.inf, 0.0]))
    probs = torch.tensor([[math.nan, math.nan], [0.5, 0.5]], dtype=torch.float64)
    classes = ClassificationSummary(probs, probs.nan_to_num(), torch.zeros(2), torch.zeros(2),
                                    torch.zeros(2), 8, 0)  # fmt: skip
    assert first_non_finite(finite) is None
    assert first_non_finite(both) == NonFinite("aleatoric_variance", [1, 2], [1])
    assert first_non_finite(interval) == NonFinite("gaussian_intervals[0.95].lower", [0], [0])
    assert first_non_finite(loglik) == NonFinite("log_likelihood", [1], [])
    assert first_non_finite(classes) == NonFinite("probabilities", [0], [0, 1])
