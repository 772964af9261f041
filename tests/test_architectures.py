"""Built-in architectures: named children, shapes, hand-checked forward, config validation."""

from __future__ import annotations

from typing import Any, TypeVar

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from mcdrop.errors import ModelLoadError
from mcdrop.repository.architectures import build_architecture, build_cnn, build_fcn, build_mlp
from mcdrop.repository.manifest import ModelSpec

M = TypeVar("M", bound=nn.Module)


def _spec(
    architecture: str,
    shape: list[int],
    n_out: int = 1,
    config: dict[str, Any] | None = None,
    task: str = "regression",
    heteroscedastic: bool = False,
) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": "m",
            "task": task,
            "input": {"shape": shape},
            "output": {
                "names": [f"o{i}" for i in range(n_out)],
                "heteroscedastic": heteroscedastic,
            },
            "model": {"format": "builtin", "architecture": architecture, "config": config or {}},
        }
    )


def _layer(module: nn.Module, name: str, kind: type[M]) -> M:
    child = module.get_submodule(name)
    assert isinstance(child, kind), f"{name} is {type(child).__name__}, expected {kind.__name__}"
    return child


def _names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_children()]


def test_mlp_children_named_in_order() -> None:
    mlp = build_mlp(13, 3, [16, 8], dropout=0.2, input_dropout=0.1)
    assert _names(mlp) == [
        "input_dropout",
        "fc0",
        "act0",
        "dropout0",
        "fc1",
        "act1",
        "dropout1",
        "out",
    ]
    fc0, fc1, out = (_layer(mlp, n, nn.Linear) for n in ("fc0", "fc1", "out"))
    assert (fc0.in_features, fc0.out_features) == (13, 16)
    assert (fc1.in_features, fc1.out_features) == (16, 8)
    assert (out.in_features, out.out_features) == (8, 3)
    assert _layer(mlp, "dropout1", nn.Dropout).p == pytest.approx(0.2)
    assert _layer(mlp, "input_dropout", nn.Dropout).p == pytest.approx(0.1)
    assert mlp(torch.randn(5, 13)).shape == (5, 3)


def test_mlp_without_dropout_omits_dropout_layers() -> None:
    mlp = build_mlp(4, 1, [3], dropout=0.0)
    assert _names(mlp) == ["fc0", "act0", "out"]
    assert not any(isinstance(m, nn.Dropout) for m in mlp.modules())


def test_mlp_activation_and_flatten() -> None:
    mlp = build_mlp(64, 10, [32], activation="tanh", flatten=True)
    assert _names(mlp)[0] == "flatten"
    _layer(mlp, "act0", nn.Tanh)
    assert mlp(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_mlp_forward_matches_hand_computation() -> None:
    mlp = build_mlp(2, 1, [2], dropout=0.5).eval()
    with torch.no_grad():
        _layer(mlp, "fc0", nn.Linear).weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.5]]))
        _layer(mlp, "fc0", nn.Linear).bias.copy_(torch.tensor([0.0, -1.0]))
        _layer(mlp, "out", nn.Linear).weight.copy_(torch.tensor([[3.0, -2.0]]))
        _layer(mlp, "out", nn.Linear).bias.copy_(torch.tensor([0.5]))
    x = torch.tensor([[1.0, 2.0], [2.0, 0.0]])
    # row 0: fc0 -> [-1, 2] -> relu [0, 2] -> 3*0 - 2*2 + 0.5 = -3.5
    # row 1: fc0 -> [2, 3] -> relu [2, 3] -> 6 - 6 + 0.5 = 0.5
    assert torch.equal(mlp(x), torch.tensor([[-3.5], [0.5]]))


def test_cnn_children_named_in_order() -> None:
    cnn = build_cnn(1, [8, 8], 10, channels=[4, 6], hidden=12, dropout=0.3)
    assert _names(cnn) == [
        "conv0",
        "act0",
        "pool0",
        "conv1",
        "act1",
        "pool1",
        "flatten",
        "dropout_head0",
        "fc0",
        "act_fc0",
        "dropout_head1",
        "out",
    ]
    _layer(cnn, "pool1", nn.MaxPool2d)
    assert _layer(cnn, "fc0", nn.Linear).in_features == 6 * 2 * 2
    assert _layer(cnn, "dropout_head1", nn.Dropout).p == pytest.approx(0.3)
    assert cnn(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_cnn_batchnorm_and_conv_dropout() -> None:
    cnn = build_cnn(3, [7, 9], 2, channels=[5], batchnorm=True, conv_dropout=0.1, kernel_size=5)
    assert _names(cnn)[:5] == ["conv0", "bn0", "act0", "pool0", "conv_dropout0"]
    _layer(cnn, "bn0", nn.BatchNorm2d)
    _layer(cnn, "conv_dropout0", nn.Dropout2d)
    assert _layer(cnn, "conv0", nn.Conv2d).bias is None  # BatchNorm carries the shift
    # 7x9 -> 5x5 conv keeps the size -> pool -> 3x4 (floor)
    assert _layer(cnn, "fc0", nn.Linear).in_features == 5 * 3 * 4
    assert cnn.eval()(torch.randn(2, 3, 7, 9)).shape == (2, 2)


def test_cnn_image_too_small_for_pooling() -> None:
    with pytest.raises(ValueError, match=r"image_size: \[4, 4\] is too small for 3"):
        build_cnn(1, [4, 4], 2, channels=[2, 2, 2])


def test_builders_validate_arguments() -> None:
    with pytest.raises(ValidationError, match="dropout"):
        build_mlp(2, 1, [4], dropout=1.0)
    with pytest.raises(ValidationError, match="activation"):
        build_mlp(2, 1, [4], activation="swish")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="image_size"):
        build_cnn(in_channels=1, image_size=[8], out_features=2)
    with pytest.raises(ValueError, match="kernel_size: must be odd"):
        build_cnn(1, [8, 8], 2, kernel_size=4)


def test_architecture_derives_mlp_sizes_from_spec() -> None:
    mlp = build_architecture(_spec("mlp", [13], n_out=2, config={"hidden": [4]}))
    assert isinstance(mlp, nn.Sequential)
    assert "flatten" not in _names(mlp)
    assert _layer(mlp, "fc0", nn.Linear).in_features == 13
    assert _layer(mlp, "out", nn.Linear).out_features == 2


def test_architecture_heteroscedastic_head_doubles_outputs() -> None:
    spec = _spec("mlp", [3], n_out=2, config={"hidden": [4]}, heteroscedastic=True)
    assert build_architecture(spec)(torch.randn(1, 3)).shape == (1, 4)


def test_architecture_mlp_on_image_input_flattens() -> None:
    mlp = build_architecture(_spec("mlp", [1, 8, 8], n_out=10, config={"hidden": [16]}))
    assert _names(mlp)[0] == "flatten"
    assert mlp(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_architecture_derives_cnn_sizes_from_spec() -> None:
    spec = _spec("cnn", [1, 8, 8], n_out=10, config={"channels": [4]}, task="classification")
    cnn = build_architecture(spec)
    assert _layer(cnn, "conv0", nn.Conv2d).in_channels == 1
    assert cnn(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_architecture_unknown_argument_is_named() -> None:
    with pytest.raises(
        ModelLoadError,
        match=r"model\.config\.hiden: unknown argument for mlp \(expected one of .*hidden",
    ):
        build_architecture(_spec("mlp", [2], config={"hiden": [4]}))


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"hidden": ["64"]}, r"model\.config\.hidden\.0: Input should be a valid integer"),
        ({"hidden": 64}, r"model\.config\.hidden: "),
        ({"hidden": [4], "dropout": 1.5}, r"model\.config\.dropout: Input should be less than 1"),
        ({"hidden": [4], "dropout": True}, r"model\.config\.dropout: "),
        ({}, r"model\.config\.hidden: Missing required argument"),
    ],
)
def test_architecture_invalid_values_name_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(ModelLoadError, match=field):
        build_architecture(_spec("mlp", [2], config=config))


def test_architecture_config_must_agree_with_manifest_shapes() -> None:
    with pytest.raises(ModelLoadError, match=r"model\.config\.in_features: 12 .* imply 13"):
        build_architecture(_spec("mlp", [13], config={"hidden": [4], "in_features": 12}))
    spec = _spec("mlp", [2], n_out=1, config={"hidden": [4], "out_features": 1})
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"names": ["a", "b"]})})
    with pytest.raises(ModelLoadError, match=r"model\.config\.out_features: 1 .* imply 2"):
        build_architecture(spec)


def test_architecture_cnn_needs_three_dimensional_input() -> None:
    with pytest.raises(ModelLoadError, match=r"input\.shape: .*\[channels, height, width\]"):
        build_architecture(_spec("cnn", [64]))


def test_architecture_cnn_too_small_image_is_a_config_error() -> None:
    with pytest.raises(ModelLoadError, match=r"model\.config\.image_size: \[2, 2\] is too small"):
        build_architecture(_spec("cnn", [1, 2, 2], config={"channels": [2, 2]}))


# --- fcn (per-pixel segmentation) -----------------------------------------------------------


def test_fcn_children_named_in_order() -> None:
    fcn = build_fcn(2, 4, widths=[3, 5, 7], dropout=0.25)
    assert _names(fcn) == [
        "conv0",
        "act0",
        "pool0",
        "conv1",
        "act1",
        "pool1",
        "conv2",
        "act2",
        "dropout",
        "up1",
        "conv_up1",
        "act_up1",
        "up0",
        "conv_up0",
        "act_up0",
        "out",
    ]
    conv0, conv2 = _layer(fcn, "conv0", nn.Conv2d), _layer(fcn, "conv2", nn.Conv2d)
    assert (conv0.in_channels, conv0.out_channels, conv0.padding) == (2, 3, (1, 1))
    assert (conv2.in_channels, conv2.out_channels) == (5, 7)
    # the decoder walks the widths back: 7 -> 5 -> 3, then a 1x1 conv to the classes
    up1, up0 = _layer(fcn, "conv_up1", nn.Conv2d), _layer(fcn, "conv_up0", nn.Conv2d)
    assert (up1.in_channels, up1.out_channels, up0.out_channels) == (7, 5, 3)
    out = _layer(fcn, "out", nn.Conv2d)
    assert (out.in_channels, out.out_channels, out.kernel_size) == (3, 4, (1, 1))
    assert _layer(fcn, "dropout", nn.Dropout2d).p == pytest.approx(0.25)
    assert fcn(torch.randn(3, 2, 16, 12)).shape == (3, 4, 16, 12)


def test_fcn_logits_are_per_pixel_and_dropout_drops_channels() -> None:
    fcn = build_fcn(1, 3, widths=[4, 8], dropout=0.5)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(fcn.eval()(x), fcn(x))  # eval: dropout off, deterministic
    fcn.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        features = fcn[:5](x)  # conv0 act0 pool0 conv1 act1 -> [2, 8, 4, 4]
        dropped = fcn.get_submodule("dropout")(features)
    # Dropout2d zeroes whole channels of a row and scales the others by 1 / (1 - p)
    zero = dropped.flatten(2).eq(0).all(dim=2)
    assert bool(zero.any())
    kept = ~zero
    torch.testing.assert_close(dropped[kept], 2.0 * features[kept])


def test_fcn_without_downsample_or_with_batchnorm() -> None:
    flat = build_fcn(3, 2, widths=[4, 6], kernel_size=5, downsample=False)
    assert _names(flat) == ["conv0", "act0", "conv1", "act1", "dropout", "out"]
    assert _layer(flat, "conv1", nn.Conv2d).padding == (2, 2)
    assert flat(torch.randn(1, 3, 7, 9)).shape == (1, 2, 7, 9)  # odd sizes keep theirs
    normed = build_fcn(1, 2, widths=[4, 6], batchnorm=True, dropout=0.0)
    assert _names(normed)[:3] == ["conv0", "bn0", "act0"]
    assert "dropout" not in _names(normed)
    assert _layer(normed, "conv0", nn.Conv2d).bias is None  # BatchNorm carries the shift
    assert normed.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 2, 8, 8)


def test_fcn_validates_arguments() -> None:
    with pytest.raises(ValidationError, match="classes"):
        build_fcn(in_channels=1, classes=0)
    with pytest.raises(ValidationError, match="widths"):
        build_fcn(1, 3, widths=[])
    with pytest.raises(ValidationError, match="dropout"):
        build_fcn(1, 3, dropout=1.0)
    with pytest.raises(ValueError, match="kernel_size: must be odd"):
        build_fcn(1, 3, kernel_size=2)
    with pytest.raises(ValueError, match=r"image_size: \[30, 32\] must be multiples of 4"):
        build_fcn(1, 3, widths=[2, 2, 2], image_size=[30, 32])
    build_fcn(1, 3, widths=[2, 2, 2], image_size=[30, 32], downsample=False)  # no pooling


def _segmentation_spec(
    shape: list[int],
    n_classes: int,
    config: dict[str, Any],
    output_shape: list[int] | None = None,
    class_axis: int | None = 0,
) -> ModelSpec:
    """An fcn manifest; its output shape defaults to [classes, *input's height and width]."""
    return ModelSpec.model_validate(
        {
            "name": "m",
            "task": "classification",
            "input": {"shape": shape},
            "output": {
                "names": [f"c{i}" for i in range(n_classes)],
                "shape": output_shape or [n_classes, *shape[1:]],
                "class_axis": class_axis,
            },
            "model": {"format": "builtin", "architecture": "fcn", "config": config},
        }
    )


def test_architecture_derives_fcn_sizes_from_spec() -> None:
    fcn = build_architecture(_segmentation_spec([2, 16, 16], 3, {"widths": [4, 8]}))
    assert _layer(fcn, "conv0", nn.Conv2d).in_channels == 2
    assert _layer(fcn, "out", nn.Conv2d).out_channels == 3
    assert fcn(torch.randn(2, 2, 16, 16)).shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    ("shape", "config", "field"),
    [
        ([1, 8, 8], {"widths": [4, "8"]}, r"model\.config\.widths\.1: Input should be a valid int"),
        ([1, 8, 8], {"dropout": 2.0}, r"model\.config\.dropout: Input should be less than 1"),
        ([1, 8, 8], {"widht": [4]}, r"model\.config\.widht: unknown argument for fcn"),
        ([1, 8, 8], {"classes": 4}, r"model\.config\.classes: 4 .* imply 3"),
        ([1, 8, 8], {"kernel_size": 4}, r"model\.config\.kernel_size: must be odd"),
        ([1, 6, 8], {"widths": [2, 2, 2]}, r"model\.config\.image_size: \[6, 8\] must be"),
        ([64], {}, r"input\.shape: the fcn architecture needs \[channels, height, width\]"),
    ],
)
def test_architecture_fcn_errors_name_the_field(
    shape: list[int], config: dict[str, Any], field: str
) -> None:
    with pytest.raises(ModelLoadError, match=field):
        build_architecture(_segmentation_spec(shape, 3, config))


def test_architecture_fcn_needs_the_per_pixel_output_declared() -> None:
    with pytest.raises(ModelLoadError, match=r"output\.shape: .* = \[3, 8, 8\] per row, got \[3\]"):
        build_architecture(_segmentation_spec([1, 8, 8], 3, {}, [3], class_axis=None))
    with pytest.raises(ModelLoadError, match=r"output\.shape: .* = \[3, 8, 8\] per row"):
        build_architecture(_segmentation_spec([1, 8, 8], 3, {}, [3, 16, 16]))
    with pytest.raises(ModelLoadError, match=r"output\.class_axis: .* axis 0, got 2"):
        build_architecture(_segmentation_spec([1, 3, 3], 3, {"widths": [2]}, [3, 3, 3], 2))
