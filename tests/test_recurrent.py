"""unstack_recurrent: same outputs as the fused nn.LSTM/GRU/RNN, dropout visible between layers."""

from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Any

import pytest
import torch
from torch import Tensor, fx, nn
from torch.nn.utils.rnn import pack_padded_sequence

from mcdrop.engine.recurrent import StackedRecurrent, unstack_recurrent
from mcdrop.errors import ModelLoadError

# oneDNN has no projected LSTM; torch warns (once) and runs its own kernel, original or not.
_PROJ_WARNING = "ignore:LSTM with projections is not supported with oneDNN:UserWarning"
pytestmark = pytest.mark.filterwarnings(_PROJ_WARNING)

IN, HIDDEN, LAYERS, T, N = 3, 5, 3, 7, 2
KINDS = ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"]


def _make(kind: str, *, bidirectional: bool = False, batch_first: bool = False,
          num_layers: int = LAYERS, dropout: float = 0.5, size: int = HIDDEN,
          input_size: int = IN) -> nn.RNNBase:  # fmt: skip
    """A seeded recurrent module of `kind` with the given options (deterministic weights)."""
    torch.manual_seed(1)
    kw: dict[str, Any] = {
        "input_size": input_size, "hidden_size": size, "num_layers": num_layers, "dropout": dropout,
        "bidirectional": bidirectional, "batch_first": batch_first,
    }  # fmt: skip
    if kind == "lstm":
        return nn.LSTM(**kw)
    if kind == "lstm_proj":
        return nn.LSTM(proj_size=2, **kw)
    if kind == "gru":
        return nn.GRU(**kw)
    return nn.RNN(nonlinearity=kind.removeprefix("rnn_"), **kw)


def _unstacked(module: nn.RNNBase) -> tuple[nn.RNNBase, StackedRecurrent]:
    """(a deep copy of the original, the rewrite of `module`)."""
    original = copy.deepcopy(module)
    stacked, paths = unstack_recurrent(module)
    assert paths == [""]
    assert isinstance(stacked, StackedRecurrent)
    return original, stacked


def _input(module: nn.RNNBase, batch: int = N, batched: bool = True) -> Tensor:
    """Input [N, T, IN] if batch_first else [T, N, IN] (or unbatched [T, IN])."""
    gen = torch.Generator().manual_seed(2)
    if not batched:
        return torch.randn(T, IN, generator=gen)
    shape = (batch, T, IN) if module.batch_first else (T, batch, IN)
    return torch.randn(*shape, generator=gen)


def _hx(module: nn.RNNBase, batched: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """A random initial state [num_layers * directions, N, H] (LSTM: (h, c))."""
    gen = torch.Generator().manual_seed(3)
    first = module.num_layers * (2 if module.bidirectional else 1)
    batch = (N,) if batched else ()
    h = torch.randn(first, *batch, module.proj_size or module.hidden_size, generator=gen)
    if isinstance(module, nn.LSTM):
        return h, torch.randn(first, *batch, module.hidden_size, generator=gen)
    return h


def _param(module: nn.Module, name: str) -> Tensor:
    """A module's tensor attribute, typed."""
    value = getattr(module, name)
    assert isinstance(value, Tensor)
    return value


def _flat(result: tuple[Tensor, Any]) -> list[Tensor]:
    """[output, h_n] or [output, h_n, c_n]."""
    output, state = result
    return [output, *state] if isinstance(state, tuple) else [output, state]


def _assert_identical(a: tuple[Tensor, Any], b: tuple[Tensor, Any]) -> None:
    fa, fb = _flat(a), _flat(b)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb, strict=True):
        assert x.shape == y.shape
        assert torch.equal(x, y), f"max |diff| {(x - y).abs().max().item():.3g}"


# (1) eval mode: bit-identical. The fused CPU kernel (native and oneDNN alike) runs the layers
# one after another with the same per-layer code, and a one-layer call is that code, so no
# reduction is regrouped; measured 0.0 max difference everywhere, also at 64 -> 128 units.
@pytest.mark.parametrize(
    ("kind", "bidirectional", "batch_first", "with_hx"),
    list(itertools.product(KINDS, [False, True], [False, True], [False, True])),
)
def test_eval_outputs_and_states_are_bit_identical(
    kind: str, bidirectional: bool, batch_first: bool, with_hx: bool
) -> None:
    original, stacked = _unstacked(
        _make(kind, bidirectional=bidirectional, batch_first=batch_first).eval()
    )
    x = _input(original)
    hx = _hx(original) if with_hx else None
    with torch.no_grad():
        _assert_identical(stacked(x, hx), original(x, hx))


@pytest.mark.parametrize("kind", KINDS)
def test_eval_unbatched_and_wide_inputs_are_bit_identical(kind: str) -> None:
    original, stacked = _unstacked(_make(kind, bidirectional=True, size=64).eval())
    with torch.no_grad():
        x, hx = _input(original, batched=False), _hx(original, batched=False)
        _assert_identical(stacked(x), original(x))
        _assert_identical(stacked(x, hx), original(x, hx))
        wide = _input(original, batch=16)
        _assert_identical(stacked(wide), original(wide))


def test_initial_states_of_the_wrong_depth_are_refused() -> None:
    _, stacked = _unstacked(_make("gru", num_layers=2))
    with pytest.raises(RuntimeError, match="num_layers"):
        stacked(torch.zeros(T, N, IN), torch.zeros(1, N, HIDDEN))


# (2) training mode. The kernel drops each non-last layer's output with at::dropout on the
# global RNG, in layer order; the rewrite calls the same op in the same order, so with the same
# seed even the masks coincide (measured: bit-identical, every kind and option).
@pytest.mark.parametrize(
    ("kind", "bidirectional", "batch_first"),
    list(itertools.product(KINDS, [False, True], [False, True])),
)
def test_training_with_the_same_seed_gives_the_same_draw(
    kind: str, bidirectional: bool, batch_first: bool
) -> None:
    original, stacked = _unstacked(
        _make(kind, bidirectional=bidirectional, batch_first=batch_first).train()
    )
    assert stacked.training
    x = _input(original)
    torch.manual_seed(11)
    expected = original(x)
    torch.manual_seed(11)
    _assert_identical(stacked(x), expected)
    # and a real draw happened: another seed gives other outputs
    torch.manual_seed(12)
    assert not torch.equal(stacked(x)[0], expected[0])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropout_sits_on_each_layer_output_but_the_last(kind: str) -> None:
    p = 0.8  # masks plainly visible: ~80% zeros, survivors scaled by 1 / (1 - p) = 5
    _, stacked = _unstacked(_make(kind, bidirectional=True, dropout=p).train())
    dropouts = [m for m in stacked.dropouts if isinstance(m, nn.Dropout)]
    assert [d.p for d in dropouts] == [p] * (LAYERS - 1)
    seen: dict[str, Tensor] = {}
    dropouts[0].register_forward_hook(lambda m, a, out: seen.update(d_in=a[0], d_out=out))
    stacked.layers[0].register_forward_hook(lambda m, a, out: seen.update(l0=out[0]))
    stacked.layers[1].register_forward_pre_hook(lambda m, a: seen.update(l1_in=a[0]))
    stacked.layers[-1].register_forward_hook(lambda m, a, out: seen.update(last=out[0]))
    x = _input(stacked.layers[0], batch=64)  # type: ignore[arg-type]
    output, _ = stacked(x)
    assert torch.equal(seen["d_in"], seen["l0"])  # the first layer's whole output sequence
    assert torch.equal(seen["l1_in"], seen["d_out"])  # ... dropped, is the second layer's input
    d_in, d_out = seen["d_in"], seen["d_out"]
    kept = d_out != 0
    assert torch.allclose(d_out[kept], d_in[kept] / (1 - p))
    # drop rate over n = T * 64 * 2 * HIDDEN = 4,480 elements: sd sqrt(p (1 - p) / n) = 0.006,
    # so 0.03 is 5 sd (p = 0.5 or no dropout would be off by 50 sd)
    assert d_out.numel() == 4480
    assert abs((~kept).float().mean().item() - p) < 0.03
    assert torch.equal(output, seen["last"])  # no dropout after the last layer
    assert bool((output != 0).all())


@pytest.mark.parametrize("kind", KINDS)
def test_training_statistics_match_the_fused_kernel(kind: str) -> None:
    """Mean and variance over 2,000 training passes of the fused module and of the rewrite,
    on independent seeds, agree within Monte Carlo error."""
    original, stacked = _unstacked(_make(kind, bidirectional=True, dropout=0.3).train())
    n = 2000
    # Passes batched: the rows of a batch get independent masks, so n copies of one sequence
    # in one call are n independent training passes over it.
    one = _input(original, batch=1)
    x = one.expand(T, n, IN).contiguous()

    def passes(module: nn.Module, seed: int) -> Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            output, state = module(x)
        h_n = (state[0] if isinstance(state, tuple) else state).transpose(0, 1).flatten(1)
        return torch.cat([output.transpose(0, 1).flatten(1), h_n], 1)

    a, b = passes(original, 100), passes(stacked, 200)  # [n, elements]
    first = 2 * (original.proj_size or HIDDEN)  # layer 0's final states: before any dropout
    layer0 = slice(T * first, T * first + first)
    for draws in (a, b):
        # the same in every pass, up to the GEMM's row blocking (measured ~1e-8)
        assert torch.allclose(draws[:, layer0], draws[0, layer0].expand(n, -1), rtol=0, atol=1e-6)
    a, b = (torch.cat([d[:, : layer0.start], d[:, layer0.stop :]], 1) for d in (a, b))
    # dropout really acts downstream (a few ReLU units may be dead: always exactly 0)
    assert float((a.var(0) > 0).double().mean()) > 0.5
    # Tolerance: a mean over n passes has standard error sd / sqrt(n), so the difference of two
    # independent means has sd sqrt(2 var / n); a sample variance has standard error
    # sqrt((m4 - var^2) / n) (m4: fourth central moment), their difference sqrt(2 (m4 - var^2) / n).
    # 5 sd per element: a false alarm has probability < 6e-7 per element (< 1e-4 over the ~100
    # elements), while a misplaced or missing dropout moves the moments by many sd.
    pooled = torch.cat([a, b]).double()
    var = pooled.var(0)
    m4 = ((pooled - pooled.mean(0)) ** 4).mean(0)
    mean_tol = 5 * torch.sqrt(2 * var / n)
    var_tol = 5 * torch.sqrt(2 * (m4 - var**2).clamp_min(0) / n)
    assert bool(((a.double().mean(0) - b.double().mean(0)).abs() <= mean_tol).all())
    assert bool(((a.double().var(0) - b.double().var(0)).abs() <= var_tol).all())


# (3) only modules with both more than one layer and dropout are rewritten.
@pytest.mark.parametrize(("num_layers", "dropout"), [(1, 0.0), (3, 0.0), (1, 0.5)])
def test_modules_without_inter_layer_dropout_are_left_alone(
    num_layers: int, dropout: float
) -> None:
    warns = num_layers == 1 and dropout > 0  # torch: "dropout ... after all but last layer"
    with pytest.warns(UserWarning, match="dropout") if warns else contextlib.nullcontext():
        rnn = _make("lstm", num_layers=num_layers, dropout=dropout)
    model = nn.Sequential(rnn)
    result, paths = unstack_recurrent(model)
    assert result is model
    assert paths == []
    assert model[0] is rnn
    same, root_paths = unstack_recurrent(rnn)
    assert same is rnn
    assert root_paths == []


class _Tagger(nn.Module):
    """Embedding -> 2-layer LSTM (dropout) -> GRU (dropout) shared twice -> linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, IN)
        self.lstm = _make("lstm", batch_first=True)
        self.gru = _make("gru", batch_first=True, bidirectional=True, input_size=HIDDEN)
        self.blocks = nn.ModuleList([self.gru, nn.RNN(2 * HIDDEN, HIDDEN, batch_first=True)])
        self.head = nn.Linear(HIDDEN, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(tokens))
        out, _ = self.blocks[0](out)
        out, _ = self.blocks[1](out)
        return self.head(out)  # type: ignore[no-any-return]


def test_submodules_are_replaced_in_place_and_reported() -> None:
    model = _Tagger().eval()
    original = copy.deepcopy(model)
    tokens = torch.randint(0, 10, (N, T), generator=torch.Generator().manual_seed(4))
    result, paths = unstack_recurrent(model)
    assert result is model
    assert paths == ["lstm", "gru", "blocks.0"]  # blocks.1 has one layer: left alone
    assert isinstance(model.lstm, StackedRecurrent)
    assert model.gru is model.blocks[0]  # one module at two paths stays one module
    assert isinstance(model.blocks[1], nn.RNN)
    with torch.no_grad():
        assert torch.equal(model(tokens), original(tokens))


def test_rewriting_draws_no_random_numbers() -> None:
    rnn = _make("lstm")
    state = torch.get_rng_state()
    unstack_recurrent(rnn)
    assert torch.equal(torch.get_rng_state(), state)


# (4) parameters are shared, and the state_dict keeps the original keys.
def test_parameters_are_shared_not_copied() -> None:
    rnn = _make("lstm_proj", bidirectional=True).eval()
    _, stacked = _unstacked(rnn)
    assert _param(stacked.layers[1], "weight_hh_l0_reverse") is _param(rnn, "weight_hh_l1_reverse")
    assert _param(stacked, "weight_hr_l2") is _param(rnn, "weight_hr_l2")  # names read through
    assert len(list(stacked.parameters())) == len(list(rnn.parameters()))
    x = _input(rnn)
    with torch.no_grad():
        before = stacked(x)[0]
        _param(rnn, "weight_ih_l1").mul_(2.0)
        _param(rnn, "bias_hh_l2_reverse").add_(1.0)
        after = stacked(x)[0]
        assert not torch.equal(after, before)
        _assert_identical(stacked(x), rnn(x))


@pytest.mark.parametrize("kind", ["lstm_proj", "gru", "rnn_relu"])
def test_state_dict_keeps_the_original_keys_both_ways(kind: str) -> None:
    rnn = _make(kind, bidirectional=True).eval()
    model = nn.Sequential(nn.Linear(IN, IN), rnn)
    keys = list(model.state_dict())
    unstack_recurrent(model)
    assert list(model.state_dict()) == keys  # same names, same order
    assert list(copy.deepcopy(model).state_dict()) == keys
    # weights saved from the rewrite load strictly into the original architecture ...
    fresh = nn.Sequential(nn.Linear(IN, IN), _make(kind, bidirectional=True)).eval()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(0.25)
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = _input(rnn)
    with torch.no_grad():
        _assert_identical(model(x), fresh(x))
        for p in fresh.parameters():
            p.mul_(-1.0)
    # ... and the original's weights load strictly into the rewrite (into the shared tensors)
    model.load_state_dict(fresh.state_dict(), strict=True)
    assert torch.equal(
        _param(rnn, "weight_ih_l2_reverse"), _param(fresh[1], "weight_ih_l2_reverse")
    )
    with torch.no_grad():
        _assert_identical(model(x), fresh(x))


# (5) fx sees the inter-layer dropouts as call_module nodes.
def _dropout_nodes(module: nn.Module) -> list[str]:
    graph = fx.symbolic_trace(module)
    modules = dict(graph.named_modules())
    return [
        str(node.target)
        for node in graph.graph.nodes
        if node.op == "call_module" and isinstance(modules[str(node.target)], nn.Dropout)
    ]


def test_fx_exposes_the_inner_dropouts() -> None:
    model = _Tagger().eval()
    assert _dropout_nodes(model) == []  # the fused modules hide them
    unstack_recurrent(model)
    assert _dropout_nodes(model) == [
        "lstm.dropouts.0", "lstm.dropouts.1", "gru.dropouts.0", "gru.dropouts.1",
    ]  # fmt: skip
    tokens = torch.randint(0, 10, (N, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(fx.symbolic_trace(model)(tokens), model(tokens))


class _WithState(nn.Module):
    """A model that passes its own initial state (an fx proxy when traced)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.rnn = _make(kind, bidirectional=True)

    def forward(self, x: Tensor, h0: Tensor, c0: Tensor) -> Tensor:
        hx = (h0, c0) if self.rnn.mode == "LSTM" else h0
        out, _ = self.rnn(x, hx)
        return out  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_fx_traces_the_rewrite_with_initial_states(kind: str) -> None:
    model = _WithState(kind).eval()
    x, hx = _input(model.rnn), _hx(model.rnn)
    h0, c0 = hx if isinstance(hx, tuple) else (hx, torch.zeros(0))
    with torch.no_grad():
        expected = model(x, h0, c0)
        unstack_recurrent(model)
        traced = fx.symbolic_trace(model)
        assert len([n for n in traced.graph.nodes if "dropouts" in str(n.target)]) == LAYERS - 1
        assert torch.equal(traced(x, h0, c0), expected)


# (6) PackedSequence is refused with a clear TypeError; subclasses and weight-drop at rewrite.
def test_packed_sequences_are_refused() -> None:
    _, stacked = _unstacked(_make("lstm"))
    packed = pack_padded_sequence(torch.zeros(T, N, IN), torch.tensor([T, 4]))
    with pytest.raises(TypeError, match="does not accept PackedSequence"):
        stacked(packed)


class _CustomLSTM(nn.LSTM):
    """A subclass whose forward could differ: not rewritable faithfully."""


def test_subclasses_and_non_parameter_weights_are_refused() -> None:
    torch.manual_seed(0)
    with pytest.raises(ModelLoadError, match=r"'rnn'.*_CustomLSTM"):
        unstack_recurrent(nn.ModuleDict({"rnn": _CustomLSTM(IN, HIDDEN, 2, dropout=0.5)}))
    rnn = _make("gru", num_layers=2)
    raw = _param(rnn, "weight_hh_l1")
    del rnn._parameters["weight_hh_l1"]  # as weight-drop wrappers do, setting it per forward
    rnn.weight_hh_l1 = raw.detach()
    with pytest.raises(ModelLoadError, match="not plain parameters"):
        unstack_recurrent(rnn)
