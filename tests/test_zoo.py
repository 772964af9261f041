"""Acceptance of "the engine samples the whole dropout family": the model zoo against its own
training-mode passes, seeds, untouched weights, and closed forms (Gaussian dropout, DropConnect
against input dropout, DropPath).

Every comparison is within a Monte Carlo band derived from the sample count (see
`model_zoo.variance_ratio_tolerance`), never a hand-tuned constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from conftest import summary_tensors
from model_zoo import (
    DETERMINISTIC,
    DROP_PATH_P,
    DROPCONNECT_LINEAR,
    GAUSSIAN_LINEAR,
    MASK_PER_CALL,
    ZOO,
    AuxHeadNet,
    DropPathResidual,
    build_aux_head,
    build_drop_path_residual,
    build_dropconnect_linear,
    build_gaussian_linear,
    build_input_dropout_linear,
    excess_kurtosis,
    training_mode_recipe,
    training_mode_samples,
    variance_ratio_tolerance,
    variance_tolerance,
)
from torch import Tensor, nn

from mcdrop.engine.core import MCEngine, MCOptions, MCRequest
from mcdrop.uncertainty import ClassificationSummary, RegressionSummary

SAMPLES = 2000
ROWS = 4
SAMPLED = [name for name, entry in ZOO.items() if entry.expected == "sampled"]


def _rows(name: str, rows: int = ROWS, seed: int = 0) -> Tensor:
    """Seeded standard-normal rows [rows, *input_shape] for zoo model `name`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((rows, *ZOO[name].input_shape), generator=gen)


def _regression_engine(model: nn.Module, name: str) -> MCEngine:
    """The engine on the model's raw outputs (logits too): the variance compared to the recipe."""
    return MCEngine(model, task="regression", input_shape=ZOO[name].input_shape)


def _epistemic(summary: RegressionSummary | ClassificationSummary) -> Tensor:
    assert isinstance(summary, RegressionSummary)
    return summary.epistemic_variance.to(torch.float64)


def _assert_identical(
    a: RegressionSummary | ClassificationSummary,
    b: RegressionSummary | ClassificationSummary,
    what: str,
) -> None:
    ta, tb = summary_tensors(a), summary_tensors(b)
    assert ta.keys() == tb.keys(), what
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{what}: fields {differ} differ"


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- (a) the engine's variance equals the model's own training-mode variance ----------------


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLED)
def test_engine_variance_equals_the_models_own_training_mode_variance(name: str) -> None:
    """Σ engine variance / Σ recipe variance over ROWS rows x all outputs is 1 within 4 sigma."""
    model = ZOO[name].factory()
    x = _rows(name)
    reference = training_mode_samples(  # before the engine sees the model, [S, B, D]
        model,
        x,
        SAMPLES,
        seed=1,
        deterministic=DETERMINISTIC.get(name, ()),
        passes_per_call=1 if name in MASK_PER_CALL else 250,
    )
    ref_var = reference.var(dim=0)
    engine = _regression_engine(model, name)
    got = _epistemic(engine.run(x, MCOptions(samples=SAMPLES, seed=2)))
    assert got.shape == ref_var.shape
    ratio = float(got.sum() / ref_var.sum())
    kappa = excess_kurtosis(reference)
    tol = variance_ratio_tolerance(SAMPLES, kappa)
    assert abs(ratio - 1.0) <= tol, (
        f"{name}: engine / training-mode variance = {ratio:.3f}, expected 1 ± {tol:.3f} "
        f"(4 sigma of the ratio of two independent {SAMPLES}-sample variance sums: "
        f"4·√2·√(2/(N-1) + κ/N), pooled excess kurtosis κ = {kappa:.2f} from the recipe)"
    )


# -- (b) seeds: the same answer across requests and whatever shares the batch ----------------


@pytest.mark.parametrize("name", SAMPLED)
def test_seeded_answers_reproduce_across_requests_and_batch_neighbours(name: str) -> None:
    entry = ZOO[name]
    engine = MCEngine(entry.factory(), task=entry.task, input_shape=entry.input_shape)
    x = _rows(name)
    opts = MCOptions(samples=64, seed=5)
    first = engine.run(x, opts)
    _assert_identical(first, engine.run(x, opts), f"{name}: the same seed twice")
    other = engine.run(x, MCOptions(samples=64, seed=6))
    assert summary_tensors(first).keys() == summary_tensors(other).keys()
    assert any(
        not torch.equal(v, summary_tensors(other)[k]) for k, v in summary_tensors(first).items()
    ), f"{name}: seeds 5 and 6 gave identical answers: nothing samples"
    alone = [engine.run(x[i : i + 1], opts) for i in range(ROWS)]
    together = engine.run_many([MCRequest(x[i : i + 1], opts) for i in range(ROWS)])
    for i, (a, t) in enumerate(zip(alone, together, strict=True)):
        _assert_identical(a, t, f"{name}: row {i} alone vs batched with the other rows")
    neighbours = engine.run_many(
        [
            MCRequest(_rows(name, 2, seed=1), MCOptions(samples=64, seed=7)),
            MCRequest(x, opts),
            MCRequest(_rows(name, 5, seed=2), MCOptions(samples=64, seed=8)),
        ]
    )
    _assert_identical(first, neighbours[1], f"{name}: request alone vs between neighbours")


# -- (c) the model is untouched ----------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLED)
def test_parameters_and_buffers_stay_bit_identical_after_many_runs(name: str) -> None:
    """Weights and BatchNorm buffers (num_batches_tracked too) unchanged; norms stay in eval."""
    entry = ZOO[name]
    model = entry.factory()
    before = _state(model)
    engine = MCEngine(model, task=entry.task, input_shape=entry.input_shape)
    for seed in range(6):
        engine.run(_rows(name, 4, seed=seed), MCOptions(samples=50, seed=seed))
    after = model.state_dict()
    assert before.keys() == after.keys(), f"{name}: the model's state keys changed"
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{name}: engine runs changed {changed}"
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert not any(model.get_submodule(n).training for n in norms), f"{name}: a norm trains"


# -- (e), (f) closed forms ---------------------------------------------------------------------


@pytest.mark.slow
def test_gaussian_dropout_on_one_linear_layer_has_variance_sigma2_sum_w2_x2() -> None:
    """y = w·(x ⊙ (1 + σε)) + b is Gaussian: mean w·x + b, variance σ² Σ w² x² (κ = 0)."""
    weight, bias, sigma = GAUSSIAN_LINEAR
    w = torch.tensor(weight, dtype=torch.float64)
    x = torch.tensor([[1.0, 2.0, -0.5, 4.0], [0.3, -1.0, 2.0, 0.5]])
    engine = MCEngine(build_gaussian_linear(), task="regression", input_shape=(4,))
    out = engine.run(x, MCOptions(samples=SAMPLES, seed=3))
    assert isinstance(out, RegressionSummary)
    xd = x.to(torch.float64)
    mean = xd @ w + bias
    var = sigma**2 * (w**2 * xd**2).sum(dim=1)
    tol = variance_tolerance(SAMPLES)
    got_var = _epistemic(out)[:, 0]
    got_mean = out.mean[:, 0].to(torch.float64)
    assert bool(((got_mean - mean).abs() <= 4 * (var / SAMPLES).sqrt()).all()), (got_mean, mean)
    ratio = got_var / var
    assert bool(((ratio - 1).abs() <= tol).all()), (
        f"engine variance / σ²Σw²x² = {ratio.tolist()}, expected 1 ± {tol:.3f} "
        f"(4·√(2/(N-1)), N = {SAMPLES})"
    )


@pytest.mark.slow
def test_dropconnect_on_a_two_output_linear_layer_has_independent_outputs() -> None:
    """y_j = Σ_i w_ji x_i m_ji / (1-p): Var y_j = p/(1-p) Σ_i (w_ji x_i)², Cov(y_1, y_2) = 0;
    input dropout (one mask m_i shared by both outputs) has Cov = p/(1-p) Σ_i w_1i w_2i x_i²."""
    weight, _, p = DROPCONNECT_LINEAR
    w = torch.tensor(weight, dtype=torch.float64)
    x = torch.tensor([[1.0, 2.0, -0.5, 1.5], [0.5, -1.0, 2.0, 0.25]])
    a = w[None] * x.to(torch.float64)[:, None, :]  # [B, out, in]: the terms w_ji x_i
    var = p / (1 - p) * a.square().sum(dim=-1)  # [B, 2]
    q = 1 - p  # each term a two-point variable: excess kurtosis (1 - 6pq)/(pq), pooled below
    kappa = (1 - 6 * p * q) / (p * q) * a.pow(4).sum(dim=-1) / a.square().sum(dim=-1).square()
    input_cov = p / (1 - p) * (a[:, 0] * a[:, 1]).sum(dim=-1)  # [B]
    bands = []
    for build, kind, cov in ((build_dropconnect_linear, "dropconnect", torch.zeros(2)),
                             (build_input_dropout_linear, "dropout", input_cov)):  # fmt: skip
        engine = MCEngine(build(), task="regression", input_shape=(4,))
        assert [s.kind for s in engine.sites] == [kind]
        out = engine.run(x, MCOptions(samples=SAMPLES, seed=9, return_samples=SAMPLES))
        assert isinstance(out, RegressionSummary)
        assert out.samples is not None
        y = out.samples.to(torch.float64)  # [B, N, 2]
        ratio = _epistemic(out) / var
        tol = torch.tensor([[variance_tolerance(SAMPLES, float(k)) for k in row] for row in kappa])
        assert bool(((ratio - 1).abs() <= tol).all()), (
            f"{kind}: engine variance / (p/(1-p) Σ w² x²) = {ratio.tolist()}, expected 1 ± "
            f"{tol.tolist()} (4·√(2/(N-1) + κ/N), κ of a sum of two-point terms)"
        )
        centred = y - y.mean(dim=1, keepdim=True)
        products = centred[..., 0] * centred[..., 1]  # [B, N]
        got = products.sum(dim=1) / (SAMPLES - 1)
        band = 4 * products.std(dim=1) / math.sqrt(SAMPLES)  # 4 standard errors of the mean
        bands.append(band)
        assert bool(((got - cov).abs() <= band).all()), (
            f"{kind}: Cov(y1, y2) = {got.tolist()}, expected {cov.tolist()} ± {band.tolist()}"
        )
    assert bool((input_cov.abs() > bands[0] + bands[1]).all()), "the bands overlap: no power"


def _drop_path_closed_form(model: DropPathResidual, x: Tensor) -> tuple[Tensor, Tensor, float]:
    """Mean x + f(x), variance f(x)² p/(1-p) [B, F] by hand, and the excess kurtosis.

    Each output is a two-point variable (keep with probability q = 1 - p), whose excess
    kurtosis is (1 - 6pq) / (pq).
    """
    p = DROP_PATH_P
    xd = x.to(torch.float64)
    f = xd @ model.f.weight.detach().to(torch.float64).T + model.f.bias.detach().to(torch.float64)
    q = 1 - p
    return xd + f, f**2 * p / (1 - p), (1 - 6 * p * q) / (p * q)


@pytest.mark.slow
def test_drop_path_on_a_residual_block_has_mean_x_plus_f_and_variance_f2_p_over_1_minus_p() -> None:
    model = build_drop_path_residual()
    assert isinstance(model, DropPathResidual)
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.5, 0.7, 2.0, -0.3]])
    mean, var, kappa = _drop_path_closed_form(model, x)
    engine = MCEngine(model, task="regression", input_shape=(4,))
    out = engine.run(x, MCOptions(samples=SAMPLES, seed=4))
    assert isinstance(out, RegressionSummary)
    got_mean = out.mean.to(torch.float64)
    assert bool(((got_mean - mean).abs() <= 4 * (var / SAMPLES).sqrt() + 1e-6).all()), (
        f"engine mean {got_mean.tolist()} vs x + f(x) {mean.tolist()}"
    )
    tol = variance_tolerance(SAMPLES, kappa)
    got = _epistemic(out)
    assert bool(((got - var).abs() <= tol * var + 1e-9).all()), (
        f"engine variance / (f² p/(1-p)) = {(got / var).tolist()}, expected 1 ± {tol:.3f} "
        f"(4·√(2/(N-1) + κ/N), two-point κ = {kappa:.3f}, N = {SAMPLES})"
    )


# -- (g) a deterministic training-only branch is not taken -----------------------------------


@pytest.mark.slow
def test_a_deterministic_training_branch_stays_off_while_dropout_samples() -> None:
    """BatchNorm stays in eval and the auxiliary head never runs; the nn.Dropout variance
    equals the recipe's with the root kept in eval (its branch is deterministic)."""
    model = build_aux_head()
    assert isinstance(model, AuxHeadNet)
    x = _rows("aux_head_bn", 4)
    before = _state(model)
    reference = training_mode_samples(model, x, SAMPLES, seed=1, deterministic=("",))
    engine = _regression_engine(model, "aux_head_bn")
    aux_calls: list[int] = []  # counted while sampling (a load-time probe may look at it)
    model.aux_head.register_forward_hook(lambda m, i, o: aux_calls.append(1))
    out = engine.run(x, MCOptions(samples=SAMPLES, seed=2))
    assert isinstance(out, RegressionSummary)
    assert out.mean.shape == (4, 3)
    assert not aux_calls, "sampling ran the training-only auxiliary head"
    ref_var = reference.var(dim=0)
    ratio = float(_epistemic(out).sum() / ref_var.sum())
    tol = variance_ratio_tolerance(SAMPLES, excess_kurtosis(reference))
    assert abs(ratio - 1) <= tol, f"engine / recipe variance = {ratio:.3f}, expected 1 ± {tol:.3f}"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "BatchNorm buffers changed"


# -- the reference and the tolerance are right on their own ----------------------------------


def test_the_recipe_matches_closed_forms_and_leaves_the_model_and_rng_as_they_were() -> None:
    model = build_drop_path_residual()
    assert isinstance(model, DropPathResidual)
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    _, var, kappa = _drop_path_closed_form(model, x)
    rng = torch.get_rng_state()
    mean, got = training_mode_recipe(model, x, SAMPLES, seed=0)
    assert torch.equal(torch.get_rng_state(), rng), "the recipe moved the global RNG"
    assert not any(m.training for m in model.modules()), "training flags not restored"
    assert mean.shape == got.shape == (1, 4)
    assert bool(((got - var).abs() <= variance_tolerance(SAMPLES, kappa) * var).all())

    gauss = build_gaussian_linear()
    weight, _, sigma = GAUSSIAN_LINEAR
    xg = torch.tensor([[1.0, 2.0, -0.5, 4.0]])
    expected = sigma**2 * sum(w * w * v * v for w, v in zip(weight, xg[0].tolist(), strict=True))
    _, gvar = training_mode_recipe(gauss, xg, SAMPLES, seed=0)
    assert abs(float(gvar) / expected - 1) <= variance_tolerance(SAMPLES)

    unet = ZOO["unet"].factory()  # BatchNorm with running statistics stays in eval
    before = _state(unet)
    training_mode_recipe(unet, _rows("unet", 2), 20, seed=0)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    with pytest.raises(TypeError, match="deterministic"):  # its training branch returns a list
        training_mode_recipe(build_aux_head(), _rows("aux_head_bn", 2), 4, seed=0)


def _gaussian(gen: torch.Generator, n: int) -> Tensor:
    return torch.randn((n, 1), generator=gen, dtype=torch.float64)


def _exponential(gen: torch.Generator, n: int) -> Tensor:
    return torch.empty((n, 1), dtype=torch.float64).exponential_(generator=gen)


def _correlated(gen: torch.Generator, n: int) -> Tensor:
    """Six outputs mixing a shared exponential, a shared Bernoulli and independent noise."""
    shared = torch.empty((n, 1), dtype=torch.float64).exponential_(generator=gen)
    coin = torch.bernoulli(torch.full((n, 1), 0.3, dtype=torch.float64), generator=gen)
    noise = torch.randn((n, 6), generator=gen, dtype=torch.float64)
    return shared * torch.linspace(0.2, 1.0, 6) + 0.8 * coin + noise


@pytest.mark.parametrize("draw", [_gaussian, _exponential, _correlated],
                         ids=["gaussian", "exponential", "correlated-outputs"])  # fmt: skip
def test_the_ratio_tolerance_is_four_times_the_measured_spread_of_variance_ratios(
    draw: Callable[[torch.Generator, int], Tensor],
) -> None:
    """std(Σs₁²/Σs₂²) over 300 pairs of 2,000-draw variance sums is the tolerance / 4 (± 15%),
    with κ estimated from one side of each pair as the zoo test does (exponential: κ = 6)."""
    gen = torch.Generator().manual_seed(0)
    ratios, predicted = [], []
    for _ in range(300):
        a, b = draw(gen, SAMPLES), draw(gen, SAMPLES)
        ratios.append(float(a.var(dim=0).sum() / b.var(dim=0).sum()))
        predicted.append(variance_ratio_tolerance(SAMPLES, excess_kurtosis(a)) / 4)
    measured = float(torch.tensor(ratios).std())
    typical = float(torch.tensor(predicted).median())
    assert abs(measured / typical - 1) < 0.15, (measured, typical)
    assert math.isclose(variance_ratio_tolerance(SAMPLES), 8 / math.sqrt(SAMPLES), rel_tol=0.01)
