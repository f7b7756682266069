"""Typed feature schema: the one definition of a model's inputs, shared by training and serving.

Pure standard library, so the server validates requests with the same rules the model was
trained under without importing numpy or scikit-learn. A schema is a JSON document:

    {"name": "small-lender", "label": "outcome", "bad_value": "default",
     "features": [{"name": "loan_term_months", "kind": "numeric", "min": 1, "max": 120,
                   "integer": true, "reason_code": "DURATION", "reason_text": "..."}, ...]}

`FeatureSchema.version` is `<name>-<first 12 hex of SHA-256>` over the canonical JSON of what
defines a valid request (schema name, and per feature: name, kind, categories, range, integer,
sensitive, excluded). Wording (descriptions, reason texts) and the fairness-report threshold are
not part of it, so rewording a reason never invalidates encrypted requests bound to the version.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeAlias

NUMERIC: Literal["numeric"] = "numeric"
CATEGORICAL: Literal["categorical"] = "categorical"
FeatureKind: TypeAlias = Literal["numeric", "categorical"]
FeatureValue: TypeAlias = float | str

# Feature names are ONNX input names and request field names: keep them identifier-like.
FEATURE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
SCHEMA_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
REASON_CODE = re.compile(r"[A-Z0-9_]{1,64}")
MAX_CATEGORY_CHARS = 256
VERSION_HASH_HEX = 12

_FEATURE_KEYS = frozenset(
    {
        "name", "kind", "categories", "min", "max", "integer", "sensitive", "excluded",
        "reason_code", "reason_text", "description", "fairness_threshold",
    }
)  # fmt: skip
_SCHEMA_KEYS = frozenset({"name", "version", "label", "bad_value", "features"})


class SchemaError(ValueError):
    """A schema document is malformed or inconsistent."""


@dataclass(frozen=True)
class ValueProblem:
    """Why a value is invalid for a feature: a stable UPPER_SNAKE reason and a description.

    Descriptions quote the schema (ranges, categories), never the offending value.
    """

    reason: str
    description: str


@dataclass(frozen=True)
class FeatureSpec:
    """One input attribute.

    `sensitive` attributes get a fairness report; `excluded` ones are not model inputs (a
    lender must not use them) but stay in the schema so reports can still group by them.
    `fairness_threshold` splits a numeric sensitive attribute into `<t` and `>=t` groups.
    """

    name: str
    kind: FeatureKind
    categories: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    integer: bool = False
    sensitive: bool = False
    excluded: bool = False
    reason_code: str = ""
    reason_text: str = ""
    description: str = ""
    fairness_threshold: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not FEATURE_NAME.fullmatch(self.name):
            raise SchemaError(f"feature name {self.name!r} must match {FEATURE_NAME.pattern}")
        for flag in ("integer", "sensitive", "excluded"):
            if not isinstance(getattr(self, flag), bool):
                raise SchemaError(f"feature {self.name}: {flag} must be true or false")
        if self.kind == CATEGORICAL:
            self._check_categorical()
        elif self.kind == NUMERIC:
            self._check_numeric()
        else:
            raise SchemaError(f"feature {self.name}: kind must be 'numeric' or 'categorical'")
        # Defaults keep inferred schemas usable; a reviewed schema file should set both.
        if not self.reason_code:
            object.__setattr__(self, "reason_code", self.name.upper().lstrip("_")[:64] or "X")
        if not REASON_CODE.fullmatch(self.reason_code):
            raise SchemaError(f"feature {self.name}: reason_code must match {REASON_CODE.pattern}")
        if not self.reason_text:
            object.__setattr__(self, "reason_text", self.name.replace("_", " ").strip())

    def _check_categorical(self) -> None:
        if self.categories is None or isinstance(self.categories, str):
            raise SchemaError(f"feature {self.name}: a categorical feature needs categories")
        categories = tuple(self.categories)
        if not categories or not all(isinstance(c, str) for c in categories):
            raise SchemaError(f"feature {self.name}: categories must be a non-empty string list")
        if len(set(categories)) != len(categories):
            raise SchemaError(f"feature {self.name}: categories must be unique")
        if any(not c or len(c) > MAX_CATEGORY_CHARS for c in categories):
            raise SchemaError(f"feature {self.name}: categories must be 1-256 characters")
        if self.min is not None or self.max is not None or self.integer:
            raise SchemaError(f"feature {self.name}: min, max and integer are numeric-only")
        if self.fairness_threshold is not None:
            raise SchemaError(f"feature {self.name}: fairness_threshold is numeric-only")
        object.__setattr__(self, "categories", categories)

    def _check_numeric(self) -> None:
        if self.categories is not None:
            raise SchemaError(f"feature {self.name}: a numeric feature has no categories")
        # Store bounds as floats so 4 and 4.0 give the same canonical JSON (and version).
        for bound in ("min", "max", "fairness_threshold"):
            value = getattr(self, bound)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SchemaError(f"feature {self.name}: {bound} must be a number")
            if not math.isfinite(value):
                raise SchemaError(f"feature {self.name}: {bound} must be finite")
            object.__setattr__(self, bound, float(value))
        if self.min is not None and self.max is not None and self.min > self.max:
            raise SchemaError(f"feature {self.name}: min must not exceed max")

    @property
    def is_numeric(self) -> bool:
        return self.kind == NUMERIC

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "categories": list(self.categories) if self.categories is not None else None,
            "min": self.min,
            "max": self.max,
            "integer": self.integer,
            "sensitive": self.sensitive,
            "excluded": self.excluded,
            "reason_code": self.reason_code,
            "reason_text": self.reason_text,
            "description": self.description,
            "fairness_threshold": self.fairness_threshold,
        }

    def contract(self) -> dict[str, Any]:
        """The fields that decide whether a request value is valid (hashed into the version)."""
        full = self.to_dict()
        keys = ("name", "kind", "categories", "min", "max", "integer", "sensitive", "excluded")
        return {key: full[key] for key in keys}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpec:
        if not isinstance(data, Mapping):
            raise SchemaError("each feature must be a JSON object")
        unknown = sorted(set(data) - _FEATURE_KEYS)
        if unknown:  # a typo such as "exclude" must not silently keep an attribute in the model
            raise SchemaError(f"feature {data.get('name')!r}: unknown keys {unknown}")
        if "name" not in data or "kind" not in data:
            raise SchemaError("each feature needs a name and a kind")
        categories = data.get("categories")
        return cls(
            name=data["name"],
            kind=data["kind"],
            categories=tuple(categories) if isinstance(categories, list) else categories,
            min=data.get("min"),
            max=data.get("max"),
            integer=data.get("integer", False),
            sensitive=data.get("sensitive", False),
            excluded=data.get("excluded", False),
            reason_code=data.get("reason_code") or "",
            reason_text=data.get("reason_text") or "",
            description=data.get("description") or "",
            fairness_threshold=data.get("fairness_threshold"),
        )


@dataclass(frozen=True)
class FeatureSchema:
    """A data set's attributes, its label column and which label value means "bad"."""

    name: str
    label: str
    bad_value: str
    features: tuple[FeatureSpec, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not SCHEMA_NAME.fullmatch(self.name):
            raise SchemaError(f"schema name {self.name!r} must match {SCHEMA_NAME.pattern}")
        if not isinstance(self.label, str) or not self.label:
            raise SchemaError("schema label must be a column name")
        if not isinstance(self.bad_value, str) or not self.bad_value:
            raise SchemaError("schema bad_value must be a non-empty string")
        features = tuple(self.features)
        names = [feature.name for feature in features]
        if len(set(names)) != len(names):
            raise SchemaError("feature names must be unique")
        if self.label in names:
            raise SchemaError("the label column must not also be a feature")
        if not any(not feature.excluded for feature in features):
            raise SchemaError("at least one feature must be a model input")
        object.__setattr__(self, "features", features)

    @cached_property
    def version(self) -> str:
        contract = {"name": self.name, "features": [f.contract() for f in self.features]}
        digest = hashlib.sha256(canonical_json(contract)).hexdigest()
        return f"{self.name}-{digest[:VERSION_HASH_HEX]}"

    # Cached: the schema is immutable, and these are read for every request.
    @cached_property
    def model_features(self) -> tuple[FeatureSpec, ...]:
        """The model's inputs, in ONNX input order."""
        return tuple(feature for feature in self.features if not feature.excluded)

    @cached_property
    def model_feature_names(self) -> frozenset[str]:
        return frozenset(feature.name for feature in self.model_features)

    @cached_property
    def excluded_features(self) -> tuple[FeatureSpec, ...]:
        return tuple(feature for feature in self.features if feature.excluded)

    @property
    def sensitive_features(self) -> tuple[FeatureSpec, ...]:
        return tuple(feature for feature in self.features if feature.sensitive)

    def feature(self, name: str) -> FeatureSpec:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(name)

    def with_exclusions(self, names: Iterable[str]) -> FeatureSchema:
        """A copy with the named features also excluded from the model."""
        wanted = set(names)
        unknown = sorted(wanted - {feature.name for feature in self.features})
        if unknown:
            raise SchemaError(f"cannot exclude unknown features {unknown}")
        features = tuple(
            replace(feature, excluded=True) if feature.name in wanted else feature
            for feature in self.features
        )
        return FeatureSchema(self.name, self.label, self.bad_value, features)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "label": self.label,
            "bad_value": self.bad_value,
            "features": [feature.to_dict() for feature in self.features],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSchema:
        if not isinstance(data, Mapping):
            raise SchemaError("a schema must be a JSON object")
        unknown = sorted(set(data) - _SCHEMA_KEYS)
        if unknown:
            raise SchemaError(f"schema: unknown keys {unknown}")
        missing = sorted({"name", "label", "bad_value", "features"} - set(data))
        if missing:
            raise SchemaError(f"schema: missing keys {missing}")
        if not isinstance(data["features"], list):
            raise SchemaError("schema: features must be a list")
        schema = cls(
            name=data["name"],
            label=data["label"],
            bad_value=data["bad_value"],
            features=tuple(FeatureSpec.from_dict(item) for item in data["features"]),
        )
        # A stated version is a claim about the content: refuse a schema edited without it.
        stated = data.get("version")
        if stated is not None and stated != schema.version:
            raise SchemaError(f"schema version {stated!r} does not match its content")
        return schema

    @classmethod
    def load(cls, path: str | Path) -> FeatureSchema:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise SchemaError(
                f"{path}: not valid JSON ({error.msg}, line {error.lineno})"
            ) from None
        return cls.from_dict(data)

    def dump(self, path: str | Path) -> None:
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False)
        Path(path).write_text(text + "\n", encoding="utf-8")


def canonical_json(value: Any) -> bytes:
    """UTF-8 JSON with sorted keys and no whitespace: equal content, equal bytes."""
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def check_value(spec: FeatureSpec, value: object) -> ValueProblem | None:
    """The problem with `value` as this feature's input, or None when it is valid."""
    if spec.kind == NUMERIC:
        return _check_number(spec, value)
    if not isinstance(value, str):
        return ValueProblem("WRONG_TYPE", "must be a string")
    assert spec.categories is not None  # guaranteed by FeatureSpec validation
    if value not in spec.categories:
        allowed = json.dumps(list(spec.categories), ensure_ascii=False)
        return ValueProblem("UNKNOWN_CATEGORY", f"must be one of {allowed}")
    return None


def validate_value(spec: FeatureSpec, value: object) -> str | None:
    """A description of what is wrong with `value` (never quoting it), or None when valid."""
    problem = check_value(spec, value)
    return problem.description if problem is not None else None


def validate_record(
    schema: FeatureSchema, values: Mapping[str, object]
) -> list[tuple[str, ValueProblem]]:
    """Every problem with one applicant's model inputs, as (feature name, problem) pairs.

    All model features are required. Excluded features are refused rather than ignored: the
    service should not receive attributes it must not use.
    """
    problems: list[tuple[str, ValueProblem]] = []
    for spec in schema.model_features:
        if spec.name not in values:
            problems.append((spec.name, ValueProblem("MISSING_FEATURE", "is required")))
            continue
        problem = check_value(spec, values[spec.name])
        if problem is not None:
            problems.append((spec.name, problem))
    for name in sorted(set(values) - schema.model_feature_names):
        if any(spec.name == name for spec in schema.excluded_features):
            problem = ValueProblem("EXCLUDED_FEATURE", "is excluded from the model; do not send it")
        else:
            problem = ValueProblem("UNKNOWN_FEATURE", "is not a feature of the model's schema")
        problems.append((name, problem))
    return problems


def parse_text(spec: FeatureSpec, text: str) -> FeatureValue:
    """Convert a textual value (a CSV cell, a decrypted field) to the feature's type.

    Only converts; call `check_value` for ranges and categories. Raises ValueError without
    quoting the text.
    """
    if spec.kind == CATEGORICAL:
        return text
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"{spec.name}: not a number") from None


def _check_number(spec: FeatureSpec, value: object) -> ValueProblem | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ValueProblem("WRONG_TYPE", "must be a number")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a double
        return ValueProblem("OUT_OF_RANGE", _range_text(spec) or "must fit a double")
    if not math.isfinite(number):
        return ValueProblem("NOT_FINITE", "must be a finite number")
    if spec.integer and not number.is_integer():
        return ValueProblem("NOT_INTEGER", "must be a whole number")
    too_low = spec.min is not None and number < spec.min
    too_high = spec.max is not None and number > spec.max
    if too_low or too_high:
        return ValueProblem("OUT_OF_RANGE", _range_text(spec))
    return None


def _range_text(spec: FeatureSpec) -> str:
    if spec.min is not None and spec.max is not None:
        return f"must be between {_number_text(spec.min)} and {_number_text(spec.max)}"
    if spec.min is not None:
        return f"must be at least {_number_text(spec.min)}"
    if spec.max is not None:
        return f"must be at most {_number_text(spec.max)}"
    return ""


def _number_text(number: float) -> str:
    return str(int(number)) if number.is_integer() and abs(number) < 1e15 else repr(number)
