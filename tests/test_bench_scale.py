"""The scale benchmark runs end to end and its ways answer identical statistics.

No timing assertions: timing claims belong to bench/ and docs/scaling.md, not to tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from conftest import bench_module

pytestmark = pytest.mark.slow  # starts three worker processes


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """bench.scale, importable whether or not the repository root is on sys.path."""
    yield from bench_module("scale")


@pytest.fixture(scope="module")
def report(bench: ModuleType) -> dict[str, Any]:
    """One quick round with the Ray section asked for but its module absent."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "RAY_MODULE", "bench.no_such_module_for_this_test")
        result: dict[str, Any] = bench.main(
            ["--quick", "--json", "--repeats", "1", "--warmup", "0", "--ray"]
        )
    return result


def test_every_way_is_timed_and_the_ratios_follow_from_the_medians(
    report: dict[str, Any], bench: ModuleType
) -> None:
    split = report["split"]
    assert set(split["ways"]) == set(bench.WAYS)
    medians = {name: way["median_ms"] for name, way in split["ways"].items()}
    assert all(m > 0 and math.isfinite(m) for m in medians.values())
    assert split["speedup_2_vs_1_worker"] == pytest.approx(medians[bench.ONE] / medians[bench.TWO])
    assert (split["samples"], split["rows"]) == (512, 2)
    assert len(report["machine"]["load_average_after"]) == 3


def test_split_and_unsplit_answers_agree_to_summation_order(report: dict[str, Any]) -> None:
    differences = report["split"]["max_difference"]
    assert len(differences) == 2
    assert all(0 <= d < 1e-12 for d in differences.values())


def test_a_missing_ray_module_is_reported_not_hidden(report: dict[str, Any]) -> None:
    assert "no_such_module_for_this_test" in report["ray"]["skipped"]


def test_the_digits_are_the_shipped_held_out_images(bench: ModuleType) -> None:
    rows = bench.digit_rows(16)
    assert tuple(rows.shape) == (16, 1, 8, 8)
    assert float(rows.min()) >= 0
    assert float(rows.max()) <= 16
    with pytest.raises(ValueError, match="--rows"):
        bench.digit_rows(1000)
