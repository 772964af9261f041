"""Repository scan: good folders load, broken ones are reported precisely and stop nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import write_mlp_model

from mcdrop.errors import ModelLoadError
from mcdrop.repository.scan import scan_repository


def _broken_repository(root: Path) -> None:
    write_mlp_model(root / "good", hidden=[4])
    write_mlp_model(root / "bad-toml")
    (root / "bad-toml" / "model.toml").write_text('name = "bad-toml"\ntask = regression\n')
    write_mlp_model(root / "bad-type")
    manifest = (root / "bad-type" / "model.toml").read_text()
    (root / "bad-type" / "model.toml").write_text(manifest.replace("shape = [2]", 'shape = "2"'))
    write_mlp_model(root / "renamed", name="other-name")


def test_scan_loads_good_and_reports_each_broken_folder(tmp_path: Path) -> None:
    _broken_repository(tmp_path)
    scan = scan_repository(tmp_path)

    assert list(scan.models) == ["good"]
    spec, folder = scan.models["good"]
    assert spec.name == "good"
    assert folder == tmp_path / "good"
    assert spec.model.config["hidden"] == [4]

    assert list(scan.errors) == ["bad-toml", "bad-type", "renamed"]
    bad_toml = tmp_path / "bad-toml" / "model.toml"
    assert scan.errors["bad-toml"].startswith(f"{bad_toml}: not valid TOML")
    bad_type = tmp_path / "bad-type" / "model.toml"
    assert scan.errors["bad-type"].startswith(f"{bad_type}: input.shape: ")
    assert "valid list" in scan.errors["bad-type"]
    renamed = tmp_path / "renamed" / "model.toml"
    assert scan.errors["renamed"] == (
        f"{renamed}: name: 'other-name' must equal the model's folder name 'renamed'"
    )


def test_scan_skips_hidden_folders_files_and_folders_without_manifest(tmp_path: Path) -> None:
    write_mlp_model(tmp_path / "b-model")
    write_mlp_model(tmp_path / "a-model")
    write_mlp_model(tmp_path / ".hidden")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("not a model")
    (tmp_path / "model.toml").write_text("stray file at the root")
    scan = scan_repository(tmp_path)
    assert list(scan.models) == ["a-model", "b-model"]
    assert scan.errors == {}


def test_scan_of_empty_repository(tmp_path: Path) -> None:
    scan = scan_repository(tmp_path)
    assert scan.models == {}
    assert scan.errors == {}


def test_missing_repository_is_named(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(
        ModelLoadError, match=f"^{re.escape(str(root))}: model repository does not exist$"
    ):
        scan_repository(root)


def test_repository_that_is_a_file_is_named(tmp_path: Path) -> None:
    root = tmp_path / "file"
    root.write_text("")
    with pytest.raises(
        ModelLoadError, match=f"^{re.escape(str(root))}: model repository is not a folder$"
    ):
        scan_repository(root)


def test_unreadable_manifest_encoding_is_reported(tmp_path: Path) -> None:
    write_mlp_model(tmp_path / "latin")
    (tmp_path / "latin" / "model.toml").write_bytes(b'name = "caf\xe9"\n')
    scan = scan_repository(tmp_path)
    assert scan.models == {}
    assert scan.errors["latin"].startswith(f"{tmp_path / 'latin' / 'model.toml'}: cannot read")
