"""ROC, calibration and LDA frontier plots (PNG) for the model card, drawn headless (Agg)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from sklearn.metrics import roc_curve

ROC_FILE = "roc.png"
CALIBRATION_FILE = "calibration.png"
FRONTIER_FILE = "lda_frontier.png"
# No software/date metadata: the same curves give the same bytes.
_PNG_METADATA: dict[str, Any] = {"Software": None}


def roc_plot(
    path: Path,
    y: npt.NDArray[np.int64],
    predictions: Mapping[str, npt.NDArray[np.float64]],
    aucs: Mapping[str, float],
    champion: str,
) -> None:
    figure, axes = plt.subplots(figsize=(5.5, 5))
    for family, p_bad in predictions.items():
        fpr, tpr, _ = roc_curve(y, p_bad)
        width = 2.2 if family == champion else 1.2
        label = f"{family} (AUC {aucs[family]:.3f}){' - champion' if family == champion else ''}"
        axes.plot(fpr, tpr, linewidth=width, label=label)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    axes.set(
        xlabel="False positive rate (goods flagged)", ylabel="True positive rate (bads caught)"
    )
    axes.set_title("ROC on the holdout split")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata=_PNG_METADATA)
    plt.close(figure)


def calibration_plot(path: Path, tables: Mapping[str, list[dict[str, Any]]], champion: str) -> None:
    figure, axes = plt.subplots(figsize=(5.5, 5))
    for family, table in tables.items():
        predicted = [row["mean_predicted"] for row in table]
        observed = [row["observed_bad_rate"] for row in table]
        width = 2.2 if family == champion else 1.0
        axes.plot(predicted, observed, marker="o", markersize=3, linewidth=width, label=family)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="perfect")
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="Mean predicted P(bad)", ylabel="Observed bad rate")
    axes.set_title("Calibration on the holdout split (deciles)")
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata=_PNG_METADATA)
    plt.close(figure)


def frontier_plot(path: Path, search: Mapping[str, Any]) -> None:
    """The LDA search's candidates: CV AUC against approval-rate ratio, with their intervals.

    The shaded band is the rule's accuracy band (within the tolerance of the best CV AUC), the
    dashed line the four-fifths threshold, the black line the frontier (candidates no other
    beats on both axes) and the ring the chosen candidate; grey bars are the best's and the
    chosen's confidence intervals (every candidate's are in the card's table).
    """
    method, selection = search["method"], search["selection"]
    rows = [row for row in search["candidates"] if row["ratio"] is not None]
    figure, axes = plt.subplots(figsize=(7, 6.5))
    families = list(dict.fromkeys(row["family"] for row in search["candidates"]))
    markers = dict(zip(families, "osD^v<>", strict=False))
    for family in families:
        points = [row for row in rows if row["family"] == family]
        if points:
            axes.scatter(
                [row["cv_auc_mean"] for row in points], [row["ratio"] for row in points],
                marker=markers.get(family, "o"), s=28, alpha=0.85, label=family,
            )  # fmt: skip
    # Intervals for the best and the chosen only: on every point they would hide the rest.
    for row in rows:
        if row["name"] in (selection["best"], selection["chosen"]):
            auc, ratio = row["cv_auc_mean"], row["ratio"]
            axes.errorbar(
                [auc], [ratio],
                xerr=[[auc - row["cv_auc_ci"][0]], [row["cv_auc_ci"][1] - auc]],
                yerr=[[ratio - row["ratio_ci"][0]], [row["ratio_ci"][1] - ratio]],
                fmt="none", ecolor="grey", elinewidth=0.8, capsize=2,
            )  # fmt: skip
    frontier = sorted(
        (row for row in rows if not any(_dominates(other, row) for other in rows)),
        key=lambda row: row["cv_auc_mean"],
    )
    if frontier:
        axes.plot(
            [row["cv_auc_mean"] for row in frontier], [row["ratio"] for row in frontier],
            color="black", linewidth=1.0, label="frontier",
        )  # fmt: skip
    best = selection["best_cv_auc"]
    axes.axvspan(best - method["auc_tolerance"], best, color="tab:green", alpha=0.12,
                 label=f"within {method['auc_tolerance']:g} of the best CV AUC")  # fmt: skip
    axes.axhline(method["four_fifths"], color="grey", linestyle="--", linewidth=0.8,
                 label=f"four-fifths ({method['four_fifths']:g})")  # fmt: skip
    chosen = next((row for row in rows if row["name"] == selection["chosen"]), None)
    if chosen is not None:
        verdict = "meets the rule" if selection["meets_rule"] else "does NOT meet the rule"
        axes.scatter(
            [chosen["cv_auc_mean"]], [chosen["ratio"]], s=220, facecolors="none",
            edgecolors="red", linewidths=1.8, zorder=5,
            label=f"chosen: {chosen['name']} ({verdict})",
        )  # fmt: skip
    axes.set(
        xlabel="CV AUC (development rows, mean over folds)",
        ylabel="Approval-rate ratio (lowest over the sensitive attributes)",
    )
    axes.set_title("LDA search: accuracy against approval-rate parity", fontsize=10)
    # Below the axes: inside, it would hide candidates wherever they fall.
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata=_PNG_METADATA)
    plt.close(figure)


def _dominates(one: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """`one` is at least as good on both axes and better on one."""
    auc, ratio = one["cv_auc_mean"], one["ratio"]
    at_least = auc >= other["cv_auc_mean"] and ratio >= other["ratio"]
    return bool(at_least and (auc > other["cv_auc_mean"] or ratio > other["ratio"]))
