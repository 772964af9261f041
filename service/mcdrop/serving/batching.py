"""Per-model worker thread with dynamic batching: compatible queued requests share one engine call.

The event loop only enqueues and awaits futures; torch runs on the worker thread. A request
whose deadline passed, or whose client went away, before its batch starts costs no compute;
once started, a batch checks between chunks and stops when none of its requests is still
wanted. Fairness: while a long batch runs (more than LONG_CHUNKS chunks), one batch of the
short requests waiting runs between each two of its chunks, so small requests never wait for
a large one to finish; long requests still take their turn in order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mcdrop.engine.core import MCRequest, batch_key
from mcdrop.errors import DeadlineExceeded, Overloaded, ServiceError
from mcdrop.model import ServedModel
from mcdrop.serving.metrics import Metrics
from mcdrop.serving.recent import RecentUncertainty
from mcdrop.shards.executor import ShardRouter
from mcdrop.uncertainty import Summary

log = logging.getLogger(__name__)

# A request of more engine chunks than this is long: short ones run between its chunks.
LONG_CHUNKS = 4


class WorkerClosed(ServiceError):
    """The worker stopped accepting work (its model is being swapped or unloaded)."""

    status_code = 503


class _Abandoned(Exception):
    """Raised by a batch's checkpoint: none of its jobs is wanted any more, stop computing."""


@dataclass
class _Job:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    enqueued: float
    deadline: float | None
    request: MCRequest | None = None  # an inference, merged with compatible ones
    call: Callable[[], Any] | None = None  # anything else, run alone
    long: bool = False  # an inference of more than LONG_CHUNKS chunks (when interleaving)
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = 0 if self.request is None else len(self.request.x)

    def key(self) -> object:
        if self.request is None or self.request.options.samples == "auto":
            return id(self)  # never merged
        return (batch_key(self.request.options), self.long)  # long and short never share a batch

    def expired(self, now: float) -> bool:
        """Whether the deadline has passed."""
        return self.deadline is not None and now >= self.deadline

    def abandoned(self, now: float) -> bool:
        """Nobody waits for the answer: the client went away (future cancelled) or it expired."""
        return self.future.cancelled() or self.expired(now)

    def settle(self, value: Any = None, error: BaseException | None = None) -> None:
        """Resolve the awaiting future from the worker thread (ignored if it was cancelled)."""

        def apply() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)

        self.loop.call_soon_threadsafe(apply)


class BatchWorker:
    """Runs one model's requests on its own thread, merging compatible ones up to a row limit."""

    def __init__(
        self,
        name: str,
        model: ServedModel,
        *,
        max_batch_rows: int,
        max_batch_delay_s: float,
        queue_size: int,
        metrics: Metrics | None = None,
        recent: RecentUncertainty | None = None,
        shard_router: ShardRouter | None = None,
        interleave: bool = True,
    ) -> None:
        self.name = name
        self.shard_router = shard_router  # runs requests above its sample threshold in shards
        self.interleave = interleave  # short batches between the chunks of a long one
        self.model = model
        self.max_rows = max_batch_rows
        self.max_delay = max_batch_delay_s
        self.queue_size = queue_size
        self.metrics = metrics
        self.recent = recent
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"mcdrop-{name}", daemon=True)
        self._thread.start()

    def submit(self, request: MCRequest, deadline: float | None = None) -> asyncio.Future[Any]:
        """Queue an inference; the future resolves to its summary. Call from the event loop."""
        long = self.interleave and (
            self.model.engine.chunk_count(len(request.x), request.options) > LONG_CHUNKS
        )
        return self._enqueue(deadline, request=request, long=long)

    def submit_call(
        self, call: Callable[[], Any], deadline: float | None = None
    ) -> asyncio.Future[Any]:
        """Run `call` on this model's worker thread, alone (e.g. an evaluation)."""
        return self._enqueue(deadline, call=call)

    def _enqueue(self, deadline: float | None, **work: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        job = _Job(loop, loop.create_future(), time.monotonic(), deadline, **work)
        with self._cond:
            if self._closing:
                raise WorkerClosed(f"model '{self.name}' is being unloaded")
            if len(self._queue) >= self.queue_size:
                raise Overloaded(f"model '{self.name}': {len(self._queue)} requests already queued")
            self._queue.append(job)
            self._depth_changed()
            self._cond.notify()
        return job.future

    @property
    def depth(self) -> int:
        """Requests waiting (not yet started)."""
        return len(self._queue)

    def close(self) -> None:
        """Stop accepting work, finish everything queued, and stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    # -- worker thread --------------------------------------------------------------------

    def _depth_changed(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(self.name, len(self._queue))

    def _take_batch(self) -> list[_Job] | None:
        """Wait for work, then for compatible company up to the row limit or the delay."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue[0]
            key = first.key()
            until = first.enqueued + self.max_delay
            while not self._closing and first.request is not None:
                rows = sum(j.rows for j in self._queue if j.key() == key)
                wait = until - time.monotonic()
                if rows >= self.max_rows or wait <= 0:
                    break
                self._cond.wait(wait)
            return self._collect(key)

    def _take_short(self) -> list[_Job]:
        """The first waiting short inference and its compatible company, without waiting."""
        with self._cond:
            first = next((j for j in self._queue if j.request is not None and not j.long), None)
            return [] if first is None else self._collect(first.key())

    def _collect(self, key: object) -> list[_Job]:
        """Remove and return queued jobs of `key` in order, up to the row limit (hold _cond)."""
        batch: list[_Job] = []
        rows = 0
        for job in list(self._queue):
            if job.key() == key and (not batch or rows + job.rows <= self.max_rows):
                batch.append(job)
                rows += job.rows
                self._queue.remove(job)
        self._depth_changed()
        return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            self._serve(batch)

    def _serve(self, batch: list[_Job]) -> bool:
        """Run a taken batch, less the jobs cancelled or expired before it started (if any)."""
        now = time.monotonic()
        live = []
        for job in batch:
            if job.future.cancelled():
                continue  # the client went away before its work started
            if job.expired(now):
                job.settle(error=DeadlineExceeded("deadline passed before the work started"))
                continue
            live.append(job)
        if live:
            self._run(live, now)
        return bool(live)

    def _interleave(self) -> None:
        """Run one batch of the waiting short jobs (skipping batches nobody waits for any more)."""
        while shorts := self._take_short():
            if self._serve(shorts):  # short jobs only: their checkpoint never interleaves
                return

    def _abandon(self, jobs: list[_Job]) -> None:
        """Settle a batch stopped by its checkpoint: expired jobs get DeadlineExceeded."""
        log.info("model '%s': stopped a batch of %d request(s) nobody waits for",
                 self.name, len(jobs))  # fmt: skip
        for job in jobs:
            if not job.future.cancelled():
                job.settle(error=DeadlineExceeded("the request's deadline passed while it ran"))

    def _run(self, jobs: list[_Job], started: float) -> None:
        """Run live jobs: a call alone, a split request over the shards, else one engine pass."""
        call = jobs[0].call
        if call is not None:
            try:
                jobs[0].settle(call())
            except Exception as exc:
                jobs[0].settle(error=exc)
            return
        requests = [j.request for j in jobs if j.request is not None]
        if self.shard_router is not None and self.shard_router.applies(requests[0].options):
            for job, request in zip(jobs, requests, strict=True):  # each uses every shard worker
                self._run_sharded(job, request, started)
            return
        t0 = time.monotonic()
        checkpoint = _Checkpoint(self, jobs)
        try:
            results = self.model.engine.run_many(requests, checkpoint=checkpoint)
        except _Abandoned:
            self._abandon(jobs)
            return
        except Exception:
            if len(jobs) == 1:
                log.exception("model '%s' failed on a request", self.name)
                jobs[0].settle(error=_internal(self.name))
                return
            for job in jobs:  # one bad request must not take the others down
                self._run([job], started)
            return
        self._answer_or_fail(jobs, results, started, time.monotonic() - t0 - checkpoint.lent_s)

    def _answer_or_fail(
        self, jobs: list[_Job], results: list[Summary], started: float, compute: float
    ) -> None:
        """_answer, and if recording the answers fails, a 500 for every job rather than a
        worker thread gone and clients waiting forever."""
        try:
            self._answer(jobs, results, started, compute)
        except Exception:
            log.exception("model '%s' failed while answering %d request(s)", self.name, len(jobs))
            for job in jobs:
                job.settle(error=_internal(self.name))

    def _run_sharded(self, job: _Job, request: MCRequest, started: float) -> None:
        """One request above the shard_router's threshold, its samples spread over shard workers.

        It runs to the end: no checkpoint and no interleaving (short requests wait meanwhile).
        """
        assert self.shard_router is not None
        t0 = time.monotonic()
        try:
            result = self.shard_router.run(self.model.engine, request)
        except ServiceError as exc:  # a shard worker died or failed: its message says which
            log.error("model '%s': sharded request failed: %s", self.name, exc)
            job.settle(error=exc)
            return
        except Exception:
            log.exception("model '%s' failed on a sharded request", self.name)
            job.settle(error=_internal(self.name))
            return
        self._answer_or_fail([job], [result], started, time.monotonic() - t0)

    def _answer(
        self, jobs: list[_Job], results: list[Summary], started: float, compute: float
    ) -> None:
        """Record the batch's metrics and recent uncertainty, then settle every job.

        A result holding NaN or inf fails only its own job (NonFiniteOutput names the output).
        """
        failed: dict[int, ServiceError] = {}
        for k, result in enumerate(results):
            try:
                self.model.check_finite(result)
            except ServiceError as exc:
                failed[k] = exc
        finite = [r for k, r in enumerate(results) if k not in failed]
        if self.metrics is not None:  # before answering, so a scrape after an answer sees it
            self.metrics.observe_batch(
                self.name,
                rows=sum(j.rows for j in jobs),
                requests=len(jobs),
                samples=results[0].samples_used,
                queue_seconds=[started - j.enqueued for j in jobs],
                compute_seconds=compute,
            )
            for result in finite:
                self.metrics.observe_summary(self.name, result)
        if self.recent is not None:  # likewise, so /recent after an answer includes it
            version = self.model.spec.version
            for result in finite:
                self.recent.record(result, version=version)
        for k, (job, result) in enumerate(zip(jobs, results, strict=True)):
            if k in failed:
                job.settle(error=failed[k])
            else:
                job.settle(result)


class _Checkpoint:
    """What the engine calls after each chunk of a batch: stop it, or let short work through.

    It raises _Abandoned once no job of the batch is wanted; between the chunks of a long
    batch it runs one batch of the short jobs waiting (round-robin, so neither starves).
    """

    def __init__(self, worker: BatchWorker, jobs: list[_Job]) -> None:
        self.worker = worker
        self.jobs = jobs
        self.interleave = worker.interleave and any(j.long for j in jobs)
        self.lent_s = 0.0  # time given to short batches, not this batch's compute

    def __call__(self) -> None:
        if all(j.abandoned(time.monotonic()) for j in self.jobs):
            raise _Abandoned
        if self.interleave and self.worker.depth:
            t0 = time.monotonic()
            self.worker._interleave()
            self.lent_s += time.monotonic() - t0


def _internal(name: str) -> ServiceError:
    return ServiceError(f"model '{name}' failed on this request; see the server log")
