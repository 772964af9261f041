"""deploy/: the Prometheus and Grafana files parse, agree, and query what the service exports.

The key check serves the shipped models in process, scrapes a live /metrics, and compares every
metric and label the dashboard's PromQL names against it, so renaming a metric breaks this test.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mcdrop.app import create_app
from mcdrop.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
DASHBOARD = DASHBOARDS / "mcdrop.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "mcdrop.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"

METRIC = re.compile(r"\bmcdrop_[a-z_]+\b")
SELECTOR = re.compile(r"\b(mcdrop_[a-z_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
LEGEND = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
LABEL_VALUES = re.compile(r"label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# -- helpers -----------------------------------------------------------------------------------


def load_yaml(path: Path) -> dict[str, Any]:
    """One YAML file as a mapping; fails naming the file otherwise."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path}: expected a YAML mapping at the top level"
    return data


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{DASHBOARD}: expected a JSON object"
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those folded inside (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(panel title, PromQL expression, legend format) of every panel target."""
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"], target.get("legendFormat", "")


def family(sample: str) -> str:
    """The family of a sample name: mcdrop_x_bucket -> mcdrop_x, mcdrop_y_total -> mcdrop_y."""
    for suffix in (*HISTOGRAM_SUFFIXES, "_total"):
        if sample.endswith(suffix):
            return sample.removesuffix(suffix)
    return sample


def label_list(text: str) -> set[str]:
    return {name.strip() for name in text.split(",") if name.strip()}


@dataclass
class Exposition:
    """Sample names of a live /metrics with the label names seen on each, and family types."""

    labels: dict[str, set[str]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Exposition:
        exposition = cls()
        for family in text_string_to_metric_families(text):
            exposition.types[family.name] = family.type
            for sample in family.samples:
                exposition.labels.setdefault(sample.name, set()).update(sample.labels)
        return exposition

    def describe(self, name: str) -> str:
        """What the exposition has under (a family of) this name, for failure messages."""
        base = family(name)
        if base in self.types:
            have = sorted(s for s in self.labels if family(s) == base)
            return f"'{base}' is a {self.types[base]} exposing {have}"
        return f"no family '{base}' is exported"


def problems(dashboard: dict[str, Any], live: Exposition) -> list[str]:
    """Every metric or label the dashboard's queries name that the live exposition lacks."""
    found: list[str] = []
    for title, expr, legend in queries(dashboard):
        where = f"panel '{title}', query {expr!r}"
        names = set(METRIC.findall(expr))
        if not names:
            found.append(f"{where}: names no mcdrop_* metric")
        for name in sorted(names):
            if name not in live.labels:
                found.append(f"{where}: no series '{name}' in /metrics ({live.describe(name)})")
        for name, matchers in SELECTOR.findall(expr):
            missing = set(MATCHER.findall(matchers)) - live.labels.get(name, set())
            if missing:
                found.append(f"{where}: '{name}' has no label(s) {sorted(missing)}")
        groupings = [label_list(g) for g in GROUPING.findall(expr)]
        for grouping in groupings:
            for name in sorted(names):
                missing = grouping - live.labels.get(name, set())
                if missing:
                    found.append(f"{where}: by/without {sorted(missing)} not on '{name}'")
        # A legend can show only labels the result keeps: those grouped by, else the series'.
        by = [label_list(g) for g in BY.findall(expr)]
        series = [live.labels.get(name, set()) for name in names]
        kept = set.intersection(*by) if by else set.intersection(*series) if series else set()
        missing = set(LEGEND.findall(legend)) - kept
        if missing:
            found.append(f"{where}: legend {legend!r} uses {sorted(missing)} the result lacks")
    for variable in dashboard["templating"]["list"]:
        definition = variable["query"]["query"]
        for name, label in LABEL_VALUES.findall(definition):
            if label not in live.labels.get(name, set()):
                found.append(f"variable '{variable['name']}': {name} has no label '{label}'")
    return found


# -- static checks -----------------------------------------------------------------------------


def test_prometheus_scrapes_the_service_metrics_endpoint() -> None:
    config = load_yaml(PROMETHEUS)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["mcdrop"]
    assert job["metrics_path"] == "/metrics"
    # One target per replica of the compose service (tests/test_compose.py checks the names).
    assert job["dns_sd_configs"] == [
        {"names": ["mcdrop"], "type": "A", "port": 8000, "refresh_interval": "15s"}
    ]


def test_grafana_provisions_the_datasource_the_panels_use() -> None:
    datasources = load_yaml(DATASOURCES)["datasources"]
    assert len(datasources) == 1
    (source,) = datasources
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    dashboard = load_dashboard()
    used = [panel["datasource"] for panel in all_panels(dashboard["panels"]) if "targets" in panel]
    used += [t["datasource"] for p in all_panels(dashboard["panels"]) for t in p.get("targets", [])]
    used += [v["datasource"] for v in dashboard["templating"]["list"]]
    assert used, "the dashboard has no queries"
    assert all(ds == {"type": "prometheus", "uid": source["uid"]} for ds in used), used


def test_grafana_provider_loads_the_dashboards_folder() -> None:
    (provider,) = load_yaml(PROVIDERS)["providers"]
    assert provider["type"] == "file"
    mounted = Path(provider["options"]["path"])
    assert mounted.name == DASHBOARDS.name, f"{PROVIDERS}: path should end in /dashboards"
    assert DASHBOARD.parent == DASHBOARDS
    assert sorted(p.name for p in DASHBOARDS.glob("*.json")) == [DASHBOARD.name]


def test_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "mcdrop"
    assert 36 <= dashboard["schemaVersion"] <= 41
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "model"
    assert variable["query"]["query"] == "label_values(mcdrop_requests_total, model)"
    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel '{panel['title']}' is wider than the grid"
        if panel["type"] == "row":
            continue
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults.get("unit"), f"panel '{panel['title']}' has no unit"
        assert defaults["custom"].get("axisLabel"), f"panel '{panel['title']}' has no axis label"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"panel '{panel['title']}': duplicate refIds"
        assert all(t.get("legendFormat") for t in panel["targets"]), panel["title"]


# -- the live check ----------------------------------------------------------------------------


async def scrape_after_traffic(tmp_path: Path) -> Exposition:
    """Serve the shipped models (and one broken folder), predict with each, scrape /metrics."""
    repository = tmp_path / "repo"
    for name in ("digits", "toy-regression"):
        shutil.copytree(ROOT / "models" / name, repository / name)
    broken = repository / "broken"  # a valid manifest over unreadable weights: a load failure
    shutil.copytree(repository / "toy-regression", broken)
    manifest = (broken / "model.toml").read_text(encoding="utf-8")
    (broken / "model.toml").write_text(manifest.replace("toy-regression", "broken", 1), "utf-8")
    (broken / "weights.safetensors").write_bytes(b"not safetensors")
    app = create_app(Settings(model_repository=repository, device="cpu"))
    digit = [[[float((r * 8 + c) % 17) for c in range(8)] for r in range(8)]]
    bodies = {
        "digits": {"rows": [digit, [[[0.0] * 8] * 8]], "samples": 20, "seed": 1},
        "toy-regression": {"rows": [[-2.0], [0.0], [3.0]], "samples": 20, "seed": 1},
    }
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://mcdrop.test") as client,
    ):
        for name, body in bodies.items():
            for _ in range(2):
                response = await client.post(f"/v1/models/{name}/predict", json=body)
                assert response.status_code == 200, response.text
        missing = await client.post("/v1/models/absent/predict", json=bodies["toy-regression"])
        assert missing.status_code == 404
        scraped = await client.get("/metrics")
    assert scraped.status_code == 200
    return Exposition.parse(scraped.text)


@pytest.mark.anyio
async def test_every_query_names_metrics_and_labels_the_service_exports(tmp_path: Path) -> None:
    live = await scrape_after_traffic(tmp_path)
    dashboard = load_dashboard()

    assert problems(dashboard, live) == []

    # Every family the service exports under mcdrop_ has a panel (timestamps aside).
    shown = {family(name) for _, expr, _ in queries(dashboard) for name in METRIC.findall(expr)}
    exported = {n for n in live.types if n.startswith("mcdrop_") and not n.endswith("_created")}
    assert exported - shown == set(), "exported metrics without a panel"

    # The checker itself catches a renamed metric, a bare histogram name, labels that don't exist.
    text = json.dumps(dashboard)
    for before, after in (
        ("mcdrop_requests_total", "mcdrop_request_total"),
        ("mcdrop_entropy_nats_bucket", "mcdrop_entropy_nats"),
        ("by (le, model)", "by (le, model, version)"),
        ('{model=~\\"$model\\"}', '{name=~\\"$model\\"}'),
        ('"{{model}} mean"', '"{{endpoint}} mean"'),
    ):
        assert before in text, before
        assert problems(json.loads(text.replace(before, after)), live), f"{before} -> {after}"
