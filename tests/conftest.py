"""Shared test helpers: write a small, valid MLP model folder (manifest + safetensors weights)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from ray_helpers import RayCluster, ray_unavailable, start_cluster, stop_cluster
from torch import Tensor, nn

from mcdrop.engine.partials import Shard, finish, merge_partials
from mcdrop.model import ServedModel
from mcdrop.repository.architectures import Activation, build_mlp
from mcdrop.repository.loading import save_weights
from mcdrop.repository.scan import fingerprint
from mcdrop.shards.executor import ModelRef, ShardExecutor, run_sharded
from mcdrop.uncertainty import ClassificationSummary, RegressionSummary


def toml_value(value: object) -> str:
    """One TOML value (bool, number, string or list of them), for hand-written manifests."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def toml_table(name: str, values: Mapping[str, object]) -> str:
    """A `[name]` table with one `key = value` line per entry whose value is not None."""
    lines = [f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def write_mlp_model(
    folder: Path,
    name: str | None = None,
    *,
    in_features: int = 2,
    outputs: Sequence[str] = ("y",),
    hidden: Sequence[int] = (8,),
    dropout: float = 0.1,
    input_dropout: float = 0.0,
    activation: Activation = "relu",
    task: str = "regression",
    heteroscedastic: bool = False,
    tau: float | None = None,
    input_mean: Sequence[float] | None = None,
    input_std: Sequence[float] | None = None,
    target_mean: Sequence[float] | None = None,
    target_std: Sequence[float] | None = None,
    sample: str | Sequence[str] = "all",
    mc: Mapping[str, object] | None = None,
    device: str = "cpu",
    state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> nn.Sequential:
    """Write `folder/model.toml` + `folder/weights.safetensors` for a built-in MLP.

    `name` defaults to the folder's name; `state` sets exact weights (else seeded random);
    `mc` adds keys to the [mc] table. Returns the network (eval mode) whose weights were written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n_out = len(outputs) * (2 if heteroscedastic else 1)
    torch.manual_seed(seed)
    module = build_mlp(in_features, n_out, list(hidden), dropout, input_dropout, activation)
    if state is not None:
        module.load_state_dict(dict(state), strict=True)
    module.eval()
    save_weights(module, folder / "weights.safetensors")
    manifest = f'name = "{name or folder.name}"\ntask = "{task}"\n\n'
    manifest += toml_table("input", {"shape": [in_features]})
    manifest += toml_table("output", {"names": list(outputs), "heteroscedastic": heteroscedastic})
    manifest += toml_table("model", {"format": "builtin", "architecture": "mlp"})
    manifest += toml_table(
        "model.config",
        {
            "hidden": list(hidden),
            "dropout": dropout,
            "input_dropout": input_dropout,
            "activation": activation,
        },
    )
    normalization = {
        "input_mean": input_mean,
        "input_std": input_std,
        "target_mean": target_mean,
        "target_std": target_std,
    }
    if any(v is not None for v in normalization.values()):
        manifest += toml_table("normalization", normalization)
    manifest += toml_table("mc", {"tau": tau, "sample": sample, **(mc or {})})
    manifest += toml_table("runtime", {"device": device})
    (folder / "model.toml").write_text(manifest, encoding="utf-8")
    return module


@pytest.fixture
def mlp_writer() -> Callable[..., nn.Sequential]:
    """`write_mlp_model` as a fixture, for test modules that prefer not to import conftest."""
    return write_mlp_model


@pytest.fixture(autouse=True)
def _no_mcdrop_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop every MCDROP_* variable so only the settings a test gives apply."""
    for key in [k for k in os.environ if k.startswith("MCDROP_")]:
        monkeypatch.delenv(key)


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio (the server's loop)."""
    return "asyncio"


def regression_summary(std: Sequence[Sequence[float]], samples: int = 10) -> RegressionSummary:
    """A hand-made summary whose total std is `std` [B, D] (all of it epistemic)."""
    s = torch.tensor(std, dtype=torch.float64)
    return RegressionSummary(
        mean=torch.zeros_like(s),
        epistemic_variance=s**2,
        aleatoric_variance=torch.zeros_like(s),
        samples_used=samples,
        seed=0,
    )


def classification_summary(
    entropy: Sequence[float],
    expected: Sequence[float],
    ratio: Sequence[float] | None = None,
    samples: int = 10,
) -> ClassificationSummary:
    """A hand-made two-class summary with these entropies and variation ratios [B]."""
    n = len(entropy)
    return ClassificationSummary(
        probabilities=torch.full((n, 2), 0.5),
        probabilities_std=torch.zeros(n, 2),
        entropy=torch.tensor(entropy),
        expected_entropy=torch.tensor(expected),
        variation_ratio=torch.zeros(n) if ratio is None else torch.tensor(ratio),
        samples_used=samples,
        seed=0,
    )


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """One local Ray cluster for the whole session; skips (saying why) where Ray may not start."""
    reason = ray_unavailable()
    if reason is not None:
        pytest.skip(reason)
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster()


def write_shard_test_models(root: Path) -> None:
    """`reg` (2 outputs, tau, raw units) and `cls` (3 classes): the sharding tests' models."""
    write_mlp_model(root / "reg", in_features=3, outputs=("a", "b"), hidden=(16,), tau=2.0,
                    target_mean=[1.0, 2.0], target_std=[3.0, 0.5])  # fmt: skip
    write_mlp_model(root / "cls", in_features=3, outputs=("x", "y", "z"), hidden=(16,),
                    task="classification", dropout=0.3)  # fmt: skip


def shard_ref(folder: Path) -> ModelRef:
    """The ModelRef a server would hand its shard executor for this model folder."""
    return ModelRef(folder.name, folder, fingerprint(folder))


def assert_split_answers_like_one_process(
    executor: ShardExecutor, folder: Path, mask_mode: str
) -> None:
    """A seeded 1,003-sample request split over `executor` equals the unsplit engine's answer."""
    model = ServedModel.load(folder)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    opts = model.options(1003, seed=7, mask_mode=mask_mode, return_samples=20)  # type: ignore[arg-type]
    request = model.request(x, opts)
    split = run_sharded(executor, shard_ref(folder), model.engine.head, request, min_shard=256)
    whole = model.engine.run_many([request])[0]
    assert type(split) is type(whole)
    if isinstance(whole, RegressionSummary):
        assert isinstance(split, RegressionSummary)
        for field in ("mean", "epistemic_variance", "aleatoric_variance", "samples"):
            torch.testing.assert_close(getattr(split, field), getattr(whole, field),
                                       rtol=1e-12, atol=1e-12, msg=field)  # fmt: skip
        low, high = whole.empirical_intervals[0.95].lower, whole.empirical_intervals[0.95].upper
        torch.testing.assert_close(split.empirical_intervals[0.95].lower, low)
        torch.testing.assert_close(split.empirical_intervals[0.95].upper, high)
    else:
        assert isinstance(whole, ClassificationSummary)
        assert isinstance(split, ClassificationSummary)
        for field in ("probabilities", "probabilities_std", "entropy", "expected_entropy",
                      "variation_ratio", "samples"):  # fmt: skip
            torch.testing.assert_close(getattr(split, field), getattr(whole, field),
                                       rtol=1e-12, atol=1e-12, msg=field)  # fmt: skip


def assert_uneven_shards_merge_exactly(executor: ShardExecutor, folder: Path) -> None:
    """Four uneven shards of a 1,000-sample request come back in order and merge to the
    unsplit engine's class probabilities."""
    model = ServedModel.load(folder)
    request = model.request(torch.ones(2, 3), model.options(1000, seed=1))
    shards = [Shard(a, b - a) for a, b in [(0, 200), (200, 304), (304, 640), (640, 1000)]]
    parts = executor.run_shards(shard_ref(folder), request, shards)
    assert [p.first for p in parts] == [0, 200, 304, 640]
    split = finish(model.engine.head, merge_partials(parts), 1, (0.95,), 0)
    whole = model.engine.run_many([request])[0]
    assert isinstance(split, ClassificationSummary)
    assert isinstance(whole, ClassificationSummary)
    torch.testing.assert_close(split.probabilities, whole.probabilities, rtol=1e-12, atol=1e-12)


def write_line_csv(path: Path, rows: int) -> Path:
    """y = 2a - b + noise(0.1) on `rows` rows, with a header line (seeded)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(rows, 2))
    y = 2 * x[:, 0] - x[:, 1] + rng.normal(0, 0.1, size=rows)
    np.savetxt(path, np.c_[x, y], delimiter=",", header="a,b,y", comments="")
    return path


REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def bench_module(name: str) -> Iterator[ModuleType]:
    """bench.<name>, importable whether or not the repository root is on sys.path.

    A generator for module-scoped fixtures: `yield from bench_module("server")`.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPOSITORY_ROOT))
        yield importlib.import_module(f"bench.{name}")


def summary_tensors(summary: RegressionSummary | ClassificationSummary) -> dict[str, Tensor]:
    """Every tensor of a summary by field name (intervals as field[level].lower/upper)."""
    out: dict[str, Tensor] = {}
    for f in dataclasses.fields(summary):
        value = getattr(summary, f.name)
        if isinstance(value, Tensor):
            out[f.name] = value
        elif isinstance(value, dict):
            for level, bounds in value.items():
                out[f"{f.name}[{level}].lower"] = bounds.lower
                out[f"{f.name}[{level}].upper"] = bounds.upper
    return out
