"""ROC and calibration plots (PNG) for the model card, drawn headless with matplotlib's Agg."""

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
