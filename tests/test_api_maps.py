"""Map outputs over HTTP: per-token tagging, per-pixel segmentation and a multi-output forecast
round-trip through OIP (JSON, binary, read back by tritonclient) and the native /v1 API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from http_helpers import binary_body, decode_outputs, oip_body, serve, settings_for
from numpy.typing import NDArray

from mcdrop.api.outputs import summary_outputs
from mcdrop.model import ServedModel
from mcdrop.repository.loading import save_weights

pytestmark = pytest.mark.anyio

MODELS = '''
import torch
from torch import nn


class Tagger(nn.Module):
    """Tokens [B, 5, 4] -> tag logits [B, 5, 3] (classes last)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.drop(x))


class Segmenter(nn.Module):
    """Images [B, 2, 4, 4] -> per-pixel logits [B, 3, 4, 4] (classes first)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout2d(0.3)
        self.fc = nn.Conv2d(2, 3, 1)

    def forward(self, x):
        return self.fc(self.drop(x))


class Forecast(nn.Module):
    """Features [B, 3] -> 6 steps x 2 targets [B, 6, 2]."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(3, 12)

    def forward(self, x):
        return self.fc(self.drop(x)).view(-1, 6, 2)


def tagger() -> nn.Module:
    return Tagger()


def segmenter() -> nn.Module:
    return Segmenter()


def forecast() -> nn.Module:
    return Forecast()
'''

SPECS: dict[str, dict[str, Any]] = {
    "tagger": {"task": "classification", "input": [5, 4], "layer": torch.nn.Linear(4, 3),
               "output": {"names": ["O", "PER", "LOC"], "shape": [5, 3], "class_axis": 1}},
    "seg": {"task": "classification", "input": [2, 4, 4], "layer": torch.nn.Conv2d(2, 3, 1),
            "output": {"names": ["bg", "a", "b"], "shape": [3, 4, 4], "class_axis": 0}},
    "forecast": {"task": "regression", "input": [3], "layer": torch.nn.Linear(3, 12),
                 "output": {"names": ["temp", "rain"], "shape": [6, 2]}},
}  # fmt: skip
ENTRY = {"tagger": "maps:tagger", "seg": "maps:segmenter", "forecast": "maps:forecast"}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repository = tmp_path / "repo"
    for name, spec in SPECS.items():
        folder = repository / name
        folder.mkdir(parents=True)
        (folder / "maps.py").write_text(MODELS, encoding="utf-8")
        holder = torch.nn.Module()
        torch.manual_seed(len(name))
        holder.fc = spec["layer"]
        save_weights(holder, folder / "weights.safetensors")
        out = spec["output"]
        lines = [f'name = "{name}"', f'task = "{spec["task"]}"', "", "[input]",
                 f"shape = {spec['input']}", "", "[output]",
                 *(f"{k} = {json.dumps(v)}" for k, v in out.items()), "", "[model]",
                 'format = "entrypoint"', f'entrypoint = "{ENTRY[name]}"', "", "[mc]",
                 "default_samples = 16", "max_samples = 256"]  # fmt: skip
        (folder / "model.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return repository


def _rows(name: str, n: int = 2) -> NDArray[np.float32]:
    shape = [n, *SPECS[name]["input"]]
    return np.random.default_rng(len(name)).standard_normal(shape).astype(np.float32)


def _library(repo: Path, name: str, rows: NDArray[Any], seed: int) -> dict[str, NDArray[Any]]:
    model = ServedModel.load(repo / name, settings_for(repo))
    x = torch.tensor(rows, dtype=torch.float64)
    return summary_outputs(model.predict(x, model.options(32, seed=seed)))


EXPECTED_SHAPES = {  # per row: the probabilities / means, and the per-element measures
    "tagger": ((5, 3), (5,)),
    "seg": ((3, 4, 4), (4, 4)),
    "forecast": ((6, 2), (6, 2)),
}


@pytest.mark.parametrize("name", list(SPECS))
async def test_oip_metadata_json_and_binary_carry_the_map_shapes(repo: Path, name: str) -> None:
    rows = _rows(name)
    params = {"seed": 9, "mc_samples": 32}
    async with serve(settings_for(repo)) as (_, client):
        meta = (await client.get(f"/v2/models/{name}")).json()
        as_json = await client.post(f"/v2/models/{name}/infer", json=oip_body(rows, params))
        content, headers = binary_body(rows, {**params, "binary_data_output": True})
        as_binary = await client.post(f"/v2/models/{name}/infer", content=content,
                                      headers=headers)  # fmt: skip
    assert as_json.status_code == 200, as_json.text
    assert as_binary.status_code == 200, as_binary.text
    vector, per_element = EXPECTED_SHAPES[name]
    shapes = {o["name"]: o["shape"] for o in meta["outputs"]}
    first = "probabilities" if SPECS[name]["task"] == "classification" else "mean"
    assert shapes[first] == [-1, *vector]
    measure = "entropy" if first == "probabilities" else "epistemic_variance"
    assert shapes[measure] == [-1, *per_element]
    got = decode_outputs(as_json)
    want = _library(repo, name, rows, seed=9)
    assert list(got) == list(want)
    assert all(got[k].shape == want[k].shape for k in want), {k: got[k].shape for k in got}
    assert all(np.array_equal(got[k], want[k], equal_nan=True) for k in want)
    assert got[first].shape == (2, *vector)
    assert got[measure].shape == (2, *per_element)
    assert {o["name"]: o["shape"][1:] for o in meta["outputs"] if o["name"] in got} == {
        k: list(v.shape[1:]) for k, v in got.items() if k != "samples"
    }
    length = int(as_binary.headers["inference-header-content-length"])
    result = triton.InferResult.from_response_body(as_binary.content, header_length=length)
    for key, array in want.items():
        parsed = result.as_numpy(key)
        assert parsed is not None, key
        assert np.array_equal(parsed, array, equal_nan=True), key


async def test_native_api_returns_nested_maps_with_their_reductions(repo: Path) -> None:
    rows = _rows("seg", 1)
    async with serve(settings_for(repo)) as (_, client):
        info = {m["name"]: m for m in (await client.get("/v1/models")).json()}
        response = await client.post(
            "/v1/models/seg/predict", json={"rows": rows.tolist(), "samples": 32, "seed": 9}
        )
    assert response.status_code == 200, response.text
    assert info["seg"]["output_shape"] == [3, 4, 4]
    assert info["seg"]["class_axis"] == 0
    (row,) = response.json()["predictions"]
    want = _library(repo, "seg", rows, seed=9)
    assert row["classes"] == ["bg", "a", "b"]
    assert np.array_equal(np.asarray(row["probabilities"]), want["probabilities"][0])
    assert np.array_equal(np.asarray(row["mutual_information"]), want["mutual_information"][0])
    assert np.asarray(row["predicted_class"]).shape == (4, 4)
    assert row["map_mean"]["entropy"] == pytest.approx(float(want["entropy"][0].mean()))
    regions = row["by_predicted_class"]
    assert sum(r["elements"] for r in regions.values()) == 16
    predicted = want["predicted_class"][0]
    for c, label in enumerate(row["classes"]):
        inside = want["entropy"][0][predicted == c]
        if inside.size:
            assert regions[label]["entropy"] == pytest.approx(float(inside.mean()))
        else:
            assert regions[label]["entropy"] is None


@pytest.mark.parametrize("name", list(SPECS))
async def test_native_rows_of_every_map_kind_are_nested_in_its_shape(repo: Path, name: str) -> None:
    rows = _rows(name)
    async with serve(settings_for(repo)) as (_, client):
        response = await client.post(
            f"/v1/models/{name}/predict", json={"rows": rows.tolist(), "samples": 32, "seed": 9}
        )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    want = _library(repo, name, rows, seed=9)
    vector, per_element = EXPECTED_SHAPES[name]
    field, measure = (("probabilities", "mutual_information")
                      if SPECS[name]["task"] == "classification" else ("mean", "std"))  # fmt: skip
    for r, row in enumerate(predictions):
        assert np.asarray(row[field]).shape == vector
        assert np.array_equal(np.asarray(row[field]), want[field][r])
        assert np.asarray(row[measure]).shape == per_element
