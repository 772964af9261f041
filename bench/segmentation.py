"""Benchmark: one segmentation request, per-pixel MC dropout, the engine against the recipes.

`python bench/segmentation.py` times, side by side in interleaved rounds, one request of
1 x 3 x 128 x 128 at 100 samples through the shipped segmentation demo's architecture (the
builtin `fcn`: conv encoder, Dropout2d bottleneck, upsampling decoder; BatchNorm kept in
eval) with in_channels=3 and seeded random weights:
  engine     mcdrop's MCEngine.run, class_axis 0 (built once, outside the timing): mean
             softmax, entropy, expected entropy, mutual information per pixel
  vectorised dropout only in training mode, the image repeated N times in one forward
             (--chunk rows at a time), softmax over the class axis, the same statistics
  loop       the same, N forward calls of the one image
  dense      one eval forward of the N repeated rows, no dropout, no statistics: the floor
Medians in ms and ratios to the dense floor. `check` compares the engine's mean mutual
information and entropy with the vectorised recipe's (other masks, so close, not equal):
a fast but wrong engine shows there. Dropout2d draws one mask per channel for all pixels,
so these image means rest on few independent draws: at 100 samples they move by about 10%
(at 2,000 samples engine and recipe agree within 1-2%).

Memory: one request of 1 x 1 x 256 x 256 at 1,000 samples, each way in a fresh Python
process (`--probe`): the peak resident set size during the call (Linux VmHWM, reset to the
current RSS just before through /proc/self/clear_refs) minus the RSS before it, once the
model and the engine are built. RSS sees torch's CPU allocations, which tracemalloc does not;
getrusage's ru_maxrss cannot be reset and, across fork and exec, starts at the parent's
size. The engine is built with audit="off" there: it keeps freed heap for reuse, so memory
left over from the load-time audit (1,000 samples on probe rows) would serve the request
without raising RSS. The `stored` way (the naive recipe: every sample's softmax kept in one
[1000, C, 256, 256] float32 tensor, statistics taken from it) is measured the same way, next
to that tensor's size, and shows the probe sees torch memory. Peaks are in MiB; `--json`
prints the figures as one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(ROOT))

from bench.common import emit, format_table, interleaved, machine, torch_threads  # noqa: E402
from mcdrop.engine.core import MCEngine, MCOptions  # noqa: E402
from mcdrop.repository.architectures import build_fcn  # noqa: E402
from mcdrop.training.demo_models import SEG_CLASSES, SEGMENTATION_FCN  # noqa: E402
from mcdrop.uncertainty import ClassificationSummary  # noqa: E402

WAYS = ("engine", "vectorised", "loop", "dense")
PROBES = ("engine", "stored")
CLASSES = len(SEG_CLASSES)
MIB = 1 << 20


def segmenter(in_channels: int, size: int, seed: int = 0) -> nn.Module:
    """The demo's fcn for [B, in_channels, size, size] rows, seeded random weights, eval.

    Convolutions are He-initialised (biases 0) so the logits are of order one: PyTorch's
    default init shrinks the signal about 25x over the six convolutions, which leaves a
    near-uniform softmax and mutual information of order 1e-6, too small to compare.
    """
    config = {**SEGMENTATION_FCN, "in_channels": in_channels, "image_size": [size, size]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_fcn(**config)  # type: ignore[arg-type]
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return model.eval()


@contextmanager
def dropout_only(model: nn.Module) -> Iterator[nn.Module]:
    """The recipe's sampling mode: dropout layers in training mode, the rest (BatchNorm) eval."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train()
    try:
        yield model
    finally:
        model.eval()


class PixelStatistics:
    """Streaming per-pixel sums over samples of softmax maps [k, C, H, W] (class axis 1)."""

    def __init__(self) -> None:
        self.n = 0
        self.p_sum: Tensor | None = None  # [C, H, W]
        self.entropy_sum: Tensor | None = None  # [H, W]

    def add(self, logits: Tensor) -> None:
        """Fold in k samples of one row's logits [k, C, H, W]."""
        p = torch.softmax(logits, dim=1)
        p_sum, entropy = p.sum(dim=0), -torch.special.xlogy(p, p).sum(dim=1).sum(dim=0)
        self.p_sum = p_sum if self.p_sum is None else self.p_sum + p_sum
        self.entropy_sum = entropy if self.entropy_sum is None else self.entropy_sum + entropy
        self.n += len(p)

    def result(self) -> dict[str, Tensor]:
        """Mean probabilities [1, C, H, W]; entropy, expected entropy, MI [1, H, W] (nats)."""
        if self.p_sum is None or self.entropy_sum is None:
            raise ValueError("no samples added")
        mean = self.p_sum / self.n
        entropy = -torch.special.xlogy(mean, mean).sum(dim=0)
        expected = self.entropy_sum / self.n
        return {
            "probabilities": mean[None],
            "entropy": entropy[None],
            "expected_entropy": expected[None],
            "mutual_information": (entropy - expected).clamp_min(0.0)[None],
        }


def vectorised(model: nn.Module, x: Tensor, samples: int, chunk: int) -> dict[str, Tensor]:
    """The usual vectorised way for one row x [1, C_in, H, W]: `chunk` repeats per forward."""
    stats = PixelStatistics()
    repeated = x.expand(min(chunk, samples), *x.shape[1:]).contiguous()
    with dropout_only(model), torch.inference_mode():
        for start in range(0, samples, chunk):
            stats.add(model(repeated[: min(chunk, samples - start)]))
    return stats.result()


def loop(model: nn.Module, x: Tensor, samples: int) -> dict[str, Tensor]:
    """Most tutorials' way: `samples` forward calls of the one row x [1, C_in, H, W]."""
    stats = PixelStatistics()
    with dropout_only(model), torch.inference_mode():
        for _ in range(samples):
            stats.add(model(x))
    return stats.result()


def engine_for(model: nn.Module, channels: int, size: int, **kwargs: Any) -> MCEngine:
    """mcdrop's engine on per-pixel logits [classes, size, size] (classes on axis 0)."""
    return MCEngine(
        model, task="classification", input_shape=(channels, size, size), class_axis=0, **kwargs
    )


def _ways(args: argparse.Namespace) -> tuple[dict[str, Callable[[], object]], dict[str, float]]:
    """The four timed calls, and the engine's statistics against the vectorised recipe's."""
    size, samples, channels = args.size, args.samples, 3
    model = segmenter(channels, size)
    x = torch.randn((1, channels, size, size), generator=torch.Generator().manual_seed(0))
    expanded = x.expand(samples, channels, size, size).contiguous()
    engine = engine_for(segmenter(channels, size), channels, size)
    options = MCOptions(samples=samples, seed=0, interval_levels=())

    def dense() -> object:
        with torch.inference_mode():
            return model.eval()(expanded)

    summary = engine.run(x, options)
    assert isinstance(summary, ClassificationSummary)
    expected_maps = {
        "probabilities": (1, CLASSES, size, size),
        "entropy": (1, size, size),
        "mutual_information": (1, size, size),
    }
    for name, shape in expected_maps.items():
        got = tuple(getattr(summary, name).shape)
        assert got == shape, f"engine {name}: {got}, expected {shape}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        recipe = vectorised(model, x, samples, args.chunk)
    mi = float(recipe["mutual_information"].double().mean())
    check = {
        "mi_ratio": float(summary.mutual_information.double().mean()) / mi,
        "entropy_ratio": float(summary.entropy.double().mean())
        / float(recipe["entropy"].double().mean()),
        "probability_max_abs_diff": float(
            (summary.probabilities.double() - recipe["probabilities"].double()).abs().max()
        ),
    }
    ways: dict[str, Callable[[], object]] = {
        "engine": lambda: engine.run(x, options),
        "vectorised": lambda: vectorised(model, x, samples, args.chunk),
        "loop": lambda: loop(model, x, samples),
        "dense": dense,
    }
    return ways, check


# --- memory: one way per fresh process -------------------------------------------------------


def _status_kib(field: str) -> int:
    """A `VmRSS:`-style line of /proc/self/status, in KiB (Linux)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def probe(way: str, size: int, samples: int, chunk: int) -> dict[str, Any]:
    """Run one request of 1 x 1 x size x size the given way; the peak RSS rise it caused.

    The rise is VmHWM after the call minus VmRSS before it, with VmHWM reset just before
    (`reset`); without the reset the earlier peak of the process (the imports, the build)
    may hide the call's, and rise_mib is then only an upper bound.
    """
    if way not in PROBES:
        raise ValueError(f"--probe: expected one of {PROBES}, got {way!r}")
    model = segmenter(1, size)
    x = torch.randn((1, 1, size, size), generator=torch.Generator().manual_seed(0))
    engine = engine_for(model, 1, size, audit="off") if way == "engine" else None
    options = MCOptions(samples=samples, seed=0, interval_levels=())
    gc.collect()
    reset = _reset_peak()
    before = _status_kib("VmRSS")
    if engine is not None:
        engine.run(x, options)
    else:
        stored(model, x, samples, chunk)
    peak = _status_kib("VmHWM")
    return {
        "way": way,
        "rise_mib": (peak - before) / 1024,
        "reset": reset,
        "rss_before_mib": before / 1024,
    }


def stored(model: nn.Module, x: Tensor, samples: int, chunk: int) -> dict[str, Tensor]:
    """The naive recipe: all samples' softmax maps in one [samples, C, H, W] tensor first."""
    probs = torch.empty((samples, CLASSES, *x.shape[2:]))
    repeated = x.expand(min(chunk, samples), *x.shape[1:]).contiguous()
    with dropout_only(model), torch.inference_mode():
        for start in range(0, samples, chunk):
            k = min(chunk, samples - start)
            probs[start : start + k] = torch.softmax(model(repeated[:k]), dim=1)
        mean = probs.mean(dim=0)
        entropy = -torch.special.xlogy(mean, mean).sum(dim=0)
        expected = -torch.special.xlogy(probs, probs).sum(dim=1).mean(dim=0)
    return {"probabilities": mean, "mutual_information": entropy - expected}


def memory(args: argparse.Namespace) -> dict[str, Any]:
    """Each probe in its own interpreter, so no earlier allocation sets its peak."""
    size, samples = args.memory_size, args.memory_samples
    ways = {}
    for way in PROBES:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--probe",
            way,
            "--memory-size",
            str(size),
            "--memory-samples",
            str(samples),
            "--chunk",
            str(args.chunk),
        ]
        if args.threads is not None:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe {way} failed:\n{done.stderr[-3000:]}")
        ways[way] = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "rows": 1,
        "channels": 1,
        "size": size,
        "samples": samples,
        "classes": CLASSES,
        "naive_samples_mib": samples * CLASSES * size * size * 4 / MIB,
        "ways": ways,
        "method": "VmHWM after the call minus VmRSS before it, peak reset just before, "
        "a fresh process per way, engine built with audit='off'",
    }


# --- the report -----------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """All ways interleaved, medians and ratios; then the memory probes."""
    ways, check = _ways(args)
    times = interleaved(ways, args.rounds)
    ms = {way: median(times[way]) for way in ways}
    return {
        "machine": machine(),
        "rows": 1,
        "channels": 3,
        "size": args.size,
        "classes": CLASSES,
        "samples": args.samples,
        "chunk": args.chunk,
        "rounds": args.rounds,
        "ms": ms,
        "to_dense": {w: ms[w] / ms["dense"] for w in ways},
        "check": check,
        "memory": memory(args),
    }


def render(report: dict[str, Any]) -> str:
    """The timing table, the engine/recipe check, the memory figures."""
    ms, dense = report["ms"], report["to_dense"]
    rows = [
        [
            w,
            f"{ms[w]:.1f}",
            f"{dense[w]:.2f}",
            "-" if w == "engine" else f"{ms[w] / ms['engine']:.2f}x",
        ]
        for w in WAYS
    ]
    title = (
        f"segmentation: 1 x 3 x {report['size']} x {report['size']} -> "
        f"[{report['classes']}, {report['size']}, {report['size']}] per pixel, "
        f"{report['samples']} samples, medians of {report['rounds']} rounds"
    )
    c = report["check"]
    mem = report["memory"]
    lines = [
        title,
        format_table(["way", "ms", "to dense", "its time / engine's"], rows),
        f"engine vs vectorised: mean MI ratio {c['mi_ratio']:.3f}, mean entropy ratio "
        f"{c['entropy_ratio']:.3f}, max |probability difference| "
        f"{c['probability_max_abs_diff']:.3f}",
        f"memory, 1 x 1 x {mem['size']} x {mem['size']} at {mem['samples']} samples "
        f"(peak RSS rise, fresh process each; {mem['method']}):",
    ]
    for way, figures in mem["ways"].items():
        bound = "" if figures["reset"] else " (upper bound: the peak could not be reset)"
        lines.append(f"  {way}: {figures['rise_mib']:.0f} MiB{bound}")
    naive = f"[{mem['samples']}, {mem['classes']}, {mem['size']}, {mem['size']}]"
    lines.append(f"  the naive {naive} float32 sample tensor: {mem['naive_samples_mib']:.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="timed image height = width")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--chunk", type=int, default=100, help="rows per recipe forward")
    parser.add_argument("--memory-size", type=int, default=256)
    parser.add_argument("--memory-samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--quick", action="store_true", help="64 x 64 x 16 samples, 3 rounds; memory 64 x 64 x 100"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, help="also save the JSON here")
    parser.add_argument("--probe", choices=PROBES, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.samples, args.rounds = 64, 16, 3
        args.memory_size, args.memory_samples = 64, 100
    if args.probe:
        with torch_threads(args.threads):
            figures = probe(args.probe, args.memory_size, args.memory_samples, args.chunk)
        print(json.dumps(figures))
        return figures
    with torch_threads(args.threads):
        report = measure(args)
    emit(report, render, args.json, args.out)
    return report


if __name__ == "__main__":
    main()
