"""BatchWorker: merging compatible requests bit-for-bit, limits, cancellation, deadlines, drain."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_mlp_model
from http_helpers import (
    SHIPPED,
    WAIT_S,
    EngineSpy,
    metric,
    parse_metrics,
    settings_for,
    wait_for,
)

from mcdrop.engine.core import MCRequest
from mcdrop.errors import DeadlineExceeded, Overloaded, ServiceError
from mcdrop.model import ServedModel
from mcdrop.serving.batching import BatchWorker, WorkerClosed
from mcdrop.serving.metrics import Metrics
from mcdrop.uncertainty import Summary

pytestmark = pytest.mark.anyio


@dataclasses.dataclass
class Rig:
    """A served model whose engine calls are spied on, and its worker."""

    model: ServedModel
    spy: EngineSpy
    worker: BatchWorker
    metrics: Metrics
    original: Callable[[list[MCRequest]], list[Summary]]

    def request(self, rows: int, first: float, **options: Any) -> MCRequest:
        """`rows` raw rows whose first feature starts at `first` (a marker) and counts up."""
        shape = tuple(self.model.spec.input.shape)
        x = torch.linspace(-1.0, 1.0, rows * _size(shape), dtype=torch.float64).reshape(
            rows, *shape
        )
        x.view(rows, -1)[:, 0] = first + torch.arange(rows, dtype=torch.float64)
        return self.model.request(x, self.model.options(**options))

    def alone(self, request: MCRequest) -> Summary:
        """The unbatched twin: the engine on this one request (not through the spy)."""
        return self.original([request])[0]


def _size(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _rig(folder: Path, monkeypatch: pytest.MonkeyPatch, **worker: Any) -> Rig:
    model = ServedModel.load(folder, settings_for(folder.parent))
    original = model.engine.run_many
    spy = EngineSpy(original)
    monkeypatch.setattr(model.engine, "run_many", spy)
    metrics = Metrics()
    options = {"max_batch_rows": 64, "max_batch_delay_s": 0.0, "queue_size": 100} | worker
    worker_ = BatchWorker("m", model, metrics=metrics, **options)
    return Rig(model, spy, worker_, metrics, original)


@pytest.fixture
async def mlp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    write_mlp_model(tmp_path / "mlp", in_features=3, outputs=("a", "b"), hidden=(16, 16),
                    dropout=0.3, tau=2.0, mc={"max_samples": 256})  # fmt: skip
    rig = _rig(tmp_path / "mlp", monkeypatch)
    yield rig
    rig.spy.release()
    await asyncio.to_thread(rig.worker.close)


def assert_same_summary(got: Summary, want: Summary) -> None:
    """Every field identical: tensors bit for bit, intervals per level, counts and seeds."""
    assert type(got) is type(want)
    for field in dataclasses.fields(want):
        a, b = getattr(got, field.name), getattr(want, field.name)
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b), field.name
        elif isinstance(b, dict):
            assert a.keys() == b.keys(), field.name
            for level in b:
                assert torch.equal(a[level].lower, b[level].lower), (field.name, level)
                assert torch.equal(a[level].upper, b[level].upper), (field.name, level)
        else:
            assert a == b, field.name


def first_features(requests: Sequence[MCRequest]) -> list[float]:
    return [float(r.x.reshape(len(r.x), -1)[0, 0]) for r in requests]


# -- merging -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mlp", "digits"])
async def test_compatible_requests_merge_and_match_their_unbatched_twins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    if model == "mlp":
        write_mlp_model(tmp_path / "m", in_features=3, hidden=(16,), dropout=0.3, tau=2.0)
        folder = tmp_path / "m"
    else:
        folder = SHIPPED / "digits"  # a CNN with batchnorm: split into prefix and suffix
    rig = _rig(folder, monkeypatch)
    try:
        sizes = [1, 2, 3, 1, 5, 2, 8, 1]
        levels = [(0.95,), (0.8, 0.95), (0.5,)]
        requests = [  # options outside the batch key (levels, samples kept) may differ
            rig.request(n, 10.0 * k, samples=24, seed=100 + k, return_samples=k % 3,
                        interval_levels=levels[k % 3])
            for k, n in enumerate(sizes)
        ]  # fmt: skip
        with rig.spy.held():
            blocker = rig.worker.submit(rig.request(1, -50.0, samples=24, seed=1))
            await rig.spy.wait_calls(1)
            futures = [rig.worker.submit(r) for r in requests]
        await blocker
        results = await asyncio.gather(*futures)
    finally:
        await asyncio.to_thread(rig.worker.close)
    assert len(rig.spy.calls) == 2
    assert first_features(rig.spy.calls[1]) == first_features(requests)  # all in one call
    for request, result in zip(requests, results, strict=True):
        assert_same_summary(result, rig.alone(request))
    series = parse_metrics(rig.metrics.render()[0].decode())
    assert metric(series, "mcdrop_batch_requests_sum", model="m") == 1 + len(sizes)
    assert metric(series, "mcdrop_batch_rows_sum", model="m") == 1 + sum(sizes)
    assert metric(series, "mcdrop_batch_requests_count", model="m") == 2


async def test_a_batch_never_exceeds_max_batch_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_mlp_model(tmp_path / "m", in_features=3)
    rig = _rig(tmp_path / "m", monkeypatch, max_batch_rows=4)
    try:
        sizes = [2, 2, 2, 1, 6, 1]
        with rig.spy.held():
            blocker = rig.worker.submit(rig.request(1, -50.0, samples=8, seed=0))
            await rig.spy.wait_calls(1)
            futures = [rig.worker.submit(rig.request(n, 10.0 * k, samples=8, seed=k))
                       for k, n in enumerate(sizes)]  # fmt: skip
        await blocker
        results = await asyncio.gather(*futures)
    finally:
        await asyncio.to_thread(rig.worker.close)
    assert [len(r.mean) for r in results] == sizes
    batches = [[len(r.x) for r in call] for call in rig.spy.calls[1:]]
    assert sorted(n for b in batches for n in b) == sorted(sizes)
    for rows in batches:
        assert sum(rows) <= 4 or len(rows) == 1, batches  # an oversized request runs alone
    assert any(len(rows) > 1 for rows in batches)


async def test_incompatible_requests_are_not_merged_but_all_answered(mlp: Rig) -> None:
    kinds: list[dict[str, Any]] = [
        {"samples": 16},
        {"samples": 32},
        {"samples": 16, "mask_mode": "shared"},
        {"samples": "auto", "tolerance": 1e-9},
        {"samples": 16},
        {"samples": "auto", "tolerance": 1e-9},
    ]
    requests = [mlp.request(1, 10.0 * k, seed=k, **o) for k, o in enumerate(kinds)]
    with mlp.spy.held():
        blocker = mlp.worker.submit(mlp.request(1, -50.0, samples=16, seed=0))
        await mlp.spy.wait_calls(1)
        futures = [mlp.worker.submit(r) for r in requests]
    await blocker
    results = await asyncio.gather(*futures)
    groups = sorted(first_features(call) for call in mlp.spy.calls[1:])
    assert groups == [[0.0, 40.0], [10.0], [20.0], [30.0], [50.0]]
    for request, result in zip(requests, results, strict=True):
        assert_same_summary(result, mlp.alone(request))
    assert [r.samples_used for r in results] == [16, 32, 16, 256, 16, 256]


async def test_max_batch_delay_waits_for_company(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a long delay and a row limit of 3, three single-row requests form one batch."""
    write_mlp_model(tmp_path / "m", in_features=3)
    rig = _rig(tmp_path / "m", monkeypatch, max_batch_rows=3, max_batch_delay_s=30.0)
    try:
        futures = []
        for k in range(3):
            futures.append(rig.worker.submit(rig.request(1, 10.0 * k, samples=8, seed=k)))
            await asyncio.sleep(0.01)  # separate arrivals
        await asyncio.gather(*futures)
    finally:
        await asyncio.to_thread(rig.worker.close)
    assert [first_features(c) for c in rig.spy.calls] == [[0.0, 10.0, 20.0]]


# -- work that must not run --------------------------------------------------------------------


async def test_a_cancelled_queued_job_is_never_computed(mlp: Rig) -> None:
    with mlp.spy.held():
        blocker = mlp.worker.submit(mlp.request(1, -50.0, samples=16, seed=0))
        await mlp.spy.wait_calls(1)
        leaving = mlp.worker.submit(mlp.request(1, 10.0, samples=16, seed=1))
        staying = mlp.worker.submit(mlp.request(1, 20.0, samples=16, seed=2))
        leaving.cancel()  # what the router does when the client disconnects
    await blocker
    await staying
    seen = [v for call in mlp.spy.calls for v in first_features(call)]
    assert seen == [-50.0, 20.0]
    assert mlp.worker.depth == 0


async def test_a_job_whose_deadline_passed_in_the_queue_is_never_computed(mlp: Rig) -> None:
    with mlp.spy.held():
        blocker = mlp.worker.submit(mlp.request(1, -50.0, samples=16, seed=0))
        await mlp.spy.wait_calls(1)
        expired = mlp.worker.submit(mlp.request(1, 10.0, samples=16, seed=1), time.monotonic())
        fine = mlp.worker.submit(
            mlp.request(1, 20.0, samples=16, seed=2), time.monotonic() + 3600.0
        )
    await blocker
    with pytest.raises(DeadlineExceeded, match="deadline"):
        await expired
    await fine
    assert [v for call in mlp.spy.calls for v in first_features(call)] == [-50.0, 20.0]


async def test_a_full_queue_refuses_with_overloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_mlp_model(tmp_path / "m", in_features=3)
    rig = _rig(tmp_path / "m", monkeypatch, queue_size=2)
    try:
        with rig.spy.held():
            running = rig.worker.submit(rig.request(1, 0.0, samples=8, seed=0))
            await rig.spy.wait_calls(1)
            queued = [rig.worker.submit(rig.request(1, 1.0 + k, samples=8, seed=k))
                      for k in range(2)]  # fmt: skip
            with pytest.raises(Overloaded, match="'m'") as refused:
                rig.worker.submit(rig.request(1, 9.0, samples=8, seed=9))
        await asyncio.gather(running, *queued)
        after = await rig.worker.submit(rig.request(1, 5.0, samples=8, seed=5))
    finally:
        await asyncio.to_thread(rig.worker.close)
    assert refused.value.status_code == 503
    assert len(after.mean) == 1
    assert 9.0 not in rig.spy.rows_seen()


# -- failures and shutdown ---------------------------------------------------------------------


async def test_a_request_that_breaks_the_engine_does_not_fail_its_batch_mates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_mlp_model(tmp_path / "m", in_features=3)
    model = ServedModel.load(tmp_path / "m", settings_for(tmp_path))
    real = model.engine.run_many

    def fragile(requests: Sequence[MCRequest], **options: Any) -> list[Summary]:
        if any(666.0 in first_features([r]) for r in requests):
            raise RuntimeError("poisoned row")
        return real(list(requests), **options)

    spy = EngineSpy(fragile)
    monkeypatch.setattr(model.engine, "run_many", spy)
    worker = BatchWorker("m", model, max_batch_rows=64, max_batch_delay_s=0.0, queue_size=10)
    rig = Rig(model, spy, worker, Metrics(), real)
    try:
        with spy.held():
            blocker = worker.submit(rig.request(1, -50.0, samples=8, seed=0))
            await spy.wait_calls(1)
            good = [worker.submit(rig.request(1, 10.0 * k, samples=8, seed=k)) for k in range(3)]
            bad = worker.submit(rig.request(1, 666.0, samples=8, seed=9))
        await blocker
        answers = await asyncio.gather(*good)
        with pytest.raises(ServiceError, match="'m' failed on this request") as failed:
            await bad
    finally:
        await asyncio.to_thread(worker.close)
    assert failed.value.status_code == 500
    assert "poisoned" not in str(failed.value)  # internals stay in the log
    for k, answer in enumerate(answers):
        assert_same_summary(answer, rig.alone(rig.request(1, 10.0 * k, samples=8, seed=k)))


async def test_close_drains_queued_work_then_refuses_more(mlp: Rig) -> None:
    with mlp.spy.held():
        blocker = mlp.worker.submit(mlp.request(1, -50.0, samples=16, seed=0))
        await mlp.spy.wait_calls(1)
        queued = [mlp.worker.submit(mlp.request(2, 10.0 * k, samples=16, seed=k))
                  for k in range(3)]  # fmt: skip
        closing = asyncio.create_task(asyncio.to_thread(mlp.worker.close))
        await wait_for(lambda: mlp.worker._closing, "close() to begin")
        with pytest.raises(WorkerClosed):
            mlp.worker.submit(mlp.request(1, 99.0, samples=16, seed=0))
    await closing
    results = await asyncio.gather(blocker, *queued)
    assert [len(r.mean) for r in results] == [1, 2, 2, 2]
    assert 99.0 not in mlp.spy.rows_seen()
    assert not mlp.worker._thread.is_alive()


async def test_submit_call_runs_alone_on_the_worker_thread(mlp: Rig) -> None:
    import threading

    def where() -> str:
        return threading.current_thread().name

    with mlp.spy.held():
        blocker = mlp.worker.submit(mlp.request(1, -50.0, samples=16, seed=0))
        await mlp.spy.wait_calls(1)
        call = mlp.worker.submit_call(where)
        after = mlp.worker.submit(mlp.request(1, 10.0, samples=16, seed=1))
    assert await call == "mcdrop-m"
    await asyncio.gather(blocker, after)
    assert [first_features(c) for c in mlp.spy.calls] == [[-50.0], [10.0]]


# -- cancellation and fairness of started work -------------------------------------------------

LONG_SAMPLES = 2048  # 4 rows x 2048 samples at 64 (row, sample) pairs a chunk: 128 chunks


class Gate:
    """Holds the worker thread where it is called (after a chunk) until the test opens it."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()

    def __call__(self) -> None:
        self.reached.set()
        assert self.opened.wait(WAIT_S), "Gate: never opened"

    async def wait(self) -> None:
        """Until the worker thread is held here."""
        await wait_for(self.reached.is_set, "the worker to reach a gate")


class Paced:
    """The engine's run_many with its checkpoint wrapped: logs every call's start, chunks and
    end by marker (first feature of its first row); `after_first_chunk[marker]` runs (on the
    worker thread) after that call's first chunk, before the worker's own checkpoint."""

    def __init__(self, run_many: Callable[..., list[Summary]]) -> None:
        self._run = run_many
        self.events: list[tuple[str, float]] = []
        self.after_first_chunk: dict[float, Callable[[], None]] = {}
        self.gates: list[Gate] = []

    def __call__(
        self, requests: Sequence[MCRequest], checkpoint: Callable[[], None] | None = None
    ) -> list[Summary]:
        marker = first_features(requests)[0]
        chunks = 0

        def counted() -> None:
            nonlocal chunks
            chunks += 1
            self.events.append(("chunk", marker))
            if chunks == 1 and marker in self.after_first_chunk:
                self.after_first_chunk[marker]()
            if checkpoint is not None:
                checkpoint()

        self.events.append(("start", marker))
        try:
            return self._run(list(requests), checkpoint=counted)
        finally:
            self.events.append(("end", marker))

    def gate(self, marker: float) -> Gate:
        """A gate after the first chunk of the call with this marker."""
        gate = Gate()
        self.gates.append(gate)
        self.after_first_chunk[marker] = gate
        return gate

    def open_all(self) -> None:
        """Open every gate (teardown: never leave the worker thread held)."""
        for gate in self.gates:
            gate.opened.set()

    def chunks(self, marker: float) -> int:
        """Chunks the calls with this marker computed."""
        return self.events.count(("chunk", marker))

    def starts(self) -> list[float]:
        """Markers of the engine calls in the order they started."""
        return [m for kind, m in self.events if kind == "start"]

    def chunks_before(self, event: tuple[str, float], marker: float) -> int:
        """Chunks of `marker` computed before `event` happened."""
        return self.events[: self.events.index(event)].count(("chunk", marker))


@dataclasses.dataclass
class Lane:
    """A worker over a model of small chunks (64 row-sample pairs), its engine paced."""

    rig: Rig
    paced: Paced

    def long(self, first: float, seed: int) -> MCRequest:
        """4 rows x LONG_SAMPLES samples: far more chunks than a short request."""
        return self.rig.request(4, first, samples=LONG_SAMPLES, seed=seed)

    def short(self, first: float, seed: int, samples: int = 16) -> MCRequest:
        """1 row, one chunk."""
        return self.rig.request(1, first, samples=samples, seed=seed)


def _lane(folder: Path, monkeypatch: pytest.MonkeyPatch, *, interleave: bool = True) -> Lane:
    write_mlp_model(folder, in_features=3, hidden=(16, 16), dropout=0.3, tau=2.0)
    model = ServedModel.load(folder, settings_for(folder.parent, chunk_elements=1024))
    original = model.engine.run_many
    paced = Paced(original)
    monkeypatch.setattr(model.engine, "run_many", paced)
    metrics = Metrics()
    worker = BatchWorker("m", model, max_batch_rows=64, max_batch_delay_s=0.0, queue_size=100,
                         metrics=metrics, interleave=interleave)  # fmt: skip
    lane = Lane(Rig(model, EngineSpy(original), worker, metrics, original), paced)
    long, short = lane.long(0.0, 0), lane.short(0.0, 0)
    assert model.engine.chunk_count(len(long.x), long.options) == 128
    assert model.engine.chunk_count(len(short.x), short.options) == 1
    return lane


@pytest.fixture
async def lane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Lane]:
    lane = _lane(tmp_path / "m", monkeypatch)
    yield lane
    lane.paced.open_all()
    await asyncio.to_thread(lane.rig.worker.close)


async def test_a_started_request_whose_client_left_stops_within_a_chunk(lane: Lane) -> None:
    gate = lane.paced.gate(100.0)
    leaving = lane.rig.worker.submit(lane.long(100.0, seed=1))
    await gate.wait()
    leaving.cancel()  # what the router does when the client disconnects
    nxt = lane.short(200.0, seed=2)
    answer = lane.rig.worker.submit(nxt)
    gate.opened.set()
    assert_same_summary(await answer, lane.rig.alone(nxt))
    assert lane.paced.chunks(100.0) == 1  # of 128: it stopped at the first checkpoint after
    assert lane.paced.starts() == [100.0, 200.0]


async def test_a_started_request_past_its_deadline_stops_within_a_chunk(lane: Lane) -> None:
    deadline = time.monotonic() + 0.5

    def until_the_deadline() -> None:
        while time.monotonic() < deadline:
            time.sleep(0.01)

    lane.paced.after_first_chunk[100.0] = until_the_deadline
    expiring = lane.rig.worker.submit(lane.long(100.0, seed=1), deadline)
    with pytest.raises(DeadlineExceeded, match="while it ran"):
        await expiring
    nxt = lane.short(200.0, seed=2)
    assert_same_summary(await lane.rig.worker.submit(nxt), lane.rig.alone(nxt))
    assert lane.paced.chunks(100.0) == 1
    assert lane.paced.starts() == [100.0, 200.0]


async def test_a_long_batch_runs_on_while_one_of_its_requests_is_wanted(lane: Lane) -> None:
    blocker, batch = lane.paced.gate(50.0), lane.paced.gate(100.0)
    first = lane.rig.worker.submit(lane.short(50.0, seed=0))
    await blocker.wait()
    staying_request = lane.long(150.0, seed=3)
    leaving = lane.rig.worker.submit(lane.long(100.0, seed=1))
    staying = lane.rig.worker.submit(staying_request)  # queued together: one batch
    blocker.opened.set()
    await first
    await batch.wait()
    leaving.cancel()
    batch.opened.set()
    assert_same_summary(await staying, lane.rig.alone(staying_request))
    assert lane.paced.starts() == [50.0, 100.0]
    assert lane.paced.chunks(100.0) == 2 * 128  # both requests' rows, to the end


def _record(order: list[str], name: str, _: object) -> None:
    order.append(name)


@pytest.mark.parametrize("interleave", [True, False])
async def test_short_requests_run_between_the_chunks_of_a_long_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interleave: bool
) -> None:
    """Interleaving: waiting short batches run one per long chunk and finish first; long
    requests and calls keep their turn. Off: strictly in arrival order (the short ones wait)."""
    lane = _lane(tmp_path / "m", monkeypatch, interleave=interleave)
    paced, worker = lane.paced, lane.rig.worker
    gate = paced.gate(100.0)
    long_request, later_long = lane.long(100.0, seed=1), lane.long(300.0, seed=3)
    shorts = [lane.short(200.0, seed=2), lane.short(210.0, seed=4),  # compatible: one batch
              lane.short(220.0, seed=5, samples=24)]  # fmt: skip
    order: list[str] = []
    try:
        futures = {"long": worker.submit(long_request)}
        await gate.wait()
        futures["later long"] = worker.submit(later_long)
        futures["call"] = worker.submit_call(lambda: "evaluated")
        for k, request in enumerate(shorts):
            futures[f"short {k}"] = worker.submit(request)
        for name, future in futures.items():
            future.add_done_callback(functools.partial(_record, order, name))
        gate.opened.set()
        results = dict(zip(futures, await asyncio.gather(*futures.values()), strict=True))
    finally:
        paced.open_all()
        await asyncio.to_thread(worker.close)
    assert results["call"] == "evaluated"
    for k, request in enumerate(shorts):  # the same seeded answers as when run alone
        assert_same_summary(results[f"short {k}"], lane.rig.alone(request))
    assert_same_summary(results["long"], lane.rig.alone(long_request))
    assert paced.chunks(100.0) == paced.chunks(300.0) == 128
    if interleave:
        assert order == ["short 0", "short 1", "short 2", "long", "later long", "call"]
        assert paced.starts() == [100.0, 200.0, 220.0, 300.0]
        assert paced.chunks_before(("start", 200.0), 100.0) == 1  # round-robin: one short
        assert paced.chunks_before(("start", 220.0), 100.0) == 2  # batch per long chunk
    else:
        assert order == ["long", "later long", "call", "short 0", "short 1", "short 2"]
        assert paced.starts() == [100.0, 300.0, 200.0, 220.0]
        assert paced.chunks_before(("start", 200.0), 100.0) == 128


async def test_a_failure_while_answering_is_an_error_for_the_batch_and_the_worker_lives_on(
    mlp: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def broken(model: str, summary: Summary) -> None:
        calls.append(model)
        if len(calls) == 1:
            raise TypeError("a metric that cannot read this summary")

    monkeypatch.setattr(mlp.metrics, "observe_summary", broken)
    with pytest.raises(ServiceError, match="see the server log"):
        await asyncio.wait_for(mlp.worker.submit(mlp.request(1, 0.0, samples=8, seed=0)), 10)
    after = await asyncio.wait_for(mlp.worker.submit(mlp.request(1, 0.0, samples=8, seed=0)), 10)
    assert after.samples_used == 8
