"""The shared feature schema: loading, versioning, request-value validation, inference."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from model_export.dataset import column_name, read_csv
from model_export.schema_infer import apply_flags, infer_schema
from service.model.schema import (
    FeatureSchema,
    FeatureSpec,
    SchemaError,
    check_value,
    validate_record,
    validate_value,
)

from .conftest import GERMAN_DATA, GERMAN_SCHEMA, REPO_ROOT


@pytest.fixture(scope="module")
def german() -> FeatureSchema:
    return FeatureSchema.load(GERMAN_SCHEMA)


def test_german_schema_excludes_protected_attributes_and_reports_age(german: FeatureSchema):
    excluded = {spec.name for spec in german.excluded_features}
    assert excluded == {"personal_status_and_sex", "foreign_worker"}
    assert all(german.feature(name).sensitive for name in excluded)
    age = german.feature("age_in_years")
    assert (age.sensitive, age.excluded, age.fairness_threshold) == (True, False, 25.0)
    assert len(german.model_features) == 18
    header = read_csv(GERMAN_DATA).columns
    assert [spec.name for spec in german.features] == [c for c in header if c != german.label]


def test_version_is_deterministic_and_tracks_only_the_request_contract(german: FeatureSchema):
    reloaded = FeatureSchema.from_dict(json.loads(json.dumps(german.to_dict())))
    assert reloaded.version == german.version
    assert german.version.startswith("german-credit-") and len(german.version) == 26

    def with_feature(**changes: Any) -> FeatureSchema:
        features = tuple(
            replace(f, **changes) if f.name == "duration_in_month" else f for f in german.features
        )
        return replace(german, features=features)

    assert with_feature(max=240.0).version != german.version
    assert with_feature(reason_text="Term of the loan").version == german.version
    # 120 and 120.0 are the same bound, so the same version.
    assert with_feature(max=120).version == german.version


def test_a_stated_version_must_match_the_content(german: FeatureSchema):
    document = german.to_dict()
    document["features"][1]["max"] = 999.0
    with pytest.raises(SchemaError, match="does not match its content"):
        FeatureSchema.from_dict(document)


def test_unknown_keys_are_refused_so_a_typo_cannot_keep_an_attribute_in_the_model():
    document = json.loads(GERMAN_SCHEMA.read_text())
    document["features"][-1] = {**document["features"][-1], "exclude": True}
    del document["features"][-1]["excluded"]
    with pytest.raises(SchemaError, match="unknown keys"):
        FeatureSchema.from_dict(document)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (12345.678, "NOT_INTEGER"),
        (-7, "OUT_OF_RANGE"),
        (4321, "OUT_OF_RANGE"),
        (True, "WRONG_TYPE"),
        ("12", "WRONG_TYPE"),
        (math.nan, "NOT_FINITE"),
        (math.inf, "NOT_FINITE"),
        (10**400, "OUT_OF_RANGE"),
    ],
)
def test_numeric_values_are_checked_without_echoing_them(german, value, reason):
    spec = german.feature("duration_in_month")
    problem = check_value(spec, value)
    assert problem is not None and problem.reason == reason
    assert str(value) not in problem.description
    assert validate_value(spec, value) == problem.description


def test_valid_values_pass(german: FeatureSchema):
    assert validate_value(german.feature("duration_in_month"), 24) is None
    assert validate_value(german.feature("duration_in_month"), 24.0) is None
    assert validate_value(german.feature("housing"), "own") is None


def test_categorical_values_must_be_known_categories(german: FeatureSchema):
    spec = german.feature("housing")
    problem = check_value(spec, "castle in the air")
    assert problem is not None and problem.reason == "UNKNOWN_CATEGORY"
    assert "castle" not in problem.description and '"own"' in problem.description
    assert check_value(spec, 3) == check_value(spec, None)  # both: must be a string


def test_validate_record_requires_model_features_and_refuses_excluded_ones(german: FeatureSchema):
    record: dict[str, object] = {spec.name: None for spec in german.model_features}
    record.update(duration_in_month=12, housing="own", foreign_worker="yes", favourite_colour="x")
    del record["purpose"]
    problems = dict(validate_record(german, record))
    assert problems["purpose"].reason == "MISSING_FEATURE"
    assert problems["foreign_worker"].reason == "EXCLUDED_FEATURE"
    assert problems["favourite_colour"].reason == "UNKNOWN_FEATURE"
    assert problems["credit_amount"].reason == "WRONG_TYPE"
    assert "duration_in_month" not in problems and "housing" not in problems


def test_feature_names_must_be_identifiers():
    with pytest.raises(SchemaError, match="must match"):
        FeatureSpec(name="credit amount", kind="numeric")


def test_inference_types_columns_and_normalises_headers(synthetic_csv: Path):
    table = read_csv(synthetic_csv)
    schema = infer_schema(table, label="outcome", bad_value="default", name="small-lender")
    by_name = {spec.name: spec for spec in schema.features}
    assert set(by_name) == {"monthly_income_eur", "age", "region", "employment", "gender",
                            "open_loans"}  # fmt: skip
    income = by_name["monthly_income_eur"]
    assert (income.kind, income.integer) == ("numeric", False)
    age = by_name["age"]
    assert age.integer and age.min is not None and age.min >= 18
    assert by_name["region"].categories == ("east", "north", "south")
    flagged = apply_flags(schema, exclude=["gender"], sensitive=["age"])
    assert [spec.name for spec in flagged.excluded_features] == ["gender"]
    assert flagged.feature("age").sensitive and not flagged.feature("age").excluded
    german = apply_flags(FeatureSchema.load(GERMAN_SCHEMA), exclude=["telephone"])
    assert len(german.excluded_features) == 3 and german.feature("telephone").excluded
    assert column_name("Monthly Income (EUR)") == "monthly_income_eur"


def test_inference_refuses_empty_cells(tmp_path: Path):
    path = tmp_path / "holes.csv"
    path.write_text("a,b,y\n1,x,good\n,y,bad\n")
    with pytest.raises(ValueError, match="empty cells"):
        infer_schema(read_csv(path), label="y", bad_value="bad", name="holes")


def test_the_shared_format_imports_neither_numpy_nor_onnxruntime():
    code = (
        "import sys, service.model.manifest, service.model.schema; "
        "heavy = {'numpy', 'sklearn', 'onnxruntime', 'onnx'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_no_german_credit_column_is_named_in_python_code():
    names = json.loads(GERMAN_SCHEMA.read_text())["features"]
    columns = {feature["name"] for feature in names} | {"creditability"}
    shared_format = [REPO_ROOT / "service/model/schema.py", REPO_ROOT / "service/model/manifest.py"]
    sources = [*(REPO_ROOT / "model_export").rglob("*.py"), *shared_format]
    assert len(sources) > 5
    for source in sources:
        text = source.read_text()
        # One-word columns (`property`, `job`) are also Python words: look for them quoted.
        found = sorted(
            column
            for column in columns
            if ("_" in column and column in text) or f'"{column}"' in text or f"'{column}'" in text
        )
        assert not found, f"{source.relative_to(REPO_ROOT)} names {found}"
