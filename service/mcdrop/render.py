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

Interval keys are str(level); entropies are in nats. Values are Python floats (not NaN-safe:
a model whose outputs overflow yields inf/NaN, which strict JSON encoders reject).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from mcdrop.repository.manifest import ModelSpec
from mcdrop.uncertainty import RegressionSummary, Summary

REGRESSION_FIELDS = ("mean", "std", "variance", "epistemic_variance", "aleatoric_variance")
CLASSIFICATION_FIELDS = ("entropy", "expected_entropy", "mutual_information", "variation_ratio")


def _floats(t: Tensor) -> list[Any]:
    return t.detach().cpu().double().tolist()


def summary_meta(summary: Summary) -> dict[str, Any]:
    """The request-level facts of a summary: samples_used (after 'auto') and the seed used."""
    return {"samples_used": summary.samples_used, "seed": summary.seed}


def summary_rows(summary: Summary, spec: ModelSpec) -> list[dict[str, Any]]:
    """One JSON-ready object per row of the summary (see the module docstring for the shape)."""
    names = spec.output.names
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


def summary_document(summary: Summary, spec: ModelSpec) -> dict[str, Any]:
    """summary_meta and the rows in one object: {"samples_used", "seed", "rows"}."""
    return {**summary_meta(summary), "rows": summary_rows(summary, spec)}


def format_summary(spec: ModelSpec, summary: Summary, mask_mode: str) -> str:
    """A readable table of a summary, one line per row (and output), with a short legend."""
    lines = [
        f"{spec.name} v{spec.version} ({spec.task}): {summary.samples_used} MC samples, "
        f"seed {summary.seed}, {mask_mode} masks"
    ]
    if isinstance(summary, RegressionSummary):
        levels = sorted(summary.gaussian_intervals)
        head = ["row", "output", "mean", "std", "epistemic", "aleatoric"]
        table = [head + [f"{level:.0%} interval" for level in levels]]
        for r in range(len(summary.mean)):
            for d, name in enumerate(spec.output.names):
                cells = [str(r), name] + [
                    f"{float(v[r, d]):.4g}"
                    for v in (
                        summary.mean,
                        summary.std,
                        summary.epistemic_variance.sqrt(),
                        summary.aleatoric_variance.sqrt(),
                    )
                ]
                for level in levels:
                    i = summary.gaussian_intervals[level]
                    cells.append(f"[{float(i.lower[r, d]):.4g}, {float(i.upper[r, d]):.4g}]")
                table.append(cells)
        legend = (
            "std: total predictive std = sqrt(epistemic^2 + aleatoric^2); epistemic: "
            "spread of the dropout samples (model uncertainty); aleatoric: noise; "
            "intervals are Gaussian (--json adds empirical ones)"
        )
    else:
        table = [["row", "class", "probability", "entropy", "mutual_info", "variation_ratio"]]
        for r in range(len(summary.probabilities)):
            k = int(summary.predicted_class[r])
            table.append(
                [str(r), spec.output.names[k], f"{float(summary.probabilities[r, k]):.3f}"]
                + [
                    f"{float(getattr(summary, key)[r]):.3f}"
                    for key in ("entropy", "mutual_information", "variation_ratio")
                ]
            )
        legend = (
            "entropy: total uncertainty (nats); mutual_info: the part due to the model "
            "(dropout samples disagree); variation_ratio: share of samples not voting "
            "for the top class"
        )
    lines += render_table(table)
    if summary.samples is not None:
        lines += [
            f"row {r} samples: "
            + ", ".join(f"{float(v):.4g}" for v in summary.samples[r].flatten())
            for r in range(len(summary.samples))
        ]
    return "\n".join([*lines, legend])


def render_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns separated by two spaces (the first row is the header)."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
