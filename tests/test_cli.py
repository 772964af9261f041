"""The `mcdrop` command line through main(argv): every subcommand and its error exits."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import write_line_csv
from http_helpers import copy_shipped, start_server

from mcdrop.cli.main import main
from mcdrop.config import Settings
from mcdrop.engine.core import MCOptions
from mcdrop.evaluation import evaluate
from mcdrop.model import ServedModel
from mcdrop.training import demo_models as dm
from mcdrop.uncertainty import ClassificationSummary, RegressionSummary

MODELS = Path(__file__).resolve().parent.parent / "models"
Capsys = pytest.CaptureFixture[str]


@pytest.fixture(autouse=True)
def _cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run on the CPU whatever the machine has; the repository flag is given per test."""
    monkeypatch.setenv("MCDROP_DEVICE", "cpu")
    monkeypatch.delenv("MCDROP_MODEL_REPOSITORY", raising=False)


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    """y = 2a - b + noise(0.1) on 120 rows, with a header line."""
    return write_line_csv(tmp_path / "line.csv", 120)


def _error(capsys: Capsys, argv: list[str]) -> str:
    """Run argv expecting a user error: exit 2 and exactly one line on stderr, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mcdrop: error: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err
    return err


def _train_argv(csv_file: Path, out: Path | str, *extra: str) -> list[str]:
    """`mcdrop train` on the CSV's columns 0-1 -> 2, writing `out`, plus `extra` flags."""
    return ["train", "--data", str(csv_file), "--features", "0-1", "--target", "2",
            "--out", str(out), *extra]  # fmt: skip


def _train(csv_file: Path, out: Path, *extra: str) -> int:
    return main(
        _train_argv(
            csv_file,
            out,
            "--hidden",
            "16",
            "--epochs",
            "30",
            "--lr",
            "1e-2",
            "--batch-size",
            "32",
            "--tau",
            "100",
            "--no-progress",
            *extra,
        )
    )


# --- train -> evaluate -> predict ---------------------------------------------------------


def test_train_evaluate_predict_round_trip(csv_file: Path, tmp_path: Path, capsys: Capsys) -> None:
    out = tmp_path / "repo" / "line"
    assert _train(csv_file, out, "--validation-fraction", "0.2") == 0
    printed = capsys.readouterr().out
    assert f"wrote model 'line' to {out}" in printed
    assert "validation (100 MC samples): rmse" in printed
    model = ServedModel.load(out, Settings(device="cpu"))
    assert model.spec.input.names == ["a", "b"]
    assert model.spec.output.names == ["y"]
    assert model.spec.mc.tau == 100.0

    argv = ["evaluate", str(out), "--data", str(csv_file), "--features", "0,1", "--target", "-1"]
    assert main([*argv, "--seed", "5", "--samples", "20", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    table = np.loadtxt(csv_file, delimiter=",", skiprows=1)
    direct = evaluate(
        model, torch.tensor(table[:, :2]), torch.tensor(table[:, 2]), MCOptions(samples=20, seed=5)
    )
    assert report == json.loads(json.dumps(direct.as_dict()))
    assert report["metrics"]["rmse"] < 0.5 * float(table[:, 2].std())  # it learned the line
    assert main([*argv, "--seed", "5"]) == 0
    text = capsys.readouterr().out
    assert "RMSE" in text
    assert "95% coverage (Gaussian)" in text

    rows = [[0.5, -0.5], [0.0, 0.0]]
    assert (
        main(
            [
                "predict",
                "line",
                "--model-repository",
                str(out.parent),
                "--rows",
                json.dumps(rows),
                "--seed",
                "3",
                "--samples",
                "50",
                "--json",
            ]
        )
        == 0
    )
    answer = json.loads(capsys.readouterr().out)
    expected = model.predict(torch.tensor(rows), model.options(50, seed=3))
    assert isinstance(expected, RegressionSummary)
    assert answer["samples_used"] == 50
    assert answer["seed"] == 3
    means = [row["y"]["mean"] for row in answer["rows"]]
    assert means == pytest.approx(expected.mean[:, 0].tolist(), rel=1e-12)
    interval = answer["rows"][0]["y"]["intervals"]["0.95"]
    assert interval["gaussian"][0] < means[0] < interval["gaussian"][1]


def test_heteroscedastic_training_needs_no_tau(csv_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "h"
    flags = ["--hidden", "8", "--epochs", "2", "--heteroscedastic", "--no-progress"]
    assert main(_train_argv(csv_file, out, *flags, "--name", "hetero")) == 0
    spec = ServedModel.load(out, Settings(device="cpu")).spec
    assert spec.name == "hetero"
    assert spec.output.heteroscedastic


def test_predict_table_intervals_and_samples(capsys: Capsys) -> None:
    argv = [
        "predict",
        dm.TOY,
        "--model-repository",
        str(MODELS),
        "--rows",
        "[[0.0], [6.0]]",
        "--seed",
        "0",
        "--samples",
        "64",
        "--interval",
        "0.5",
        "0.9",
        "--return-samples",
        "3",
    ]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "toy-regression v1 (regression): 64 MC samples, seed 0, independent masks"
    assert lines[1].split() == [
        "row",
        "output",
        "mean",
        "std",
        "epistemic",
        "aleatoric",
        "50%",
        "interval",
        "90%",
        "interval",
    ]
    assert [line.split()[:2] for line in lines[2:4]] == [["0", "y"], ["1", "y"]]
    assert lines[4].startswith("row 0 samples: ")
    assert len(lines[4].split(":")[1].split(",")) == 3
    assert "epistemic" in lines[-1]


def test_predict_shared_masks_and_a_table_file(tmp_path: Path, capsys: Capsys) -> None:
    rows = tmp_path / "rows.txt"
    rows.write_text("0.0\n0.5\n", encoding="utf-8")
    argv = [
        "predict",
        str(MODELS / dm.TOY),
        "--file",
        str(rows),
        "--mask-mode",
        "shared",
        "--seed",
        "1",
        "--samples",
        "16",
        "--return-samples",
        "16",
        "--json",
    ]
    assert main(argv) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["mask_mode"] == "shared"
    assert len(answer["rows"]) == 2
    assert len(answer["rows"][1]["y"]["samples"]) == 16


def test_predict_a_digit_from_a_json_file(tmp_path: Path, capsys: Capsys) -> None:
    _, _, x_test, y_test = dm.digits_holdout()
    path = tmp_path / "digit.json"
    path.write_text(json.dumps(x_test[0].reshape(-1).tolist()), encoding="utf-8")  # flat row
    argv = ["predict", dm.DIGITS, "--model-repository", str(MODELS), "--file", str(path)]
    assert main([*argv, "--seed", "0", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    row = answer["rows"][0]
    assert row["predicted"] == str(y_test[0])
    assert sum(row["probabilities"].values()) == pytest.approx(1.0)
    assert 0.0 <= row["mutual_information"] <= row["entropy"]
    assert main([*argv, "--seed", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == [
        "row",
        "class",
        "probability",
        "entropy",
        "mutual_info",
        "variation_ratio",
    ]
    assert lines[2].split()[:2] == ["0", str(y_test[0])]


def test_evaluate_the_digits_classifier(tmp_path: Path, capsys: Capsys) -> None:
    _, _, x_test, y_test = dm.digits_holdout()
    path = tmp_path / "digits.csv"
    np.savetxt(path, np.c_[x_test.reshape(len(x_test), -1), y_test][:100], delimiter=",")
    argv = [
        "evaluate",
        dm.DIGITS,
        "--model-repository",
        str(MODELS),
        "--data",
        str(path),
        "--features",
        "0-63",
        "--target",
        "64",
        "--samples",
        "20",
        "--seed",
        "0",
    ]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 100
    assert report["metrics"]["accuracy"] > 0.9
    assert sum(report["metrics"]["calibration"]["count"]) == 100
    assert main(argv) == 0
    assert "mean mutual information" in capsys.readouterr().out


# --- models, demo, settings ---------------------------------------------------------------


def test_models_lists_sites_and_broken_folders(
    tmp_path: Path, capsys: Capsys, mlp_writer: Callable[..., Any]
) -> None:
    mlp_writer(tmp_path / "good", hidden=(4,), dropout=0.2, input_dropout=0.1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.toml").write_text('name = "bad"\n', encoding="utf-8")
    nodrop = tmp_path / "nodrop"
    mlp_writer(nodrop, hidden=(4,), dropout=0.0)
    assert main(["models", "--model-repository", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{tmp_path}: 1 model(s), 2 broken"
    good = next(line for line in lines if line.startswith("good "))
    assert good.split()[:4] == ["good", "1", "regression", "[2]"]
    assert "input_dropout (dropout, p=0.1), dropout0 (dropout, p=0.2)" in good
    broken = [line for line in lines if "BROKEN" in line]
    assert broken[0].startswith("bad  BROKEN: ")
    assert "task" in broken[0]
    assert broken[1].startswith("nodrop  BROKEN: ")
    assert "no stochastic op" in broken[1]


def test_repository_comes_from_the_environment_and_flags_win(
    tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCDROP_MODEL_REPOSITORY", str(MODELS))
    assert main(["models"]) == 0
    assert "toy-regression" in capsys.readouterr().out
    assert main(["models", "--model-repository", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path}: 0 model(s)")
    monkeypatch.setenv("MCDROP_CHUNK_ELEMENTS", "12")
    assert "chunk_elements" in _error(capsys, ["models"])


def test_demo_prints_both_models(capsys: Capsys) -> None:
    assert main(["demo", "--model-repository", str(MODELS)]) == 0
    out = capsys.readouterr().out
    assert "toy-regression" in out
    assert "outside the data" in out
    assert "digits" in out


# --- user errors: exit 2, one line ----------------------------------------------------------


def test_bad_column_spec(csv_file: Path, capsys: Capsys) -> None:
    err = _error(
        capsys,
        [
            "evaluate",
            str(MODELS / dm.TOY),
            "--data",
            str(csv_file),
            "--features",
            "0-9",
            "--target",
            "2",
        ],
    )
    assert "column spec '0-9'" in err
    err = _error(
        capsys,
        [
            "train",
            "--data",
            str(csv_file),
            "--features",
            "a",
            "--target",
            "2",
            "--out",
            "x",
            "--tau",
            "1",
        ],
    )
    assert "'a' is not a column number" in err


def test_missing_model_names_the_repository(tmp_path: Path, capsys: Capsys) -> None:
    err = _error(capsys, ["predict", "nope", "--model-repository", str(MODELS), "--rows", "[0]"])
    assert "'nope'" in err
    assert "toy-regression" in err  # lists what is available


def test_samples_above_the_maximum(capsys: Capsys) -> None:
    err = _error(capsys, ["predict", str(MODELS / dm.TOY), "--rows", "[0]", "--samples", "100001"])
    assert "maximum of 100000" in err


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("[[0.0", "not valid JSON"),
        ('[["a"]]', "rows of numbers"),
        ("[[0.0], [1.0, 2.0]]", "rows of numbers"),
        ("[[0.0, 1.0]]", "expected shape [rows, 1]"),
        ("[[NaN]]", "NaN"),
    ],
)
def test_bad_rows(rows: str, message: str, capsys: Capsys) -> None:
    err = _error(capsys, ["predict", str(MODELS / dm.TOY), "--rows", rows])
    assert message in err


def test_bad_files_and_training_options(csv_file: Path, tmp_path: Path, capsys: Capsys) -> None:
    missing = tmp_path / "missing.csv"
    assert "cannot read table" in _error(
        capsys, ["predict", str(MODELS / dm.TOY), "--file", str(missing)]
    )
    assert "--tau is required" in _error(
        capsys,
        _train_argv(csv_file, "x"),
    )
    assert "dropout" in _error(
        capsys,
        _train_argv(csv_file, "x", "--tau", "1", "--dropout", "1.5"),
    )
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "rows", "flags"),
    [
        (
            "toy-regression",
            "[[-3.0], [0.5], [2.0]]",
            ["--interval", "0.9", "--return-samples", "2"],
        ),
        ("digits", json.dumps([[0.0] * 64, [8.0] * 64]), ["--mask-mode", "shared"]),
    ],
)
def test_predict_url_prints_what_predict_prints(
    tmp_path: Path, capsys: Capsys, model: str, rows: str, flags: list[str]
) -> None:
    """The same seeded request answered here and by a server: the same table, the same JSON."""
    repo = copy_shipped(tmp_path / "repo", "toy-regression", "digits")
    server = start_server(repo, tmp_path / "server.log")
    try:
        printed = {}
        for where in (["--model-repository", str(repo)], ["--url", server.url]):
            for form in ([], ["--json"]):
                argv = ["predict", model, "--rows", rows, "--seed", "5", *flags, *where, *form]
                assert main(argv) == 0
                printed[(where[0], bool(form))] = capsys.readouterr().out
    finally:
        server.stop()
    for as_json in (False, True):
        assert printed[("--url", as_json)] == printed[("--model-repository", as_json)], as_json
    assert "seed 5" in printed[("--url", False)].splitlines()[0]


def test_argument_errors_exit_2(capsys: Capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["predict", "m", "--rows", "[0]", "--samples", "0"])
    assert exc.value.code == 2
    assert "positive integer or 'auto'" in capsys.readouterr().err


def test_samples_auto_is_accepted(capsys: Capsys) -> None:
    assert (
        main(
            [
                "predict",
                str(MODELS / dm.DIGITS),
                "--rows",
                json.dumps([[0.0] * 64]),
                "--samples",
                "auto",
                "--seed",
                "0",
                "--json",
            ]
        )
        == 0
    )
    answer = json.loads(capsys.readouterr().out)
    assert answer["samples_used"] >= 64
    summary = ServedModel.load(MODELS / dm.DIGITS, Settings(device="cpu")).predict(
        torch.zeros(1, 1, 8, 8), MCOptions(samples="auto", seed=0, tolerance=0.01)
    )
    assert isinstance(summary, ClassificationSummary)
    assert answer["samples_used"] == summary.samples_used


# --- serve --ray (no cluster: the Ray module is replaced; tests/test_ray_serve.py runs it) ---


@pytest.fixture(autouse=True)
def _never_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray cannot start from these tests, even if a fake below failed to take: `import ray`
    fails (Ray may start only inside the loopback-only namespace of `make ray-test`)."""
    monkeypatch.setitem(sys.modules, "ray", None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--replicas", "2"], "--replicas, --autoscale and --ray-* need --ray"),
        (["--ray-num-gpus", "1"], "--replicas, --autoscale and --ray-* need --ray"),
        (["--ray", "--workers", "2"], "--workers is for uvicorn; with --ray use --replicas"),
        (["--ray", "--autoscale", "4:1"], "max_replicas (1) is below min_replicas (4)"),
        (["--ray", "--autoscale", "4"], "expected MIN:MAX replicas such as 1:4, got '4'"),
        (["--ray", "--ray-num-cpus", "-1"], "num_cpus: Input should be greater than or equal"),
    ],
)
def test_serve_ray_flag_errors(capsys: Capsys, argv: list[str], message: str) -> None:
    assert message in _error(capsys, ["serve", *argv])


def test_serve_ray_without_the_extra_says_how_to_install(
    capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mcdrop.ray_serve", None)  # import fails as if absent
    assert "Ray Serve is not installed: pip install '.[ray]'" in _error(capsys, ["serve", "--ray"])


def test_serve_ray_hands_settings_and_options_to_ray_serve(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[Settings, Any]] = []
    fake = types.ModuleType("mcdrop.ray_serve")
    fake.run = lambda settings, options: calls.append((settings, options))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mcdrop.ray_serve", fake)
    monkeypatch.chdir(tmp_path)
    argv = ["serve", "--ray", "--autoscale", "1:3", "--ray-address", "127.0.0.1:1",
            "--ray-num-cpus", "0.5", "--ray-num-gpus", "0.25", "--model-repository", "repo",
            "--host", "0.0.0.0", "--port", "9000"]  # fmt: skip
    assert main(argv) == 0
    [(settings, options)] = calls
    assert settings.model_repository == tmp_path / "repo"  # absolute: replicas run elsewhere
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert options.address == "127.0.0.1:1"
    assert (options.num_cpus, options.num_gpus, options.replicas) == (0.5, 0.25, None)
    assert options.autoscaling is not None
    assert (options.autoscaling.min_replicas, options.autoscaling.max_replicas) == (1, 3)
