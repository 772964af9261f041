"""The servers under test as subprocesses: mcdrop, LitServe and the canned HTTP floor.

Each one leads its own process group on 127.0.0.1; its CPU time is read from /proc, and the
whole group is stopped on the way out, on errors too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from bench.workload import CLASSES, FLOOR, HOST, LITSERVE, MCDROP, MODEL, MODEL_DIR, ROOT, SAMPLES

LITSERVE_BATCH_TIMEOUT_S = 0.002


# -- process groups and their CPU time (Linux /proc) -----------------------------------------


def group_stats(pgid: int) -> dict[int, list[str]] | None:
    """/proc/PID/stat fields (from field 3, the state, on) of each member of a process group.

    None where there is no /proc (not Linux).
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    members: dict[int, list[str]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:  # field 5: pgrp
            members[int(entry.name)] = fields
    return members


def group_cpu_s(pgid: int) -> float | None:
    """User + system CPU seconds of the live processes of a process group (Linux /proc)."""
    members = group_stats(pgid)
    if members is None:
        return None
    ticks = sum(int(f[11]) + int(f[12]) for f in members.values())  # fields 14, 15
    return ticks / os.sysconf("SC_CLK_TCK")


# -- starting, probing and stopping -----------------------------------------------------------


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def free_ports(names: Sequence[str]) -> dict[str, int]:
    """A distinct free 127.0.0.1 port per name."""
    ports: dict[str, int] = {}
    while len(ports) < len(names):
        port = free_port()
        if port not in ports.values():
            ports[names[len(ports)]] = port
    return ports


@dataclass
class Server:
    """A server subprocess (leader of its own process group) and where it answers."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    predict_path: str
    ready_path: str
    log: IO[bytes]

    def url(self, path: str) -> str:
        """Full URL of a path on this server (always 127.0.0.1)."""
        return f"http://{HOST}:{self.port}{path}"

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's stdout/stderr."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]


def group_alive(server: Server) -> bool:
    """Whether any process of the server's group still runs (zombies do not count)."""
    server.process.poll()  # reap the leader once it has exited
    members = group_stats(server.process.pid)
    if members is None:  # no /proc: only the leader can be checked
        return server.process.returncode is None
    return any(fields[0] != "Z" for fields in members.values())


def stop(server: Server) -> None:
    """SIGTERM to the server's process group, SIGKILL 10 s later; wait until none of it is left.

    The group's id is the PID of the process we started. It is signalled only while a member
    still runs, so the id cannot have been reused by anything else.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_alive(server):
            break
        with suppress(ProcessLookupError):
            os.killpg(server.process.pid, sig)
        deadline = time.monotonic() + 10.0
        while group_alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
    server.process.wait(timeout=10.0)


@contextmanager
def launched(
    name: str,
    command: list[str],
    env: dict[str, str],
    port: int,
    predict_path: str,
    ready_path: str,
    cwd: Path = ROOT,
) -> Iterator[Server]:
    """Start `command` in its own process group; stop the group on the way out, errors too.

    `cwd` is the source tree it runs from (another checkout, to compare commits side by side).
    """
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = Server(name, process, port, predict_path, ready_path, log)
        try:
            yield server
        finally:
            stop(server)


def wait_ready(servers: Sequence[Server], timeout_s: float) -> None:
    """Poll every server's readiness URL until all answer 200; raise with the log otherwise."""
    pending = list(servers)
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while pending:
            for server in list(pending):
                if server.process.poll() is not None:
                    raise RuntimeError(
                        f"{server.name} exited with code "
                        f"{server.process.returncode}:\n{server.log_tail()}"
                    )
                try:
                    if client.get(server.url(server.ready_path)).status_code == 200:
                        pending.remove(server)
                except httpx.HTTPError:
                    pass
            if pending and time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                raise RuntimeError(
                    f"not ready after {timeout_s:g} s: {names}\n"
                    + "\n".join(s.log_tail() for s in pending)
                )
            if pending:
                time.sleep(0.2)


# -- what runs in them ------------------------------------------------------------------------


CANNED = json.dumps({"probabilities": [1.0] + [0.0] * (CLASSES - 1)}).encode()
Scope = dict[str, Any]
Message = dict[str, Any]


async def canned_app(
    scope: Scope,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """ASGI app that reads the whole body and answers CANNED: the HTTP floor (no model)."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body", False):
        pass
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": CANNED})


def uvicorn_command(app: str, port: int, factory: bool = False) -> list[str]:
    """uvicorn on 127.0.0.1 without access log (for every uvicorn-served way alike)."""
    flags = ["--factory"] if factory else []
    return [
        *(sys.executable, "-m", "uvicorn", *flags, app, "--host", HOST, "--port", str(port)),
        *("--log-level", "warning", "--no-access-log"),
    ]


def server_specs(
    ports: dict[str, int], max_batch_rows: int
) -> dict[str, tuple[list[str], str, str]]:
    """Per served way: (command, predict path, readiness path)."""
    litserve = [sys.executable, str(ROOT / "bench" / "litserve_digits.py")]
    litserve += ["--port", str(ports[LITSERVE]), "--model", str(MODEL_DIR)]
    litserve += ["--samples", str(SAMPLES), "--max-batch-size", str(max_batch_rows)]
    litserve += ["--batch-timeout", str(LITSERVE_BATCH_TIMEOUT_S)]
    return {
        # settings come from MCDROP_* (the model repository): what `mcdrop serve` does
        MCDROP: (
            uvicorn_command("mcdrop.app:create_app", ports[MCDROP], factory=True),
            f"/v1/models/{MODEL}/predict",
            "/v2/health/ready",
        ),
        LITSERVE: (litserve, "/predict", "/health"),
        FLOOR: (uvicorn_command("bench.servers:canned_app", ports[FLOOR]), "/predict", "/"),
    }


def server_env(threads: int | None) -> dict[str, str]:
    """The servers' environment: this one, the shipped model repository, CPU, no OTLP export."""
    env = {
        **os.environ,
        "MCDROP_MODEL_REPOSITORY": str(ROOT / "models"),
        "MCDROP_DEVICE": "cpu",
        "FASTAPI_OTEL_AUTO_CONFIGURE": "false",  # no OTLP exporter, whatever the environment says
    }
    if threads is not None:  # torch's intra-op threads in every server process too
        env["OMP_NUM_THREADS"] = str(threads)
    return env
