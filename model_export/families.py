"""The model families: scikit-learn pipelines that take the raw typed features.

Preprocessing lives in the pipeline (ColumnTransformer over schema-ordered columns), so the
exported ONNX graph takes one raw input per feature and the service re-implements nothing.
Trees get raw numbers, never a scaler: ONNX tree ensembles compare thresholds in float32, and
scaled values near a threshold can fall on the other side of it (a scaler broke parity at 8e-3,
raw values keep it near 1e-7).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from service.model.schema import FeatureSchema

LOGISTIC_REGRESSION = "logistic_regression"
RANDOM_FOREST = "random_forest"
GRADIENT_BOOSTING = "gradient_boosting"
FAMILIES = (LOGISTIC_REGRESSION, RANDOM_FOREST, GRADIENT_BOOSTING)
CALIBRATION_FOLDS = 5

# Fixed, modest settings (chosen once by repeated CV on German credit; not searched per run).
# Single-threaded estimators: a forest's parallel prediction sums trees in varying order, which
# would make metrics differ in the last bits between runs.
HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    LOGISTIC_REGRESSION: {"C": 0.1, "max_iter": 5000},
    RANDOM_FOREST: {"n_estimators": 200, "min_samples_leaf": 4, "n_jobs": 1},
    GRADIENT_BOOSTING: {
        "n_estimators": 200, "learning_rate": 0.05, "max_depth": 2, "subsample": 0.8,
    },
}  # fmt: skip


def build(
    family: str, schema: FeatureSchema, seed: int, params: Mapping[str, Any] | None = None
) -> Pipeline:
    """An unfitted, uncalibrated pipeline (what cross-validation compares).

    `params` override the family's HYPERPARAMETERS (the LDA search's regularised and monotone
    variants); None keeps them.
    """
    estimator = _estimator(family, seed, params)
    return Pipeline([("features", _features(family, schema)), ("model", estimator)])


def build_calibrated(
    family: str, schema: FeatureSchema, seed: int, params: Mapping[str, Any] | None = None
) -> Pipeline:
    """The pipeline with Platt (sigmoid) calibration fitted on out-of-fold predictions.

    ensemble=False keeps one base model plus one monotone calibrator: the artifact stays small
    and the calibrated score ranks applicants exactly as the base model does. Sample weights
    reach both through `fit(x, y, model__sample_weight=w)`.
    """
    calibrated = CalibratedClassifierCV(
        _estimator(family, seed, params),
        method="sigmoid",
        cv=StratifiedKFold(CALIBRATION_FOLDS, shuffle=True, random_state=seed),
        ensemble=False,
    )
    return Pipeline([("features", _features(family, schema)), ("model", calibrated)])


def monotone_constraints(schema: FeatureSchema, directions: Mapping[str, int]) -> list[int]:
    """`monotonic_cst` for the estimator behind `_features`: one entry per encoded column.

    `directions` maps numeric model features to +1 (P(bad) may only rise with the value) or
    -1 (only fall); features not named, and every one-hot column, are unconstrained (0). The
    order follows `_features`: numeric columns in schema order, then each categorical
    feature's one-hot block.
    """
    specs = schema.model_features
    unknown = sorted(set(directions) - {spec.name for spec in specs if spec.is_numeric})
    if unknown:
        raise ValueError(f"monotone constraints name no numeric model feature: {unknown}")
    numeric = [directions.get(spec.name, 0) for spec in specs if spec.is_numeric]
    width = sum(len(spec.categories or ()) for spec in specs if not spec.is_numeric)
    return numeric + [0] * width


def _features(family: str, schema: FeatureSchema) -> ColumnTransformer:
    specs = schema.model_features
    numeric = [j for j, spec in enumerate(specs) if spec.is_numeric]
    categorical = [j for j, spec in enumerate(specs) if not spec.is_numeric]
    # Categories come from the schema, so every fold and the artifact encode identically.
    encoder = OneHotEncoder(
        categories=[list(specs[j].categories or ()) for j in categorical],
        handle_unknown="ignore",
        sparse_output=False,
    )
    numbers = StandardScaler() if family == LOGISTIC_REGRESSION else "passthrough"
    transformers: list[tuple[str, Any, list[int]]] = []
    if numeric:
        transformers.append(("numeric", numbers, numeric))
    if categorical:
        transformers.append(("categorical", encoder, categorical))
    return ColumnTransformer(transformers, sparse_threshold=0.0)


def _estimator(family: str, seed: int, overrides: Mapping[str, Any] | None = None) -> Any:
    if family not in HYPERPARAMETERS:
        raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")
    params = {**HYPERPARAMETERS[family], **(overrides or {})}
    if family == LOGISTIC_REGRESSION:
        return LogisticRegression(**params)
    if family == RANDOM_FOREST:
        return RandomForestClassifier(random_state=seed, **params)
    if family == GRADIENT_BOOSTING:
        return GradientBoostingClassifier(random_state=seed, **params)
    raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")
