"""mcdrop.ray_options without a cluster: what Ray Serve is asked for, and bad input named."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mcdrop.ray_options import Autoscaling, RayOptions, settings_and_options


def test_fixed_replicas_with_fractional_resources() -> None:
    options = RayOptions(replicas=3, num_cpus=0.5, num_gpus=0.25)
    assert options.deployment_options() == {
        "name": "mcdrop",
        "num_replicas": 3,
        "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.25},
        "max_ongoing_requests": 64,
    }


def test_one_replica_of_one_cpu_by_default() -> None:
    options = RayOptions().deployment_options()
    assert options["num_replicas"] == 1
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert "autoscaling_config" not in options


def test_autoscaling_replaces_the_fixed_count() -> None:
    options = RayOptions(autoscaling="2:6").deployment_options()
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 2,
        "max_replicas": 6,
        "target_ongoing_requests": 8.0,
    }


def test_autoscaling_from_a_mapping_with_its_own_target() -> None:
    options = RayOptions.model_validate(
        {"autoscaling": {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 3}}
    )
    assert options.deployment_options()["autoscaling_config"]["target_ongoing_requests"] == 3.0


@pytest.mark.parametrize("text", ["4", "a:b", "1:", ":3", "1-4", ""])
def test_autoscale_text_must_be_min_colon_max(text: str) -> None:
    with pytest.raises(ValueError, match="expected MIN:MAX replicas such as 1:4"):
        Autoscaling.parse(text)


def test_autoscale_bounds_must_be_ordered() -> None:
    with pytest.raises(ValidationError, match=r"max_replicas \(1\) is below min_replicas \(4\)"):
        Autoscaling.parse("4:1")


def test_replicas_and_autoscaling_exclude_each_other() -> None:
    with pytest.raises(ValidationError, match="either replicas or autoscaling, not both"):
        RayOptions(replicas=2, autoscaling="1:3")


@pytest.mark.parametrize(
    ("field", "value"),
    [("replicas", 0), ("num_cpus", -0.5), ("num_gpus", -1), ("max_ongoing_requests", 0)],
)
def test_out_of_range_values_name_their_field(field: str, value: float) -> None:
    with pytest.raises(ValidationError) as raised:
        RayOptions.model_validate({field: value})
    assert [e["loc"] for e in raised.value.errors()] == [(field,)]


def test_app_args_split_into_settings_and_ray_options(tmp_path: Path) -> None:
    settings, options = settings_and_options(
        {
            "model_repository": str(tmp_path),
            "device": "cpu",
            "max_batch_rows": 16,
            "replicas": 2,
            "num_cpus": 0.5,
            "num_gpus": 1,
        }
    )
    assert settings.model_repository == tmp_path
    assert settings.device == "cpu"
    assert settings.max_batch_rows == 16
    assert options == RayOptions(replicas=2, num_cpus=0.5, num_gpus=1)


def test_unknown_app_args_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown application argument\(s\) colour, replica;"):
        settings_and_options({"replica": 2, "colour": "blue"})


def test_bad_settings_in_app_args_name_the_field() -> None:
    with pytest.raises(ValidationError, match="max_batch_rows"):
        settings_and_options({"max_batch_rows": 0})


def test_build_app_refuses_an_address_argument() -> None:
    pytest.importorskip("ray.serve", reason="Ray is not installed: pip install '.[ray]'")
    from mcdrop.ray_serve import build_app

    with pytest.raises(ValueError, match="address: not an application argument"):
        build_app({"address": "auto"})
