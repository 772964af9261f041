"""Reading numeric tables (CSV, whitespace text) and choosing columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mcdrop.cli.tables import TableError, load_table, parse_columns, read_table, select_columns
from mcdrop.errors import InvalidInput

UCI_BOSTON = Path("/work/shared/uci/bostonHousing/data.txt")


def _write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_with_header_gives_names_and_values(tmp_path: Path) -> None:
    path = _write(tmp_path, 'x1,x2,y\n1,2.5,3\n-4,5e-1,"6"\n')
    table = load_table(path)
    assert table.names == ["x1", "x2", "y"]
    np.testing.assert_array_equal(table.values, [[1.0, 2.5, 3.0], [-4.0, 0.5, 6.0]])
    assert table.values.dtype == np.float64


def test_csv_without_header_and_with_spaces_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes("\ufeff1, 2\n3 ,4\n".encode())
    table = load_table(path)
    assert table.names is None
    np.testing.assert_array_equal(table.values, [[1.0, 2.0], [3.0, 4.0]])


def test_whitespace_table_skips_blank_and_comment_lines(tmp_path: Path) -> None:
    text = "# a comment\n 0.00632  18.00\t2.310\n\n   0.02731   0.00   7.070  \n"
    values = read_table(_write(tmp_path, text, "data.txt"))
    np.testing.assert_array_equal(values, [[0.00632, 18.0, 2.31], [0.02731, 0.0, 7.07]])


def test_single_column_is_still_two_dimensional(tmp_path: Path) -> None:
    values = read_table(_write(tmp_path, "1\n2\n3\n", "one.txt"))
    assert values.shape == (3, 1)


def test_header_can_be_forced_either_way(tmp_path: Path) -> None:
    path = _write(tmp_path, "10,20\n1,2\n")
    assert load_table(path, header=True).names == ["10", "20"]
    assert read_table(path, header=True).shape == (1, 2)
    assert read_table(path, header=False).shape == (2, 2)


def test_non_numeric_cell_names_file_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "a,b\n1,2\n\n3,oops\n")
    with pytest.raises(TableError, match=r"t\.csv, line 4, column 1: 'oops' is not a finite"):
        read_table(path)


def test_missing_and_nan_cells_are_errors(tmp_path: Path) -> None:
    with pytest.raises(TableError, match=r"line 2, column 1: ''"):
        read_table(_write(tmp_path, "1,2\n3,\n"))
    with pytest.raises(TableError, match=r"line 3, column 0: 'nan'"):
        read_table(_write(tmp_path, "1 2\n3 4\nnan 5\n", "w.txt"))


def test_ragged_rows_name_the_line_and_widths(tmp_path: Path) -> None:
    path = _write(tmp_path, "1 2 3\n4 5 6\n7 8\n", "r.txt")
    with pytest.raises(TableError, match=r"r\.txt, line 3: 2 columns, expected 3 \(as on line 1\)"):
        read_table(path)


def test_empty_header_only_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="no data rows"):
        read_table(_write(tmp_path, "\n# nothing\n", "empty.txt"))
    with pytest.raises(TableError, match="after the header on line 1"):
        read_table(_write(tmp_path, "a,b\n", "h.csv"))
    with pytest.raises(TableError, match="cannot read table"):
        read_table(tmp_path / "absent.csv")


def test_table_errors_are_invalid_input() -> None:
    assert issubclass(TableError, InvalidInput)


@pytest.mark.skipif(not UCI_BOSTON.exists(), reason="shared UCI data not present")
def test_reads_the_uci_boston_file() -> None:
    values = read_table(UCI_BOSTON)
    assert values.shape == (506, 14)
    assert values[0, 0] == pytest.approx(0.00632)
    assert values[0, -1] == pytest.approx(24.0)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0-7,9", [0, 1, 2, 3, 4, 5, 6, 7, 9]),
        ("-1", [11]),
        (" 3 , -2 ", [3, 10]),
        (4, [4]),
        ([0, "2-3", -1], [0, 2, 3, 11]),
        ("5-5", [5]),
    ],
)
def test_parse_columns(spec: str | int | list[int | str], expected: list[int]) -> None:
    assert parse_columns(spec, 12) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("a", r"'a' is not a column number"),
        ("1-", r"'1-' is not a column number"),
        ("7-3", r"range '7-3' runs backwards"),
        ("12", r"column 12 is outside a table of 12 columns"),
        ("-13", r"column -13 is outside"),
        ("10-12", r"range '10-12' goes past the last column \(11\)"),
        ("1,1", r"column 1 is named twice"),
        ("0,-12", r"column 0 is named twice"),
        (True, r"not a boolean"),
    ],
)
def test_parse_columns_errors_name_the_spec(spec: str | bool, message: str) -> None:
    with pytest.raises(TableError, match=message) as info:
        parse_columns(spec, 12)
    assert repr(spec) in str(info.value)


def test_select_columns_splits_features_and_target() -> None:
    table = np.arange(12.0).reshape(3, 4)
    x, y = select_columns(table, "0-1", "-1")
    np.testing.assert_array_equal(x, table[:, :2])
    np.testing.assert_array_equal(y, table[:, 3:])
    assert y.shape == (3, 1)


def test_select_columns_defaults_features_to_the_rest() -> None:
    table = np.arange(12.0).reshape(3, 4)
    x, y = select_columns(table, None, "1")
    np.testing.assert_array_equal(x, table[:, [0, 2, 3]])
    np.testing.assert_array_equal(y, table[:, [1]])


def test_select_columns_refuses_overlap() -> None:
    table = np.zeros((2, 4))
    with pytest.raises(TableError, match=r"\[3\] are both features \('0-3'\) and target \('-1'\)"):
        select_columns(table, "0-3", "-1")
