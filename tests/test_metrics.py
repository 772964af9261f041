"""Prometheus collectors: observe, render, parse the exposition back and check the numbers."""

from __future__ import annotations

import math
import re

import pytest
from conftest import classification_summary, regression_summary
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from mcdrop.serving import metrics as metrics_module
from mcdrop.serving.metrics import NATS_BUCKETS, Metrics

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(m: Metrics) -> Series:
    """Every sample of the exposition, keyed by (sample name, labels)."""
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode("utf-8"))
        for s in family.samples
    }


def value(series: Series, name: str, **labels: str) -> float:
    return series[(name, frozenset(labels.items()))]


def models_in(series: Series) -> set[str]:
    return {dict(labels)["model"] for _, labels in series if "model" in dict(labels)}


def test_requests_counted_by_status_and_timed_by_endpoint() -> None:
    m = Metrics()
    m.observe_request("toy", "predict", 200, 0.02)
    m.observe_request("toy", "predict", 200, 0.02)
    m.observe_request("toy", "predict", "404", 0.004)
    m.observe_request("toy", "oip_infer", 503, 2.0)
    s = scrape(m)
    total = "mcdrop_requests_total"
    assert value(s, total, model="toy", endpoint="predict", status="200") == 2
    assert value(s, total, model="toy", endpoint="predict", status="404") == 1
    assert value(s, total, model="toy", endpoint="oip_infer", status="503") == 1
    predict = {"model": "toy", "endpoint": "predict"}
    assert value(s, "mcdrop_request_seconds_count", **predict) == 3
    assert value(s, "mcdrop_request_seconds_sum", **predict) == pytest.approx(0.044)
    bucket = "mcdrop_request_seconds_bucket"
    assert value(s, bucket, le="0.001", **predict) == 0
    assert value(s, bucket, le="0.005", **predict) == 1
    assert value(s, bucket, le="0.025", **predict) == 3
    assert value(s, bucket, le="+Inf", **predict) == 3
    assert value(s, bucket, le="1.0", model="toy", endpoint="oip_infer") == 0
    assert value(s, bucket, le="2.5", model="toy", endpoint="oip_infer") == 1


def test_batches_rows_samples_queue_and_compute() -> None:
    m = Metrics()
    m.observe_batch("toy", 5, 3, 100, queue_seconds=[0.001, 0.002, 0.5], compute_seconds=0.2)
    m.observe_batch("toy", 1, 1, 1000, queue_seconds=[0.0], compute_seconds=0.04)
    s = scrape(m)
    toy = {"model": "toy"}
    assert value(s, "mcdrop_batch_rows_bucket", le="1.0", **toy) == 1
    assert value(s, "mcdrop_batch_rows_bucket", le="4.0", **toy) == 1
    assert value(s, "mcdrop_batch_rows_bucket", le="8.0", **toy) == 2
    assert value(s, "mcdrop_batch_rows_bucket", le="1024.0", **toy) == 2
    assert value(s, "mcdrop_batch_rows_sum", **toy) == 6
    assert value(s, "mcdrop_batch_requests_sum", **toy) == 4
    assert value(s, "mcdrop_batch_requests_bucket", le="2.0", **toy) == 1
    assert value(s, "mcdrop_samples_bucket", le="50.0", **toy) == 0
    assert value(s, "mcdrop_samples_bucket", le="100.0", **toy) == 1
    assert value(s, "mcdrop_samples_bucket", le="1000.0", **toy) == 2
    assert value(s, "mcdrop_samples_bucket", le="100000.0", **toy) == 2
    assert value(s, "mcdrop_queue_seconds_count", **toy) == 4  # one per request
    assert value(s, "mcdrop_queue_seconds_sum", **toy) == pytest.approx(0.503)
    assert value(s, "mcdrop_queue_seconds_bucket", le="0.001", **toy) == 2
    assert value(s, "mcdrop_compute_seconds_count", **toy) == 2  # one per engine call
    assert value(s, "mcdrop_compute_seconds_sum", **toy) == pytest.approx(0.24)
    assert value(s, "mcdrop_compute_seconds_bucket", le="0.05", **toy) == 1


def test_gauges_and_load_failures() -> None:
    m = Metrics()
    m.set_queue_depth("toy", 7)
    m.set_queue_depth("toy", 3)
    m.set_queue_depth("digits", 1)
    m.set_models_loaded(2)
    m.observe_load_failure("broken")
    m.observe_load_failure("broken")
    s = scrape(m)
    assert value(s, "mcdrop_queue_depth", model="toy") == 3
    assert value(s, "mcdrop_queue_depth", model="digits") == 1
    assert value(s, "mcdrop_models_loaded") == 2
    assert value(s, "mcdrop_model_load_failures_total", model="broken") == 2


def test_predictive_std_every_output_of_every_row_skipping_non_finite() -> None:
    m = Metrics()
    m.observe_summary("houses", regression_summary([[0.5, 5.0], [0.02, math.nan]]))
    s = scrape(m)
    houses = {"model": "houses"}
    assert value(s, "mcdrop_predictive_std_count", **houses) == 3
    assert value(s, "mcdrop_predictive_std_sum", **houses) == pytest.approx(5.52, rel=1e-6)
    assert value(s, "mcdrop_predictive_std_bucket", le="0.025", **houses) == 1
    assert value(s, "mcdrop_predictive_std_bucket", le="0.5", **houses) == 2
    assert value(s, "mcdrop_predictive_std_bucket", le="5.0", **houses) == 3
    assert not any(name.startswith("mcdrop_entropy") for name, _ in s)


def test_entropy_and_mutual_information_per_row() -> None:
    m = Metrics()
    m.observe_summary("pets", classification_summary([math.log(2), 0.25], [0.5, 0.25]))
    s = scrape(m)
    pets = {"model": "pets"}
    assert value(s, "mcdrop_entropy_nats_count", **pets) == 2
    assert value(s, "mcdrop_entropy_nats_sum", **pets) == pytest.approx(math.log(2) + 0.25)
    assert value(s, "mcdrop_entropy_nats_bucket", le="0.2", **pets) == 0
    assert value(s, "mcdrop_entropy_nats_bucket", le="0.3", **pets) == 1
    assert value(s, "mcdrop_entropy_nats_bucket", le="0.5", **pets) == 1
    assert value(s, "mcdrop_entropy_nats_bucket", le="0.6932", **pets) == 2  # ln 2 fits
    mi = "mcdrop_mutual_information_nats"
    assert value(s, f"{mi}_count", **pets) == 2
    assert value(s, f"{mi}_sum", **pets) == pytest.approx(math.log(2) - 0.5)
    assert value(s, f"{mi}_bucket", le="0.001", **pets) == 1  # 0.25 - 0.25 = 0
    assert value(s, f"{mi}_bucket", le="0.1", **pets) == 1
    assert value(s, f"{mi}_bucket", le="0.2", **pets) == 2


def test_nats_buckets_hold_the_maximum_entropy_of_common_class_counts() -> None:
    assert tuple(sorted(NATS_BUCKETS)) == NATS_BUCKETS
    for classes in (2, 10, 100, 1000):
        edge = next(b for b in NATS_BUCKETS if b >= math.log(classes))
        assert edge - math.log(classes) < 1e-4
    assert NATS_BUCKETS[-1] >= math.log(1000)


def test_two_instances_are_independent_and_the_global_registry_untouched() -> None:
    a, b = Metrics(), Metrics()
    a.observe_request("toy", "predict", 200, 0.01)
    a.set_models_loaded(4)
    sa, sb = scrape(a), scrape(b)
    assert value(sa, "mcdrop_requests_total", model="toy", endpoint="predict", status="200") == 1
    assert not any(name == "mcdrop_requests_total" for name, _ in sb)
    assert value(sb, "mcdrop_models_loaded") == 0
    assert not any(f.name.startswith("mcdrop_") for f in REGISTRY.collect())


def _observe_everything(m: Metrics, model: str) -> None:
    m.observe_request(model, "predict", 200, 0.01)
    m.observe_request(model, "oip_infer", 404, 0.002)
    m.observe_batch(model, 2, 2, 10, [0.0, 0.001], 0.01)
    m.set_queue_depth(model, 1)
    m.observe_load_failure(model)
    m.observe_summary(model, regression_summary([[1.0]]))
    m.observe_summary(model, classification_summary([0.3], [0.2]))


def test_remove_model_drops_only_its_series() -> None:
    m = Metrics()
    _observe_everything(m, "a")
    _observe_everything(m, "b")
    m.set_models_loaded(2)
    before = scrape(m)
    assert models_in(before) == {"a", "b"}
    m.remove_model("a")
    after = scrape(m)
    assert models_in(after) == {"b"}
    kept = {key: v for key, v in before.items() if ("model", "a") not in key[1]}
    assert {k for k in kept if not k[0].startswith(("process_", "python_"))} == {
        k for k in after if not k[0].startswith(("process_", "python_"))
    }
    m.observe_request("a", "predict", 200, 0.01)  # a reloaded model starts from zero
    again = scrape(m)
    assert value(again, "mcdrop_requests_total", model="a", endpoint="predict", status="200") == 1


def test_the_docstring_table_names_every_metric() -> None:
    doc = metrics_module.__doc__ or ""
    documented = set(re.findall(r"^\| (mcdrop_\w+)", doc, flags=re.M))
    m = Metrics()
    _observe_everything(m, "a")
    body, _ = m.render()
    exposed = set()
    for family in text_string_to_metric_families(body.decode("utf-8")):
        if family.name.startswith("mcdrop_") and not family.name.endswith("_created"):
            exposed.add(family.name + ("_total" if family.type == "counter" else ""))
    assert documented == exposed
    assert len(documented) == 13
