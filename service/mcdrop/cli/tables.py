"""Numeric tables for training and evaluation: CSV or whitespace text, and column selection."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcdrop.errors import InvalidInput

ColumnSpec = str | int | Sequence[int | str]
_SINGLE = re.compile(r"^-?\d+$")
_RANGE = re.compile(r"^(\d+)-(\d+)$")


class TableError(InvalidInput):
    """A table file or a column spec is malformed; the message names the file, line or spec."""


@dataclass(frozen=True)
class Table:
    """A numeric table: values [rows, columns] (float64) and the header's names, if any."""

    values: np.ndarray
    names: list[str] | None


def _cells(line: str, comma: bool) -> list[str]:
    if comma:
        return [cell.strip() for cell in next(csv.reader([line]))]
    return line.split()


def _number(cell: str) -> float | None:
    """The cell as a finite float, or None when it is not one."""
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def load_table(path: Path | str, header: bool | None = None) -> Table:
    """Read a numeric table: CSV (comma) or whitespace-separated text, blank and # lines skipped.

    The delimiter is a comma when the first data line has one. header=None detects a header:
    the first line is one when any of its cells is not a number. Every other cell must be a
    finite number and every row as long as the first; errors name the file, line and column.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise TableError(f"{path}: cannot read table: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TableError(f"{path}: not a UTF-8 text table ({exc.reason})") from exc

    lines = [
        (number, line)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise TableError(f"{path}: no data rows (the file is empty or only comments)")
    comma = "," in lines[0][1]

    names: list[str] | None = None
    first_number, first_line = lines[0]
    first_cells = _cells(first_line, comma)
    is_header = header if header is not None else any(_number(c) is None for c in first_cells)
    if is_header:
        names = first_cells
        lines = lines[1:]
        if not lines:
            raise TableError(f"{path}: no data rows after the header on line {first_number}")

    width = len(names) if names is not None else len(first_cells)
    width_line = first_number
    rows: list[list[float]] = []
    for number, line in lines:
        cells = _cells(line, comma)
        if len(cells) != width:
            raise TableError(
                f"{path}, line {number}: {len(cells)} columns, expected {width} "
                f"(as on line {width_line})"
            )
        row: list[float] = []
        for column, cell in enumerate(cells):
            value = _number(cell)
            if value is None:
                raise TableError(
                    f"{path}, line {number}, column {column}: {cell!r} is not a finite number"
                )
            row.append(value)
        rows.append(row)
    return Table(np.asarray(rows, dtype=np.float64).reshape(len(rows), width), names)


def read_table(path: Path | str, header: bool | None = None) -> np.ndarray:
    """The numeric values of a table file as a float64 array [rows, columns] (see load_table)."""
    return load_table(path, header).values


def _parts(spec: ColumnSpec) -> list[str]:
    if isinstance(spec, bool):
        raise TableError(f"column spec {spec!r}: expected column numbers, not a boolean")
    if isinstance(spec, int):
        return [str(spec)]
    if isinstance(spec, str):
        return [part.strip() for part in spec.split(",")]
    parts: list[str] = []
    for item in spec:
        parts.extend(_parts(item))
    return parts


def parse_columns(spec: ColumnSpec, n_columns: int) -> list[int]:
    """Column numbers from a spec: 0-based ints, inclusive ranges "0-7", negatives "-1" (last).

    Accepts a CLI string ("0-7,9", "-1"), an int, or a list of either. Errors name the spec.
    """
    columns: list[int] = []
    for part in _parts(spec):
        if _SINGLE.match(part):
            index = int(part)
            if not -n_columns <= index < n_columns:
                raise TableError(
                    f"column spec {spec!r}: column {index} is outside a table of "
                    f"{n_columns} columns (0..{n_columns - 1}, or -1 for the last)"
                )
            columns.append(index % n_columns)
        elif match := _RANGE.match(part):
            start, stop = int(match[1]), int(match[2])
            if start > stop:
                raise TableError(f"column spec {spec!r}: range {part!r} runs backwards")
            if stop >= n_columns:
                raise TableError(
                    f"column spec {spec!r}: range {part!r} goes past the last column "
                    f"({n_columns - 1})"
                )
            columns.extend(range(start, stop + 1))
        else:
            raise TableError(
                f"column spec {spec!r}: {part!r} is not a column number, a range like '0-7', "
                "or a negative index like '-1'"
            )
    seen: set[int] = set()
    for column in columns:
        if column in seen:
            raise TableError(f"column spec {spec!r}: column {column} is named twice")
        seen.add(column)
    return columns


def select_columns(
    table: np.ndarray, features: ColumnSpec | None, target: ColumnSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Split a table [rows, columns] into inputs X [rows, F] and targets y [rows, D].

    features=None takes every column that is not a target. A column may not be both.
    """
    if table.ndim != 2:
        raise TableError(f"expected a 2-D table, got an array of shape {tuple(table.shape)}")
    n_columns = table.shape[1]
    target_columns = parse_columns(target, n_columns)
    if not target_columns:
        raise TableError(f"target column spec {target!r} selects no column")
    if features is None:
        feature_columns = [c for c in range(n_columns) if c not in target_columns]
    else:
        feature_columns = parse_columns(features, n_columns)
        overlap = sorted(set(feature_columns) & set(target_columns))
        if overlap:
            raise TableError(
                f"column(s) {overlap} are both features ({features!r}) and target ({target!r})"
            )
    if not feature_columns:
        raise TableError(f"feature column spec {features!r} selects no column")
    return table[:, feature_columns], table[:, target_columns]
