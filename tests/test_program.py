"""Site discovery and the prefix/suffix split, on small models of every stochastic kind."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcdrop.engine.fallback import WholeProgram
from mcdrop.engine.partition import PartitionedProgram
from mcdrop.engine.program import prepare_program
from mcdrop.engine.sites import select_sites
from mcdrop.errors import ModelLoadError


class FunctionalDropout(nn.Module):
    """Dropout written the functional way, as many research models do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(torch.relu(self.fc1(x)), p=0.2, training=self.training)
        out: Tensor = self.fc2(h.view(x.size(0), -1))
        return out


class Residual(nn.Module):
    """x + dropout(f(x)): the skip value from the prefix must be expanded."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc(x))
        out: Tensor = self.head(h + self.drop(h))
        return out


class Attention(nn.Module):
    """A token model with nn.MultiheadAttention dropout and functional SDPA dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.mha(x, x, x, need_weights=False)
        q = h.view(h.size(0), h.size(1), 2, 4).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q, dropout_p=0.2)
        out: Tensor = self.head(a.transpose(1, 2).reshape(h.size(0), h.size(1), 8))
        return out.mean(1)


class DataDependent(nn.Module):
    """Control flow on values: fx cannot trace it, so the engine runs it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 1e9:
            return x
        out: Tensor = self.drop(self.fc(x))
        return out


def _kinds(model: nn.Module, shape: tuple[int, ...]) -> list[tuple[str, str, float]]:
    program = prepare_program(model, shape, "all", torch.float32)
    return [(s.name, s.kind, s.p) for s in program.sites]


def test_every_dropout_module_kind_is_found() -> None:
    model = nn.Sequential(
        nn.Conv1d(2, 2, 1), nn.Dropout1d(0.1), nn.AlphaDropout(0.2), nn.FeatureAlphaDropout(0.3),
        nn.Flatten(), nn.Dropout(0.4),
    )  # fmt: skip
    assert _kinds(model, (2, 3)) == [
        ("1", "channel", 0.1), ("2", "alpha", 0.2), ("3", "feature_alpha", 0.3),
        ("5", "dropout", 0.4),
    ]  # fmt: skip
    image = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Dropout2d(0.5))
    assert [k for _, k, _ in _kinds(image, (1, 2, 2))] == ["channel"]
    volume = nn.Sequential(nn.Conv3d(1, 2, 1), nn.Dropout3d(0.5))
    assert [k for _, k, _ in _kinds(volume, (1, 2, 2, 2))] == ["channel"]


def test_functional_and_attention_dropout_are_found() -> None:
    assert _kinds(FunctionalDropout(), (4,)) == [("dropout", "dropout", 0.2)]
    assert [(k, p) for _, k, p in _kinds(Attention(), (5, 8))] == [
        ("attention", 0.3),
        ("sdpa", 0.2),
    ]


def test_a_model_without_stochastic_ops_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ModelLoadError, match="no stochastic op"):
        prepare_program(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)), (2,), "all", torch.float32)


def test_selection_by_last_and_by_name() -> None:
    names = ["a", "b", "c"]
    assert select_sites(names, "all") == [0, 1, 2]
    assert select_sites(names, "last") == [2]
    assert select_sites(names, ["c", "a"]) == [0, 2]
    with pytest.raises(ModelLoadError, match=r"unknown sites \['z'\]"):
        select_sites(names, ["z"])


def test_prefix_stops_at_the_first_sampled_op_and_the_rest_is_suffix() -> None:
    model = nn.Sequential(
        nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 4), nn.Dropout(0.5)
    )
    program = prepare_program(model, (3,), "last", torch.float32)
    assert isinstance(program, PartitionedProgram)
    assert isinstance(program.prefix, torch.fx.GraphModule)
    prefix_code = program.prefix.code
    assert 'getattr(self, "3")' in prefix_code  # the unselected dropout is identity, so 3 is prefix
    assert "mc_ctx" not in prefix_code
    assert [s.name for s in program.sites] == ["4"]


def test_residual_and_size_values_cross_the_boundary_correctly() -> None:
    for model, shape in [(Residual(), (4,)), (FunctionalDropout(), (4,))]:
        program = prepare_program(model, shape, "all", torch.float32)
        assert isinstance(program, PartitionedProgram)


def test_untraceable_models_and_torchscript_fall_back_to_whole_programs() -> None:
    assert isinstance(prepare_program(DataDependent(), (3,), "all", torch.float32), WholeProgram)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.25)))
    program = prepare_program(scripted, (3,), "all", torch.float32)
    assert isinstance(program, WholeProgram)
    assert [(s.name, s.kind, s.p) for s in program.sites] == [("dropout_call0", "dropout", 0.25)]


def test_preparing_leaves_every_module_in_eval_mode() -> None:
    model = Attention().train()
    prepare_program(model, (5, 8), "all", torch.float32)
    assert not any(m.training for m in model.modules())


class TwoLayerLSTM(nn.Module):
    """nn.LSTM(num_layers=2, dropout): its final states are unused values of the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 5, num_layers=2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(5, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        y: Tensor = self.head(out[:, -1])
        return y


class UnusedInPlace(nn.Module):
    """An in-place write whose result nobody reads: it must stay in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h.add_(1.0)
        return self.drop(h)  # type: ignore[no-any-return]


def test_unused_values_do_not_decide_the_boundary_but_in_place_writes_stay() -> None:
    lstm = prepare_program(TwoLayerLSTM(), (4, 3), "all", torch.float32)
    assert isinstance(lstm, PartitionedProgram)  # the unused [layers, B, H] states are dropped
    assert [s.name for s in lstm.sites] == ["rnn.dropouts.0"]
    model = UnusedInPlace()
    program = prepare_program(model, (3,), "all", torch.float32)
    assert isinstance(program, PartitionedProgram)
    x = torch.randn(2, 3)
    with torch.inference_mode():
        (boundary,) = program.run_prefix(x)
        torch.testing.assert_close(boundary, model.fc(x) + 1.0)
