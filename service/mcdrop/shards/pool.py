"""LocalShardPool: persistent worker processes on this machine that run a request's shards.

Each worker is spawned (no fork of a threaded server), uses one torch thread, loads each
model once from the repository folder and keeps it. Messages are shard_wire bytes (JSON and
safetensors, never pickle) sent by value, so no shared-memory handles can leak. A worker
that dies mid-shard raises ShardWorkerDied at once (its pipe closes) and is replaced before
the next request; it never hangs the caller.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from mcdrop.config import Settings
from mcdrop.engine.core import MCRequest
from mcdrop.engine.partials import PartialStats, Shard
from mcdrop.errors import ServiceError
from mcdrop.shards.executor import ModelRef
from mcdrop.shards.wire import decode, decode_stats, encode, encode_work
from mcdrop.shards.worker import ShardFailed, ShardWorker, ShardWorkerDied

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # importing torch on a loaded 2-core machine can take a while
STOP_TIMEOUT_S = 10.0


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    failed: bool = False  # its pipe broke: replace it even if the process lingers

    def describe(self) -> str:
        return f"shard worker {self.index} (pid {self.process.pid})"


class LocalShardPool:
    """A ShardExecutor over `workers` local processes; one request's shards run at a time."""

    def __init__(self, workers: int, settings: Settings | None = None, threads: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"shard workers must be >= 1, got {workers}")
        if threads < 1:
            raise ValueError(f"threads per shard worker must be >= 1, got {threads}")
        self._settings = settings or Settings()
        self._threads = threads
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._closed = False
        self.last_cpu_s: list[float] = []  # CPU seconds of each message of the last call
        self._workers: list[_Worker] = []
        try:
            self._workers = [self._spawn(i) for i in range(workers)]
            for worker in self._workers:
                self._await_ready(worker)
        except BaseException:
            self._stop_all()
            raise

    @property
    def workers(self) -> int:
        """How many shards run at once."""
        return len(self._workers)

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers, in worker order."""
        return [w.process.pid or 0 for w in self._workers]

    def alive(self) -> list[bool]:
        """Whether each worker process is running (a dead one is replaced on the next call)."""
        return [w.process.is_alive() for w in self._workers]

    # -- ShardExecutor --------------------------------------------------------------------

    def run_shards(
        self, model: ModelRef, request: MCRequest, shards: Sequence[Shard]
    ) -> list[PartialStats]:
        """Run every shard (as many at once as there are workers); results in shard order."""
        messages = [encode_work("run", model, request, shard) for shard in shards]
        what = [f"samples {s.first}..{s.end - 1} of model '{model.name}'" for s in shards]
        results = self._dispatch(messages, what)
        assert all(isinstance(r, PartialStats) for r in results)
        return results

    def preload(self, model: ModelRef) -> None:
        """Load a model in every worker now, so its first split request does not wait for it."""
        n = self.workers
        load = encode_work("load", model, None, None)
        self._dispatch([load] * n, [f"loading '{model.name}'"] * n, True)

    def close(self) -> None:
        """Stop every worker (asking first, then terminating); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop_all()

    def __enter__(self) -> LocalShardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scheduling -----------------------------------------------------------------------

    def _dispatch(
        self, messages: Sequence[bytes], what: Sequence[str], one_each: bool = False
    ) -> list[Any]:
        """Send each message to an idle worker, collect the replies in message order.

        With `one_each`, message i goes to worker i. On the first failure nothing new is
        sent; work already running is drained so no stale reply is left in a pipe.
        """
        with self._lock:
            if self._closed:
                raise ShardFailed("the shard pool is closed")
            self._replace_dead()
            pending = deque(range(len(messages)))
            idle = deque(self._workers)
            busy: dict[Connection, tuple[_Worker, int]] = {}
            results: list[Any] = [None] * len(messages)
            self.last_cpu_s = [0.0] * len(messages)
            error: ServiceError | None = None
            while pending or busy:
                while pending and idle and error is None:
                    i = pending.popleft()
                    worker = self._workers[i] if one_each else idle.popleft()
                    if one_each:
                        idle.remove(worker)
                    try:
                        worker.conn.send_bytes(messages[i])
                    except OSError:
                        error = error or self._died(worker, what[i])
                        continue
                    busy[worker.conn] = (worker, i)
                if error is not None:
                    pending.clear()
                if not busy:
                    break
                for conn in wait(list(busy)):
                    assert isinstance(conn, Connection)
                    worker, i = busy.pop(conn)
                    try:
                        header, tensors = decode(conn.recv_bytes())
                    except (EOFError, OSError):
                        error = error or self._died(worker, what[i])
                        continue
                    idle.append(worker)
                    if header["kind"] == "error":
                        reason = header["reason"]
                        error = error or ShardFailed(f"{worker.describe()}, {what[i]}: {reason}")
                    else:
                        results[i] = decode_stats(header, tensors)
                        self.last_cpu_s[i] = float(header["cpu_s"])
            if error is not None:
                raise error
            return results

    def _died(self, worker: _Worker, what: str) -> ShardWorkerDied:
        worker.failed = True
        worker.process.join(timeout=1.0)
        code = worker.process.exitcode
        log.error("%s died (exit code %s) during %s", worker.describe(), code, what)
        return ShardWorkerDied(
            f"{worker.describe()} died (exit code {code}) during {what}; "
            "it is replaced for the next request, retry"
        )

    def _replace_dead(self) -> None:
        for i, worker in enumerate(self._workers):
            if worker.failed or not worker.process.is_alive():
                log.warning("replacing %s (exit code %s)", worker.describe(),
                            worker.process.exitcode)  # fmt: skip
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join(timeout=STOP_TIMEOUT_S)
                worker.conn.close()
                self._workers[i] = self._spawn(i)
                self._await_ready(self._workers[i])

    # -- processes ------------------------------------------------------------------------

    def _spawn(self, index: int) -> _Worker:
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=serve_shards,
            args=(child, self._settings.model_dump(mode="json", exclude_none=True), self._threads),
            name=f"mcdrop-shard-{index}",
            daemon=True,
        )
        process.start()
        child.close()
        return _Worker(index, process, parent)

    def _await_ready(self, worker: _Worker) -> None:
        ready = wait([worker.conn, worker.process.sentinel], timeout=START_TIMEOUT_S)
        if worker.conn in ready:
            try:
                if decode(worker.conn.recv_bytes())[0]["kind"] == "ready":
                    return
            except (EOFError, OSError, ValueError):
                pass
        raise ShardWorkerDied(
            f"{worker.describe()} did not start (exit code {worker.process.exitcode})"
        )

    def _stop_all(self) -> None:
        for worker in self._workers:
            with contextlib.suppress(OSError):  # already gone
                worker.conn.send_bytes(encode({"kind": "stop"}))
        for worker in self._workers:
            worker.process.join(timeout=STOP_TIMEOUT_S)
            if worker.process.is_alive():
                log.warning("%s did not stop; terminating it", worker.describe())
                worker.process.terminate()
                worker.process.join(timeout=STOP_TIMEOUT_S)
            worker.conn.close()


# -- the worker process ----------------------------------------------------------------------


def serve_shards(conn: Connection, settings: dict[str, Any], threads: int) -> None:
    """Worker main loop: answer "run" and "load" messages until "stop" (see wire.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops us
    torch.set_num_threads(threads)
    worker = ShardWorker(Settings(**settings))
    conn.send_bytes(encode({"kind": "ready"}))
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the server went away
        try:
            if decode(message)[0]["kind"] == "stop":
                return
            reply = worker.answer(message)
        except Exception as exc:
            reply = encode({"kind": "error", "reason": f"{type(exc).__name__}: {exc}"})
        conn.send_bytes(reply)
