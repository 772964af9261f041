"""The native JSON API (in process): model list, predict and evaluate against the library."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import write_mlp_model
from http_helpers import (
    copy_shipped,
    error_of,
    queue_depth,
    serve,
    set_version,
    settings_for,
    spy_engine,
    wait_for,
    write_slow_model,
)

from mcdrop.engine.accumulators import MAX_VARIANCE
from mcdrop.engine.masks import MASK_STREAM
from mcdrop.errors import NonFiniteOutput
from mcdrop.evaluation import evaluate
from mcdrop.model import ServedModel
from mcdrop.render import summary_rows
from mcdrop.uncertainty import RegressionSummary, first_non_finite

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


# -- live view: recent uncertainty and latest calibration ---------------------------------------


def stds(answer: dict[str, Any]) -> list[float]:
    """Every std of a predict answer (rows x outputs)."""
    return [out["std"] for row in answer["predictions"] for out in row.values()]


async def test_recent_holds_the_uncertainty_of_each_answered_prediction(repo: Path) -> None:
    images = (np.arange(3 * 64).reshape(3, 1, 8, 8) % 13).astype(float).tolist()
    async with serve(settings_for(repo)) as (_, client):
        empty = (await client.get("/v1/models/mlp/recent")).json()
        before = time.time()
        answers = [
            (await client.post(PREDICT, json={"rows": rows, "samples": n, "seed": 5})).json()
            for rows, n in ((ROWS, 16), (ROWS[:1], 32), (ROWS[1:], 8))
        ]
        digits = await client.post(
            "/v1/models/digits/predict", json={"rows": images, "samples": 12, "seed": 1}
        )
        after = time.time()
        recent = await client.get("/v1/models/mlp/recent")
        recent_digits = (await client.get("/v1/models/digits/recent")).json()
    assert empty == {"model": "mlp", "task": "regression", "capacity": 1000, "entries": []}
    assert recent.status_code == 200, recent.text
    doc = recent.json()
    assert (doc["model"], doc["task"], doc["capacity"]) == ("mlp", "regression", 1000)
    entries = doc["entries"]
    assert [(e["rows"], e["samples"], e["version"]) for e in entries] == [
        (3, 16, "1"), (1, 32, "1"), (2, 8, "1"),
    ]  # fmt: skip
    for entry, answer in zip(entries, answers, strict=True):
        assert entry["mean_std"] == pytest.approx(sum(stds(answer)) / len(stds(answer)))
        assert entry["max_std"] == pytest.approx(max(stds(answer)))
    moments = [e["time"] for e in entries]
    assert before <= moments[0] <= moments[1] <= moments[2] <= after
    [entry] = recent_digits["entries"]
    predictions = digits.json()["predictions"]
    assert recent_digits["task"] == "classification"
    assert entry["rows"] == 3
    for key in ("entropy", "mutual_information", "variation_ratio"):
        want = sum(p[key] for p in predictions) / 3
        assert entry[f"mean_{key}"] == pytest.approx(want, rel=1e-6, abs=1e-9), key
    assert entry["max_mutual_information"] == pytest.approx(
        max(p["mutual_information"] for p in predictions), rel=1e-6, abs=1e-9
    )


async def test_recent_since_and_limit(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        for seed in range(4):
            await client.post(PREDICT, json={"rows": ROWS[:1], "seed": seed})
        entries = (await client.get("/v1/models/mlp/recent")).json()["entries"]
        since = entries[1]["time"]
        later = (await client.get("/v1/models/mlp/recent", params={"since": since})).json()
        newest = (await client.get("/v1/models/mlp/recent", params={"limit": 1})).json()
        both = await client.get("/v1/models/mlp/recent", params={"since": 0, "limit": 2})
    assert len(entries) == 4
    assert later["entries"] == [e for e in entries if e["time"] > since]
    assert newest["entries"] == entries[-1:]
    assert both.json()["entries"] == entries[-2:]


@pytest.mark.parametrize(
    ("query", "word"),
    [
        pytest.param("since=soon", "since", id="since-text"),
        pytest.param("since=-1", "since", id="since-negative"),
        pytest.param("since=nan", "since", id="since-nan"),
        pytest.param("limit=0", "limit", id="limit-zero"),
        pytest.param("limit=2.5", "limit", id="limit-fraction"),
    ],
)
async def test_recent_refuses_bad_query_values(repo: Path, query: str, word: str) -> None:
    async with serve(settings_for(repo)) as (_, client):
        response = await client.get(f"/v1/models/mlp/recent?{query}")
    assert word in error_of(response, 422)


async def test_calibration_is_the_latest_evaluate_report(repo: Path) -> None:
    xs, ys = [[-1.0], [0.5], [2.0]], [-0.5, 0.2, 0.9]
    url = "/v1/models/toy-regression"
    async with serve(settings_for(repo)) as (_, client):
        missing = await client.get(f"{url}/calibration")
        before = time.time()
        first = await client.post(f"{url}/evaluate", json={"rows": xs, "targets": ys, "seed": 1})
        second = await client.post(
            f"{url}/evaluate", json={"rows": xs[:2], "targets": ys[:2], "seed": 2}
        )
        after = time.time()
        latest = await client.get(f"{url}/calibration")
        refused = await client.post(f"{url}/evaluate", json={"rows": xs, "targets": ys[:1]})
        still = (await client.get(f"{url}/calibration")).json()
        recent = (await client.get(f"{url}/recent")).json()
    assert missing.status_code == 200  # nothing yet is an answer, not an error
    assert missing.json() == {"model": "toy-regression", "time": None, "report": None}
    assert first.status_code == second.status_code == 200
    doc = latest.json()
    assert set(doc) == {"model", "time", "report"}
    assert doc["model"] == "toy-regression"
    assert doc["report"] == second.json() != first.json()
    assert before <= doc["time"] <= after
    error_of(refused, 400)
    assert still == doc  # a refused evaluation changes nothing
    assert recent["entries"] == []  # evaluations are not traffic


async def test_unknown_model_has_no_recent_or_calibration(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        recent = await client.get("/v1/models/ghost/recent")
        calibration = await client.get("/v1/models/ghost/calibration")
    for response in (recent, calibration):
        assert "ghost" in error_of(response, 404)


async def test_recent_survives_a_new_version_and_goes_with_unload(repo: Path) -> None:
    def rewrite(**changes: Any) -> None:
        write_mlp_model(repo / "mlp", outputs=("a", "b"), hidden=(16,), dropout=0.2, tau=4.0,
                        mc={"max_rows": 4}, **changes)  # fmt: skip

    async with serve(settings_for(repo)) as (app, client):
        registry = app.state.registry
        await client.post(PREDICT, json={"rows": ROWS[:1]})
        await client.post("/v1/models/mlp/evaluate", json={"rows": ROWS, "targets": [[0, 0]] * 3})
        rewrite(seed=3)
        set_version(repo / "mlp", "2")
        await registry.index()
        await client.post(PREDICT, json={"rows": ROWS[:2]})
        swapped = (await client.get("/v1/models/mlp/recent")).json()
        kept = await client.get("/v1/models/mlp/calibration")
        await registry.unload("mlp")
        gone = await client.get("/v1/models/mlp/recent")
        await registry.load("mlp")
        fresh = (await client.get("/v1/models/mlp/recent")).json()
        fresh_calibration = await client.get("/v1/models/mlp/calibration")
        rewrite(task="classification")
        await client.post(PREDICT, json={"rows": ROWS[:1]})
        await registry.index()
        other_task = (await client.get("/v1/models/mlp/recent")).json()
    assert [(e["version"], e["rows"]) for e in swapped["entries"]] == [("1", 1), ("2", 2)]
    assert kept.json()["report"]["version"] == "1"
    error_of(gone, 404)
    assert fresh["entries"] == []
    assert fresh_calibration.status_code == 200, fresh_calibration.text
    assert fresh_calibration.json() == {"model": "mlp", "time": None, "report": None}
    assert (other_task["task"], other_task["entries"]) == ("classification", [])


async def test_recent_and_calibration_are_open_while_inference_needs_the_token(
    repo: Path,
) -> None:
    token = {"Authorization": "Bearer s3cret"}
    async with serve(settings_for(repo, inference_token="s3cret")) as (_, client):
        refused = await client.post(PREDICT, json={"rows": ROWS})
        await client.post(PREDICT, json={"rows": ROWS}, headers=token)
        body = {"rows": ROWS, "targets": [[0.0, 1.0]] * 3}
        evaluate_refused = await client.post("/v1/models/mlp/evaluate", json=body)
        await client.post("/v1/models/mlp/evaluate", json=body, headers=token)
        recent = await client.get("/v1/models/mlp/recent")
        calibration = await client.get("/v1/models/mlp/calibration")
    error_of(refused, 401)
    error_of(evaluate_refused, 401)
    assert [e["rows"] for e in recent.json()["entries"]] == [3]
    assert calibration.json()["report"]["rows"] == 3


# -- numerics: finite inputs give finite JSON; a non-finite output is a 422 naming it ------------

FAR = [[5000.0], [-5000.0]]  # toy-regression was trained on |x| <= 4: its log-variance explodes


def strict_json(text: str) -> Any:
    """Parse JSON as the standard has it: bare NaN / Infinity are refused."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in the JSON body")

    return json.loads(text, parse_constant=refuse)


def write_overflowing_mlp(folder: Path, task: str = "regression") -> None:
    """A 1 -> 1 -> outputs MLP with fixed weights: relu(1e20 x); x = 1 is fine, x = 1e20 is inf."""
    outputs = ("y",) if task == "regression" else ("a", "b")
    state = {"fc0.weight": torch.tensor([[1e20]]), "fc0.bias": torch.zeros(1),
             "out.weight": torch.tensor([[1.0], [-1.0]][: len(outputs)]),
             "out.bias": torch.zeros(len(outputs))}  # fmt: skip
    write_mlp_model(folder, in_features=1, outputs=outputs, hidden=(1,), task=task,
                    tau=1.0 if task == "regression" else None, state=state)  # fmt: skip


async def test_toy_regression_far_from_its_data_answers_finite_valid_json(repo: Path) -> None:
    model = served(repo, "toy-regression")
    summary = model.predict(torch.tensor(FAR), model.options(64, seed=3, return_samples=4))
    async with serve(settings_for(repo)) as (_, client):
        response = await client.post(
            "/v1/models/toy-regression/predict",
            json={"rows": FAR, "samples": 64, "seed": 3, "return_samples": 4},
        )
    assert first_non_finite(summary) is None
    assert isinstance(summary, RegressionSummary)
    aleatoric = summary.aleatoric_variance
    assert bool((aleatoric <= MAX_VARIANCE).all())
    assert bool((aleatoric > 1e100).all())  # capped, not overflowed: "astronomically noisy"
    assert response.status_code == 200, response.text
    predictions = strict_json(response.text)["predictions"]
    assert predictions == library_rows(repo, "toy-regression", FAR, samples=64, seed=3,
                                       return_samples=4)  # fmt: skip
    assert predictions[0]["y"]["aleatoric_variance"] == float(aleatoric[0, 0])


@pytest.mark.parametrize(("task", "named"), [("regression", "output 'y' (mean)"),
                                             ("classification", "probabilities")])  # fmt: skip
async def test_a_non_finite_output_is_a_422_naming_the_output_and_rows(
    tmp_path: Path, task: str, named: str
) -> None:
    write_overflowing_mlp(tmp_path / "huge", task)
    model = ServedModel.load(tmp_path / "huge", settings_for(tmp_path))
    rows = [[1.0], [1e20], [2.0]]  # row 1 overflows float32 inside the network
    with pytest.raises(NonFiniteOutput) as info:
        model.predict(torch.tensor(rows), model.options(16, seed=0))
    async with serve(settings_for(tmp_path)) as (_, client):
        response = await client.post("/v1/models/huge/predict", json={"rows": rows, "seed": 0})
        finite = await client.post("/v1/models/huge/predict", json={"rows": [[1.0]], "seed": 0})
    want = f"model 'huge' cannot compute a finite answer for this input: {named} is NaN or " \
        "infinite in rows [1]"  # fmt: skip
    assert str(info.value) == want
    assert info.value.status_code == 422
    assert error_of(response, 422) == want
    assert finite.status_code == 200


async def test_a_non_finite_answer_fails_only_its_own_job_in_a_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_overflowing_mlp(tmp_path / "huge")
    url = "/v1/models/huge/predict"
    async with serve(settings_for(tmp_path, max_batch_delay_ms=0)) as (app, client):
        spy = spy_engine(app, "huge", monkeypatch)
        with spy.held():
            blocker = asyncio.create_task(client.post(url, json={"rows": [[0.0]], "seed": 1}))
            await spy.wait_calls(1)
            bad = asyncio.create_task(client.post(url, json={"rows": [[1e20]], "seed": 2}))
            good = asyncio.create_task(client.post(url, json={"rows": [[1.0], [2.0]], "seed": 3}))
            await wait_for(lambda: queue_depth(app, "huge") == 2, "two queued requests")
        answers = [await blocker, await bad, await good]
    assert [[len(r.x) for r in call] for call in spy.calls] == [[1], [1, 2]]  # one engine batch
    assert "output 'y' (mean) is NaN or infinite in rows [0]" in error_of(answers[1], 422)
    assert [answers[0].status_code, answers[2].status_code] == [200, 200]
    assert answers[2].json()["predictions"] == library_rows(tmp_path, "huge", [[1.0], [2.0]],
                                                            seed=3)  # fmt: skip


async def test_a_seeded_answer_records_the_mask_stream_that_reproduces_it(repo: Path) -> None:
    async with serve(settings_for(repo)) as (_, client):
        models = {m["name"]: m for m in (await client.get("/v1/models")).json()}
        native = (await client.post(PREDICT, json={"rows": ROWS, "seed": 4})).json()
        meta = (await client.get("/v2/models/mlp")).json()
    assert models["mlp"]["mask_stream"] == MASK_STREAM
    assert native["mask_stream"] == MASK_STREAM
    assert meta["parameters"]["mask_stream"] == MASK_STREAM
