"""What the server benchmark asks and how answers are checked: held-out digits, 100 samples.

Every way is timed doing real work: each answer must be a valid probability vector, and its
predicted class is scored against the digit's label.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
MODEL = "digits"
MODEL_DIR = ROOT / "models" / MODEL
HOST = "127.0.0.1"  # the only address this benchmark ever talks to
SAMPLES = 100
CLASSES = 10
MCDROP, CEILING, LITSERVE, FLOOR = "mcdrop", "ceiling", "litserve", "http_floor"
WAYS: dict[str, str] = {
    MCDROP: "this server: uvicorn subprocess, POST /v1/models/digits/predict with a seed",
    CEILING: "in-process ceiling: ServedModel + engine.run_many on groups of c rows, no HTTP",
    LITSERVE: "LitServe subprocess, batching on, repeat_interleave + one forward (usual way)",
    FLOOR: "bare ASGI app under uvicorn, canned answer, no model: the client + HTTP limit",
}


@dataclass(frozen=True)
class Digits:
    """Held-out digits of the shipped model (index % 4 == 0): raw 0..16 pixels and labels."""

    images: Tensor  # [K, 1, 8, 8] float32
    labels: list[int]

    @classmethod
    def load(cls) -> Digits:
        """scikit-learn's bundled digits (no download), the test split of models/digits."""
        from sklearn.datasets import load_digits

        data = load_digits()
        images = torch.tensor(data.images[::4], dtype=torch.float32).unsqueeze(1)
        return cls(images, [int(v) for v in data.target[::4]])

    def row(self, i: int) -> Tensor:
        """Request i's single row [1, 1, 8, 8] (cycling through the test set)."""
        k = i % len(self.labels)
        return self.images[k : k + 1]

    def label(self, i: int) -> int:
        """True class of request i's digit."""
        return self.labels[i % len(self.labels)]

    def body(self, i: int) -> bytes:
        """Request i's JSON body, the same for every HTTP way: one row, 100 samples, seed i."""
        doc = {"rows": self.row(i).tolist(), "samples": SAMPLES, "seed": i}
        return json.dumps(doc).encode()


def check_probabilities(values: Sequence[float], what: str) -> int:
    """The predicted class of a valid probability vector [10]; ValueError otherwise."""
    if len(values) != CLASSES:
        raise ValueError(f"{what}: {len(values)} probabilities, expected {CLASSES}")
    if not all(isinstance(v, float | int) and math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{what}: probabilities must be finite and >= 0")
    if abs(sum(values) - 1.0) > 1e-4:
        raise ValueError(f"{what}: probabilities sum to {sum(values):.6f}, not 1")
    return max(range(CLASSES), key=lambda c: values[c])


def mcdrop_answer(body: bytes, seed: int) -> int:
    """The predicted class of a native predict answer for one row and `seed`; else ValueError."""
    doc = json.loads(body)
    if doc.get("samples_used") != SAMPLES or doc.get("seed") != seed:
        raise ValueError(
            f"mcdrop: samples_used/seed {doc.get('samples_used')}/{doc.get('seed')}"
            f", expected {SAMPLES}/{seed}"
        )
    predictions = doc.get("predictions")
    if not isinstance(predictions, list) or len(predictions) != 1:
        raise ValueError("mcdrop: expected one prediction")
    probs = predictions[0].get("probabilities", {})
    values = [probs.get(str(c), math.nan) for c in range(CLASSES)]
    predicted = check_probabilities(values, "mcdrop")
    if predictions[0].get("predicted") != str(predicted):
        raise ValueError("mcdrop: 'predicted' is not the most probable class")
    return predicted


def litserve_answer(body: bytes, seed: int) -> int:
    """The predicted class of a LitServe answer (unseeded: `seed` is unused); else ValueError."""
    probs = json.loads(body).get("probabilities")
    if not isinstance(probs, list):
        raise ValueError("litserve: no 'probabilities' list")
    return check_probabilities(probs, "litserve")


ANSWER_CHECKS: dict[str, Callable[[bytes, int], int]] = {
    MCDROP: mcdrop_answer,
    LITSERVE: litserve_answer,
    FLOOR: litserve_answer,
}
