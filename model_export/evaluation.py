"""Scores of a model on labelled data: discrimination, calibration and group fairness.

Metrics are rounded to 6 decimals: enough to compare families and runs, and stable in JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

from service.model.schema import FeatureSpec

DIGITS = 6
FOUR_FIFTHS = 0.8

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def rounded(value: float) -> float:
    return round(float(value), DIGITS)


def auc(y: IntArray, p_bad: FloatArray) -> float:
    return float(roc_auc_score(y, p_bad))


def ks_statistic(y: IntArray, p_bad: FloatArray) -> float:
    """Kolmogorov-Smirnov: the largest gap between the bad and good score distributions."""
    fpr, tpr, _ = roc_curve(y, p_bad)
    return float(np.max(tpr - fpr))


def holdout_metrics(y: IntArray, p_bad: FloatArray) -> dict[str, float]:
    return {
        "holdout_auc": rounded(auc(y, p_bad)),
        "holdout_ks": rounded(ks_statistic(y, p_bad)),
        "holdout_brier": rounded(float(brier_score_loss(y, p_bad))),
    }


def calibration_table(y: IntArray, p_bad: FloatArray, bins: int = 10) -> list[dict[str, Any]]:
    """Equal-count bins of predicted P(bad) (deciles by default): mean predicted vs observed."""
    order = np.argsort(p_bad, kind="stable")
    table = []
    for number, members in enumerate(np.array_split(order, bins), start=1):
        if len(members) == 0:
            continue
        table.append(
            {
                "bin": number,
                "n": len(members),
                "mean_predicted": rounded(float(np.mean(p_bad[members]))),
                "observed_bad_rate": rounded(float(np.mean(y[members]))),
            }
        )
    return table


def group_labels(
    spec: FeatureSpec, values: Sequence[str], *, numeric_split: float | None
) -> tuple[npt.NDArray[np.object_], list[str]]:
    """Each row's group of a sensitive attribute, and the groups present in report order.

    Numeric attributes split at `numeric_split` into `<t` and `>=t`; categorical ones group by
    category, in the schema's order. One definition for the holdout report and the LDA search.
    """
    if spec.is_numeric:
        if numeric_split is None:
            raise ValueError(f"{spec.name}: a numeric attribute needs a split value")
        numbers = np.array([float(v) for v in values])
        below = f"<{_number_text(numeric_split)}"
        at_or_above = f">={_number_text(numeric_split)}"
        groups = np.where(numbers < numeric_split, below, at_or_above).astype(object)
        return groups, [name for name in (below, at_or_above) if (groups == name).any()]
    present = set(values)
    return np.array(values, dtype=object), [c for c in spec.categories or () if c in present]


def fairness_report(
    spec: FeatureSpec,
    values: Sequence[str],
    y: IntArray,
    approved: npt.NDArray[np.bool_],
    *,
    numeric_split: float | None,
) -> dict[str, Any]:
    """Approval rate per group of a sensitive attribute, and the lowest-to-highest ratio.

    Numeric attributes split at `numeric_split` into `<t` and `>=t`; categorical ones group by
    category. A ratio under 0.8 fails the "four-fifths" rule of thumb for disparate impact.
    """
    groups, names = group_labels(spec, values, numeric_split=numeric_split)
    rows: list[dict[str, Any]] = []
    for name in names:
        members = groups == name
        if not members.any():
            continue
        rows.append(
            {
                "group": name,
                "n": int(members.sum()),
                "approval_rate": rounded(float(approved[members].mean())),
                "observed_bad_rate": rounded(float(y[members].mean())),
            }
        )
    rates = [row["approval_rate"] for row in rows]
    lowest = rows[int(np.argmin(rates))]
    highest = rows[int(np.argmax(rates))]
    ratio = lowest["approval_rate"] / highest["approval_rate"] if highest["approval_rate"] else 1.0
    report: dict[str, Any] = {
        "excluded_from_model": spec.excluded,
        "groups": rows,
        "lowest_group": lowest["group"],
        "highest_group": highest["group"],
        "approval_rate_ratio": rounded(ratio),
        "four_fifths_rule_met": bool(ratio >= FOUR_FIFTHS),
    }
    if numeric_split is not None:
        report["split"] = numeric_split
    return report


def numeric_split(
    spec: FeatureSpec, column: Sequence[str], rows: npt.NDArray[np.intp]
) -> float | None:
    """For numeric attributes: the schema's fairness threshold, else the median over `rows`
    (the development sample); None for categorical ones."""
    if not spec.is_numeric:
        return None
    if spec.fairness_threshold is not None:
        return spec.fairness_threshold
    return float(np.median([float(column[i]) for i in rows]))


def _number_text(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"
