"""Summaries as JSON-ready rows and as a readable table, shared by the CLI and the native API.

One object per input row, keyed by the model's output names (regression) or class labels
(classification), so clients never map indices back to names themselves:

    regression row      {output_name: {"mean", "std", "variance", "epistemic_variance",
                          "aleatoric_variance", "intervals": {"0.95": {"gaussian": [lo, hi],
                          "empirical": [lo, hi] | null}}, "samples": [K floats] (if kept)}}
    classification row  {"predicted": label, "probabilities": {label: p},
                          "probabilities_std": {label: s}, "entropy", "expected_entropy",
                          "mutual_information", "variation_ratio",
                          "samples": [K][C] per-sample probabilities (if kept)}

A model with a map output (output.shape of several axes) gets one object per row of nested
arrays in the output's shape instead:

    regression map      {"names", "mean", "std", "variance", "epistemic_variance",
                          "aleatoric_variance", "intervals": {"0.95": {"gaussian": {"lower",
                          "upper"}, "empirical": {"lower", "upper"} | null}}, "map_mean":
                          {field: float}, "samples" (if kept)}
    classification map  {"classes", "predicted_class" (indices), "probabilities",
                          "probabilities_std" ([C, ...] in the model's layout), "entropy",
                          "expected_entropy", "mutual_information", "variation_ratio",
                          "map_mean": {measure: float}, "by_predicted_class": {label:
                          {"elements", measure: mean | null}}, "samples" (if kept)}

Interval keys are str(level); entropies are in nats. Values are Python floats (not NaN-safe:
a model whose outputs overflow yields inf/NaN, which strict JSON encoders reject).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from mcdrop.engine.masks import MASK_STREAM
from mcdrop.repository.manifest import ModelSpec
from mcdrop.uncertainty import RegressionSummary, Summary, is_map, map_reductions

REGRESSION_FIELDS = ("mean", "std", "variance", "epistemic_variance", "aleatoric_variance")
CLASSIFICATION_FIELDS = ("entropy", "expected_entropy", "mutual_information", "variation_ratio")


def _floats(t: Tensor) -> list[Any]:
    return t.detach().cpu().double().tolist()


def summary_meta(summary: Summary) -> dict[str, Any]:
    """The request-level facts of a summary: samples_used (after 'auto'), the seed used and
    the mask-stream version, which together reproduce it."""
    return {"samples_used": summary.samples_used, "seed": summary.seed, "mask_stream": MASK_STREAM}


def summary_rows(summary: Summary, spec: ModelSpec) -> list[dict[str, Any]]:
    """One JSON-ready object per row of the summary (see the module docstring for the shape)."""
    names = spec.output.names
    if is_map(summary):
        return map_rows(summary, names)
    rows: list[dict[str, Any]] = []
    if isinstance(summary, RegressionSummary):
        for r in range(len(summary.mean)):
            outputs = {}
            for d, name in enumerate(names):
                out: dict[str, Any] = {
                    k: float(getattr(summary, k)[r, d]) for k in REGRESSION_FIELDS
                }
                out["intervals"] = {
                    str(level): {
                        "gaussian": [float(i.lower[r, d]), float(i.upper[r, d])],
                        "empirical": [float(e.lower[r, d]), float(e.upper[r, d])]
                        if (e := summary.empirical_intervals.get(level))
                        else None,
                    }
                    for level, i in summary.gaussian_intervals.items()
                }
                if summary.samples is not None:
                    out["samples"] = _floats(summary.samples[r, :, d])
                outputs[name] = out
            rows.append(outputs)
        return rows
    for r in range(len(summary.probabilities)):
        row: dict[str, Any] = {
            "predicted": names[int(summary.predicted_class[r])],
            "probabilities": dict(zip(names, _floats(summary.probabilities[r]), strict=True)),
            "probabilities_std": dict(
                zip(names, _floats(summary.probabilities_std[r]), strict=True)
            ),
        }
        for key in CLASSIFICATION_FIELDS:
            row[key] = float(getattr(summary, key)[r])
        if summary.samples is not None:
            row["samples"] = _floats(summary.samples[r])
        rows.append(row)
    return rows


def map_rows(summary: Summary, names: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a map summary as nested arrays (see the module docstring)."""
    reductions = map_reductions(summary)
    rows: list[dict[str, Any]] = []
    if isinstance(summary, RegressionSummary):
        for r in range(len(summary.mean)):
            row: dict[str, Any] = {"names": list(names)}
            row.update({k: _floats(getattr(summary, k)[r]) for k in REGRESSION_FIELDS})
            row["intervals"] = {
                str(level): {
                    "gaussian": {"lower": _floats(i.lower[r]), "upper": _floats(i.upper[r])},
                    "empirical": {"lower": _floats(e.lower[r]), "upper": _floats(e.upper[r])}
                    if (e := summary.empirical_intervals.get(level))
                    else None,
                }
                for level, i in summary.gaussian_intervals.items()
            }
            row["map_mean"] = {k.removesuffix("_map_mean"): float(v[r])
                               for k, v in reductions.items()}  # fmt: skip
            if summary.samples is not None:
                row["samples"] = _floats(summary.samples[r])
            rows.append(row)
        return rows
    for r in range(len(summary.probabilities)):
        row = {
            "classes": list(names),
            "predicted_class": summary.predicted_class[r].tolist(),
            "probabilities": _floats(summary.probabilities[r]),
            "probabilities_std": _floats(summary.probabilities_std[r]),
        }
        row.update({key: _floats(getattr(summary, key)[r]) for key in CLASSIFICATION_FIELDS})
        row["map_mean"] = {key: float(reductions[f"{key}_map_mean"][r])
                           for key in CLASSIFICATION_FIELDS}  # fmt: skip
        sizes = reductions["class_elements"][r]
        row["by_predicted_class"] = {
            label: {"elements": int(sizes[c]),
                    **{key: float(reductions[f"{key}_by_class"][r, c]) if sizes[c] else None
                       for key in CLASSIFICATION_FIELDS}}
            for c, label in enumerate(names)
        }  # fmt: skip
        if summary.samples is not None:
            row["samples"] = _floats(summary.samples[r])
        rows.append(row)
    return rows


def summary_document(summary: Summary, spec: ModelSpec) -> dict[str, Any]:
    """summary_meta and the rows in one object: {"samples_used", "seed", "rows"}."""
    return {**summary_meta(summary), "rows": summary_rows(summary, spec)}


def prediction_document(spec: ModelSpec, summary: Summary, mask_mode: str) -> dict[str, Any]:
    """What `mcdrop predict --json` prints, local or remote: the model, how it sampled, the rows."""
    return {"model": spec.name, "version": spec.version, "task": spec.task,
            "mask_mode": mask_mode, **summary_document(summary, spec)}  # fmt: skip


def format_summary(spec: ModelSpec, summary: Summary, mask_mode: str) -> str:
    """A readable table of a summary, one line per row (and output), with a short legend."""
    return format_document(prediction_document(spec, summary, mask_mode))


def format_document(document: Mapping[str, Any]) -> str:
    """The readable table of a prediction_document (from this process or from a server's rows).

    One function for both, so `mcdrop predict --url` prints what `mcdrop predict` prints.
    """
    lines = [
        f"{document['model']} v{document['version']} ({document['task']}): "
        f"{document['samples_used']} MC samples, seed {document['seed']}, "
        f"{document['mask_mode']} masks"
    ]
    rows: list[dict[str, Any]] = document["rows"]
    samples: list[str] = []
    if rows and "map_mean" in rows[0]:  # a map: its means per row (--json has the maps)
        keys = list(rows[0]["map_mean"])
        table = [["row", *(f"map mean {k}" for k in keys)]]
        table += [[str(r), *(f"{row['map_mean'][k]:.4g}" for k in keys)]
                  for r, row in enumerate(rows)]  # fmt: skip
        legend = "per-element maps: --json gives them whole, in the model's output shape"
    elif document["task"] == "regression":
        levels = sorted(rows[0][next(iter(rows[0]))]["intervals"], key=float) if rows else []
        head = ["row", "output", "mean", "std", "epistemic", "aleatoric"]
        table = [head + [f"{float(level):.0%} interval" for level in levels]]
        for r, row in enumerate(rows):
            kept: list[float] = []
            for name, out in row.items():
                values = (out["mean"], out["std"], math.sqrt(out["epistemic_variance"]),
                          math.sqrt(out["aleatoric_variance"]))  # fmt: skip
                cells = [str(r), name] + [f"{v:.4g}" for v in values]
                for level in levels:
                    lower, upper = out["intervals"][level]["gaussian"]
                    cells.append(f"[{lower:.4g}, {upper:.4g}]")
                table.append(cells)
                kept += out.get("samples", [])
            if kept:
                samples.append(f"row {r} samples: " + ", ".join(f"{v:.4g}" for v in kept))
        legend = (
            "std: total predictive std = sqrt(epistemic^2 + aleatoric^2); epistemic: "
            "spread of the dropout samples (model uncertainty); aleatoric: noise; "
            "intervals are Gaussian (--json adds empirical ones)"
        )
    else:
        table = [["row", "class", "probability", "entropy", "mutual_info", "variation_ratio"]]
        for r, row in enumerate(rows):
            predicted = row["predicted"]
            measures = [row[key] for key in ("entropy", "mutual_information", "variation_ratio")]
            probability = row["probabilities"][predicted]
            table.append([str(r), predicted, *(f"{v:.3f}" for v in (probability, *measures))])
            if "samples" in row:
                flat = [v for sample in row["samples"] for v in sample]
                samples.append(f"row {r} samples: " + ", ".join(f"{v:.4g}" for v in flat))
        legend = (
            "entropy: total uncertainty (nats); mutual_info: the part due to the model "
            "(dropout samples disagree); variation_ratio: share of samples not voting "
            "for the top class"
        )
    return "\n".join([*lines, *render_table(table), *samples, legend])


def render_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns separated by two spaces (the first row is the header)."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
