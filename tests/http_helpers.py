"""Shared fixtures of the HTTP tests: an app with its lifespan, request bodies, metrics, gates.

Import as `from http_helpers import ...` (tests/ is on sys.path; it has no __init__.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from fastapi import FastAPI
from numpy.typing import NDArray
from prometheus_client.parser import text_string_to_metric_families

from mcdrop.app import create_app
from mcdrop.config import Settings
from mcdrop.engine.core import MCRequest
from mcdrop.repository.loading import save_weights
from mcdrop.shards.executor import ShardExecutor

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models"
WAIT_S = 20.0  # longest any helper waits for something that should happen at once

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- repositories --------------------------------------------------------------------------


def copy_shipped(repository: Path, *names: str) -> Path:
    """Copy shipped model folders (e.g. "digits", "toy-regression") into `repository`."""
    repository.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(SHIPPED / name, repository / name)
    return repository


def append_table(folder: Path, name: str, values: Mapping[str, object]) -> None:
    """Append a `[name]` table (e.g. "batching") to the folder's model.toml."""
    lines = [f"\n[{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    with (folder / "model.toml").open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def set_version(folder: Path, version: str) -> None:
    """Set (or replace) the manifest's top-level `version`."""
    path = folder / "model.toml"
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines()
             if not ln.startswith("version =")]  # fmt: skip
    path.write_text(f'version = "{version}"\n' + "\n".join(lines) + "\n", encoding="utf-8")


SLOW_MODEL = '''
"""A test model that logs the first feature of every row it sees and waits while `hold` exists."""

import os
import time

import torch
from torch import nn


class Slow(nn.Module):
    def __init__(self, log: str, hold: str, features: int) -> None:
        super().__init__()
        self.log, self.hold = log, hold
        self.linear = nn.Linear(features, 1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = sorted({round(float(v), 6) for v in x[:, 0].tolist()})
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(" ".join(map(str, values)) + "\\n")
        give_up = time.monotonic() + 30.0
        while os.path.exists(self.hold) and time.monotonic() < give_up:
            time.sleep(0.005)
        return self.linear(self.drop(x))


def build(log: str, hold: str, features: int = 1) -> nn.Module:
    return Slow(log, hold, features)
'''


@dataclass(frozen=True)
class SlowModel:
    """An entrypoint model folder whose forward logs what it computes and can be held."""

    folder: Path
    log: Path
    hold: Path

    def computed(self) -> set[float]:
        """The first-feature values of every row any forward call has seen (load probe too)."""
        if not self.log.exists():
            return set()
        text = self.log.read_text(encoding="utf-8")
        return {float(v) for v in text.split()}

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Forward calls that start inside this block wait until it ends."""
        self.hold.touch()
        try:
            yield
        finally:
            self.hold.unlink(missing_ok=True)

    async def started(self, value: float) -> None:
        """Wait until a forward call has seen a row whose first feature is `value`."""
        await wait_for(lambda: value in self.computed(), f"a forward call on {value}")


def write_slow_model(
    folder: Path, *, features: int = 1, batching: Mapping[str, object] | None = None
) -> SlowModel:
    """Write an entrypoint model (fx cannot trace it: it runs whole) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "slow.py").write_text(SLOW_MODEL, encoding="utf-8")
    log, hold = folder.parent / f"{folder.name}.log", folder.parent / f"{folder.name}.hold"
    torch.manual_seed(0)
    module = torch.nn.Sequential()
    module.add_module("linear", torch.nn.Linear(features, 1))
    save_weights(module, folder / "weights.safetensors")
    manifest = (
        f'name = "{folder.name}"\ntask = "regression"\n\n'
        f'[input]\nshape = [{features}]\n\n[output]\nnames = ["y"]\n\n'
        f'[model]\nformat = "entrypoint"\nentrypoint = "slow:build"\n\n'
        f"[model.config]\nlog = {json.dumps(str(log))}\nhold = {json.dumps(str(hold))}\n"
        f"features = {features}\n\n[mc]\ndefault_samples = 8\ntau = 1.0\n"
        '\n[runtime]\ndevice = "cpu"\n'
    )
    (folder / "model.toml").write_text(manifest, encoding="utf-8")
    if batching:
        append_table(folder, "batching", batching)
    return SlowModel(folder, log, hold)


# -- in-process app --------------------------------------------------------------------------


def settings_for(repository: Path, **overrides: Any) -> Settings:
    """Settings over `repository` on the CPU; overrides by field name."""
    overrides.setdefault("device", "cpu")
    return Settings(model_repository=repository, **overrides)


@contextlib.asynccontextmanager
async def serve(
    settings: Settings, *, lifespan: bool = True, shard_executor: ShardExecutor | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app over `settings` (its lifespan run unless told otherwise) and a client to it."""
    app = create_app(settings, shard_executor=shard_executor)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mcdrop.test") as client:
        if not lifespan:
            yield app, client
            return
        async with app.router.lifespan_context(app):
            yield app, client


async def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll `condition` until true; fail naming `what` if it never becomes true."""
    give_up = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


# -- Open Inference Protocol bodies ------------------------------------------------------------


def oip_body(
    rows: Sequence[Any] | NDArray[Any],
    parameters: Mapping[str, Any] | None = None,
    *,
    outputs: Sequence[str] | None = None,
    request_id: str | None = None,
    datatype: str = "FP32",
    flat: bool = True,
) -> dict[str, Any]:
    """A JSON infer body with the single input 'input' holding `rows` [B, *shape]."""
    array = np.asarray(rows, dtype=np.float64)
    data: Any = array.reshape(-1).tolist() if flat else array.tolist()
    body: dict[str, Any] = {
        "inputs": [
            {"name": "input", "shape": list(array.shape), "datatype": datatype, "data": data}
        ]
    }
    if parameters is not None:
        body["parameters"] = dict(parameters)
    if outputs is not None:
        body["outputs"] = [{"name": n} for n in outputs]
    if request_id is not None:
        body["id"] = request_id
    return body


def binary_body(
    rows: NDArray[Any], parameters: Mapping[str, Any] | None = None, *, size: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """An infer body with 'input' as FP32 binary tensor data; `size` overrides its byte count."""
    blob = np.ascontiguousarray(rows, dtype="<f4").tobytes()
    header = {
        "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": len(blob) if size is None else size}}],
        "parameters": dict(parameters or {}),
    }  # fmt: skip
    head = json.dumps(header).encode()
    return head + blob, {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def decode_outputs(response: httpx.Response) -> dict[str, NDArray[Any]]:
    """The output tensors of an infer response (JSON or binary), by name, shaped."""
    raw = response.content
    header_length = response.headers.get("inference-header-content-length")
    split = len(raw) if header_length is None else int(header_length)
    doc = json.loads(raw[:split])
    kinds = {"FP64": "<f8", "FP32": "<f4", "INT64": "<i8", "INT32": "<i4", "BOOL": "?"}
    out: dict[str, NDArray[Any]] = {}
    offset = split
    for entry in doc["outputs"]:
        dtype = np.dtype(kinds[entry["datatype"]])
        size = entry.get("parameters", {}).get("binary_data_size")
        if size is None:
            flat = np.asarray(entry["data"], dtype=dtype)
        else:
            flat = np.frombuffer(raw, dtype, size // dtype.itemsize, offset)
            offset += size
        out[entry["name"]] = flat.reshape(entry["shape"])
    return out


def error_of(response: httpx.Response, status: int) -> str:
    """Check the status and the {"error": "..."} body; return the message."""
    assert response.status_code == status, (response.status_code, response.text)
    doc = response.json()
    assert set(doc) == {"error"}, doc
    message = doc["error"]
    assert isinstance(message, str)
    assert message
    return message


# -- metrics -----------------------------------------------------------------------------------


def parse_metrics(text: str) -> Series:
    """Every sample of a Prometheus exposition, keyed by (sample name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(series: Series, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return series.get((name, frozenset(labels.items())), 0.0)


# -- engine spies ------------------------------------------------------------------------------


class EngineSpy:
    """Wraps an engine's run_many: records the requests of every call; can hold calls."""

    def __init__(self, run_many: Callable[..., Any]) -> None:
        self._run = run_many
        self.calls: list[list[MCRequest]] = []
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()

    def __call__(self, requests: Sequence[MCRequest], **options: Any) -> Any:
        """Record the call, wait while held, then run it (options, e.g. checkpoint, passed on)."""
        with self._lock:
            self.calls.append(list(requests))
        if not self._open.wait(timeout=WAIT_S):
            raise RuntimeError("EngineSpy: held call never released")
        return self._run(list(requests), **options)

    def hold(self) -> None:
        """Calls that start from now on wait until release()."""
        self._open.clear()

    def release(self) -> None:
        """Let held calls run."""
        self._open.set()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold calls inside the block; always released at its end."""
        self.hold()
        try:
            yield
        finally:
            self.release()

    async def wait_calls(self, n: int) -> None:
        """Wait until `n` engine calls have started."""
        await wait_for(lambda: len(self.calls) >= n, f"{n} engine calls")

    def rows_seen(self) -> list[float]:
        """First raw feature value (as the engine got it) of every row of every call."""
        return [
            float(v) for call in self.calls for r in call for v in r.x.reshape(len(r.x), -1)[:, 0]
        ]


# -- a real server -----------------------------------------------------------------------------


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """A uvicorn subprocess serving create_app on 127.0.0.1:port."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it lingers; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(timeout=WAIT_S)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def start_server(
    repository: Path,
    log: Path,
    env: Mapping[str, str] | None = None,
    *,
    launcher: str = "uvicorn",
) -> ServerProcess:
    """Start a server over `repository` on a free 127.0.0.1 port and wait until it is ready.

    launcher "uvicorn": `python -m uvicorn --factory mcdrop.app:create_app`; "cli": the
    product's `mcdrop serve`. Settings come from MCDROP_* variables; the caller must stop() it
    (in a finally).
    """
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MCDROP_")}
    environment.update(
        {"MCDROP_MODEL_REPOSITORY": str(repository), "MCDROP_DEVICE": "cpu", **(env or {})}
    )
    where = ["--host", "127.0.0.1", "--port", str(port)]
    if launcher == "cli":
        main = "import sys; from mcdrop.cli.main import main; sys.exit(main(sys.argv[1:]))"
        command = [sys.executable, "-c", main, "serve", *where]
    else:
        command = [sys.executable, "-m", "uvicorn", "--factory", "mcdrop.app:create_app",
                   *where, "--log-level", "warning"]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=sink, stderr=subprocess.STDOUT
        )
    server = ServerProcess(process, port, log)
    try:
        give_up = time.monotonic() + 60.0
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}:\n{server.output()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{server.url}/v2/health/ready", timeout=2.0).status_code == 200:
                    return server
            if time.monotonic() > give_up:
                raise AssertionError(f"server never became ready:\n{server.output()}")
            time.sleep(0.05)
    except BaseException:
        server.stop()
        raise


def spy_engine(app: FastAPI, name: str, monkeypatch: Any) -> EngineSpy:
    """Spy on the engine of the model `name` serving in `app` (pytest's monkeypatch undoes it)."""
    engine = app.state.registry.get(name).model.engine
    spy = EngineSpy(engine.run_many)
    monkeypatch.setattr(engine, "run_many", spy)
    return spy


def queue_depth(app: FastAPI, name: str) -> int:
    """Requests waiting (not started) on the worker of `name`."""
    depth: int = app.state.registry.get(name).worker.depth
    return depth


async def raw_asgi_post(
    app: FastAPI, path: str, body: bytes, disconnect: asyncio.Event
) -> list[dict[str, Any]]:
    """POST through the ASGI interface directly; the client 'disconnects' when the event is set.

    Returns the messages the app sent.
    """
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 50000), "server": ("mcdrop.test", 80),
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }  # fmt: skip
    await app(scope, receive, send)
    return sent


async def asgi_call(
    app: FastAPI,
    method: str,
    path: str,
    receive: Callable[[], Awaitable[dict[str, Any]]],
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> tuple[int, dict[str, Any]]:
    """One request through the ASGI interface with a caller-made `receive`: (status, JSON)."""
    sent: list[Mapping[str, Any]] = []

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 50000), "server": ("mcdrop.test", 80),
        "headers": [(b"content-type", b"application/json"), *headers],
    }  # fmt: skip
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    answer: dict[str, Any] = json.loads(text)
    return status, answer
