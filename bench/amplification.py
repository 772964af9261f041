"""Benchmark: server memory under unauthenticated large bodies, this tree beside an older commit.

A server with an inference token gets `--bodies` JSON bodies of `--mb` MB each (rows of the
shipped digits model, as a careless or hostile client sends them) without the token; every
one should be a cheap 401. The server's RSS (VmRSS of /proc) is read before the first body,
after each, and its peak (VmHWM) at the end. `--before REV` runs the same against a git
worktree of REV in the same run, so the table sets the two side by side. 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import format_table
from bench.servers import free_port, launched, server_env, wait_ready
from bench.workload import HOST, ROOT

TOKEN = "amplification-bench"


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of /proc/<pid>/status in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def json_body(megabytes: float) -> bytes:
    """A syntactically valid native predict body of about `megabytes` MB of digit rows."""
    row = json.dumps([[[1.5] * 8] * 8])
    count = max(1, int(megabytes * 1e6) // (len(row) + 1))
    return ('{"rows": [' + ",".join([row] * count) + '], "samples": 10}').encode()


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A temporary checkout of `rev` (removed afterwards); the models are this tree's."""
    with tempfile.TemporaryDirectory(prefix="mcdrop-before-") as parent:
        path = Path(parent) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
                       check=True, capture_output=True)  # fmt: skip
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                           check=False, capture_output=True)  # fmt: skip


def measure(source: Path, body: bytes, bodies: int, timeout_s: float) -> dict[str, Any]:
    """Start a server from `source`, send the bodies without a token, record statuses and RSS."""
    port = free_port()
    env = {**server_env(None), "MCDROP_INFERENCE_TOKEN": TOKEN, "PYTHONPATH": str(source)}
    command = [sys.executable, "-m", "uvicorn", "--factory", "mcdrop.app:create_app",
               "--host", HOST, "--port", str(port), "--log-level", "warning"]  # fmt: skip
    path = "/v1/models/digits/predict"
    with launched("mcdrop", command, env, port, path, "/v2/health/ready", cwd=source) as server:
        wait_ready([server], timeout_s)
        pid = server.process.pid
        time.sleep(0.5)
        rss = [rss_mb(pid)]
        statuses: list[int] = []
        seconds: list[float] = []
        with httpx.Client(timeout=timeout_s, trust_env=False) as client:
            for _ in range(bodies):
                start = time.perf_counter()
                response = client.post(server.url(path), content=body,
                                       headers={"content-type": "application/json"})  # fmt: skip
                seconds.append(time.perf_counter() - start)
                statuses.append(response.status_code)
                time.sleep(0.2)
                rss.append(rss_mb(pid))
        peak = rss_mb(pid, "VmHWM")
    return {"statuses": statuses, "rss_mb": rss, "peak_mb": peak, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=16.0, help="size of each body (MB)")
    parser.add_argument("--bodies", type=int, default=4, help="unauthenticated bodies to send")
    parser.add_argument("--before", help="also measure this git revision (e.g. HEAD~5)")
    parser.add_argument("--start-timeout-s", type=float, default=120.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    body = json_body(args.mb)
    runs: dict[str, dict[str, Any]] = {}
    if args.before:
        with worktree(args.before) as tree:
            runs[f"before ({args.before})"] = measure(tree, body, args.bodies, args.start_timeout_s)
    runs["this tree"] = measure(ROOT, body, args.bodies, args.start_timeout_s)
    rows = [
        [name, " ".join(map(str, r["statuses"])), f"{r['rss_mb'][0]:.0f}",
         " -> ".join(f"{v:.0f}" for v in r["rss_mb"][1:]), f"{r['peak_mb']:.0f}",
         f"{max(r['seconds']) * 1000:.0f}"]
        for name, r in runs.items()
    ]  # fmt: skip
    print(f"{args.bodies} unauthenticated bodies of {len(body) / 1e6:.1f} MB each "
          "(POST /v1/models/digits/predict, inference token set)")  # fmt: skip
    headers = ["server", "statuses", "RSS before MB", "RSS after each MB", "peak MB",
               "slowest answer ms"]  # fmt: skip
    print(format_table(headers, rows))
    if args.json:
        args.json.write_text(json.dumps({"body_bytes": len(body), "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
