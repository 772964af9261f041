"""Seeded answers recorded from the shipped models stay bit-identical (a refactor's guard).

`tests/seeded_answers.json` holds the full JSON answers of a handful of seeded requests, native
and Open Inference Protocol, to both shipped models, as recorded before the package moved to
`mcdrop`. JSON floats round-trip exactly, so equal documents mean equal bits. Record anew
(only when answers are meant to change, and say why in the commit) with
`python tests/test_seeded_answers.py --record`.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from http_helpers import SHIPPED, oip_body, serve, settings_for

RECORDED = Path(__file__).with_name("seeded_answers.json")
DIGIT = [[[0, 0, 5, 13, 9, 1, 0, 0], [0, 0, 13, 15, 10, 15, 5, 0], [0, 3, 15, 2, 0, 11, 8, 0],
          [0, 4, 12, 0, 0, 8, 8, 0], [0, 5, 8, 0, 0, 9, 8, 0], [0, 4, 11, 0, 1, 12, 7, 0],
          [0, 2, 14, 5, 10, 12, 0, 0], [0, 0, 6, 13, 10, 0, 0, 0]]]  # fmt: skip
BLANK = [[[0.0] * 8] * 8]

# (name, method path, body): seeds, both mask modes, intervals, kept samples, batching of rows.
REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("toy native", "/v1/models/toy-regression/predict",
     {"rows": [[-3.0], [0.0], [2.5], [6.0]], "samples": 200, "seed": 7,
      "interval_levels": [0.9, 0.95], "return_samples": 4}),
    ("toy native shared", "/v1/models/toy-regression/predict",
     {"rows": [[-1.5], [1.5]], "samples": 64, "seed": 11, "mask_mode": "shared"}),
    ("toy oip", "/v2/models/toy-regression/infer",
     oip_body([[-2.0], [0.5]], {"mc_samples": 128, "seed": 3, "interval_levels": "0.8,0.99"})),
    ("digits native", "/v1/models/digits/predict",
     {"rows": [DIGIT, BLANK], "samples": 100, "seed": 5}),
    ("digits oip shared", "/v2/models/digits/infer",
     oip_body([DIGIT, BLANK, DIGIT], {"mc_samples": 48, "seed": 9, "mask_mode": "shared",
                                      "return_samples": 2}, flat=False)),
    ("toy evaluate", "/v1/models/toy-regression/evaluate",
     {"rows": [[1.0], [-2.0], [3.0]], "targets": [1.2, -0.9, 0.1], "samples": 100, "seed": 1}),
]  # fmt: skip


async def answers(repository: Path) -> dict[str, Any]:
    """The JSON answer of every request, by name, from an app over `repository`."""
    out: dict[str, Any] = {}
    async with serve(settings_for(repository)) as (_, client):
        for name, path, body in REQUESTS:
            response = await client.post(path, json=body)
            assert response.status_code == 200, (name, response.text)
            out[name] = response.json()
    return out


@pytest.mark.anyio
async def test_seeded_answers_are_bit_identical_to_the_recorded_ones() -> None:
    recorded = json.loads(RECORDED.read_text(encoding="utf-8"))
    now = await answers(SHIPPED)
    assert set(now) == set(recorded)
    for name in recorded:
        assert now[name] == recorded[name], name


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    document = asyncio.run(answers(SHIPPED))
    RECORDED.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"recorded {len(document)} answers in {RECORDED}")
