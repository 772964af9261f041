"""Ray test helpers: when Ray may start, and the one local cluster a test session shares.

Ray's start-up probes outside addresses (cloud metadata, a public DNS server) even with its
dashboard and usage stats off, so Ray starts only inside a loopback-only network namespace:
`make ray-test` runs the `ray` tests under `unshare -n`. Anywhere else they skip, saying why.
Import as `from ray_helpers import ...` (tests/ is on sys.path). Ray is imported lazily.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from http_helpers import free_port

# Logical CPUs of the test cluster: room for the proxy, two replicas of 0.5 CPU each and a
# few shard actors on a 2-core machine (Ray schedules by these counts, not by real cores).
CLUSTER_CPUS = 4
OBJECT_STORE_BYTES = 128 << 20  # a shared machine: never Ray's default of 30% of memory
NETNS_HINT = "run them with `make ray-test` (inside `unshare -n`, loopback only)"


def outside_interfaces() -> list[str]:
    """Network interfaces other than loopback in this process's network namespace."""
    return sorted(name for _, name in socket.if_nameindex() if name != "lo")


def ray_unavailable() -> str | None:
    """Why Ray may not start here, or None when it may (installed, loopback-only network)."""
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed: pip install '.[ray]' (make ray-test installs it)"
    others = outside_interfaces()
    if others:
        return (
            f"Ray tests never start Ray where traffic can leave the machine (interfaces "
            f"{', '.join(others)}): {NETNS_HINT}"
        )
    return None


@dataclass(frozen=True)
class RayCluster:
    """The session's local Ray cluster and its Serve HTTP proxy on 127.0.0.1."""

    address: str  # the GCS address another driver (e.g. `mcdrop serve --ray-address`) joins
    http_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def start_cluster() -> RayCluster:
    """A local cluster with its dashboard off, and Serve's proxy on a free loopback port."""
    import ray

    from mcdrop.ray_serve import connect, start_proxy

    connect(None, num_cpus=CLUSTER_CPUS, object_store_bytes=OBJECT_STORE_BYTES)
    host, port = start_proxy("127.0.0.1", free_port())
    assert host == "127.0.0.1", host
    return RayCluster(ray.get_runtime_context().gcs_address, port)


def stop_cluster() -> None:
    """Serve and Ray down, with every process they started."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    """Poll `condition` (Ray deploys take seconds) until true; fail naming `what`."""
    give_up = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def pids_in(path: str) -> set[int]:
    """Process ids written one per line to `path` (by the pid-logging test model)."""
    if not os.path.exists(path):
        return set()
    with open(path, encoding="utf-8") as f:
        return {int(line) for line in f if line.strip()}
