"""Submodules fx cannot trace stay opaque inside a partitioned graph, their dropout caught at
the dispatcher: the rest of the model is still split, runs once per row before the first
sampled op, and the answers are those of running the model whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcdrop.engine.core import MCEngine, MCOptions
from mcdrop.engine.fallback import WholeProgram, whole_program
from mcdrop.engine.partition import PartitionedProgram
from mcdrop.engine.program import prepare_program
from mcdrop.engine.sampling import RowKeys, SamplingContext
from mcdrop.errors import ModelLoadError
from mcdrop.uncertainty import RegressionSummary


class GatedBlock(nn.Module):
    """Control flow on a value (fx cannot trace it) around an nn.Dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        h: Tensor = self.fc(x)
        if bool(h.abs().sum() >= 0):  # always true, but fx cannot know
            h = self.drop(h)
        return h


class StemBlockHead(nn.Module):
    """A traceable stem, the untraceable block at path `block`, a traceable head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(3, 4)
        self.block = GatedBlock()
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.block(torch.tanh(self.stem(x))))
        return out


class GatedDropPath(nn.Module):
    """Untraceable and drawing its own mask with bernoulli_ in training."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or bool(x.abs().sum() < 0):
            return x
        keep = x.new_empty(x.shape[0], 1).bernoulli_(0.75)
        return x * keep / 0.75


class DrawsInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.block = GatedDropPath()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(self.fc(x))  # type: ignore[no-any-return]


def _context(
    program: PartitionedProgram | WholeProgram, rows: int, samples: int
) -> SamplingContext:
    keys = RowKeys([11] * rows, list(range(rows)), [11], None)
    return SamplingContext(program.sites, keys, 0, samples, "independent", torch.device("cpu"))


def test_an_untraceable_submodule_is_opaque_and_named_while_the_rest_is_partitioned() -> None:
    program = prepare_program(StemBlockHead(), (3,), "all", torch.float32)
    assert isinstance(program, PartitionedProgram)
    assert set(program.opaque) == {"block"}
    assert "Error" in program.opaque["block"]
    assert [(s.name, s.kind, s.p) for s in program.sites] == [("block.drop", "dropout", 0.5)]


def test_the_stem_before_the_opaque_dropout_runs_once_per_row() -> None:
    model = StemBlockHead()
    batches: dict[str, list[int]] = {"stem": [], "head": []}
    for name in batches:
        module = getattr(model, name)
        module.register_forward_hook(lambda m, i, o, name=name: batches[name].append(i[0].shape[0]))
    engine = MCEngine(model, task="regression", input_shape=(3,))
    batches["stem"].clear()
    batches["head"].clear()
    engine.run(torch.randn(3, 3), MCOptions(samples=40, seed=1))
    # the 3 rows (padded to a multiple of 8 by the engine), never rows x samples
    assert batches["stem"]
    assert max(batches["stem"]) <= 8, batches["stem"]
    assert sum(batches["head"]) == 3 * 40, batches["head"]


def test_opaque_answers_equal_the_whole_model_run_with_the_same_keys() -> None:
    model = StemBlockHead()
    partitioned = prepare_program(model, (3,), "all", torch.float32)
    whole = whole_program(model, (3,), "all", torch.float32)
    assert isinstance(partitioned, PartitionedProgram)
    assert [s.name for s in whole.sites] == [s.name for s in partitioned.sites]
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        a = partitioned.run_suffix(partitioned.run_prefix(x), _context(partitioned, 2, 64))
        b = whole.run_suffix(whole.run_prefix(x), _context(whole, 2, 64))
    assert a.shape == (2 * 64, 2)
    torch.testing.assert_close(a, b)
    assert a.view(2, 64, 2).var(dim=1).min() > 0, "the opaque dropout did not sample"


def test_an_opaque_submodule_that_draws_random_numbers_sends_the_model_whole() -> None:
    engine = MCEngine(DrawsInside(), task="regression", input_shape=(3,))
    coverage = engine.coverage()
    assert coverage["program"] == "whole", coverage
    assert [s["name"] for s in coverage["sampled"]] == ["block.bernoulli_"]
    out = engine.run(torch.ones(2, 3), MCOptions(samples=200, seed=3))
    assert isinstance(out, RegressionSummary)
    assert float(out.epistemic_variance.min()) > 0


def test_coverage_lists_the_opaque_submodules_with_the_reason() -> None:
    coverage = MCEngine(StemBlockHead(), task="regression", input_shape=(3,)).coverage()
    assert coverage["program"] == "partitioned"
    assert list(coverage["opaque"]) == ["block"]
    assert [s["name"] for s in coverage["sampled"]] == ["block.drop"]


class GatedDropConnect(nn.Linear):
    """DropConnect behind control flow on a value: neither fx nor the engine can key it."""

    def forward(self, x: Tensor) -> Tensor:
        if bool(x.abs().sum() < 0):
            return x
        return F.linear(x, F.dropout(self.weight, 0.3, training=True), self.bias)


class WrapsGatedDropConnect(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = GatedDropConnect(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.block(x))


@pytest.mark.parametrize(
    ("model", "parameter"),
    [(WrapsGatedDropConnect(), "block.weight"), (GatedDropConnect(3, 2), "weight")],
    ids=["opaque submodule", "whole model"],
)
def test_untraceable_dropconnect_is_refused_at_load_naming_the_parameter(
    model: nn.Module, parameter: str
) -> None:
    with pytest.raises(ModelLoadError) as info:
        MCEngine(model, task="regression", input_shape=(3,))
    assert f"parameter '{parameter}'" in str(info.value), str(info.value)
    assert "DropConnect" in str(info.value)
