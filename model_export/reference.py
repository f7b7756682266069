"""Favourable reference values per feature, for reason codes.

For each model feature the reference is the candidate value with the lowest partial
dependence: the mean predicted P(bad) over the development sample with only that feature set
to the candidate. Candidates are observed values: for numeric features the 5th..95th
percentiles (nearest observed value, step 5), for categorical features the categories present.
Using the model itself (not raw bad rates) keeps reason codes consistent with what it scores:
moving a feature to its reference never raises the model's average risk.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from service.model.schema import FeatureSchema, FeatureValue

METHOD = (
    "partial dependence on the champion: per model feature, the candidate with the lowest mean "
    "predicted P(bad) over the development sample with only that feature replaced; candidates "
    "are observed values (numeric: nearest-observed 5th..95th percentiles in steps of 5; "
    "categorical: categories present in the development sample); ties go to the first candidate"
)
PERCENTILES = np.arange(5, 100, 5) / 100.0
MAX_ROWS = 400  # enough for a stable average, keeps the search to seconds


def reference_values(
    pipeline: Any, schema: FeatureSchema, matrix: npt.NDArray[np.object_]
) -> dict[str, FeatureValue]:
    sample = matrix[:MAX_ROWS]
    bad_index = [int(c) for c in pipeline.classes_].index(1)
    references: dict[str, FeatureValue] = {}
    for j, spec in enumerate(schema.model_features):
        column = matrix[:, j]
        candidates: list[FeatureValue]
        if spec.is_numeric:
            observed = np.array(column, dtype=np.float64)
            picks = np.quantile(observed, PERCENTILES, method="nearest")
            candidates = sorted({float(value) for value in picks})
        else:
            present = set(column)
            candidates = [c for c in spec.categories or () if c in present]
        risks = []
        for candidate in candidates:
            altered = sample.copy()
            altered[:, j] = candidate
            risks.append(float(np.mean(pipeline.predict_proba(altered)[:, bad_index])))
        references[spec.name] = candidates[int(np.argmin(risks))]
    return references
