"""The `mcdrop` command line: serve, train, evaluate, predict, models, demo.

Settings come from MCDROP_* environment variables (mcdrop.config) with flags winning.
User errors print one line to stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor

from mcdrop import client
from mcdrop.cli.tables import load_table, parse_columns, read_table, select_columns
from mcdrop.config import Settings
from mcdrop.errors import InvalidInput, ModelNotFound, ServiceError
from mcdrop.evaluation import ClassificationMetrics, EvaluationReport, evaluate
from mcdrop.model import ServedModel
from mcdrop.render import format_document, prediction_document, render_table
from mcdrop.repository.manifest import MANIFEST_NAME
from mcdrop.repository.scan import scan_repository
from mcdrop.server import serve

if TYPE_CHECKING:
    from mcdrop.training.recipe import TrainedModel

USER_ERRORS = (ServiceError, OSError, ValueError)  # ValueError: pydantic, JSON, training


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except USER_ERRORS as exc:
        print(f"mcdrop: error: {describe_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mcdrop: interrupted", file=sys.stderr)
        return 130


def describe_error(exc: BaseException) -> str:
    """One line for a user error (pydantic's multi-line reports joined field by field)."""
    if isinstance(exc, ValidationError):
        text = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or exc.title}: {e['msg']}" for e in exc.errors()
        )
    elif isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


# --- arguments ----------------------------------------------------------------------------


def _samples(text: str) -> int | Literal["auto"]:
    if text == "auto":
        return "auto"
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree; each subcommand stores its handler in `handler`."""
    parser = argparse.ArgumentParser(prog="mcdrop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def repository(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model-repository", type=Path, help="default: $MCDROP_MODEL_REPOSITORY or ./models"
        )
        p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="overrides manifests")

    def sampling(p: argparse.ArgumentParser) -> None:
        p.add_argument("--samples", type=_samples, help="MC samples per row, or 'auto'")
        p.add_argument("--seed", type=int, help="seed for reproducible masks")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    train = sub.add_parser("train", help="train a dropout MLP regressor from a table")
    train.add_argument("--data", type=Path, required=True, help="CSV or whitespace table")
    train.add_argument("--features", required=True, help="columns, e.g. '0-7' or '0,2,5'")
    train.add_argument("--target", required=True, help="target column(s), e.g. '-1'")
    train.add_argument("--out", type=Path, required=True, help="model folder to write")
    train.add_argument("--name", help="model name (default: the folder's name)")
    train.add_argument("--hidden", type=int, nargs="+", default=[50], help="layer widths")
    train.add_argument("--dropout", type=float, default=0.05, help="on inputs and hidden layers")
    train.add_argument("--input-dropout", type=float, help="on the inputs (default: --dropout)")
    train.add_argument("--tau", type=float, help="model precision in target units (1/noise var)")
    train.add_argument("--lengthscale", type=float, default=1e-2, help="prior length-scale")
    train.add_argument("--epochs", type=int, default=400)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    train.add_argument("--heteroscedastic", action="store_true", help="also predict the noise")
    train.add_argument(
        "--concrete",
        action="store_true",
        help="learn the dropout rates (Concrete dropout); --dropout is the starting rate",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--validation-fraction", type=float, default=0.0)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=cmd_train)

    ev = sub.add_parser("evaluate", help="score a model on a held-out table")
    ev.add_argument("model", help="model folder, or a model name in the repository")
    ev.add_argument("--data", type=Path, required=True)
    ev.add_argument("--features", required=True)
    ev.add_argument("--target", required=True, help="targets (class indices for classifiers)")
    repository(ev)
    sampling(ev)
    ev.set_defaults(handler=cmd_evaluate)

    pr = sub.add_parser("predict", help="MC predictions with uncertainty for some rows")
    pr.add_argument("model", help="model folder, or a model name in the repository")
    rows = pr.add_mutually_exclusive_group(required=True)
    rows.add_argument("--rows", help="JSON: one row, or a list of rows")
    rows.add_argument("--file", type=Path, help="a .json file of rows, or a numeric table")
    repository(pr)
    sampling(pr)
    pr.add_argument("--mask-mode", choices=["independent", "shared"])
    pr.add_argument("--interval", type=float, nargs="+", default=[0.95], help="levels")
    pr.add_argument("--return-samples", type=int, default=0, metavar="K")
    pr.set_defaults(handler=cmd_predict)

    pr.add_argument("--url", help="ask a running server (e.g. http://127.0.0.1:8000)")
    pr.add_argument("--token", help="bearer token for the server")

    sv = sub.add_parser("serve", help="serve the repository over HTTP (OIP v2 + native API)")
    repository(sv)
    sv.add_argument("--host", help="bind address (default 127.0.0.1)")
    sv.add_argument("--port", type=int, help="bind port (default 8000)")
    sv.add_argument("--workers", type=int, help="server processes (each loads every model)")
    sv.add_argument("--shard-workers", type=int, help="processes that split large-N requests")
    sv.add_argument("--shard-threshold", type=int, help="split requests above this many samples")
    sv.add_argument("--max-batch-rows", type=int, help="rows merged per engine call")
    sv.add_argument("--max-batch-delay-ms", type=float, help="wait this long for company")
    sv.add_argument("--queue-size", type=int, help="queued requests per model before 503")
    sv.add_argument("--max-body-bytes", type=int, help="largest request body")
    sv.add_argument("--poll-interval-s", type=float, help="rescan the repository (0 = never)")
    sv.add_argument("--control-token", help="bearer token for the repository endpoints")
    sv.add_argument("--inference-token", help="bearer token for inference")
    sv.add_argument("--cors-origin", action="append", help="allowed CORS origin (repeatable)")
    ray = sv.add_argument_group("Ray Serve (needs: pip install '.[ray]')")
    ray.add_argument("--ray", action="store_true", help="run the app as Ray Serve replicas")
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, help="replicas, each loads every model (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="let Ray scale replicas in range")
    ray.add_argument("--ray-address", help="join this cluster ('auto', HOST:PORT); else local")
    ray.add_argument("--ray-num-cpus", type=float, help="CPUs per replica (default 1)")
    ray.add_argument("--ray-num-gpus", type=float, help="GPUs per replica (default 0)")
    ray.add_argument("--ray-shard-actors", type=int, help="per replica, for large-N requests")
    sv.set_defaults(handler=cmd_serve)

    models = sub.add_parser("models", help="list the model repository")
    repository(models)
    models.set_defaults(handler=cmd_models)

    demo = sub.add_parser("demo", help="show uncertainty on the shipped demo models")
    repository(demo)
    demo.set_defaults(handler=cmd_demo)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags that were given winning."""
    flags = {"model_repository": args.model_repository, "device": args.device}
    return Settings(**{k: v for k, v in flags.items() if v is not None})


def resolve_model(model: str, settings: Settings) -> ServedModel:
    """Load MODEL: a folder holding model.toml, else a model name in the repository."""
    for folder in (Path(model), settings.model_repository / model):
        if (folder / MANIFEST_NAME).is_file():
            return ServedModel.load(folder, settings)
    repo = settings.model_repository
    known = sorted(scan_repository(repo).models) if repo.is_dir() else []
    listed = ", ".join(known) or ("no models" if repo.is_dir() else "no such folder")
    raise ModelNotFound(f"model {model!r}: not a model folder, nor a model in {repo} ({listed})")


# --- train --------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from mcdrop.training.export import write_model_folder
    from mcdrop.training.recipe import TrainConfig, train_regressor

    table = load_table(args.data)
    x, y = select_columns(table.values, args.features, args.target)
    tau = args.tau
    if tau is None:
        if not args.heteroscedastic:
            raise InvalidInput(
                "--tau is required (the model precision, 1 / noise variance in "
                "target units), unless --heteroscedastic"
            )
        tau = 1.0 / (0.01 * float(np.var(y, axis=0).mean()) or 1.0)  # noise std 10% of y's
    config = TrainConfig(
        tau=tau,
        hidden=args.hidden,
        dropout=args.dropout,
        input_dropout=args.input_dropout,
        lengthscale=args.lengthscale,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        heteroscedastic=args.heteroscedastic,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
    )
    if args.concrete:
        from mcdrop.training.concrete_training import train_concrete_regressor

        try:
            trained = train_concrete_regressor(x, y, config, progress=not args.no_progress)
        except ValueError as error:
            raise InvalidInput(f"--concrete: {error}") from error
    else:
        trained = train_regressor(x, y, config, progress=not args.no_progress)
    names = table.names
    features = parse_columns(args.features, table.values.shape[1])
    targets = parse_columns(args.target, table.values.shape[1])
    name = args.name or args.out.resolve().name
    folder = write_model_folder(
        args.out,
        name,
        trained,
        task="regression",
        input_shape=[x.shape[1]],
        output_names=[names[c] for c in targets] if names else [f"y{c}" for c in targets],
        input_names=[names[c] for c in features] if names else None,
        description=f"Trained by `mcdrop train` on {args.data.name} ({len(x)} rows).",
    )
    print(f"wrote model {name!r} to {folder}")
    print(
        f"  {len(x)} rows, {x.shape[1]} features -> {y.shape[1]} target(s); hidden "
        f"{args.hidden}, dropout {_rates(trained)}, tau {tau:.4g}, {args.epochs} epochs; "
        f"final loss {trained.history[-1]['loss']:.4g}"
    )
    if trained.validation:
        scores = ", ".join(f"{k} {v:.4g}" for k, v in trained.validation.items())
        print(f"  validation ({config.validation_samples} MC samples): {scores}")
    return 0


def _rates(trained: TrainedModel) -> str:
    """The dropout rates the model serves with (learned ones with --concrete)."""
    from mcdrop.training.recipe import TrainConfig

    config = trained.config
    assert isinstance(config, TrainConfig)
    if config.effective_input_dropout == config.dropout:
        return f"{config.dropout:.4g}"
    return f"{config.effective_input_dropout:.4g} (inputs), {config.dropout:.4g} (hidden)"


# --- evaluate -----------------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    model = resolve_model(args.model, settings_from(args))
    x, y = select_columns(read_table(args.data), args.features, args.target)
    report = evaluate(
        model, torch.from_numpy(x), torch.from_numpy(y), model.options(args.samples, seed=args.seed)
    )
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return 0


def format_report(report: EvaluationReport) -> str:
    """The evaluation report as a few aligned lines."""
    m = report.metrics
    head = (
        f"{report.model} v{report.version} ({report.task}): {report.rows} rows, "
        f"{report.samples} MC samples, seed {report.seed}"
    )
    if isinstance(m, ClassificationMetrics):
        lines = [
            ("accuracy", m.accuracy),
            ("NLL", m.nll),
            ("Brier score", m.brier),
            ("ECE (15 bins)", m.ece),
            ("mean entropy", m.mean_entropy),
            ("mean mutual information", m.mean_mutual_information),
        ]
        return "\n".join([head] + [f"  {k:<26}{v:.4f}" for k, v in lines])
    loglik = (
        f"{m.log_likelihood:.4f}"
        if m.log_likelihood is not None
        else (f"n/a ({m.log_likelihood_note})")
    )
    return "\n".join(
        [
            head,
            f"  {'RMSE':<26}{m.rmse:.4f}",
            f"  {'test log-likelihood':<26}{loglik}",
            f"  {'95% coverage (Gaussian)':<26}{m.coverage_gaussian_95:.3f}",
            f"  {'95% coverage (empirical)':<26}{m.coverage_empirical_95:.3f}",
            f"  {'mean predictive std':<26}{m.mean_std:.4f} (epistemic {m.mean_epistemic_std:.4f}, "
            f"aleatoric {m.mean_aleatoric_std:.4f})",
        ]
    )


# --- predict ------------------------------------------------------------------------------


def read_rows(shape: tuple[int, ...], rows: str | None, file: Path | None) -> Tensor:
    """Raw rows [B, *input.shape] from JSON text, a .json file or a numeric table file."""
    if file is not None and file.suffix.lower() != ".json":
        values = torch.from_numpy(read_table(file))
    else:
        source = "--rows" if file is None else str(file)
        text = rows if file is None else file.read_text(encoding="utf-8")
        try:
            values = torch.tensor(json.loads(text or ""), dtype=torch.float64)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{source}: not valid JSON: {exc}") from exc
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidInput(
                f"{source}: expected a row or a list of rows of numbers of equal length ({exc})"
            ) from exc
    if tuple(values.shape) == shape or (values.dim() == 1 and len(values) == math.prod(shape)):
        return values.reshape(1, *shape)  # one row
    if values.dim() == 2 and len(shape) > 1 and values.shape[1] == math.prod(shape):
        return values.reshape(len(values), *shape)  # flat rows of an image model
    return values


def cmd_predict(args: argparse.Namespace) -> int:
    if args.url is not None:
        return remote_predict(args)
    model = resolve_model(args.model, settings_from(args))
    options = model.options(
        args.samples,
        seed=args.seed,
        mask_mode=args.mask_mode,
        interval_levels=tuple(args.interval),
        return_samples=args.return_samples,
    )
    rows = read_rows(tuple(model.spec.input.shape), args.rows, args.file)
    document = prediction_document(model.spec, model.predict(rows, options), options.mask_mode)
    print(json.dumps(document, indent=2) if args.json else format_document(document))
    return 0


def remote_predict(args: argparse.Namespace) -> int:
    """`predict --url`: the same request sent to a running server."""
    info = client.model_info(args.url, args.model, args.token)
    rows = read_rows(tuple(info["input_shape"]), args.rows, args.file)
    body = {
        "rows": rows.tolist(),
        "samples": args.samples,
        "seed": args.seed,
        "mask_mode": args.mask_mode,
        "interval_levels": args.interval,
        "return_samples": args.return_samples,
    }
    answer = client.predict(args.url, args.model, {k: v for k, v in body.items() if v is not None},
                            args.token)  # fmt: skip
    document = {"model": answer["model"], "version": answer["version"], "task": info["task"],
                "mask_mode": args.mask_mode or info["mask_mode"],
                "samples_used": answer["samples_used"], "seed": answer["seed"],
                "mask_stream": answer.get("mask_stream"),
                "rows": answer["predictions"]}  # fmt: skip
    print(json.dumps(document, indent=2) if args.json else format_document(document))
    return 0


# --- serve --------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    flags = {
        "model_repository": args.model_repository,
        "device": args.device,
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "shard_workers": args.shard_workers,
        "shard_threshold": args.shard_threshold,
        "max_batch_rows": args.max_batch_rows,
        "max_batch_delay_ms": args.max_batch_delay_ms,
        "queue_size": args.queue_size,
        "max_body_bytes": args.max_body_bytes,
        "poll_interval_s": args.poll_interval_s,
        "control_token": args.control_token,
        "inference_token": args.inference_token,
        "cors_origins": args.cors_origin,
    }
    settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    ray_flags = {
        "replicas": args.replicas,
        "autoscaling": args.autoscale,
        "address": args.ray_address,
        "num_cpus": args.ray_num_cpus,
        "num_gpus": args.ray_num_gpus,
        "shard_actors": args.ray_shard_actors,
    }
    given = {k: v for k, v in ray_flags.items() if v is not None}
    if not args.ray:
        if given:
            raise InvalidInput("--replicas, --autoscale and --ray-* need --ray")
        serve(settings)
        return 0
    if args.workers is not None:
        raise InvalidInput("--workers is for uvicorn; with --ray use --replicas")
    from mcdrop.ray_options import RAY_MISSING, RayOptions

    options = RayOptions(**given)  # validated before Ray is imported: bad flags fail fast
    try:
        ray_serve = importlib.import_module("mcdrop.ray_serve")
    except ImportError as exc:
        raise InvalidInput(RAY_MISSING) from exc
    # Replicas may run in another working directory (or on another node): an absolute path.
    ray_serve.run(
        settings.model_copy(update={"model_repository": settings.model_repository.resolve()}),
        options,
    )
    return 0


# --- models and demo ----------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    scan = scan_repository(settings.model_repository)
    table = [["name", "version", "task", "input", "stochastic sites"]]
    errors = dict(scan.errors)
    notes: list[str] = []
    for name, (spec, folder) in scan.models.items():
        try:
            coverage = ServedModel.load(folder, settings).engine.coverage()
        except ServiceError as exc:
            errors[name] = str(exc)
            continue
        listed = ", ".join(_site_text(s) for s in coverage["sampled"])
        table.append([name, spec.version, spec.task, str(spec.input.shape), listed])
        notes += [
            f"{name}  not sampled: {n['name']}: {n['reason']}" for n in coverage["not_sampled"]
        ]
        if coverage["whole_because"]:
            notes.append(f"{name}  runs whole (slower): {coverage['whole_because']}")
        notes += [
            f"{name}  opaque to fx, run eagerly, dropout caught at the dispatcher: {path}"
            for path in coverage["opaque"]
        ]
    print(
        f"{settings.model_repository}: {len(table) - 1} model(s)"
        + (f", {len(errors)} broken" if errors else "")
    )
    if len(table) > 1:
        print("\n".join(render_table(table)))
    for note in notes:
        print(note)
    for name, message in sorted(errors.items()):
        print(f"{name}  BROKEN: {' '.join(message.split())}")
    return 0


def _site_text(site: dict[str, Any]) -> str:
    """One sampled site as `mcdrop models` lists it: name (kind, p=0.1 | op bernoulli_)."""
    detail = f"op {site['op']}" if "op" in site else f"p={site['p']:g}"
    return f"{site['name']} ({site['kind']}, {detail})"


def cmd_demo(args: argparse.Namespace) -> int:
    from mcdrop.training.demo_models import demo_text

    print(demo_text(settings_from(args)))
    return 0
