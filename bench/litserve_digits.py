"""The digits model served by LitServe the usual way: the baseline of bench/server.py.

`python bench/litserve_digits.py --port P` serves `POST /predict` on 127.0.0.1 only. Body:
`{"rows": [[[8 x 8 raw pixels]]]}` (one row, [1, 1, 8, 8]); answer: `{"probabilities": [10]}`.
Batching is on; predict repeats the batch N times, runs ONE forward with the dropout modules
in train mode and averages the softmax, as LitServe/MC-dropout tutorials do. No seeds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script (also in LitServe's spawned worker)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import litserve as ls

from mcdrop.repository.loading import load_module
from mcdrop.repository.manifest import MANIFEST_NAME, load_manifest

HOST = "127.0.0.1"


class DigitsAPI(ls.LitAPI):  # type: ignore[misc]
    """Vectorised MC dropout: [B, 1, 8, 8] -> B*N rows -> one forward -> mean softmax [B, 10]."""

    def __init__(self, folder: Path, samples: int, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.folder = folder
        self.samples = samples

    def setup(self, device: str) -> None:
        """Same network and weights as mcdrop; dropout modules sample, BatchNorm stays in eval."""
        spec = load_manifest(self.folder / MANIFEST_NAME)
        self.model = load_module(spec, self.folder).to(device).eval()
        for m in self.model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.train()
        norm = spec.normalization
        self.mean = float((norm.input_mean or [0.0])[0])
        self.std = float((norm.input_std or [1.0])[0])

    # LitServe builds its endpoint from these two signatures: left unannotated, as in its
    # docs, the body is read as plain JSON and the answer is not re-validated.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        """One raw row [1, 8, 8] (LitServe stacks these into the batch)."""
        return torch.tensor(request["rows"][0], dtype=torch.float32)

    def predict(self, x: Tensor) -> Tensor:
        """Mean class probabilities [B, 10] over `samples` dropout draws."""
        with torch.inference_mode():
            x = (x - self.mean) / self.std
            logits = self.model(x.repeat_interleave(self.samples, dim=0))
            probs = torch.softmax(logits, dim=-1)
            return probs.view(len(x), self.samples, -1).mean(dim=1)

    def encode_response(self, output):  # type: ignore[no-untyped-def]
        """One row's probabilities [10] as a JSON list."""
        return {"probabilities": output.tolist()}


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until terminated; nothing leaves 127.0.0.1 (no client file, no shutdown API)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", type=Path, default=Path(__file__).parents[1] / "models/digits")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout", type=float, default=0.002, help="seconds")
    args = parser.parse_args(argv)
    api = DigitsAPI(args.model.resolve(), args.samples, args.max_batch_size, args.batch_timeout)
    server = ls.LitServer(
        api,
        accelerator="cpu",
        devices=1,
        workers_per_device=1,
        timeout=60,
        fast_queue=False,
        enable_shutdown_api=False,
        track_requests=False,
    )
    server.run(
        host=HOST,
        port=args.port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
        access_log=False,
    )


if __name__ == "__main__":
    main()
