"""Model loading: built-in, entrypoint and TorchScript formats; strict weights; no unpickling."""

from __future__ import annotations

import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from conftest import toml_table, write_mlp_model
from safetensors.torch import save_file
from torch import nn

from mcdrop.config import Settings
from mcdrop.errors import ModelLoadError
from mcdrop.model import ServedModel
from mcdrop.repository.architectures import build_cnn
from mcdrop.repository.loading import load_module, read_safetensors, save_weights
from mcdrop.repository.manifest import ModelSpec, load_manifest


class _Exploit:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _write_manifest(
    folder: Path, model: Mapping[str, object], shape: tuple[int, ...] = (2,), n_out: int = 1
) -> ModelSpec:
    """A regression manifest with one output and the given [model] table; returns its spec."""
    folder.mkdir(parents=True, exist_ok=True)
    text = f'name = "{folder.name}"\ntask = "regression"\n'
    text += toml_table("input", {"shape": list(shape)})
    text += toml_table("output", {"names": [f"y{i}" for i in range(n_out)]})
    config = {k: v for k, v in model.items() if isinstance(v, dict)}
    text += toml_table("model", {k: v for k, v in model.items() if k not in config})
    for key, table in config.items():
        text += toml_table(f"model.{key}", table)
    (folder / "model.toml").write_text(text, encoding="utf-8")
    return load_manifest(folder / "model.toml")


def _load(folder: Path) -> nn.Module:
    return load_module(load_manifest(folder / "model.toml"), folder)


def _script(module: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13 but still served
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(path))


def _pickle_bomb(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Exploit(marker)))


def _zip_bomb(path: Path, marker: Path) -> None:
    """A zip laid out like a torch.save / TorchScript archive whose pickles run a command."""
    payload = pickle.dumps(_Exploit(marker), protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/constants.pkl", payload)
        z.writestr("archive/version", "3\n")


# --- built-in architectures + safetensors ---------------------------------------------------


def test_builtin_mlp_round_trip_is_bit_for_bit(tmp_path: Path) -> None:
    original = write_mlp_model(tmp_path / "m", in_features=3, hidden=[8, 4], input_dropout=0.2)
    loaded = _load(tmp_path / "m")
    assert not loaded.training
    assert all(m.training is False for m in loaded.modules())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.parameters())
    x = torch.randn(6, 3)
    assert torch.equal(loaded(x), original(x))
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_builtin_cnn_round_trip_keeps_batchnorm_statistics(tmp_path: Path) -> None:
    folder = tmp_path / "cnn"
    torch.manual_seed(1)
    original = build_cnn(1, [8, 8], 3, channels=[4], hidden=6, batchnorm=True)
    original.train()
    original(torch.randn(16, 1, 8, 8))  # move running statistics away from 0/1
    original.eval()
    save_weights(original, folder / "weights.safetensors")
    model = {
        "format": "builtin",
        "architecture": "cnn",
        "config": {"channels": [4], "hidden": 6, "batchnorm": True},
    }
    spec = _write_manifest(folder, model, shape=(1, 8, 8), n_out=3)
    loaded = load_module(spec, folder)
    running_mean = loaded.get_submodule("bn0").get_buffer("running_mean")
    assert torch.equal(running_mean, original.get_buffer("bn0.running_mean"))
    assert running_mean.abs().sum() > 0
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), original(x))


def test_save_weights_handles_tied_parameters(tmp_path: Path) -> None:
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    save_weights(nn.Sequential(first, second), tmp_path / "w.safetensors")
    state = read_safetensors(tmp_path / "w.safetensors")
    assert torch.equal(state["0.weight"], state["1.weight"])
    assert torch.equal(state["0.weight"], first.weight.detach())


def test_float64_weights_are_cast_to_float32(tmp_path: Path) -> None:
    original = write_mlp_model(tmp_path / "m")
    save_file(
        {k: v.double() for k, v in original.state_dict().items()},
        str(tmp_path / "m" / "weights.safetensors"),
    )
    loaded = _load(tmp_path / "m")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randn(4, 2)
    assert torch.allclose(loaded(x), original(x))


def _rewrite_weights(folder: Path, state: Mapping[str, torch.Tensor]) -> Path:
    path = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_missing_key_is_named_with_the_file(tmp_path: Path) -> None:
    state = dict(write_mlp_model(tmp_path / "m").state_dict())
    del state["out.bias"]
    path = _rewrite_weights(tmp_path / "m", state)
    with pytest.raises(ModelLoadError, match=r"missing keys \[out\.bias\]") as info:
        _load(tmp_path / "m")
    assert str(info.value).startswith(f"{path}: ")


def test_unexpected_key_is_named_with_the_file(tmp_path: Path) -> None:
    state = dict(write_mlp_model(tmp_path / "m").state_dict())
    state["extra.weight"] = torch.zeros(2)
    path = _rewrite_weights(tmp_path / "m", state)
    with pytest.raises(ModelLoadError, match=r"unexpected keys \[extra\.weight\]") as info:
        _load(tmp_path / "m")
    assert str(info.value).startswith(f"{path}: ")


def test_shape_mismatch_names_key_and_both_shapes(tmp_path: Path) -> None:
    write_mlp_model(tmp_path / "m", hidden=[8])
    other = write_mlp_model(tmp_path / "other", hidden=[5])
    path = _rewrite_weights(tmp_path / "m", other.state_dict())
    with pytest.raises(ModelLoadError) as info:
        _load(tmp_path / "m")
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "fc0.weight: file has [5, 2], model expects [8, 2]" in message
    assert "out.weight: file has [1, 5], model expects [1, 8]" in message


def test_missing_weights_file(tmp_path: Path) -> None:
    write_mlp_model(tmp_path / "m")
    (tmp_path / "m" / "weights.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="weights file not found") as info:
        _load(tmp_path / "m")
    assert str(info.value).startswith(str(tmp_path / "m" / "weights.safetensors"))


def test_architecture_error_names_the_manifest(tmp_path: Path) -> None:
    model = {"format": "builtin", "architecture": "mlp", "config": {"hiden": [4]}}
    spec = _write_manifest(tmp_path / "m", model)
    with pytest.raises(ModelLoadError) as info:
        load_module(spec, tmp_path / "m")
    assert str(info.value).startswith(f"{tmp_path / 'm' / 'model.toml'}: model.config.hiden: ")


def test_pickle_in_place_of_safetensors_is_refused_unopened(tmp_path: Path) -> None:
    write_mlp_model(tmp_path / "m")
    weights, marker = tmp_path / "m" / "weights.safetensors", tmp_path / "pwned"
    _pickle_bomb(weights, marker)
    with pytest.raises(ModelLoadError, match=r"not a safetensors file.*pickle") as info:
        _load(tmp_path / "m")
    assert str(info.value).startswith(str(weights))
    assert not marker.exists()


def test_torch_save_archive_in_place_of_safetensors_is_refused(tmp_path: Path) -> None:
    write_mlp_model(tmp_path / "m")
    weights, marker = tmp_path / "m" / "weights.safetensors", tmp_path / "pwned"
    _zip_bomb(weights, marker)
    with pytest.raises(ModelLoadError, match=r"not a safetensors file.*zip archive"):
        _load(tmp_path / "m")
    assert not marker.exists()


@pytest.mark.parametrize(
    "content", [b"", b"abc", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxx"]
)
def test_garbage_weights_are_not_safetensors(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "w.safetensors").write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"w\.safetensors: not a safetensors file"):
        read_safetensors(tmp_path / "w.safetensors")


# --- TorchScript ---------------------------------------------------------------------------


def _torchscript_folder(folder: Path, weights: str = "model.pt") -> ModelSpec:
    return _write_manifest(folder, {"format": "torchscript", "weights": weights})


def test_torchscript_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Dropout(0.3), nn.Linear(4, 1)).eval()
    spec = _torchscript_folder(tmp_path / "ts")
    _script(original, tmp_path / "ts" / "model.pt")
    loaded = load_module(spec, tmp_path / "ts")
    assert isinstance(loaded, torch.jit.ScriptModule)
    assert not loaded.training
    x = torch.randn(5, 2)
    assert torch.equal(loaded(x), original(x))


def test_torchscript_pickle_is_refused_unopened(tmp_path: Path) -> None:
    spec = _torchscript_folder(tmp_path / "ts")
    archive, marker = tmp_path / "ts" / "model.pt", tmp_path / "pwned"
    _pickle_bomb(archive, marker)
    with pytest.raises(ModelLoadError, match=r"not a TorchScript archive.*pickle") as info:
        load_module(spec, tmp_path / "ts")
    assert str(info.value).startswith(str(archive))
    assert not marker.exists()


def test_torchscript_zip_with_malicious_pickles_is_refused(tmp_path: Path) -> None:
    spec = _torchscript_folder(tmp_path / "ts")
    archive, marker = tmp_path / "ts" / "model.pt", tmp_path / "pwned"
    _zip_bomb(archive, marker)
    with pytest.raises(ModelLoadError, match="not a loadable TorchScript archive") as info:
        load_module(spec, tmp_path / "ts")
    assert str(info.value).startswith(str(archive))
    assert not marker.exists()


def test_torchscript_missing_file(tmp_path: Path) -> None:
    spec = _torchscript_folder(tmp_path / "ts")
    with pytest.raises(ModelLoadError, match=r"model\.pt: TorchScript archive not found"):
        load_module(spec, tmp_path / "ts")


# --- entrypoint: user factory + safetensors ------------------------------------------------

_ARCH = """
from torch import nn


def build(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, {n_out}))


def not_a_module() -> object:
    return "hello"


def broken() -> nn.Module:
    raise RuntimeError("factory exploded")
"""


def _entrypoint_folder(
    folder: Path, entrypoint: str, config: Mapping[str, object], n_out: int = 1
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "arch.py").write_text(_ARCH.format(n_out=n_out), encoding="utf-8")
    model = {"format": "entrypoint", "entrypoint": entrypoint, "config": dict(config)}
    _write_manifest(folder, model)
    return folder


def test_entrypoint_from_model_folder_round_trip(tmp_path: Path) -> None:
    folder = _entrypoint_folder(tmp_path / "user", "arch:build", {"width": 5})
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Dropout(0.2), nn.Linear(5, 1)).eval()
    save_weights(original, folder / "weights.safetensors")
    loaded = _load(folder)
    assert not loaded.training
    x = torch.randn(3, 2)
    assert torch.equal(loaded(x), original(x))


def test_two_folders_with_the_same_module_name_do_not_clash(tmp_path: Path) -> None:
    one = _entrypoint_folder(tmp_path / "one", "arch:build", {"width": 3}, n_out=1)
    two = _entrypoint_folder(tmp_path / "two", "arch:build", {"width": 3}, n_out=4)
    for folder, n_out in ((one, 1), (two, 4)):
        net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Dropout(0.2), nn.Linear(3, n_out))
        save_weights(net, folder / "weights.safetensors")
    first, second = _load(one), _load(two)
    assert first(torch.zeros(1, 2)).shape == (1, 1)
    assert second(torch.zeros(1, 2)).shape == (1, 4)
    assert "arch" not in sys.modules


def test_entrypoint_imported_from_installed_package(tmp_path: Path) -> None:
    folder = tmp_path / "lin"
    _write_manifest(
        folder,
        {
            "format": "entrypoint",
            "entrypoint": "torch.nn:Linear",
            "config": {"in_features": 2, "out_features": 1},
        },
    )
    original = nn.Linear(2, 1)
    save_weights(original, folder / "weights.safetensors")
    loaded = _load(folder)
    assert isinstance(loaded, nn.Linear)
    x = torch.randn(2, 2)
    assert torch.equal(loaded(x), original(x))


@pytest.mark.parametrize(
    ("entrypoint", "config", "message"),
    [
        (
            "arch:build",
            {"widht": 3},
            r"model\.config\.widht: unknown argument for arch:build \(expected one of width\)",
        ),
        ("arch:build", {}, r"model\.config: arguments do not fit arch:build: .*'width'"),
        (
            "arch:not_a_module",
            {},
            r"model\.entrypoint: .* returned str, expected a torch\.nn\.Module",
        ),
        ("arch:missing", {}, r"model\.entrypoint: 'arch' has no callable 'missing'"),
        (
            "arch:broken",
            {},
            r"model\.entrypoint: arch:broken\(\*\*model\.config\) failed: .*exploded",
        ),
        ("no_such_pkg.mod:build", {}, r"model\.entrypoint: cannot import 'no_such_pkg\.mod'"),
    ],
)
def test_entrypoint_errors_name_manifest_and_field(
    tmp_path: Path, entrypoint: str, config: dict[str, object], message: str
) -> None:
    folder = _entrypoint_folder(tmp_path / "user", entrypoint, config)
    with pytest.raises(ModelLoadError, match=message) as info:
        _load(folder)
    assert str(info.value).startswith(f"{folder / 'model.toml'}: ")


def test_entrypoint_module_that_fails_to_import(tmp_path: Path) -> None:
    folder = _entrypoint_folder(tmp_path / "user", "arch:build", {"width": 3})
    (folder / "arch.py").write_text("raise ImportError('needs a missing dependency')\n")
    with pytest.raises(ModelLoadError, match=r"cannot import .*arch\.py: .*missing dependency"):
        _load(folder)


# --- non-finite weights -------------------------------------------------------------------------


def test_nan_and_inf_weights_are_refused_naming_the_tensors_and_the_file(tmp_path: Path) -> None:
    state = dict(write_mlp_model(tmp_path / "m").state_dict())
    state["fc0.weight"] = torch.full_like(state["fc0.weight"], float("nan"))
    state["out.bias"] = torch.tensor([float("inf")])
    path = _rewrite_weights(tmp_path / "m", state)  # a well-formed safetensors file
    with pytest.raises(ModelLoadError) as info:
        _load(tmp_path / "m")
    assert str(info.value) == (
        f"{path}: NaN or infinite values (as float32) in tensors [fc0.weight, out.bias]"
    )


def test_float64_weights_that_overflow_float32_are_refused(tmp_path: Path) -> None:
    state = {k: v.double() for k, v in write_mlp_model(tmp_path / "m").state_dict().items()}
    state["out.weight"] = torch.full_like(state["out.weight"], 1e300)  # finite in float64 only
    _rewrite_weights(tmp_path / "m", state)
    with pytest.raises(ModelLoadError, match=r"safetensors: .* in tensors \[out\.weight\]$"):
        _load(tmp_path / "m")


def test_many_non_finite_tensors_are_listed_first_eight_then_counted(tmp_path: Path) -> None:
    model = write_mlp_model(tmp_path / "m", hidden=(4, 4, 4, 4, 4))  # 12 tensors
    _rewrite_weights(
        tmp_path / "m", {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}
    )
    with pytest.raises(ModelLoadError) as info:
        _load(tmp_path / "m")
    names = ", ".join(list(model.state_dict())[:8])
    assert str(info.value).endswith(f"in tensors [{names} ... and 4 more]")


def test_torchscript_with_non_finite_parameters_or_buffers_is_refused(tmp_path: Path) -> None:
    norm, last = nn.BatchNorm1d(4), nn.Linear(4, 1)
    original = nn.Sequential(nn.Linear(2, 4), norm, nn.Dropout(0.3), last)
    with torch.no_grad():
        last.bias.fill_(float("nan"))
        assert norm.running_var is not None
        norm.running_var.fill_(float("inf"))  # a buffer, not a parameter
    spec = _torchscript_folder(tmp_path / "ts")
    _script(original.eval(), tmp_path / "ts" / "model.pt")
    with pytest.raises(ModelLoadError) as info:
        load_module(spec, tmp_path / "ts")
    assert str(info.value) == (
        f"{tmp_path / 'ts' / 'model.pt'}: NaN or infinite values (as float32) in tensors "
        "[3.bias, 1.running_var]"
    )


# --- the model's outputs against the manifest's ---------------------------------------------

SEGMENTER = '''
import torch
from torch import nn


class Segmenter(nn.Module):
    """Per-pixel logits [B, 3, 4, 4] for images [B, 1, 4, 4]."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout2d(0.2)
        self.conv = nn.Conv2d(1, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.drop(x))


def build() -> nn.Module:
    return Segmenter()
'''


def _segmenter(folder: Path, task: str, names: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "seg.py").write_text(SEGMENTER, encoding="utf-8")
    torch.manual_seed(0)
    weights = nn.Module()
    weights.conv = nn.Conv2d(1, 3, 1)  # the Segmenter's only parameters
    save_weights(weights, folder / "weights.safetensors")
    text = f'name = "{folder.name}"\ntask = "{task}"\n'
    text += toml_table("input", {"shape": [1, 4, 4]}) + toml_table("output", {"names": names})
    text += toml_table("model", {"format": "entrypoint", "entrypoint": "seg:build"})
    (folder / "model.toml").write_text(text, encoding="utf-8")
    return folder


def test_a_per_pixel_classifier_is_refused_not_given_one_softmax_over_the_map(
    tmp_path: Path,
) -> None:
    folder = _segmenter(tmp_path / "seg", "classification", ["bg", "a", "b"])
    with pytest.raises(ModelLoadError) as info:
        ServedModel.load(folder, Settings(device="cpu"))
    message = str(info.value)
    assert "[3, 4, 4] per row" in message, message
    assert "softmax" in message, message


def test_outputs_that_do_not_match_the_names_are_refused_with_both_counts(tmp_path: Path) -> None:
    folder = _segmenter(tmp_path / "reg", "regression", ["y0", "y1", "y2"])
    with pytest.raises(ModelLoadError) as info:
        ServedModel.load(folder, Settings(device="cpu"))
    message = str(info.value)
    assert "3 output name(s)" in message, message
    assert "[3, 4, 4] per row (48 values)" in message, message
