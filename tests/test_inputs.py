"""Named inputs packed into one row: unpacked in front of the model, paths kept as the model's."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mcdrop.engine.core import MCEngine, MCOptions
from mcdrop.engine.inputs import InputLayout, NamedInputs, pack, packed_size
from mcdrop.uncertainty import ClassificationSummary


class Bag(nn.Module):
    """Token ids [B, 4] (int64) and a weight per token [B, 4] -> 3 class logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 5)
        self.drop = nn.Dropout(0.4)
        self.head = nn.Linear(5, 3)
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def forward(self, ids: Tensor, weight: Tensor) -> Tensor:
        self.seen.append((ids.dtype, weight.dtype))
        pooled = (self.embed(ids) * weight.unsqueeze(-1)).sum(dim=1)
        return self.head(self.drop(pooled))  # type: ignore[no-any-return]


LAYOUT = [InputLayout("ids", (4,), torch.int64, 0, 9), InputLayout("weight", (4,), torch.float32)]


def test_packed_rows_unpack_to_the_models_own_call() -> None:
    model = Bag().eval()
    ids = torch.tensor([[1, 2, 3, 9], [0, 0, 5, 5]])
    weight = torch.rand(2, 4)
    packed = pack(LAYOUT, {"ids": ids, "weight": weight})
    assert packed.shape == (2, packed_size(LAYOUT)) == (2, 8)
    wrapped = NamedInputs(model, LAYOUT)
    with torch.inference_mode():
        torch.testing.assert_close(wrapped(packed.float()), model(ids, weight))
    assert model.seen[0] == (torch.int64, torch.float32)
    assert [n for n, _ in wrapped.named_modules()] == ["", "embed", "drop", "head"]
    assert wrapped.state_dict().keys() == model.state_dict().keys()


def test_probe_rows_become_valid_indices_and_the_engine_samples_by_the_models_paths() -> None:
    engine = MCEngine(NamedInputs(Bag().eval(), LAYOUT), task="classification", input_shape=(8,))
    assert [s.name for s in engine.sites] == ["drop"]  # not "inner.drop"
    assert engine.coverage()["program"] == "partitioned"
    packed = pack(LAYOUT, {"ids": torch.tensor([[1, 2, 3, 9]]), "weight": torch.ones(1, 4)})
    out = engine.run(packed.float(), MCOptions(samples=64, seed=1))
    assert isinstance(out, ClassificationSummary)
    assert float(out.mutual_information[0]) > 0
