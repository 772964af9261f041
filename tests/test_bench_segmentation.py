"""bench/segmentation.py: the recipes' per-pixel statistics by hand, and the benchmark run as a
user starts it (four timed ways, the engine/recipe check, the memory probes)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import segmentation as seg

ROOT = Path(__file__).resolve().parents[1]


def test_pixel_statistics_match_a_hand_computation() -> None:
    # two samples of a 1 x 2 map, 2 classes; pixel 0 flips between the classes, pixel 1 agrees
    p = torch.tensor([[[0.9, 0.5], [0.1, 0.5]], [[0.1, 0.5], [0.9, 0.5]]])  # [k=2, C=2, 1x2]
    stats = seg.PixelStatistics()
    stats.add(p.log()[:1].unsqueeze(2))  # softmax of log-probabilities gives p back
    stats.add(p.log()[1:].unsqueeze(2))
    out = stats.result()
    torch.testing.assert_close(out["probabilities"], torch.full((1, 2, 1, 2), 0.5))
    h_half = math.log(2.0)
    h_sample = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    expected = torch.tensor([[[h_sample, h_half]]])
    torch.testing.assert_close(out["entropy"], torch.full((1, 1, 2), h_half))
    torch.testing.assert_close(out["expected_entropy"], expected)
    mi = torch.tensor([[[h_half - h_sample, 0.0]]])
    torch.testing.assert_close(out["mutual_information"], mi, atol=1e-6, rtol=0)


def test_recipes_sample_dropout_only_and_agree() -> None:
    model = seg.segmenter(3, 16)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.running_mean is not None
    running = bn.running_mean.clone()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with seg.dropout_only(model):
        assert not bn.training
        assert all(m.training for m in model.modules() if isinstance(m, nn.Dropout2d))
    assert not model.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vectorised = seg.vectorised(model, x, 64, chunk=24)  # 24 + 24 + 16 rows
        torch.manual_seed(0)
        looped = seg.loop(model, x, 64)
    assert torch.equal(bn.running_mean, running)  # BatchNorm never saw batch statistics
    for name, shape in [("probabilities", (1, 3, 16, 16)), ("mutual_information", (1, 16, 16))]:
        assert vectorised[name].shape == shape
        assert looped[name].shape == shape
    mi = float(vectorised["mutual_information"].mean())
    assert mi > 1e-3  # He-initialised: the dropout samples disagree visibly
    # other mask draws, same distribution: the image means agree roughly
    assert 0.5 < float(looped["mutual_information"].mean()) / mi < 2.0


def test_stored_recipe_keeps_every_sample_and_gives_the_same_statistics() -> None:
    model = seg.segmenter(1, 8)
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        stored = seg.stored(model, x, 20, chunk=7)
        torch.manual_seed(0)
        streamed = seg.vectorised(model, x, 20, chunk=7)
    # same seed, same chunks: the same masks, so the same numbers up to summation order
    torch.testing.assert_close(stored["probabilities"], streamed["probabilities"][0])
    torch.testing.assert_close(
        stored["mutual_information"], streamed["mutual_information"][0], atol=1e-5, rtol=0
    )


@pytest.mark.slow
def test_the_benchmark_reports_four_ways_and_memory(tmp_path: Path) -> None:
    out = tmp_path / "segmentation.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "segmentation.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT / "bench",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert (report["size"], report["samples"], report["classes"]) == (64, 16, 3)
    assert set(report["ms"]) == set(seg.WAYS)
    assert all(v > 0 for v in report["ms"].values())
    assert report["to_dense"]["dense"] == 1.0
    check = report["check"]
    assert 0 < check["mi_ratio"] < 10
    assert 0 < check["entropy_ratio"] < 10
    assert 0 <= check["probability_max_abs_diff"] <= 1
    memory = report["memory"]
    assert (memory["size"], memory["samples"]) == (64, 100)
    assert memory["naive_samples_mib"] == pytest.approx(100 * 3 * 64 * 64 * 4 / 2**20)
    assert set(memory["ways"]) == set(seg.PROBES)
    for way in memory["ways"].values():
        assert way["reset"] is True
        assert way["rise_mib"] > 0
    # the probe sees torch's allocations: keeping every sample costs at least their tensor
    assert memory["ways"]["stored"]["rise_mib"] >= memory["naive_samples_mib"]
    assert "| way " in done.stdout
    assert "sample tensor" in done.stdout
