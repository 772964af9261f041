"""What every shard worker does, whatever carries its messages (a pipe or a Ray actor call).

Loads each model once from its repository folder (refusing a folder changed since the server
loaded it) and answers wire messages: "load" warms a model, "run" computes one shard's
partial statistics. Both the local pool's processes and the Ray actors are this, plus transport.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from mcdrop.config import Settings
from mcdrop.engine.core import MCEngine
from mcdrop.errors import ServiceError
from mcdrop.model import ServedModel
from mcdrop.repository.scan import fingerprint
from mcdrop.shards.executor import ModelRef
from mcdrop.shards.wire import decode, decode_work, encode_stats

VERSIONS_KEPT = 2  # per model folder: the serving version and the one replacing it


class ShardWorkerDied(ServiceError):
    """A shard worker (process or actor) exited while it had work; it is replaced, so retry."""

    status_code = 503


class ShardFailed(ServiceError):
    """A shard raised an error inside its worker (the message says which and why)."""

    status_code = 500


class ShardWorker:
    """The engines one worker has loaded, keyed by (folder, fingerprint), and the shards it runs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engines: OrderedDict[tuple[str, str], MCEngine] = OrderedDict()

    def engine(self, model: ModelRef) -> MCEngine:
        """The model's engine, loaded on first use; refuses a folder changed since the server."""
        key = (str(model.folder), model.fingerprint)
        if key in self._engines:
            self._engines.move_to_end(key)
            return self._engines[key]
        if fingerprint(model.folder) != model.fingerprint:
            raise ShardFailed(
                f"model '{model.name}' changed on disk since the server loaded it; retry once "
                "the server has loaded the new version"
            )
        self._engines[key] = ServedModel.load(model.folder, self.settings).engine
        same_folder = [k for k in self._engines if k[0] == key[0]]
        for old in same_folder[:-VERSIONS_KEPT]:
            del self._engines[old]
        return self._engines[key]

    def answer(self, message: bytes) -> bytes:
        """The reply to one "load" or "run" work message: partial statistics (none for "load")."""
        model, request, shard = decode_work(*decode(message))
        engine = self.engine(model)
        start = time.process_time()
        result = None if shard is None or request is None else engine.run_shard(request, shard)
        return encode_stats(result, time.process_time() - start)
