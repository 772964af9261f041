"""Model names never become paths outside the repository: every route that takes a name, raw,
encoded and double-encoded traversal forms, against a real server (no client normalises them).

The repository's parent holds a model folder whose code would write a marker file on import:
no request may ever import it.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_helpers import ServerProcess, copy_shipped, settings_for, start_server

from mcdrop.errors import InvalidInput, ModelLoadError
from mcdrop.model import ServedModel
from mcdrop.repository.scan import check_model_name, model_folder, scan_repository
from mcdrop.serving.metrics import Metrics
from mcdrop.serving.registry import ModelRegistry

EVIL = """
from pathlib import Path
Path(__file__).with_name("EXECUTED").write_text("imported")

import torch


def build() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Dropout(0.5))
"""

TRAVERSALS = ["..", "%2e%2e", "%2E%2E", ".%2e", "%252e%252e", "..%2f..", "%2e%2e%2f%2e%2e", "."]

# (method, path with NAME for the model name); every route of the API that takes one.
ROUTES = [
    ("GET", "/v2/models/NAME"),
    ("GET", "/v2/models/NAME/versions/1"),
    ("GET", "/v2/models/NAME/ready"),
    ("GET", "/v2/models/NAME/versions/1/ready"),
    ("POST", "/v2/models/NAME/infer"),
    ("POST", "/v2/models/NAME/versions/1/infer"),
    ("POST", "/v2/repository/models/NAME/load"),
    ("POST", "/v2/repository/models/NAME/unload"),
    ("POST", "/v1/models/NAME/predict"),
    ("POST", "/v1/models/NAME/evaluate"),
    ("GET", "/v1/models/NAME/recent"),
    ("GET", "/v1/models/NAME/calibration"),
]


def plant_model(folder: Path, name: str) -> Path:
    """A loadable entrypoint model folder whose module writes `EXECUTED` when imported."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evil.py").write_text(EVIL, encoding="utf-8")
    (folder / "model.toml").write_text(
        f'name = "{name}"\ntask = "regression"\n[input]\nshape = [1]\n[output]\nnames = ["y"]\n'
        '[model]\nformat = "entrypoint"\nentrypoint = "evil:build"\n'
        'weights = "weights.safetensors"\n',
        encoding="utf-8",
    )
    return folder / "EXECUTED"


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """A server over <tmp>/repo (the shipped models), with a planted model in <tmp> itself."""
    base = tmp_path_factory.mktemp("traversal")
    marker = plant_model(base, "traversal-parent")
    repo = copy_shipped(base / "repo", "toy-regression")
    server = start_server(repo, base / "server.log")
    try:
        yield server, marker
    finally:
        server.stop()


def raw_request(server: ServerProcess, method: str, path: str) -> tuple[int, str]:
    """Send `path` byte for byte (http.client neither resolves dot segments nor re-encodes)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    try:
        body = json.dumps({"rows": [[0.0]]}) if method == "POST" else None
        connection.putrequest(method, path, skip_accept_encoding=True)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(len(body or "")))
        connection.endheaders(body.encode() if body else None)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.mark.parametrize("name", TRAVERSALS)
@pytest.mark.parametrize(("method", "route"), ROUTES, ids=[f"{m} {r}" for m, r in ROUTES])
def test_traversal_names_are_refused_on_every_route(
    planted: tuple[ServerProcess, Path], method: str, route: str, name: str
) -> None:
    server, marker = planted
    status, text = raw_request(server, method, route.replace("NAME", name))
    assert not marker.exists(), f"{method} {route} with {name!r} imported code outside the repo"
    # 400: the name breaks the rule; 404: the path no longer matches a route (a decoded '/').
    assert status in (400, 404), (status, text)
    assert json.loads(text)["error"], text
    assert "Traceback" not in server.output()


def test_the_server_still_serves_after_the_attempts(planted: tuple[ServerProcess, Path]) -> None:
    server, marker = planted
    status, text = raw_request(server, "POST", "/v1/models/toy-regression/predict")
    assert status == 200, text
    assert not marker.exists()


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a\\b", "%2e%2e", "", "x" * 129, ".hidden"])
def test_invalid_names_never_reach_the_file_system(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidInput, match="model name"):
        check_model_name(name)
    with pytest.raises(InvalidInput, match="model name"):
        model_folder(tmp_path, name)


def test_a_symlinked_model_folder_leaving_the_repository_is_refused(tmp_path: Path) -> None:
    marker = plant_model(tmp_path / "outside" / "sneaky", "sneaky")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "sneaky").symlink_to(tmp_path / "outside" / "sneaky", target_is_directory=True)
    scan = scan_repository(repo)
    assert "sneaky" not in scan.models
    assert "resolves outside repo" in scan.errors["sneaky"]
    with pytest.raises(ModelLoadError, match="resolves outside"):
        model_folder(repo, "sneaky")
    assert not marker.exists()


@pytest.mark.anyio
async def test_load_of_a_symlink_leaving_the_repository_runs_nothing(tmp_path: Path) -> None:
    marker = plant_model(tmp_path / "outside" / "sneaky", "sneaky")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "sneaky").symlink_to(tmp_path / "outside" / "sneaky", target_is_directory=True)
    registry = ModelRegistry(settings_for(repo), Metrics())
    await registry.start()
    try:
        with pytest.raises(ModelLoadError, match="resolves outside") as refused:
            await registry.load("sneaky")
        assert str(tmp_path) not in str(refused.value)  # no host paths in the answer
        assert [s.state for s in registry.statuses()] == ["FAILED"]
    finally:
        await registry.close()
    assert not marker.exists()


@pytest.mark.parametrize("weights", ["../w.safetensors", "/etc/passwd", "a/../../w"])
def test_weights_outside_the_model_folder_are_refused_by_the_manifest(
    tmp_path: Path, weights: str
) -> None:
    folder = copy_shipped(tmp_path / "repo", "toy-regression") / "toy-regression"
    manifest = folder / "model.toml"
    text = manifest.read_text(encoding="utf-8")
    manifest.write_text(text.replace('weights = "weights.safetensors"', f'weights = "{weights}"'))
    scan = scan_repository(tmp_path / "repo")
    assert "model.weights" in scan.errors["toy-regression"]
    assert "relative path inside the model folder" in scan.errors["toy-regression"]


def test_weights_symlinked_outside_the_model_folder_are_refused(tmp_path: Path) -> None:
    folder = copy_shipped(tmp_path / "repo", "toy-regression") / "toy-regression"
    (folder / "weights.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (folder / "weights.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.weights: resolves outside"):
        ServedModel.load(folder)
