"""The native JSON API (in process): model list, predict and evaluate against the library."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import write_mlp_model
from http_helpers import (
    copy_shipped,
    error_of,
    serve,
    settings_for,
    write_slow_model,
)

from service.evaluation import evaluate
from service.model import ServedModel
from service.render import summary_rows

pytestmark = pytest.mark.anyio
PREDICT = "/v1/models/mlp/predict"
ROWS = [[0.5, -1.25], [2.0, 0.75], [-3.5, 0.0]]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """'mlp' (2 features -> a, b; tau 4; <= 4 rows, <= 64 samples), toy-regression, digits."""
    repository = copy_shipped(tmp_path / "repo", "toy-regression", "digits")
    write_mlp_model(
        repository / "mlp", outputs=("a", "b"), hidden=(16,), dropout=0.2, tau=4.0,
        mc={"max_rows": 4, "max_samples": 64, "default_samples": 16},
    )  # fmt: skip
    return repository


def served(repo: Path, name: str) -> ServedModel:
    return ServedModel.load(repo / name, settings_for(repo))


def library_rows(repo: Path, name: str, rows: Any, **options: Any) -> list[dict[str, Any]]:
    """summary_rows of ServedModel.predict for the same rows and options, through JSON."""
    model = served(repo, name)
    samples = options.pop("samples", None)
    summary = model.predict(
        torch.tensor(rows, dtype=torch.float64), model.options(samples, **options)
    )
    rows_out: list[dict[str, Any]] = json.loads(json.dumps(summary_rows(summary, model.spec)))
    return rows_out


# -- model list --------------------------------------------------------------------------------


async def test_model_list_shows_state_limits_and_load_errors(repo: Path) -> None:
    broken = repo / "broken"
    write_mlp_model(broken)
    (broken / "weights.safetensors").write_bytes(b"not a safetensors file at all")
    async with serve(settings_for(repo)) as (_, client):
        listed = await client.get("/v1/models")
    assert listed.status_code == 200
    models = {m["name"]: m for m in listed.json()}
    assert sorted(models) == ["broken", "digits", "mlp", "toy-regression"]
    mlp = models["mlp"]
    assert mlp["state"] == "READY"
    assert mlp["version"] == "1"
    assert mlp["task"] == "regression"
    assert mlp["input_shape"] == [2]
    assert mlp["outputs"] == ["a", "b"]
    assert (mlp["default_samples"], mlp["max_samples"], mlp["max_rows"]) == (16, 64, 4)
    assert mlp["error"] is None
    assert models["digits"]["task"] == "classification"
    assert models["digits"]["outputs"] == [str(d) for d in range(10)]
    assert models["broken"]["state"] == "FAILED"
    assert "weights.safetensors" in models["broken"]["error"]
    assert "safetensors" in models["broken"]["error"]


# -- predict -----------------------------------------------------------------------------------


async def test_predict_equals_the_library_for_the_same_seed(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        response = await client.post(PREDICT, json={"rows": ROWS, "samples": 32, "seed": 19})
    assert response.status_code == 200, response.text
    doc = response.json()
    assert (doc["model"], doc["version"], doc["samples_used"], doc["seed"]) == ("mlp", "1", 32, 19)
    assert doc["predictions"] == library_rows(repo, "mlp", ROWS, samples=32, seed=19)
    first = doc["predictions"][0]["a"]
    assert set(first) >= {"mean", "std", "variance", "epistemic_variance", "aleatoric_variance"}
    assert first["aleatoric_variance"] == pytest.approx(0.25)  # 1 / tau
    assert first["std"] == pytest.approx(first["variance"] ** 0.5)


async def test_predict_options_mask_mode_levels_and_samples(repo: Path) -> None:
    body = {"rows": ROWS, "samples": 16, "seed": 2, "mask_mode": "shared",
            "interval_levels": [0.5, 0.9], "return_samples": 4}  # fmt: skip
    async with serve(settings_for(repo)) as (_, client):
        response = await client.post(PREDICT, json=body)
        independent = await client.post(PREDICT, json={**body, "mask_mode": "independent"})
    predictions = response.json()["predictions"]
    want = library_rows(repo, "mlp", ROWS, samples=16, seed=2, mask_mode="shared",
                        interval_levels=(0.5, 0.9), return_samples=4)  # fmt: skip
    assert predictions == want
    assert set(predictions[0]["a"]["intervals"]) == {"0.5", "0.9"}
    assert len(predictions[0]["a"]["samples"]) == 4
    # shared masks: every row sees the same dropout masks, so the answers differ from independent
    assert independent.json()["predictions"] != predictions


async def test_predict_classification_equals_the_library(repo: Path) -> None:
    images = (np.arange(2 * 64).reshape(2, 1, 8, 8) % 17).astype(float).tolist()
    async with serve(settings_for(repo)) as (_, client):
        response = await client.post(
            "/v1/models/digits/predict", json={"rows": images, "samples": 24, "seed": 6}
        )
    predictions = response.json()["predictions"]
    assert predictions == library_rows(repo, "digits", images, samples=24, seed=6)
    assert predictions[0]["predicted"] in [str(d) for d in range(10)]
    assert sum(predictions[0]["probabilities"].values()) == pytest.approx(1.0)


async def test_an_unseeded_answer_reports_a_seed_that_reproduces_it(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        first = (await client.post(PREDICT, json={"rows": ROWS})).json()
        again = (await client.post(PREDICT, json={"rows": ROWS, "seed": first["seed"]})).json()
        auto = (await client.post(PREDICT, json={"rows": ROWS, "samples": "auto",
                                                 "tolerance": 1e-9})).json()  # fmt: skip
    assert first["samples_used"] == 16
    assert again == first
    assert auto["samples_used"] == 64


# -- evaluate ----------------------------------------------------------------------------------


async def test_evaluate_equals_the_library_for_regression_and_classification(repo: Path) -> None:
    xs = [[-3.0], [-1.5], [0.0], [2.0], [3.5]]
    ys = [-1.2, -0.9, 0.1, 0.6, 1.4]
    images = (np.arange(4 * 64).reshape(4, 1, 8, 8) % 17).astype(float).tolist()
    labels = [0, 3, 7, 9]
    async with serve(settings_for(repo)) as (_, client):
        reg = await client.post(
            "/v1/models/toy-regression/evaluate",
            json={"rows": xs, "targets": ys, "samples": 40, "seed": 3},
        )
        cls = await client.post(
            "/v1/models/digits/evaluate",
            json={"rows": images, "targets": labels, "samples": 20, "seed": 4},
        )
    assert reg.status_code == 200, reg.text
    assert cls.status_code == 200, cls.text
    for name, rows, targets, samples, seed, response in (
        ("toy-regression", xs, ys, 40, 3, reg),
        ("digits", images, labels, 20, 4, cls),
    ):
        model = served(repo, name)
        report = evaluate(
            model,
            torch.tensor(rows, dtype=torch.float64),
            torch.tensor(targets, dtype=torch.float64),
            model.options(samples, seed=seed),
        )
        assert response.json() == json.loads(json.dumps(report.as_dict())), name
    assert reg.json()["metrics"]["log_likelihood"] is not None


async def test_evaluate_refuses_targets_that_do_not_fit(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        count = await client.post(
            "/v1/models/mlp/evaluate", json={"rows": ROWS, "targets": [[0.0, 0.0]]}
        )
        nan = await client.post(
            "/v1/models/mlp/evaluate",
            content=json.dumps({"rows": ROWS[:1], "targets": [[float("nan"), 0.0]]}).encode(),
            headers={"content-type": "application/json"},
        )
    assert "targets" in error_of(count, 400)
    assert "targets" in error_of(nan, 400)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        pytest.param(b'{"rows": [[1, 2]', 400, ["JSON"], id="malformed-json"),
        pytest.param({"rows": [[1.0, 2.0], [1.0]]}, 400, ["rows", "rectangular"], id="ragged"),
        pytest.param({"rows": [["a", "b"]]}, 400, ["rows", "numbers"], id="strings"),
        pytest.param({"rows": [[1.0, 2.0, 3.0]]}, 400, ["shape", "[rows, 2]"], id="shape"),
        pytest.param({"rows": [[float("nan"), 0.0]]}, 400, ["NaN"], id="nan"),
        pytest.param({"rows": [[float("inf"), 0.0]]}, 400, ["infinite"], id="inf"),
        pytest.param({"rows": [[1e300, 0.0]]}, 400, ["input"], id="beyond-float32"),
        pytest.param({"rows": [[0.0, 0.0]], "samples": 65}, 422, ["65", "64"], id="samples"),
        pytest.param({"rows": [[0.0, 0.0]] * 5}, 422, ["5 rows", "4"], id="rows"),
        pytest.param({"rows": [[0.0, 0.0]], "seed": -1}, 422, ["seed"], id="seed"),
        pytest.param({"rows": [[0.0, 0.0]], "sample": 5}, 422, ["sample"], id="unknown-field"),
        pytest.param({"rows": []}, 422, ["rows"], id="no-rows"),
        pytest.param(
            {"rows": [[0.0, 0.0]], "interval_levels": [2e3]}, 400, ["interval"], id="level"
        ),
    ],
)
async def test_bad_requests_get_a_clear_error(
    repo: Path, body: bytes | dict[str, Any], status: int, words: list[str]
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with serve(settings_for(repo)) as (_, client):
        response = await client.post(
            PREDICT, content=content, headers={"content-type": "application/json"}
        )
        healthy = await client.post(PREDICT, json={"rows": ROWS})
    message = error_of(response, status)
    for word in words:
        assert word in message, message
    assert healthy.status_code == 200


async def test_unknown_model_gets_404(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        predict = await client.post("/v1/models/ghost/predict", json={"rows": ROWS})
        evaluate_ = await client.post(
            "/v1/models/ghost/evaluate", json={"rows": ROWS, "targets": [0, 0, 0]}
        )
    for response in (predict, evaluate_):
        assert "ghost" in error_of(response, 404)


async def test_timeout_ms_gives_504_and_the_late_work_is_never_computed(tmp_path: Path) -> None:
    slow = write_slow_model(tmp_path / "repo" / "slow", batching={"max_batch_delay_ms": 0})
    async with serve(settings_for(tmp_path / "repo")) as (_, client):
        url = "/v1/models/slow/predict"
        with slow.held():
            running = asyncio.create_task(client.post(url, json={"rows": [[1.0]], "seed": 0}))
            await slow.started(1.0)
            late = await client.post(url, json={"rows": [[2.0]], "timeout_ms": 50})
        assert (await running).status_code == 200
        after = await client.post(url, json={"rows": [[3.0]], "timeout_ms": 60_000})
        bad = await client.post(url, json={"rows": [[4.0]], "timeout_ms": 0})
    assert "deadline" in error_of(late, 504)
    assert after.status_code == 200
    assert "timeout_ms" in error_of(bad, 422)
    assert 2.0 not in slow.computed()
    assert 3.0 in slow.computed()
