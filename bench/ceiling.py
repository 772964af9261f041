"""The in-process ceiling of the server benchmark: the same requests straight into the engine.

No HTTP and no server: ServedModel builds each request, engine.run_many runs c of them at once.
"""

from __future__ import annotations

import time

from bench.common import collector_paused
from bench.load import Slice
from bench.workload import CEILING, MODEL, SAMPLES, Digits, check_probabilities
from mcdrop.model import ServedModel
from mcdrop.uncertainty import ClassificationSummary


def ceiling_slice(
    model: ServedModel, digits: Digits, group: int, first: int, count: int, seconds: float
) -> Slice:
    """The same requests straight into the engine, `group` of them per run_many (no HTTP).

    Latencies are per engine call; request building (validation, normalisation) is timed.
    """
    result = Slice()

    def run(indices: range) -> list[ClassificationSummary]:
        requests = [model.request(digits.row(i), model.options(SAMPLES, seed=i)) for i in indices]
        summaries = []
        for summary in model.engine.run_many(requests):
            if not isinstance(summary, ClassificationSummary):
                raise TypeError(f"{MODEL} must be a classification model")
            summaries.append(summary)
        return summaries

    run(range(first, first + min(group, count)))  # warm-up, untimed
    with collector_paused():
        client_cpu = time.process_time()
        start = time.perf_counter()
        done = 0
        while done < count and time.perf_counter() < start + seconds:
            indices = range(first + done, first + min(done + group, count))
            t0 = time.perf_counter()
            summaries = run(indices)
            result.latencies_ms.append((time.perf_counter() - t0) * 1e3)
            for i, summary in zip(indices, summaries, strict=True):
                try:
                    predicted = check_probabilities(summary.probabilities[0].tolist(), CEILING)
                except ValueError as exc:
                    result.fail(f"request {i}: {exc}")
                    continue
                result.requests += 1
                result.correct += predicted == digits.label(i)
            done += len(indices)
        result.wall_s = time.perf_counter() - start
        result.client_cpu_s = time.process_time() - client_cpu
    return result
