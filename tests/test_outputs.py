"""Summary output tensors: names, shapes and values from real engine runs, levels, selection."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from torch import nn

from mcdrop.api.oip_codec import HEADER_LENGTH, RequestedOutput, encode_infer_response
from mcdrop.api.outputs import (
    MAX_LEVELS,
    input_metadata,
    interval_name,
    output_metadata,
    parse_levels,
    select_outputs,
    summary_outputs,
)
from mcdrop.engine.core import MCEngine, MCOptions
from mcdrop.errors import InvalidInput
from mcdrop.repository.manifest import ModelSpec
from mcdrop.uncertainty import ClassificationSummary, RegressionSummary

ROWS, FEATURES, TARGETS, CLASSES = 3, 4, 2, 5
Task = Literal["regression", "classification"]


def engine(task: Task, n_out: int) -> MCEngine:
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(FEATURES, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, n_out)
    )
    tau = 4.0 if task == "regression" else None
    return MCEngine(module, task=task, input_shape=(FEATURES,), tau=tau)


def run(task: Task, levels: tuple[float, ...] = (0.95,), keep: int = 0) -> Any:
    n_out = TARGETS if task == "regression" else CLASSES
    x = torch.linspace(-1, 1, ROWS * FEATURES).view(ROWS, FEATURES)
    options = MCOptions(samples=16, seed=3, interval_levels=levels, return_samples=keep)
    return engine(task, n_out).run(x, options)


def spec(task: Task) -> ModelSpec:
    names = ["a", "b"] if task == "regression" else [f"c{i}" for i in range(CLASSES)]
    return ModelSpec.model_validate(
        {
            "name": "tiny",
            "task": task,
            "input": {"shape": [FEATURES]},
            "output": {"names": names},
            "model": {"format": "builtin", "architecture": "mlp"},
        }
    )


def test_regression_outputs_names_shapes_and_values() -> None:
    summary = run("regression", levels=(0.995, 0.9), keep=6)
    assert isinstance(summary, RegressionSummary)
    out = summary_outputs(summary)
    assert list(out) == [
        "mean", "variance", "epistemic_variance", "aleatoric_variance", "std",
        "lower_90", "upper_90", "lower_99.5", "upper_99.5",
        "lower_90_empirical", "upper_90_empirical", "lower_99.5_empirical", "upper_99.5_empirical",
        "samples",
    ]  # fmt: skip
    for name, array in out.items():
        assert array.dtype == np.float64, name
        assert array.shape == ((ROWS, 6, TARGETS) if name == "samples" else (ROWS, TARGETS)), name
    np.testing.assert_array_equal(out["mean"], summary.mean.double().numpy())
    np.testing.assert_array_equal(out["epistemic_variance"], summary.epistemic_variance.numpy())
    np.testing.assert_allclose(out["aleatoric_variance"], 0.25)  # 1 / tau
    np.testing.assert_allclose(out["variance"], out["epistemic_variance"] + 0.25)
    np.testing.assert_allclose(out["std"], np.sqrt(out["variance"]))
    np.testing.assert_array_equal(
        out["upper_99.5"], summary.gaussian_intervals[0.995].upper.numpy()
    )
    np.testing.assert_array_equal(
        out["lower_90_empirical"], summary.empirical_intervals[0.9].lower.numpy()
    )
    assert (out["lower_99.5"] < out["lower_90"]).all()
    assert (out["lower_90"] < out["mean"]).all()
    assert (out["mean"] < out["upper_90"]).all()
    assert summary.samples is not None
    np.testing.assert_array_equal(out["samples"], summary.samples.numpy())


def test_classification_outputs_names_shapes_and_values() -> None:
    summary = run("classification", keep=4)
    assert isinstance(summary, ClassificationSummary)
    out = summary_outputs(summary)
    assert list(out) == [
        "probabilities", "probabilities_std", "predicted_class", "entropy",
        "expected_entropy", "mutual_information", "variation_ratio", "samples",
    ]  # fmt: skip
    assert out["predicted_class"].dtype == np.int64
    assert out["predicted_class"].shape == (ROWS,)
    np.testing.assert_array_equal(out["predicted_class"], out["probabilities"].argmax(axis=1))
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0)
    np.testing.assert_allclose(out["mutual_information"], out["entropy"] - out["expected_entropy"])
    for name in ("probabilities", "probabilities_std"):
        assert out[name].shape == (ROWS, CLASSES)
        assert out[name].dtype == np.float64
    for name in ("entropy", "expected_entropy", "mutual_information", "variation_ratio"):
        assert out[name].shape == (ROWS,)
        assert out[name].dtype == np.float64
    assert out["samples"].shape == (ROWS, 4, CLASSES)


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_metadata_lists_exactly_what_summaries_produce(task: Task) -> None:
    with_samples = summary_outputs(run(task, keep=2))
    without = summary_outputs(run(task))
    assert "samples" not in without
    meta = output_metadata(spec(task))
    assert [m["name"] for m in meta] == list(with_samples)
    assert [m["name"] for m in meta if m["name"] != "samples"] == list(without)
    for m in meta:
        array = with_samples[m["name"]]
        assert m["datatype"] == ("INT64" if array.dtype == np.int64 else "FP64")
        expected = [-1, *array.shape[1:]]
        if m["name"] == "samples":
            expected[1] = -1
        assert m["shape"] == expected, m["name"]


def test_metadata_follows_levels_and_input() -> None:
    names = [m["name"] for m in output_metadata(spec("regression"), (0.99, 0.5))]
    assert names[5:9] == ["lower_50", "upper_50", "lower_99", "upper_99"]
    assert names[9:13] == ["lower_50_empirical", "upper_50_empirical",
                           "lower_99_empirical", "upper_99_empirical"]  # fmt: skip
    assert input_metadata(spec("classification")) == [
        {"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}
    ]


@pytest.mark.parametrize(
    ("level", "pct"),
    [(0.95, "95"), (0.995, "99.5"), (0.9, "90"), (0.5, "50"), (0.999, "99.9"),
     (0.9999, "99.99"), (0.05, "5"), (0.001, "0.1"), (0.123456, "12.3456")],
)  # fmt: skip
def test_interval_names_format_the_percentage_without_trailing_zeros(
    level: float, pct: str
) -> None:
    assert interval_name(level, "lower") == f"lower_{pct}"
    assert interval_name(level, "upper", empirical=True) == f"upper_{pct}_empirical"


@pytest.mark.parametrize(
    ("value", "levels"),
    [
        ([0.95, 0.9], (0.9, 0.95)),
        (0.95, (0.95,)),
        (95, (0.95,)),
        ("90, 99.5", (0.9, 0.995)),
        ("0.8", (0.8,)),
        ([95, 0.95, "95"], (0.95,)),
        (1.5, (0.015,)),
    ],
)
def test_parse_levels_accepts_lists_numbers_strings_and_percentages(
    value: object, levels: tuple[float, ...]
) -> None:
    assert parse_levels(value) == pytest.approx(levels, abs=0, rel=1e-12)


def test_percentages_name_like_fractions() -> None:
    for pct in ("99.9", "99.99", "97.5", "68.27"):
        (level,) = parse_levels(float(pct))
        assert interval_name(level, "lower") == f"lower_{pct}"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "give at least one level"),
        ("abc", "'abc' is not a number"),
        ("0.9,", "'' is not a number"),
        ([0], "0 must lie in (0, 1), or in (1, 100) as a percentage"),
        ([1], "1 must lie in (0, 1)"),
        (100, "100 must lie in (0, 1)"),
        (-0.5, "-0.5 must lie in (0, 1)"),
        ([float("nan")], "nan is not a number"),
        ([True], "True is not a number"),
        ({"a": 1}, "is not a number"),
        ([[0.9]], "[0.9] is not a number"),
        (None, "None is not a number"),
        ([i + 1.5 for i in range(MAX_LEVELS + 1)], f"{MAX_LEVELS + 1} levels is above"),
    ],
)
def test_parse_levels_errors_name_the_parameter(value: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=r"^interval_levels: ") as info:
        parse_levels(value)
    assert message in str(info.value)


def test_select_outputs_all_or_named() -> None:
    out = summary_outputs(run("classification"))
    every, binary = select_outputs(out, [], "digits", binary_default=True)
    assert [t.name for t in every] == list(out)
    assert binary == set(out)
    assert select_outputs(out, [], "digits")[1] == set()
    assert [t.datatype for t in every][:3] == ["FP64", "FP64", "INT64"]
    asked = [RequestedOutput("entropy", False, {}), RequestedOutput("probabilities", True, {})]
    chosen, binary = select_outputs(out, asked, "digits", binary_default=True)
    assert [t.name for t in chosen] == ["entropy", "probabilities"]
    assert chosen[1].data is out["probabilities"]
    assert binary == {"probabilities"}


@pytest.mark.parametrize(
    ("name", "hint"),
    [("foo", ""), ("samples", "return_samples"), ("lower_90", "interval_levels")],
)
def test_select_outputs_refuses_unknown_names(name: str, hint: str) -> None:
    out = summary_outputs(run("regression"))
    with pytest.raises(InvalidInput) as info:
        select_outputs(out, [RequestedOutput(name, True, {})], "digits")
    message = str(info.value)
    assert message.startswith(
        f"output '{name}' is not produced by model 'digits'; it produces: mean, variance, "
    )
    assert "lower_95_empirical" in message
    assert hint in message


@pytest.mark.parametrize("binary_default", [True, False])
def test_summary_outputs_reach_tritonclient_unchanged(binary_default: bool) -> None:
    out = summary_outputs(run("regression", keep=3))
    chosen, binary = select_outputs(out, [], "tiny", binary_default)
    body, headers = encode_infer_response("tiny", "1", None, chosen, {"seed": 3}, binary)
    length = headers.get(HEADER_LENGTH)
    result = triton.InferResult.from_response_body(
        body, header_length=None if length is None else int(length)
    )
    for name, array in out.items():
        got = result.as_numpy(name)
        assert got.dtype == array.dtype, name
        assert got.tobytes() == array.tobytes(), name
