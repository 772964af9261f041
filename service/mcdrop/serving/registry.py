"""The live model set: loads the repository, hot-swaps changed models, routes work to workers.

A changed model is loaded beside the serving one and swapped in when ready; a version that
fails to load leaves the old one serving and is reported. Work queued on a replaced worker
finishes there; work that reaches a retired worker is sent to its successor.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from mcdrop.config import Settings
from mcdrop.engine.core import MCOptions
from mcdrop.errors import DeadlineExceeded, ModelLoadError, ModelNotFound
from mcdrop.model import ServedModel
from mcdrop.repository.manifest import MANIFEST_NAME, ModelSpec
from mcdrop.repository.scan import check_model_name, fingerprint, model_folder, scan_repository
from mcdrop.serving.batching import BatchWorker, WorkerClosed
from mcdrop.serving.metrics import Metrics
from mcdrop.serving.recent import RecentUncertainty
from mcdrop.shards.executor import ModelRef, ShardExecutor, ShardRouter
from mcdrop.shards.pool import LocalShardPool

log = logging.getLogger(__name__)

ModelState = Literal["READY", "LOADING", "FAILED", "UNAVAILABLE"]


@dataclass(frozen=True)
class ModelStatus:
    """What the repository knows of one model folder."""

    name: str
    state: ModelState
    version: str | None = None
    spec: ModelSpec | None = None
    error: str | None = None  # the last load failure (an older version may still serve)
    coverage: dict[str, Any] | None = None  # the serving version's load report (engine)


@dataclass(frozen=True)
class Answer:
    """What a model's worker returned, and the model version that computed it."""

    result: Any
    model: ServedModel


@dataclass
class ModelEntry:
    """One loaded model version, the worker that runs it, and the model's recent uncertainty."""

    model: ServedModel
    worker: BatchWorker
    fingerprint: str
    recent: RecentUncertainty  # handed on to the next version while the task stays the same


class ModelRegistry:
    """Loaded models by name; every control operation is serialised."""

    def __init__(
        self, settings: Settings, metrics: Metrics, shard_executor: ShardExecutor | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.ready = False
        self._entries: dict[str, ModelEntry] = {}
        self._errors: dict[str, str] = {}
        self._failed: dict[str, str] = {}  # fingerprint of each folder's last failed load
        self._loading: set[str] = set()
        self._control = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        # Splits large-N requests: the one given, else local processes if shard_workers > 0.
        self.shard_executor = shard_executor

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the shard workers if configured, load the whole repository, then poll it."""
        if self.shard_executor is None and self.settings.shard_workers > 0:
            self.shard_executor = await asyncio.to_thread(
                LocalShardPool, self.settings.shard_workers, self.settings
            )
            log.info("requests above %d samples are split over %d local shard workers",
                     self.settings.shard_threshold, self.settings.shard_workers)  # fmt: skip
        await self.index()
        self.ready = True
        if self.settings.poll_interval_s > 0:
            self._poller = asyncio.create_task(self._poll())

    async def close(self) -> None:
        """Stop polling and drain every worker."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        entries, self._entries = list(self._entries.values()), {}
        await asyncio.gather(*(asyncio.to_thread(e.worker.close) for e in entries))
        if self.shard_executor is not None:
            await asyncio.to_thread(self.shard_executor.close)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.index()
            except Exception:
                log.exception("repository poll failed")

    # -- control ---------------------------------------------------------------------------

    async def index(self) -> list[ModelStatus]:
        """Rescan: load new and changed models, unload those whose folder is gone."""
        async with self._control:
            scan = await asyncio.to_thread(scan_repository, self.settings.model_repository)
            self._errors = {k: v for k, v in self._errors.items() if k in self._entries}
            self._errors.update({k: self._public(v) for k, v in scan.errors.items()})
            for name, (_, folder) in scan.models.items():
                await self._load(name, folder, force=False)
            for name in [n for n in self._entries if n not in scan.models and n not in scan.errors]:
                await self._unload(name)
        return self.statuses()

    async def load(self, name: str) -> ModelStatus:
        """(Re)load one model now; raises ModelLoadError (old version keeps serving)."""
        async with self._control:
            try:  # a bad name is refused before any path is built from it
                folder = model_folder(self.settings.model_repository, name)
            except ModelLoadError as exc:
                raise ModelLoadError(self._public(str(exc))) from exc
            if not (folder / MANIFEST_NAME).is_file():
                raise ModelNotFound(
                    f"model '{name}' has no folder with a {MANIFEST_NAME} in the repository"
                )
            await self._load(name, folder, force=True)
            if name in self._errors:
                raise ModelLoadError(self._errors[name])
        return self.status(name)

    async def unload(self, name: str) -> None:
        """Stop serving a model; queued requests finish first."""
        check_model_name(name)
        async with self._control:
            if name not in self._entries:
                raise ModelNotFound(f"model '{name}' is not loaded")
            await self._unload(name)

    async def _load(self, name: str, folder: Path, force: bool) -> None:
        mark = await asyncio.to_thread(fingerprint, folder)
        old = self._entries.get(name)
        if not force and mark in (None if old is None else old.fingerprint, self._failed.get(name)):
            return  # unchanged since it last loaded, or since it last failed

        self._loading.add(name)
        try:
            model = await asyncio.to_thread(ServedModel.load, folder, self.settings)
            await asyncio.to_thread(model.canary)  # a version that cannot answer never swaps in
            if model.spec.name != name:
                got = model.spec.name
                raise ModelLoadError(
                    f"{folder / MANIFEST_NAME}: name '{got}' is not the folder name"
                )
        except Exception as exc:
            message = str(exc) if isinstance(exc, ModelLoadError) else f"{folder}: {exc!r}"
            log.error("model '%s' failed to load: %s", name, message)
            self._errors[name] = self._public(message)
            self._failed[name] = mark
            self.metrics.observe_load_failure(name)
            return
        finally:
            self._loading.discard(name)
        batching = model.spec.batching
        recent = RecentUncertainty(model.spec.task)
        if old is not None and old.recent.task == recent.task:
            recent = old.recent  # a new version of the same model keeps its history
        worker = BatchWorker(
            name,
            model,
            max_batch_rows=self.settings.max_batch_rows or batching.max_batch_rows,
            max_batch_delay_s=(
                batching.max_batch_delay_ms if self.settings.max_batch_delay_ms is None
                else self.settings.max_batch_delay_ms
            ) / 1000.0,
            queue_size=self.settings.queue_size,
            metrics=self.metrics,
            recent=recent,
            shard_router=await self._shard_router(ModelRef(name, folder, mark)),
            interleave=self.settings.interleave,
        )  # fmt: skip
        self._entries[name] = ModelEntry(model, worker, mark, recent)
        self._errors.pop(name, None)
        self._failed.pop(name, None)
        self.metrics.set_models_loaded(len(self._entries))
        log.info("model '%s' version %s ready", name, model.spec.version)
        if old is not None:
            await asyncio.to_thread(old.worker.close)

    async def _shard_router(self, model: ModelRef) -> ShardRouter | None:
        """Split this model's large-N requests over the shard executor (the model preloaded)."""
        if self.shard_executor is None:
            return None
        try:
            await asyncio.to_thread(self.shard_executor.preload, model)
        except Exception as exc:  # it serves anyway, unsplit
            log.error("model '%s' will not be split: shard workers failed to load it: %s",
                      model.name, exc)  # fmt: skip
            return None
        return ShardRouter(self.shard_executor, model, self.settings.shard_threshold)

    async def _unload(self, name: str) -> None:
        entry = self._entries.pop(name)
        self.metrics.set_models_loaded(len(self._entries))
        await asyncio.to_thread(entry.worker.close)
        self.metrics.remove_model(name)

    def _public(self, message: str) -> str:
        """A load error as callers see it: paths relative to the repository, none of the host's."""
        root = self.settings.model_repository
        for prefix in sorted({str(root.resolve()), str(root.absolute())}, key=len, reverse=True):
            message = message.replace(prefix.rstrip(os.sep) + os.sep, "")
        return message

    # -- lookups ---------------------------------------------------------------------------

    def get(self, name: str, version: str | None = None) -> ModelEntry:
        """The serving entry, or ModelNotFound naming what is missing (InvalidInput: bad name)."""
        entry = self._entries.get(check_model_name(name))
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ModelNotFound(f"model '{name}' is not loaded (loaded: {known})")
        if version is not None and version != entry.model.spec.version:
            serving = entry.model.spec.version
            raise ModelNotFound(f"model '{name}' has no version '{version}' (serving '{serving}')")
        return entry

    def status(self, name: str) -> ModelStatus:
        """The state of one model folder."""
        entry = self._entries.get(name)
        error = self._errors.get(name)
        if name in self._loading:
            state: ModelState = "LOADING"
        elif entry is not None:
            state = "READY"
        elif error is not None:
            state = "FAILED"
        else:
            state = "UNAVAILABLE"
        spec = None if entry is None else entry.model.spec
        coverage = None if entry is None else entry.model.engine.coverage()
        return ModelStatus(
            name, state, None if spec is None else spec.version, spec, error, coverage
        )

    def statuses(self) -> list[ModelStatus]:
        """Every model the registry knows of, loaded or failed, by name."""
        return [
            self.status(n) for n in sorted(set(self._entries) | set(self._errors) | self._loading)
        ]

    # -- work ------------------------------------------------------------------------------

    async def infer(
        self,
        entry: ModelEntry,
        rows: Tensor,
        options: MCOptions,
        targets: Tensor | None = None,
        deadline: float | None = None,
        *,
        version: str | None = None,
    ) -> Answer:
        """Run one request on the entry's batching worker (validated first).

        The entry is the one the request looked up; `version` is the one its client pinned,
        if any, which a successor must match when a swap retires the entry's worker.
        """

        def submit(target: ModelEntry) -> asyncio.Future[Any]:
            return target.worker.submit(target.model.request(rows, options, targets), deadline)

        return await self._on_worker(entry, version, submit, deadline)

    async def call(
        self,
        entry: ModelEntry,
        fn: Callable[[ServedModel], Any],
        deadline: float | None = None,
        *,
        version: str | None = None,
    ) -> Answer:
        """Run fn(model) on the entry's worker thread (alone)."""

        def submit(target: ModelEntry) -> asyncio.Future[Any]:
            return target.worker.submit_call(functools.partial(fn, target.model), deadline)

        return await self._on_worker(entry, version, submit, deadline)

    async def _on_worker(
        self,
        entry: ModelEntry,
        version: str | None,
        submit: Callable[[ModelEntry], asyncio.Future[Any]],
        deadline: float | None,
    ) -> Answer:
        """Submit to the entry's worker; if a swap retired it, to its successor."""
        name = entry.model.spec.name
        for _ in range(3):
            try:
                future = submit(entry)
            except WorkerClosed:  # swapped since the lookup: the successor takes it
                entry = self.get(name, version)
                continue
            return Answer(await _await(future, deadline), entry.model)
        raise WorkerClosed(f"model '{name}' is being replaced; retry")


async def _await(future: asyncio.Future[Any], deadline: float | None) -> Any:
    """Await a worker's future until the deadline; on timeout the job is dropped if not started."""
    if deadline is None:
        return await future
    try:
        return await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
    except TimeoutError as exc:
        raise DeadlineExceeded("the request's deadline passed") from exc
