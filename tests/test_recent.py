"""RecentUncertainty: bounded ring buffer, since/limit, threads, entries of real engine answers."""

from __future__ import annotations

import asyncio
import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import classification_summary, regression_summary, write_mlp_model
from http_helpers import EngineSpy, settings_for

from mcdrop.engine.core import MCRequest
from mcdrop.model import ServedModel
from mcdrop.serving.batching import BatchWorker
from mcdrop.serving.recent import RECENT_CAPACITY, RecentUncertainty

ONE = regression_summary([[1.0]])


def times(entries: list[dict[str, Any]]) -> list[float]:
    return [e["time"] for e in entries]


# -- entries -----------------------------------------------------------------------------------


def test_a_regression_entry_averages_std_over_rows_and_outputs() -> None:
    recent = RecentUncertainty("regression")
    recent.record(regression_summary([[0.3, 0.4], [0.0, 0.5]], samples=32), now=12.5, version="3")
    assert recent.snapshot() == [
        {"time": 12.5, "version": "3", "rows": 2, "samples": 32,
         "mean_std": pytest.approx(0.3), "max_std": pytest.approx(0.5)},
    ]  # fmt: skip


def test_a_classification_entry_averages_each_measure_over_rows() -> None:
    recent = RecentUncertainty("classification")
    recent.record(
        classification_summary([0.6, 0.2, 0.4], [0.5, 0.2, 0.1], [0.25, 0.0, 0.5], samples=7),
        now=1.0,
    )
    [entry] = recent.snapshot()
    assert entry == {
        "time": 1.0, "version": None, "rows": 3, "samples": 7,
        "mean_entropy": pytest.approx(0.4),
        "mean_mutual_information": pytest.approx((0.1 + 0.0 + 0.3) / 3),
        "mean_variation_ratio": pytest.approx(0.25),
        "max_mutual_information": pytest.approx(0.3),
    }  # fmt: skip
    assert all(
        type(v) is float for k, v in entry.items() if k not in ("rows", "samples", "version")
    )


def test_non_finite_values_are_left_out_and_none_when_nothing_is_left() -> None:
    recent = RecentUncertainty("regression")
    recent.record(regression_summary([[math.nan, 0.2], [math.inf, 0.4]]), now=1.0)
    recent.record(regression_summary([[math.nan]]), now=2.0)
    first, second = recent.snapshot()
    assert (first["mean_std"], first["max_std"]) == (pytest.approx(0.3), pytest.approx(0.4))
    assert (second["mean_std"], second["max_std"]) == (None, None)


# -- the ring buffer ---------------------------------------------------------------------------


def test_the_buffer_keeps_only_the_newest_capacity_entries_oldest_first() -> None:
    assert RecentUncertainty("regression").capacity == RECENT_CAPACITY == 1000
    recent = RecentUncertainty("regression", capacity=3)
    for t in range(1, 6):
        recent.record(regression_summary([[float(t)]]), now=float(t))
    assert len(recent) == 3
    entries = recent.snapshot()
    assert times(entries) == [3.0, 4.0, 5.0]
    assert [e["mean_std"] for e in entries] == [3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="capacity"):
        RecentUncertainty("regression", capacity=0)


def test_since_is_strict_and_limit_keeps_the_newest() -> None:
    recent = RecentUncertainty("regression")
    for t in (1.0, 2.0, 3.0, 4.0, 5.0):
        recent.record(ONE, now=t)
    assert times(recent.snapshot(since=3.0)) == [4.0, 5.0]
    assert times(recent.snapshot(since=0.5)) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert recent.snapshot(since=5.0) == []
    assert times(recent.snapshot(limit=2)) == [4.0, 5.0]
    assert times(recent.snapshot(limit=99)) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert times(recent.snapshot(since=1.0, limit=3)) == [3.0, 4.0, 5.0]
    assert times(recent.snapshot(since=3.5, limit=3)) == [4.0, 5.0]
    assert recent.snapshot(limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        recent.snapshot(limit=-1)


def test_a_snapshot_is_a_copy() -> None:
    recent = RecentUncertainty("regression")
    recent.record(ONE, now=1.0)
    recent.snapshot()[0]["mean_std"] = 99.0
    assert recent.snapshot()[0]["mean_std"] == 1.0


def test_concurrent_records_lose_nothing_and_keep_each_thread_in_order() -> None:
    threads, each = 8, 400
    summary = regression_summary([[0.5, 1.5]])
    full = RecentUncertainty("regression", capacity=threads * each)
    small = RecentUncertainty("regression", capacity=500)
    start = threading.Barrier(threads + 1)
    done = threading.Event()
    seen: list[int] = []
    failures: list[BaseException] = []

    def writer(k: int) -> None:
        start.wait()
        for i in range(each):
            full.record(summary, now=k * 10_000 + i)
            small.record(summary, now=k * 10_000 + i)

    def reader() -> None:
        start.wait()
        try:
            while not done.is_set():
                seen.append(len(full.snapshot(since=0.0)))
                small.snapshot(limit=100)
        except BaseException as exc:  # surfaced below: a thread's error would be lost
            failures.append(exc)

    workers = [threading.Thread(target=writer, args=(k,)) for k in range(threads)]
    watcher = threading.Thread(target=reader)
    for t in [*workers, watcher]:
        t.start()
    for t in workers:
        t.join()
    done.set()
    watcher.join()
    assert failures == []
    assert sorted(seen) == seen  # the count only grew
    got = times(full.snapshot())
    assert sorted(got) == sorted(float(k * 10_000 + i) for k in range(threads) for i in range(each))
    assert len(small) == 500
    kept = times(small.snapshot())
    for k in range(threads):  # each thread's entries stay in the order it recorded them
        mine = [t for t in kept if k * 10_000 <= t < (k + 1) * 10_000]
        assert mine == sorted(mine)
    assert all(e["mean_std"] == 1.0 and e["max_std"] == 1.5 for e in small.snapshot())


def test_latest_calibration_keeps_the_last_report_with_its_time() -> None:
    recent = RecentUncertainty("regression")
    assert recent.latest_calibration is None
    recent.record_calibration({"rows": 3}, now=10.0)
    recent.record_calibration({"rows": 5}, now=11.0)
    assert recent.latest_calibration == {"time": 11.0, "report": {"rows": 5}}
    assert recent.snapshot() == []  # an evaluation is no answered request


# -- real engine answers -----------------------------------------------------------------------


def zero_hidden_state(n_in: int, hidden: int, out_bias: list[float]) -> dict[str, torch.Tensor]:
    """Weights whose hidden layer is always 0, so dropout changes nothing: out = out.bias."""
    n_out = len(out_bias)
    return {
        "fc0.weight": torch.zeros(hidden, n_in),
        "fc0.bias": torch.zeros(hidden),
        "out.weight": torch.ones(n_out, hidden),
        "out.bias": torch.tensor(out_bias),
    }


def test_entries_of_a_real_regression_answer(tmp_path: Path) -> None:
    # epistemic variance 0 (constant output); aleatoric 1 / tau = 0.25: std 0.5 everywhere
    write_mlp_model(tmp_path / "r", in_features=2, outputs=("a", "b"), hidden=(3,), tau=4.0,
                    state=zero_hidden_state(2, 3, [1.5, -2.0]))  # fmt: skip
    model = ServedModel.load(tmp_path / "r", settings_for(tmp_path))
    summary = model.predict(torch.tensor([[0.0, 1.0], [2.0, -3.0], [1.0, 1.0]]), model.options(16))
    recent = RecentUncertainty("regression")
    recent.record(summary, now=100.0, version=model.spec.version)
    [entry] = recent.snapshot()
    assert (entry["time"], entry["version"], entry["rows"], entry["samples"]) == (100.0, "1", 3, 16)
    assert entry["mean_std"] == pytest.approx(0.5, abs=1e-6)
    assert entry["max_std"] == pytest.approx(0.5, abs=1e-6)


def test_entries_of_a_real_classification_answer(tmp_path: Path) -> None:
    # constant logits (0, 0, ln 2): probabilities (1/4, 1/4, 1/2) in every sample
    write_mlp_model(tmp_path / "c", in_features=2, outputs=("x", "y", "z"), hidden=(3,),
                    task="classification",
                    state=zero_hidden_state(2, 3, [0.0, 0.0, math.log(2.0)]))  # fmt: skip
    model = ServedModel.load(tmp_path / "c", settings_for(tmp_path))
    summary = model.predict(torch.tensor([[0.0, 1.0], [2.0, -3.0]]), model.options(12))
    recent = RecentUncertainty("classification")
    recent.record(summary, now=5.0)
    [entry] = recent.snapshot()
    assert (entry["rows"], entry["samples"]) == (2, 12)
    assert entry["mean_entropy"] == pytest.approx(1.5 * math.log(2.0), rel=1e-6)
    assert entry["mean_mutual_information"] == pytest.approx(0.0, abs=1e-6)
    assert entry["max_mutual_information"] == pytest.approx(0.0, abs=1e-6)
    assert entry["mean_variation_ratio"] == 0.0  # every sample votes for z


@pytest.mark.anyio
async def test_the_worker_records_one_entry_per_request_of_a_merged_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_mlp_model(tmp_path / "m", in_features=2, hidden=(8,), dropout=0.3, tau=2.0)
    model = ServedModel.load(tmp_path / "m", settings_for(tmp_path))
    spy = EngineSpy(model.engine.run_many)
    monkeypatch.setattr(model.engine, "run_many", spy)
    recent = RecentUncertainty("regression")
    worker = BatchWorker("m", model, max_batch_rows=64, max_batch_delay_s=0.0, queue_size=10,
                         recent=recent)  # fmt: skip

    def request(rows: int, seed: int) -> MCRequest:
        x = torch.linspace(-2.0, 2.0, 2 * rows, dtype=torch.float64).reshape(rows, 2)
        return model.request(x, model.options(24, seed=seed))

    try:
        with spy.held():
            blocker = worker.submit(request(1, 0))
            await spy.wait_calls(1)
            futures = [worker.submit(request(n, n)) for n in (2, 1, 3)]
        await blocker
        results = await asyncio.gather(*futures)
    finally:
        await asyncio.to_thread(worker.close)
    assert len(spy.calls) == 2  # the three were answered by one engine call
    entries = recent.snapshot()
    assert [e["rows"] for e in entries] == [1, 2, 1, 3]
    assert all(e["samples"] == 24 and e["version"] == "1" for e in entries)
    for entry, result in zip(entries[1:], results, strict=True):
        std = [v for row in result.std.tolist() for v in row]
        assert entry["mean_std"] == pytest.approx(sum(std) / len(std))
        assert entry["max_std"] == pytest.approx(max(std))
    assert times(entries) == sorted(times(entries))
