"""Run one request's MC samples as shards on workers (processes, Ray actors) and merge them.

The ShardExecutor protocol, the plan of a request's shards, and the ShardRouter that sends a
model's large-N requests there; the statistics and their merge are mcdrop.engine.partials.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from mcdrop.engine.accumulators import OutputHead
from mcdrop.engine.core import MCEngine, MCOptions, MCRequest
from mcdrop.engine.partials import PartialStats, Shard, finish, merge_partials
from mcdrop.engine.streaming import BLOCK
from mcdrop.uncertainty import Summary


def plan_shards(samples: int, workers: int, *, min_shard: int = 64) -> list[Shard]:
    """At most `workers` contiguous shards covering samples 0 .. samples-1, sizes within a block.

    Every shard but the last is a whole number of BLOCKs, so block sums and mask counters
    line up with a single run; no shard is smaller than `min_shard` samples (fewer shards
    rather than tiny ones, whose fixed cost would outweigh their work).
    """
    if samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    if workers < 1:
        raise ValueError(f"workers must be positive, got {workers}")
    blocks = -(-samples // BLOCK)
    n = max(1, min(workers, blocks, samples // max(min_shard, 1)))
    base, extra = divmod(blocks, n)
    shards = []
    first = 0
    for i in range(n):
        size = (base + (i >= n - extra)) * BLOCK  # the last shard holds the partial block
        shards.append(Shard(first, min(size, samples - first)))
        first += size
    return shards


@dataclass(frozen=True)
class ModelRef:
    """Which model a shard runs: its repository folder and the fingerprint the server loaded.

    Workers load the folder themselves and refuse to run a version other than `fingerprint`.
    """

    name: str
    folder: Path
    fingerprint: str


class ShardExecutor(Protocol):
    """Runs the shards of one seeded request on some workers (processes, Ray actors, ...)."""

    @property
    def workers(self) -> int:
        """How many shards it can run at once (plan this many)."""
        ...

    def run_shards(
        self, model: ModelRef, request: MCRequest, shards: Sequence[Shard]
    ) -> list[PartialStats]:
        """Each shard's statistics, in the order of `shards`. request.options.seed is set."""
        ...

    def preload(self, model: ModelRef) -> None:
        """Get the model ready on the workers before its first request (may do nothing)."""
        ...

    def close(self) -> None:
        """Stop the workers; no call may follow."""
        ...


def seeded(request: MCRequest) -> MCRequest:
    """The request with a seed drawn now if it had none (every shard must use the same one)."""
    if request.options.seed is not None:
        return request
    return replace(request, options=replace(request.options, seed=secrets.randbits(63)))


def run_sharded(
    executor: ShardExecutor,
    model: ModelRef,
    head: OutputHead,
    request: MCRequest,
    min_shard: int = 64,
) -> Summary:
    """One fixed-N request run in shards on the executor's workers, merged into its summary."""
    samples = request.options.samples
    if not isinstance(samples, int):
        raise ValueError("only a fixed sample count runs in shards; samples='auto' runs whole")
    request = seeded(request)
    shards = plan_shards(samples, executor.workers, min_shard=min_shard)
    parts = executor.run_shards(model, request, shards)
    seed = request.options.seed
    assert seed is not None
    opts = request.options
    return finish(head, merge_partials(parts), seed, opts.interval_levels, opts.return_samples)


@dataclass(frozen=True)
class ShardRouter:
    """When and where one model's requests run in shards: above `threshold` fixed samples."""

    executor: ShardExecutor
    model: ModelRef
    threshold: int

    def applies(self, options: MCOptions) -> bool:
        """Whether a request with these options runs in shards ('auto' never: it runs in rounds)."""
        return isinstance(options.samples, int) and options.samples > self.threshold

    def run(self, engine: MCEngine, request: MCRequest) -> Summary:
        """The request's summary, computed in shards (checked here first, so errors are clear)."""
        request.options.validated()
        engine.check_request(request)
        return run_sharded(self.executor, self.model, engine.head, request)


class SerialExecutor:
    """Runs shards one after another in this process (the reference, and for tests)."""

    def __init__(self, engine_of: Callable[[ModelRef], MCEngine], workers: int = 1) -> None:
        self._engine_of = engine_of
        self._workers = workers

    @property
    def workers(self) -> int:
        """How many shards to plan per request."""
        return self._workers

    def run_shards(
        self, model: ModelRef, request: MCRequest, shards: Sequence[Shard]
    ) -> list[PartialStats]:
        """Each shard's statistics, computed here in order."""
        engine = self._engine_of(model)
        return [engine.run_shard(request, shard) for shard in shards]

    def preload(self, model: ModelRef) -> None:
        """Load the model's engine now."""
        self._engine_of(model)

    def close(self) -> None:
        """Nothing to stop."""
