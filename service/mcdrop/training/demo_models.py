"""Regenerate the shipped demo models, deterministically: `python -m mcdrop.training.demo_models`.

toy-regression: a heteroscedastic MLP on 1-D data with a gap, whose epistemic uncertainty
grows in the gap and outside the data. digits: a CNN (dropout, batchnorm) on scikit-learn's
bundled 8x8 digits, uncertain about rotated or noisy digits. segmentation: a tiny fully
convolutional net labelling every pixel of generated 32x32 images of squares and discs,
uncertain where an image is noisier than anything it was trained on. Each trains in seconds
on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcdrop.config import Settings
from mcdrop.errors import ModelNotFound
from mcdrop.model import ServedModel
from mcdrop.repository.architectures import build_cnn, build_fcn
from mcdrop.repository.loading import load_module, save_weights
from mcdrop.repository.manifest import MANIFEST_NAME, load_manifest
from mcdrop.training.export import dumps_toml, write_model_folder
from mcdrop.training.recipe import (
    ClassifierConfig,
    TrainConfig,
    standardisation,
    standardise,
    train_classifier,
    train_regressor,
)
from mcdrop.uncertainty import ClassificationSummary, RegressionSummary

TOY = "toy-regression"
DIGITS = "digits"
SEGMENTATION = "segmentation"
TOY_SEGMENTS = ((-4.0, -1.0), (1.0, 4.0))  # training x; no data in the gap (-1, 1)
TOY_INSIDE = (-3.5, -3.0, -2.5, -2.0, 2.0, 2.5, 3.0, 3.5)
TOY_GAP = (-0.5, -0.25, 0.0, 0.25, 0.5)
TOY_OUTSIDE = (-7.0, -6.0, -5.0, 5.0, 6.0, 7.0)
TOY_EPOCHS = 200
DIGITS_EPOCHS = 30
DIGITS_CNN = {
    "in_channels": 1,
    "image_size": [8, 8],
    "out_features": 10,
    "channels": [16, 32],
    "hidden": 64,
    "dropout": 0.3,
    "batchnorm": True,
}


@contextmanager
def single_thread() -> Iterator[None]:
    """Train tiny networks on one thread: faster than two here, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- toy-regression -----------------------------------------------------------------------


def toy_function(x: np.ndarray) -> np.ndarray:
    """The smooth curve the toy data scatter around."""
    return np.asarray(np.sin(1.5 * x) + 0.3 * x)


def toy_noise_std(x: np.ndarray) -> np.ndarray:
    """Noise std of the toy data: grows with |x| (heteroscedastic)."""
    return np.asarray(0.05 + 0.08 * np.abs(x))


def toy_data(rows: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x [rows, 1] uniform on both segments (half each), y [rows] = curve + noise."""
    rng = np.random.default_rng(seed)
    halves = [rng.uniform(lo, hi, rows // 2) for lo, hi in TOY_SEGMENTS]
    x = np.concatenate(halves)
    y = toy_function(x) + rng.normal(0.0, 1.0, x.shape) * toy_noise_std(x)
    return x[:, None], y


def generate_toy_regression(out: Path, *, epochs: int = TOY_EPOCHS, seed: int = 0) -> Path:
    """Train and write `out/toy-regression`; the same seed gives the same bytes."""
    x, y = toy_data(seed=seed)
    config = TrainConfig(
        tau=10.0,  # only sets the weight decay here: the head predicts the noise
        hidden=[64, 64],
        dropout=0.1,
        input_dropout=0.0,
        epochs=epochs,
        batch_size=32,
        lr=1e-2,
        heteroscedastic=True,
        seed=seed,
    )
    with single_thread():
        trained = train_regressor(x, y, config, progress=False)
    (a, b), (c, d) = TOY_SEGMENTS
    return write_model_folder(
        out / TOY,
        TOY,
        trained,
        input_shape=[1],
        output_names=["y"],
        input_names=["x"],
        training_ranges=TOY_SEGMENTS,
        description=(
            f"Toy 1-D heteroscedastic regression, y = sin(1.5x) + 0.3x + noise whose std grows "
            f"with |x|. Trained on x in [{a}, {b}] and [{c}, {d}] only: the gap ({b}, {c}) and "
            f"|x| > {d} have no data, so epistemic uncertainty should grow there. "
            f"Regenerate: python -m mcdrop.training.demo_models --only {TOY}."
        ),
        mc={"default_samples": 200},
    )


# --- digits -------------------------------------------------------------------------------


def digits_holdout() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as raw pixels 0..16 [N, 1, 8, 8] and labels [N].

    A fixed split without randomness: every 4th image (index % 4 == 0) is held out.
    Returns x_train, y_train, x_test, y_test.
    """
    from sklearn.datasets import load_digits  # training/test extra, bundled data

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float64)[:, None]
    labels = np.asarray(digits.target, dtype=np.int64)
    test = np.arange(len(images)) % 4 == 0
    return images[~test], labels[~test], images[test], labels[test]


def rotate(images: Tensor | np.ndarray, degrees: float) -> Tensor:
    """Rotate raw images [N, C, H, W] about their centre; uncovered pixels become 0 (background)."""
    x = torch.as_tensor(images, dtype=torch.float32)
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def add_noise(images: Tensor | np.ndarray, std: float = 4.0, seed: int = 0) -> Tensor:
    """Raw images plus seeded Gaussian pixel noise, clipped to the 0..16 pixel range."""
    x = torch.as_tensor(images, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=gen)).clamp(0.0, 16.0)


def generate_digits(out: Path, *, epochs: int = DIGITS_EPOCHS, seed: int = 0) -> Path:
    """Train and write `out/digits`; the same seed gives the same bytes."""
    x_train, y_train, _, _ = digits_holdout()
    config = ClassifierConfig(epochs=epochs, batch_size=64, lr=3e-3, weight_decay=1e-4, seed=seed)

    def build() -> nn.Module:
        return build_cnn(**DIGITS_CNN)  # type: ignore[arg-type]

    with single_thread():
        trained = train_classifier(x_train, y_train, build, config, progress=False)
    return write_model_folder(
        out / DIGITS,
        DIGITS,
        trained,
        input_shape=[1, 8, 8],
        output_names=[str(k) for k in range(10)],
        architecture="cnn",
        config=DIGITS_CNN,
        description=(
            "Small CNN (dropout, batchnorm) on scikit-learn's bundled 8x8 digits. Input: raw "
            "pixel values 0..16, shape [1, 8, 8]. Held out: images whose index % 4 == 0. "
            "Rotated or noisy digits get higher mutual information than clean ones. "
            f"Regenerate: python -m mcdrop.training.demo_models --only {DIGITS}."
        ),
        mc={"default_samples": 100},
    )


TEST_DIGITS_PER_CLASS = 3


DASHBOARD_DIGITS = Path(__file__).parent / "static" / "dashboard" / "digits-test.json"


def write_test_digits(path: Path, per_class: int = TEST_DIGITS_PER_CLASS) -> Path:
    """Write the dashboard's test digits: the first held-out images (index % 4 == 0) of each class.

    JSON list of {"index": sklearn index, "label": int, "pixels": 8 x 8 raw values 0..16}.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    picked: list[dict[str, object]] = []
    counts = dict.fromkeys(range(10), 0)
    for index in range(0, len(digits.images), 4):
        label = int(digits.target[index])
        if counts[label] < per_class:
            counts[label] += 1
            pixels = [[int(v) for v in row] for row in digits.images[index]]
            picked.append({"index": index, "label": label, "pixels": pixels})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(picked, separators=(",", ":")) + "\n", encoding="utf-8")
    return path


# --- segmentation -------------------------------------------------------------------------

SEG_SIZE = 32  # images are [1, SEG_SIZE, SEG_SIZE]
SEG_CLASSES = ("background", "square", "disc")
SEG_SHAPE_SIDES = (8, 14)  # square side / disc diameter in pixels, inclusive range
SEG_INTENSITY = (0.6, 1.0)  # shapes are brighter than the background (mean 0)
SEG_TRAIN_NOISE = (0.05, 0.15)  # per-image Gaussian pixel noise std seen in training
SEG_UNSEEN_NOISE = 0.5  # extra noise std never seen in training (see noisy_right_quarter)
SEG_UNSEEN_FROM = 3 * SEG_SIZE // 4  # first column of the right-hand quarter
SEG_IMAGES = 512
SEG_EPOCHS = 12
SEG_HELD_OUT_SEED = 10_000  # segmentation_data seed of held-out images (training uses `seed`)
SEGMENTATION_FCN = {
    "in_channels": 1,
    "classes": len(SEG_CLASSES),
    "widths": [8, 16, 32],
    "dropout": 0.3,
    "batchnorm": True,
    "image_size": [SEG_SIZE, SEG_SIZE],
}


def segmentation_data(
    images: int, seed: int = 0, noise: tuple[float, float] = SEG_TRAIN_NOISE
) -> tuple[np.ndarray, np.ndarray]:
    """Raw images [N, 1, 32, 32] (float32) of 1-3 squares and discs and labels [N, 32, 32].

    Background pixels are N(0, s^2) noise, shape pixels intensity + N(0, s^2), with s drawn
    per image from `noise` and the intensity per shape from SEG_INTENSITY. Shapes may
    overlap (the later one wins) and may lie anywhere in the image. Label k is the index in
    SEG_CLASSES (0 background, 1 square, 2 disc).
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:SEG_SIZE, 0:SEG_SIZE] + 0.5  # pixel centres
    x = np.empty((images, 1, SEG_SIZE, SEG_SIZE), dtype=np.float32)
    y = np.zeros((images, SEG_SIZE, SEG_SIZE), dtype=np.int64)
    for i in range(images):
        std = rng.uniform(*noise)
        image = np.zeros((SEG_SIZE, SEG_SIZE))
        for _ in range(int(rng.integers(1, 4))):
            kind = int(rng.integers(1, len(SEG_CLASSES)))
            r = int(rng.integers(SEG_SHAPE_SIDES[0], SEG_SHAPE_SIDES[1] + 1)) / 2
            cx, cy = rng.uniform(r, SEG_SIZE - r, size=2)
            if SEG_CLASSES[kind] == "square":
                inside = (np.abs(cols - cx) <= r) & (np.abs(rows - cy) <= r)
            else:
                inside = (cols - cx) ** 2 + (rows - cy) ** 2 <= r * r
            image[inside] = rng.uniform(*SEG_INTENSITY)
            y[i][inside] = kind
        x[i, 0] = image + rng.normal(0.0, std, image.shape)
    return x, y


def noisy_right_quarter(
    images: Tensor | np.ndarray, std: float = SEG_UNSEEN_NOISE, seed: int = 0
) -> Tensor:
    """Raw images [N, 1, H, W] with seeded N(0, std^2) noise added to their right-hand quarter.

    The segmentation model never saw noise this strong: the input it has no data for, where
    its per-pixel mutual information should be higher. (A fully convolutional net is
    translation-equivariant, so a place it saw no shapes in would not look new to it.)
    """
    x = torch.as_tensor(images, dtype=torch.float32).clone()
    gen = torch.Generator().manual_seed(seed)
    right = x[..., SEG_UNSEEN_FROM:]
    x[..., SEG_UNSEEN_FROM:] = right + std * torch.randn(right.shape, generator=gen)
    return x


def _train_segmenter(
    x: Tensor, y: Tensor, *, epochs: int, seed: int
) -> tuple[nn.Module, Tensor, Tensor]:
    """Per-pixel cross-entropy + 1e-4 ||W||^2, Adam, batches of 8, on x [N, 1, H, W] raw pixels.

    Returns the network (eval mode) and the per-channel mean and std [1] it standardises by.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        mean, std = standardisation(x.double(), dim=(0, 2, 3))
        x_norm = standardise(x.double(), mean, std).float()
        module = build_fcn(**SEGMENTATION_FCN)  # type: ignore[arg-type]
        weights = [p for p in module.parameters() if p.dim() >= 2]
        optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
        module.train()
        for _ in range(epochs):
            order = torch.randperm(len(x_norm), generator=generator)
            for start in range(0, len(order), 8):
                batch = order[start : start + 8]
                loss = F.cross_entropy(module(x_norm[batch]), y[batch])
                loss = loss + 1e-4 * torch.stack([w.square().sum() for w in weights]).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
    return module.eval(), mean, std


def generate_segmentation(out: Path, *, epochs: int = SEG_EPOCHS, seed: int = 0) -> Path:
    """Train and write `out/segmentation`; the same seed gives the same bytes.

    The manifest declares per-pixel outputs: [output] shape [3, 32, 32] with the classes on
    axis 0 (class_axis), so the engine averages one softmax per pixel.
    """
    x, y = segmentation_data(SEG_IMAGES, seed=seed)
    with single_thread():
        module, mean, std = _train_segmenter(
            torch.from_numpy(x), torch.from_numpy(y), epochs=epochs, seed=seed
        )
    lo, hi = SEG_TRAIN_NOISE
    document = {
        "name": SEGMENTATION,
        "version": "1",
        "task": "classification",
        "description": (
            f"Tiny fully convolutional segmenter (batchnorm, channel dropout in the bottleneck) "
            f"on generated {SEG_SIZE}x{SEG_SIZE} one-channel images of 1-3 bright squares and "
            f"discs (intensity {SEG_INTENSITY[0]}..{SEG_INTENSITY[1]}) on a dark background. "
            f"Input: raw pixels, shape [1, {SEG_SIZE}, {SEG_SIZE}]. Output: per-pixel logits "
            f"[{len(SEG_CLASSES)}, {SEG_SIZE}, {SEG_SIZE}] for {', '.join(SEG_CLASSES)} "
            f"(classes on axis 0). Trained only on pixel noise of std {lo}..{hi}: where an "
            f"image is much noisier (e.g. std {SEG_UNSEEN_NOISE} added to its right quarter) "
            f"the per-pixel mutual information is higher. "
            f"Regenerate: python -m mcdrop.training.demo_models --only {SEGMENTATION}."
        ),
        "input": {"shape": [1, SEG_SIZE, SEG_SIZE], "dtype": "float32"},
        "output": {
            "names": list(SEG_CLASSES),
            "shape": [len(SEG_CLASSES), SEG_SIZE, SEG_SIZE],
            "class_axis": 0,
        },
        "model": {
            "format": "builtin",
            "architecture": "fcn",
            "weights": "weights.safetensors",
            "config": SEGMENTATION_FCN,
        },
        "normalization": {"input_mean": mean.tolist(), "input_std": std.tolist()},
        "mc": {"default_samples": 100},
    }
    return _write_folder(out / SEGMENTATION, document, module)


def _write_folder(folder: Path, document: Mapping[str, Any], module: nn.Module) -> Path:
    """Write model.toml + weights.safetensors, staged and read back through the server's loader.

    As training.export.write_model_folder does (which writes only vector outputs): the files
    replace the folder's only once the manifest validates and the weights round-trip bit for
    bit, so a folder that would not serve is never left.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_weights(module, staging / "weights.safetensors")
        (staging / MANIFEST_NAME).write_text(dumps_toml(document), encoding="utf-8")
        rebuilt = load_module(load_manifest(staging / MANIFEST_NAME), staging)
        expected = module.state_dict()
        for key, value in rebuilt.state_dict().items():
            if not torch.equal(value, expected[key]):
                raise ValueError(f"{folder}: weights {key!r} did not round-trip through the folder")
        folder.mkdir(exist_ok=True)
        for name in ("weights.safetensors", MANIFEST_NAME):
            (staging / name).chmod(0o644)  # safetensors writes 0600; servers must read it
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# --- the demo (`mcdrop demo`, `make serve`) --------------------------------------------------


def _load(name: str, settings: Settings) -> ServedModel:
    folder = settings.model_repository / name
    if not (folder / MANIFEST_NAME).is_file():
        raise ModelNotFound(f"{folder}: demo model missing; regenerate it with `make models`")
    return ServedModel.load(folder, settings)


def demo_text(settings: Settings) -> str:
    """Predictions of both shipped models that show where their uncertainty grows."""
    toy = _load(TOY, settings)
    points = {
        -3.0: "in the data",
        -0.5: "in the gap",
        0.0: "in the gap",
        2.5: "in the data",
        6.0: "outside the data",
    }
    s = toy.predict(torch.tensor(list(points))[:, None], toy.options(seed=0))
    assert isinstance(s, RegressionSummary)
    truth = toy_function(np.array(list(points)))
    table = [["x", "where", "mean", "true curve", "epistemic std", "aleatoric std"]]
    for r, (x, where) in enumerate(points.items()):
        table.append(
            [
                f"{x:g}",
                where,
                f"{float(s.mean[r, 0]):.2f}",
                f"{truth[r]:.2f}",
                f"{float(s.epistemic_variance[r, 0].sqrt()):.3f}",
                f"{float(s.aleatoric_variance[r, 0].sqrt()):.3f}",
            ]
        )
    lines = [
        f"{TOY}: trained on x in [-4, -1] and [1, 4] only ({s.samples_used} dropout samples)",
        *("  " + line for line in _columns(table)),
        "  epistemic std = how much the dropout samples disagree (the model's own doubt):",
        "  small where it saw data, larger in the gap, far larger outside. aleatoric std =",
        "  the noise the network predicts for y at x.",
        "",
    ]
    try:
        lines += _digits_demo(_load(DIGITS, settings))
    except ImportError:
        lines.append(f"{DIGITS}: skipped (needs scikit-learn: pip install 'mcdrop[train]')")
    return "\n".join(lines)


def _digits_demo(model: ServedModel) -> list[str]:
    _, _, x_test, y_test = digits_holdout()
    index = int(np.flatnonzero(y_test == 7)[0])
    clean = torch.as_tensor(x_test[index : index + 1], dtype=torch.float32)
    cases = {
        "clean test digit": clean,
        "rotated 75 degrees": rotate(clean, 75.0),
        "with pixel noise": add_noise(clean, seed=1),
    }
    s = model.predict(torch.cat(list(cases.values())), model.options(seed=0))
    assert isinstance(s, ClassificationSummary)
    table = [["image (a 7)", "predicted", "probability", "entropy", "mutual information"]]
    for r, name in enumerate(cases):
        k = int(s.predicted_class[r])
        table.append(
            [
                name,
                str(k),
                f"{float(s.probabilities[r, k]):.3f}",
                f"{float(s.entropy[r]):.3f}",
                f"{float(s.mutual_information[r]):.3f}",
            ]
        )
    return [
        f"{DIGITS}: a CNN on 8x8 digits ({s.samples_used} dropout samples)",
        *("  " + line for line in _columns(table)),
        "  entropy = total uncertainty of the averaged prediction (nats); mutual information",
        "  = the part that comes from the model (samples disagree), high for inputs unlike",
        "  its training data.",
    ]


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


GENERATORS: dict[str, Callable[[Path], Path]] = {
    TOY: generate_toy_regression,
    DIGITS: generate_digits,
    SEGMENTATION: generate_segmentation,
}


def main(argv: list[str] | None = None) -> int:
    """Regenerate the demo models into --out (all, or --only NAME)."""
    parser = argparse.ArgumentParser(
        prog="python -m mcdrop.training.demo_models", description=__doc__
    )
    parser.add_argument("--out", type=Path, default=Path("models"), help="model repository")
    parser.add_argument("--only", choices=sorted(GENERATORS), help="regenerate one model")
    parser.add_argument(
        "--test-digits", type=Path, default=DASHBOARD_DIGITS, help="the dashboard's test digits"
    )
    args = parser.parse_args(argv)
    for name in [args.only] if args.only else list(GENERATORS):
        folder = GENERATORS[name](args.out)
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"wrote {folder} ({size / 1024:.0f} KiB)")
    if args.only in (None, "digits"):
        print(f"wrote {write_test_digits(args.test_digits)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
