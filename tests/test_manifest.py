"""The model manifest: defaults, cross-field validators, and errors that name file and field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydantic
import pytest
from conftest import toml_table, toml_value

from mcdrop.errors import ModelLoadError
from mcdrop.repository.manifest import ModelSpec, load_manifest


def _raw(**sections: Any) -> dict[str, Any]:
    """A minimal valid regression manifest as a dict; `sections` replace or add tables."""
    raw: dict[str, Any] = {
        "name": "m",
        "task": "regression",
        "input": {"shape": [3]},
        "output": {"names": ["y"]},
        "model": {"format": "builtin", "architecture": "mlp", "config": {"hidden": [4]}},
    }
    raw.update(sections)
    return raw


def _write(path: Path, raw: dict[str, Any]) -> Path:
    """Write `raw` (scalars at the top, then tables, nested tables as [a.b]) as TOML."""
    text = "".join(f"{k} = {toml_value(v)}\n" for k, v in raw.items() if not isinstance(v, dict))
    for name, table in raw.items():
        if isinstance(table, dict):
            scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
            text += toml_table(name, scalars)
            for sub, subtable in table.items():
                if isinstance(subtable, dict):
                    text += toml_table(f"{name}.{sub}", subtable)
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, raw: dict[str, Any]) -> str:
    path = _write(tmp_path / "model.toml", raw)
    with pytest.raises(ModelLoadError) as info:
        load_manifest(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message


def test_minimal_manifest_gets_documented_defaults(tmp_path: Path) -> None:
    spec = load_manifest(_write(tmp_path / "model.toml", _raw()))
    assert spec.name == "m"
    assert spec.version == "1"
    assert spec.input.dtype == "float32"
    assert spec.output.heteroscedastic is False
    assert spec.model.weights == "weights.safetensors"
    assert spec.model.config == {"hidden": [4]}
    assert (spec.mc.default_samples, spec.mc.max_samples) == (100, 100_000)
    assert spec.mc.mask_mode == "independent"
    assert spec.mc.sample == "all"
    assert spec.mc.tau is None
    assert spec.normalization.input_mean is None
    assert spec.runtime.device == "auto"
    assert spec.n_outputs == 1


def test_full_manifest_round_trips_every_section(tmp_path: Path) -> None:
    raw = _raw(
        version="2.1",
        input={"shape": [2], "names": ["a", "b"]},
        output={"names": ["y0", "y1"], "heteroscedastic": True},
        normalization={
            "input_mean": [1.0, 2.0],
            "input_std": [0.5, 4.0],
            "target_mean": [0.0],
            "target_std": [3.0],
        },
        mc={
            "default_samples": 10,
            "max_samples": 20,
            "mask_mode": "shared",
            "sample": ["dropout0"],
        },
        runtime={"device": "cpu", "dtype": "bfloat16", "compile": True},
    )
    spec = load_manifest(_write(tmp_path / "model.toml", raw))
    assert spec.version == "2.1"
    assert spec.input.names == ["a", "b"]
    assert spec.n_outputs == 2
    assert spec.normalization.input_std == [0.5, 4.0]
    assert spec.mc.sample == ["dropout0"]
    assert spec.mc.mask_mode == "shared"
    assert spec.runtime.compile is True


def test_spec_is_frozen() -> None:
    spec = ModelSpec.model_validate(_raw())
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        setattr(spec, "name", "other")  # noqa: B010 (a plain assignment would not type-check)


def test_missing_file_and_bad_toml_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.toml"
    with pytest.raises(ModelLoadError, match=f"^{re.escape(str(missing))}: manifest not found$"):
        load_manifest(missing)
    bad = tmp_path / "model.toml"
    bad.write_text("name = \n")
    with pytest.raises(ModelLoadError, match=r"model\.toml: not valid TOML: .*line 1"):
        load_manifest(bad)


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"mc": {"default_samples": 500, "max_samples": 100}}, "default_samples must not exceed"),
        ({"mc": {"default_samples": 0}}, r"mc\.default_samples: .*greater than or equal to 1"),
        ({"mc": {"tau": 0.0}}, r"mc\.tau: .*greater than 0"),
        ({"mc": {"mask_mode": "paired"}}, r"mc\.mask_mode: .*'independent' or 'shared'"),
        ({"mc": {"samples": 10}}, r"mc\.samples: Extra inputs are not permitted"),
        ({"input": {"shape": []}}, r"input\.shape: .*at least 1 item"),
        ({"input": {"shape": [3, 0]}}, r"input\.shape\.1: .*greater than or equal to 1"),
        ({"output": {"names": []}}, r"output\.names: .*at least 1 item"),
        ({"name": "bad name!"}, r"name: String should match pattern"),
        ({"task": "ranking"}, r"task: Input should be 'regression' or 'classification'"),
        ({"model": {"format": "builtin"}}, "format 'builtin' needs 'architecture'"),
        ({"model": {"format": "entrypoint"}}, "format 'entrypoint' needs 'entrypoint'"),
        (
            {"model": {"format": "entrypoint", "entrypoint": "no-colon"}},
            r"model\.entrypoint: String should match pattern",
        ),
        ({"model": {"format": "onnx"}}, r"model\.format: Input should be 'builtin'"),
        ({"runtime": {"device": "tpu"}}, r"runtime\.device: "),
    ],
)
def test_invalid_fields_are_named(tmp_path: Path, sections: dict[str, Any], expected: str) -> None:
    assert re.search(expected, _error(tmp_path, _raw(**sections)))


def test_heteroscedastic_classifier_is_refused(tmp_path: Path) -> None:
    raw = _raw(task="classification", output={"names": ["a", "b"], "heteroscedastic": True})
    assert "heteroscedastic applies only to regression" in _error(tmp_path, raw)


@pytest.mark.parametrize(
    ("normalization", "expected"),
    [
        ({"input_mean": [0.0, 0.0, 0.0]}, "input_mean and input_std must be given together"),
        ({"target_std": [1.0]}, "target_mean and target_std must be given together"),
        ({"input_mean": [0.0], "input_std": [0.0]}, "input_std must be positive"),
        ({"target_mean": [0.0], "target_std": [-1.0]}, "target_std must be positive"),
        (
            {"input_mean": [0.0, 0.0], "input_std": [1.0]},
            "input_mean and input_std must have the same length",
        ),
        (
            {"input_mean": [0.0, 0.0], "input_std": [1.0, 1.0]},
            r"input_mean has 2 values; expected 1, 3 \(per channel\) or 3 \(per feature\)",
        ),
        (
            {"target_mean": [0.0, 0.0], "target_std": [1.0, 1.0]},
            "target_mean has 2 values; expected 1 or 1",
        ),
    ],
)
def test_normalisation_pairs_and_lengths(
    tmp_path: Path, normalization: dict[str, Any], expected: str
) -> None:
    assert re.search(expected, _error(tmp_path, _raw(normalization=normalization)))


@pytest.mark.parametrize("n", [1, 2, 128])
def test_input_normalisation_scalar_per_channel_or_per_feature(n: int) -> None:
    raw = _raw(
        input={"shape": [2, 8, 8]},
        normalization={"input_mean": [0.5] * n, "input_std": [2.0] * n},
    )
    assert ModelSpec.model_validate(raw).normalization.input_mean == [0.5] * n


def test_target_normalisation_refused_for_classifier(tmp_path: Path) -> None:
    raw = _raw(
        task="classification",
        output={"names": ["a", "b"]},
        normalization={"target_mean": [0.0], "target_std": [1.0]},
    )
    assert "target normalisation applies only to regression" in _error(tmp_path, raw)


@pytest.mark.parametrize(
    ("task", "output", "expected"),
    [
        ("classification", {"names": ["a", "b"], "shape": [2, 4, 4]}, "output.class_axis"),
        (
            "classification",
            {"names": ["a", "b"], "shape": [3, 4, 4], "class_axis": 0},
            "lists 2 classes but axis 0",
        ),
        ("classification", {"names": ["a", "b"], "shape": [2, 4], "class_axis": 2}, "not an axis"),
        ("regression", {"names": ["y"], "shape": [2, 4], "class_axis": 0}, "only to classif"),
        ("regression", {"names": ["a", "b", "c"], "shape": [4, 2]}, "one name, or 2"),
        ("regression", {"names": ["y"], "shape": [3]}, "does not hold 1 output"),
        ("regression", {"names": ["y"], "class_axis": 0}, "needs output.shape"),
        ("regression", {"names": ["y"], "heteroscedastic": True, "shape": [2, 2]}, "flat"),
    ],
)
def test_output_shape_and_class_axis_must_fit_the_names(
    tmp_path: Path, task: str, output: dict[str, Any], expected: str
) -> None:
    assert expected in _error(tmp_path, _raw(task=task, output=output))


def test_declared_output_shapes_and_the_flat_default() -> None:
    seg = ModelSpec.model_validate(
        _raw(
            task="classification",
            output={"names": ["a", "b", "c"], "shape": [3, 8, 8], "class_axis": 0},
        )
    )
    assert seg.output_shape == (3, 8, 8)
    assert seg.is_map
    flat = ModelSpec.model_validate(_raw(output={"names": ["y"], "heteroscedastic": True}))
    assert flat.output_shape == (2,)
    assert not flat.is_map


def _named(*inputs: dict[str, Any]) -> dict[str, Any]:
    raw = _raw(inputs=list(inputs))
    del raw["input"]
    return raw


def test_named_inputs_fill_the_packed_input_shape() -> None:
    spec = ModelSpec.model_validate(
        _named(
            {"name": "ids", "dtype": "int64", "shape": [4], "range": [0, 9], "pad": 0},
            {"name": "mask", "dtype": "bool", "shape": [4], "mask_for": "ids"},
            {"name": "extra", "shape": [2, 3], "default": 0.5},
        )
    )
    assert spec.input.shape == [4 + 4 + 6]
    assert spec.inputs is not None
    assert [i.name for i in spec.inputs] == ["ids", "mask", "extra"]


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ([{"name": "a", "shape": [2]}, {"name": "a", "shape": [2]}], "names repeat"),
        ([{"name": "a", "dtype": "int64", "shape": [2], "range": [0, 2**25]}], "±16777216"),
        ([{"name": "a", "dtype": "int64", "shape": [2], "range": [3, 1]}], "is empty"),
        ([{"name": "a", "dtype": "int64", "shape": [2], "default": 0.5}], "default 0.5"),
        ([{"name": "a", "dtype": "bool", "shape": [2], "pad": 2}], "pad 2"),
        ([{"name": "m", "shape": [2], "mask_for": "ids"}], "mask_for must name"),
        ([{"name": "1x", "shape": [2]}], "inputs.0.name"),
    ],
)
def test_bad_named_inputs_are_named(inputs: list[dict[str, Any]], expected: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        ModelSpec.model_validate(_named(*inputs))
    assert expected in str(info.value)


def test_input_and_inputs_together_are_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match=re.escape("either [input] or [[inputs]]")):
        ModelSpec.model_validate(_raw(inputs=[{"name": "a", "shape": [3]}]))
