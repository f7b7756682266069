"""Inferring a feature schema from a CSV: numeric when every cell parses as a finite number.

An inferred schema takes its ranges and categories from the data it saw, so the service would
refuse values outside them; review it (`privscore-model infer-schema`) and commit a schema file
for anything that serves real traffic.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from model_export.dataset import DataError, Table, column_name
from service.model.schema import CATEGORICAL, NUMERIC, FeatureSchema, FeatureSpec, SchemaError


def schema_name_for(data_path: str | Path) -> str:
    """`small_lender.csv` -> `small-lender`."""
    stem = re.sub(r"[^a-z0-9]+", "-", Path(data_path).stem.lower()).strip("-")
    return stem[:64] or "dataset"


def infer_schema(
    table: Table,
    *,
    label: str,
    bad_value: str,
    name: str,
    exclude: Iterable[str] = (),
    sensitive: Iterable[str] = (),
) -> FeatureSchema:
    label_column = column_name(label)
    if label_column not in table.columns:
        raise DataError(f"label column {label!r} is not in {table.file_name}")
    features = []
    for column in table.columns:
        if column == label_column:
            continue
        features.append(_infer_feature(column, table.column(column), table.file_name))
    schema = FeatureSchema(name, label_column, bad_value, tuple(features))
    return apply_flags(schema, exclude=exclude, sensitive=sensitive)


def apply_flags(
    schema: FeatureSchema, *, exclude: Iterable[str] = (), sensitive: Iterable[str] = ()
) -> FeatureSchema:
    """The schema with more features excluded from the model and/or marked sensitive."""
    exclude = [column_name(item) for item in exclude]
    sensitive = {column_name(item) for item in sensitive}
    unknown = sorted(sensitive - {feature.name for feature in schema.features})
    if unknown:
        raise SchemaError(f"cannot mark unknown features as sensitive: {unknown}")
    if sensitive:
        features = tuple(
            replace(f, sensitive=True) if f.name in sensitive else f for f in schema.features
        )
        schema = replace(schema, features=features)
    return schema.with_exclusions(exclude) if exclude else schema


def _infer_feature(column: str, cells: list[str], file_name: str) -> FeatureSpec:
    empty = sum(1 for cell in cells if not cell.strip())
    if empty:
        raise DataError(
            f"{file_name}: column {column!r} has {empty} empty cells; "
            "impute or drop them before training"
        )
    numbers = _as_numbers(cells)
    if numbers is None:
        return FeatureSpec(name=column, kind=CATEGORICAL, categories=tuple(sorted(set(cells))))
    return FeatureSpec(
        name=column,
        kind=NUMERIC,
        min=min(numbers),
        max=max(numbers),
        integer=all(number.is_integer() for number in numbers),
    )


def _as_numbers(cells: list[str]) -> list[float] | None:
    numbers = []
    for cell in cells:
        try:
            number = float(cell)
        except ValueError:
            return None
        if not math.isfinite(number):
            return None
        numbers.append(number)
    return numbers
