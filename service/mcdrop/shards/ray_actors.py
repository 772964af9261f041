"""RayShardExecutor: a request's sample shards run on Ray actors, anywhere in the cluster.

The Ray counterpart of shard_pool.LocalShardPool, speaking the same shard_wire bytes (Ray
only ever carries bytes, no objects of ours are pickled). Each actor loads a model once
(checked against the server's fingerprint) and keeps it; shard i goes to actor i mod n. A shard is a
pure function of (model, seeded request, sample range), so Ray may rerun one whose actor died.
Needs the `ray` extra and a connected Ray (the caller's ray.init, or a Serve replica's).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import ray
import torch

from mcdrop.config import Settings
from mcdrop.engine.core import MCRequest
from mcdrop.engine.partials import PartialStats, Shard
from mcdrop.shards.executor import ModelRef
from mcdrop.shards.wire import encode_work, stats_of
from mcdrop.shards.worker import ShardFailed, ShardWorker, ShardWorkerDied

TASK_RETRIES = 2  # reruns of a shard whose actor died (safe: shards are deterministic)


class ShardActor:
    """One Ray actor: a ShardWorker whose messages come as actor calls."""

    def __init__(self, settings: dict[str, Any], threads: int) -> None:
        torch.set_num_threads(threads)
        self._worker = ShardWorker(Settings(**settings))

    def run(self, work: bytes) -> bytes:
        """Statistics of one shard of one seeded request (wire bytes in and out)."""
        return self._worker.answer(work)

    def load(self, work: bytes) -> int:
        """Load the model now; the actor's process id (to tell actors apart)."""
        self._worker.answer(work)
        return os.getpid()


def assign(shards: int, actors: int) -> list[int]:
    """Which actor runs each shard: round robin, so n shards on n actors run all at once."""
    if actors < 1:
        raise ValueError(f"shard actors must be >= 1, got {actors}")
    return [i % actors for i in range(shards)]


class RayShardExecutor:
    """A ShardExecutor over `workers` Ray actors of num_cpus / num_gpus each."""

    def __init__(
        self,
        workers: int,
        settings: Settings | None = None,
        *,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        threads: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"shard actors must be >= 1, got {workers}")
        if threads < 1:
            raise ValueError(f"threads per shard actor must be >= 1, got {threads}")
        if not ray.is_initialized():
            raise RuntimeError("RayShardExecutor needs a connected Ray (ray.init) first")
        remote = ray.remote(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            max_restarts=-1,  # a dead actor comes back (with no models loaded)
            max_task_retries=TASK_RETRIES,
        )(ShardActor)
        values = (settings or Settings()).model_dump(mode="json", exclude_none=True)
        self._actors = [remote.remote(values, threads) for _ in range(workers)]
        self._closed = False
        self.pids: list[int] = []  # of the actors, once preload() ran

    @property
    def workers(self) -> int:
        """How many shards run at once."""
        return len(self._actors)

    def run_shards(
        self, model: ModelRef, request: MCRequest, shards: Sequence[Shard]
    ) -> list[PartialStats]:
        """Every shard on its actor, all at once; results in shard order."""
        actors = assign(len(shards), len(self._actors))
        refs = [
            self._actors[a].run.remote(encode_work("run", model, request, s))
            for a, s in zip(actors, shards, strict=True)
        ]
        what = f"samples {shards[0].first}..{shards[-1].end - 1} of model '{model.name}'"
        replies: list[bytes] = self._get(refs, what)
        return [stats_of(reply) for reply in replies]

    def preload(self, model: ModelRef) -> None:
        """Load the model in every actor, so its first split request does not wait for it."""
        work = encode_work("load", model, None, None)
        refs = [a.load.remote(work) for a in self._actors]
        self.pids = self._get(refs, f"loading '{model.name}'")

    def close(self) -> None:
        """Stop every actor; idempotent."""
        if self._closed:
            return
        self._closed = True
        for actor in self._actors:
            ray.kill(actor)

    def _get(self, refs: list[Any], what: str) -> list[Any]:
        """ray.get, with Ray's errors turned into the service's (reason kept, no traceback)."""
        if self._closed:
            raise ShardFailed("the Ray shard executor is closed")
        try:
            values: list[Any] = ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            raise ShardFailed(f"Ray shard actor, {what}: {type(cause).__name__}: {cause}") from exc
        except ray.exceptions.RayActorError as exc:
            raise ShardWorkerDied(
                f"a Ray shard actor died during {what} (retried {TASK_RETRIES} times); "
                "it restarts for the next request, retry"
            ) from exc
        return values
