"""Summaries as JSON rows and tables: real engine summaries of tiny fixed-weight models."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import write_mlp_model

from mcdrop.config import Settings
from mcdrop.engine.masks import MASK_STREAM
from mcdrop.model import ServedModel
from mcdrop.render import (
    format_summary,
    render_table,
    summary_document,
    summary_meta,
    summary_rows,
)
from mcdrop.uncertainty import ClassificationSummary, RegressionSummary

ROWS = torch.tensor([[0.5, -1.0], [2.0, 0.25], [-3.0, 1.5]])


@pytest.fixture(scope="module")
def regressor(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    folder = tmp_path_factory.mktemp("reg") / "houses"
    write_mlp_model(folder, outputs=("price", "rent"), hidden=(6,), dropout=0.3, tau=4.0, seed=1)
    return ServedModel.load(folder, Settings(device="cpu"))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    folder = tmp_path_factory.mktemp("cls") / "pets"
    write_mlp_model(
        folder, task="classification", outputs=("cat", "dog", "bird"), hidden=(6,), dropout=0.4
    )
    return ServedModel.load(folder, Settings(device="cpu"))


def _regression(model: ServedModel, keep: int = 4) -> RegressionSummary:
    options = model.options(32, seed=7, interval_levels=(0.5, 0.95), return_samples=keep)
    summary = model.predict(ROWS, options)
    assert isinstance(summary, RegressionSummary)
    return summary


def _classification(model: ServedModel, keep: int = 3) -> ClassificationSummary:
    summary = model.predict(ROWS, model.options(40, seed=3, return_samples=keep))
    assert isinstance(summary, ClassificationSummary)
    return summary


def test_regression_rows_are_keyed_by_output_name_and_equal_the_summary(
    regressor: ServedModel,
) -> None:
    s = _regression(regressor)
    rows = summary_rows(s, regressor.spec)
    assert len(rows) == len(ROWS)
    for r, row in enumerate(rows):
        assert list(row) == ["price", "rent"]
        for d, name in enumerate(["price", "rent"]):
            out = row[name]
            assert out["mean"] == float(s.mean[r, d])
            assert out["std"] == float(s.std[r, d])
            assert out["variance"] == float(s.variance[r, d])
            assert out["epistemic_variance"] == float(s.epistemic_variance[r, d])
            assert out["aleatoric_variance"] == pytest.approx(0.25)  # 1 / tau
            assert set(out["intervals"]) == {"0.5", "0.95"}
            for level, key in ((0.5, "0.5"), (0.95, "0.95")):
                g, e = s.gaussian_intervals[level], s.empirical_intervals[level]
                interval = out["intervals"][key]
                assert interval["gaussian"] == [float(g.lower[r, d]), float(g.upper[r, d])]
                assert interval["empirical"] == [float(e.lower[r, d]), float(e.upper[r, d])]
            assert s.samples is not None
            assert out["samples"] == s.samples[r, :, d].double().tolist()
            assert len(out["samples"]) == 4
    json.dumps(rows, allow_nan=False)  # JSON-ready: plain floats, lists and dicts


def test_regression_without_kept_samples_or_empirical_intervals(regressor: ServedModel) -> None:
    s = dataclasses.replace(_regression(regressor, keep=0), empirical_intervals={})
    assert s.samples is None
    out = summary_rows(s, regressor.spec)[0]["price"]
    assert "samples" not in out
    assert out["intervals"]["0.95"]["empirical"] is None
    lower, upper = out["intervals"]["0.95"]["gaussian"]
    assert lower < out["mean"] < upper


def test_classification_rows_use_the_class_labels(classifier: ServedModel) -> None:
    s = _classification(classifier)
    rows = summary_rows(s, classifier.spec)
    labels = ["cat", "dog", "bird"]
    assert len(rows) == len(ROWS)
    for r, row in enumerate(rows):
        assert row["predicted"] == labels[int(s.probabilities[r].argmax())]
        assert list(row["probabilities"]) == labels
        assert list(row["probabilities"].values()) == s.probabilities[r].double().tolist()
        assert sum(row["probabilities"].values()) == pytest.approx(1.0)
        assert list(row["probabilities_std"].values()) == s.probabilities_std[r].double().tolist()
        for key in ("entropy", "expected_entropy", "mutual_information", "variation_ratio"):
            assert row[key] == float(getattr(s, key)[r])
        assert s.samples is not None
        assert row["samples"] == s.samples[r].double().tolist()
        assert len(row["samples"]) == 3
        assert len(row["samples"][0]) == 3
    json.dumps(rows, allow_nan=False)
    without = summary_rows(dataclasses.replace(s, samples=None), classifier.spec)
    assert "samples" not in without[0]


def test_meta_and_document(classifier: ServedModel) -> None:
    s = _classification(classifier, keep=0)
    assert summary_meta(s) == {"samples_used": 40, "seed": 3, "mask_stream": MASK_STREAM}
    document = summary_document(s, classifier.spec)
    assert list(document) == ["samples_used", "seed", "mask_stream", "rows"]
    assert document["rows"] == summary_rows(s, classifier.spec)


def test_render_table_aligns_columns() -> None:
    assert render_table([["a", "bbb", "c"], ["dddd", "e", "ff"]]) == [
        "a     bbb  c",
        "dddd  e    ff",
    ]


def test_format_summary_regression(regressor: ServedModel) -> None:
    s = _regression(regressor, keep=2)
    lines = format_summary(regressor.spec, s, "shared").splitlines()
    assert lines[0] == "houses v1 (regression): 32 MC samples, seed 7, shared masks"
    assert lines[1].split()[:6] == ["row", "output", "mean", "std", "epistemic", "aleatoric"]
    assert "50% interval" in lines[1]
    assert "95% interval" in lines[1]
    body = lines[2:8]  # 3 rows x 2 outputs
    assert [line.split()[:2] for line in body] == [
        [str(r), name] for r in range(3) for name in ("price", "rent")
    ]
    assert body[1].split()[2] == f"{float(s.mean[0, 1]):.4g}"
    assert body[1].split()[5] == f"{0.5:.4g}"  # aleatoric std = sqrt(1 / tau)
    assert lines[8].startswith("row 0 samples: ")
    assert len(lines[8].split(": ")[1].split(", ")) == 2 * 2  # K x D
    assert lines[-1].startswith("std: total predictive std")


def test_format_summary_classification(classifier: ServedModel) -> None:
    s = _classification(classifier, keep=0)
    lines = format_summary(classifier.spec, s, "independent").splitlines()
    assert lines[0] == "pets v1 (classification): 40 MC samples, seed 3, independent masks"
    assert lines[1].split() == [
        "row",
        "class",
        "probability",
        "entropy",
        "mutual_info",
        "variation_ratio",
    ]
    for r, line in enumerate(lines[2:5]):
        k = int(s.predicted_class[r])
        assert line.split() == [
            str(r),
            ["cat", "dog", "bird"][k],
            f"{float(s.probabilities[r, k]):.3f}",
            f"{float(s.entropy[r]):.3f}",
            f"{float(s.mutual_information[r]):.3f}",
            f"{float(s.variation_ratio[r]):.3f}",
        ]
    assert len(lines) == 6
    assert lines[-1].startswith("entropy: total uncertainty")
