"""Reading a credit data set (CSV with a header) into the arrays training and ONNX consume."""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.model.schema import FeatureSchema, FeatureSpec, check_value, parse_text

_NOT_NAME_CHARS = re.compile(r"[^A-Za-z0-9_]+")


class DataError(ValueError):
    """The data set cannot be used as given (messages name columns and rows, never values)."""


@dataclass(frozen=True)
class Table:
    """A CSV's text cells under feature-style column names, and the file's identity."""

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    file_name: str
    sha256: str

    def column(self, name: str) -> list[str]:
        try:
            index = self.columns.index(name)
        except ValueError:
            raise DataError(f"column {name!r} is not in {self.file_name}") from None
        return [row[index] for row in self.rows]


def column_name(header: str) -> str:
    """A header as a feature name (ONNX input and request field): `Loan Amount` ->
    `loan_amount`. Headers that already are valid names stay exactly as they are."""
    name = _NOT_NAME_CHARS.sub("_", header.strip()).strip("_")
    if name != header.strip():
        name = name.lower()
    if not name or name[0].isdigit():
        name = f"c_{name}"
    return name[:64]


def read_csv(path: str | Path) -> Table:
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path.name} is not UTF-8 text") from None
    records = list(csv.reader(text.splitlines()))
    if len(records) < 2:
        raise DataError(f"{path.name} needs a header and at least one row")
    header = records[0]
    columns = tuple(column_name(h) for h in header)
    if len(set(columns)) != len(columns):
        raise DataError(f"{path.name}: column names collide after normalisation: {columns}")
    rows = []
    for number, record in enumerate(records[1:], start=2):
        if not record:
            continue
        if len(record) != len(header):
            raise DataError(
                f"{path.name} line {number}: {len(record)} cells, expected {len(header)}"
            )
        rows.append(tuple(record))
    return Table(columns, tuple(rows), path.name, hashlib.sha256(raw).hexdigest())


def labels(schema: FeatureSchema, table: Table) -> npt.NDArray[np.int64]:
    """1 for the bad class, 0 for the other one; exactly two label values are required."""
    values = table.column(column_name(schema.label))
    distinct = sorted(set(values))
    if schema.bad_value not in distinct:
        raise DataError(f"label {schema.label!r} never takes the bad value {schema.bad_value!r}")
    if len(distinct) != 2:
        raise DataError(f"label {schema.label!r} must have exactly two values, has {len(distinct)}")
    return np.array([value == schema.bad_value for value in values], dtype=np.int64)


def feature_matrix(schema: FeatureSchema, table: Table) -> npt.NDArray[np.object_]:
    """Model features as an object array, one column per model feature in schema order.

    Numbers are rounded through float32 here, so scikit-learn fits and predicts on exactly the
    values the float32 ONNX inputs carry. Every cell is checked against the schema.
    """
    specs = schema.model_features
    matrix = np.empty((len(table.rows), len(specs)), dtype=object)
    for j, spec in enumerate(specs):
        for i, value in enumerate(parse_column(spec, table)):
            matrix[i, j] = float(np.float32(value)) if spec.is_numeric else value
    return matrix


def onnx_feeds(
    schema: FeatureSchema, matrix: npt.NDArray[np.object_]
) -> dict[str, npt.NDArray[np.generic]]:
    """The ONNX inputs for a feature matrix: one [N, 1] array per model feature."""
    feeds: dict[str, npt.NDArray[np.generic]] = {}
    for j, spec in enumerate(schema.model_features):
        column = matrix[:, j : j + 1]
        feeds[spec.name] = column.astype(np.float32) if spec.is_numeric else column.astype(object)
    return feeds


def parse_column(spec: FeatureSpec, table: Table) -> list[float | str]:
    """One feature's cells as typed values (numbers as parsed, not float32-rounded), each
    checked against the schema; DataError names the rows, never the values."""
    values: list[float | str] = []
    bad_rows: list[int] = []
    description = ""
    for row_number, text in enumerate(table.column(spec.name), start=2):
        try:
            value = parse_text(spec, text)
        except ValueError:
            bad_rows.append(row_number)
            description = "is not a number"
            values.append(0.0)
            continue
        problem = check_value(spec, value)
        if problem is not None:
            bad_rows.append(row_number)
            description = problem.description
        values.append(value)
    if bad_rows:
        lines = ", ".join(map(str, bad_rows[:5])) + (" ..." if len(bad_rows) > 5 else "")
        raise DataError(
            f"{table.file_name}: column {spec.name!r} {description} "
            f"({len(bad_rows)} rows, lines {lines}); fix the data or the schema"
        )
    return values
