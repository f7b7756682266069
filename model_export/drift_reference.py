"""The manifest's `drift_reference`: the development sample's distribution of each model
feature and of the score, for the server's drift monitor (format and binning rule:
`service.model.manifest.DriftReference`).

`privscore-model train` writes it. `privscore-model drift-reference DIR --data CSV` adds or
refreshes it in an existing artifact without retraining: it draws the development split again
from the manifest's seed and holdout fraction (`development_split`, the split `train` makes),
scores those rows with the artifact's ONNX file, and leaves the artifact unsigned.

Scores come from the exported ONNX model through onnxruntime (the model the server runs, not
the scikit-learn pipeline), scaled and rounded as the server does: round(scaling.score(P)).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sklearn.model_selection import train_test_split

from model_export.card import CARD_FILE, read_lda_document, render_card
from model_export.dataset import (
    DataError,
    Table,
    feature_matrix,
    labels,
    onnx_feeds,
    parse_column,
    read_csv,
)
from model_export.verify import onnx_bad_probability
from service.model.manifest import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    CategoricalBins,
    DriftReference,
    Manifest,
    NumericBins,
    ScorecardScaling,
    read_manifest_document,
    read_verified_onnx,
)
from service.model.schema import FeatureSchema, FeatureSpec

DECILES = 10


def development_split(
    y: npt.NDArray[np.int64], holdout: float, seed: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """(development rows, holdout rows): the stratified split `train` makes."""
    dev, hold = train_test_split(
        np.arange(len(y)), test_size=holdout, stratify=y, random_state=seed
    )
    return np.asarray(dev, dtype=np.intp), np.asarray(hold, dtype=np.intp)


def decile_edges(values: Sequence[float]) -> tuple[float, ...]:
    """Interior edges at the deciles: the j-th is the smallest value with at least j/10 of the
    values at or below it; repeats and the maximum are dropped, so no bin is empty."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values to bin")
    count, edges = len(ordered), list[float]()
    for j in range(1, DECILES):
        edge = ordered[(j * count + DECILES - 1) // DECILES - 1]  # ceil(j * n / 10)-th value
        if edge < ordered[-1] and (not edges or edge > edges[-1]):
            edges.append(edge)
    return tuple(edges)


def numeric_bins(values: Sequence[float]) -> NumericBins:
    edges = decile_edges(values)
    counts = [0] * (len(edges) + 1)
    binning = NumericBins(edges, tuple(counts))
    for value in values:
        counts[binning.index(value)] += 1
    return NumericBins(edges, tuple(counts))


def categorical_bins(spec: FeatureSpec, values: Sequence[str]) -> CategoricalBins:
    categories = spec.categories or ()
    position = {category: i for i, category in enumerate(categories)}
    counts = [0] * len(categories)
    for value in values:
        counts[position[value]] += 1
    return CategoricalBins(categories, tuple(counts))


def served_scores(
    onnx_bytes: bytes,
    schema: FeatureSchema,
    matrix: npt.NDArray[np.object_],
    probability_output: str,
    bad_class_index: int,
    scaling: ScorecardScaling,
) -> list[int]:
    """The score the server would return for each row of a feature matrix."""
    feeds = onnx_feeds(schema, matrix)
    p_bad = onnx_bad_probability(onnx_bytes, feeds, probability_output, bad_class_index)
    return [round(scaling.score(p)) for p in p_bad.tolist()]


def compute_drift_reference(
    schema: FeatureSchema,
    table: Table,
    dev: npt.NDArray[np.intp],
    onnx_bytes: bytes,
    probability_output: str,
    bad_class_index: int,
    scaling: ScorecardScaling,
) -> DriftReference:
    """The development rows' bins, numbers as parsed from the data (what a caller sends)."""
    features: dict[str, NumericBins | CategoricalBins] = {}
    for spec in schema.model_features:
        column = parse_column(spec, table)
        values = [column[i] for i in dev.tolist()]
        if spec.is_numeric:
            features[spec.name] = numeric_bins([float(v) for v in values])
        else:
            features[spec.name] = categorical_bins(spec, [str(v) for v in values])
    matrix = feature_matrix(schema, table)[dev]
    scores = served_scores(onnx_bytes, schema, matrix, probability_output, bad_class_index, scaling)
    return DriftReference(len(dev), features, numeric_bins(scores))


def add_drift_reference(artifact_dir: str | Path, data_path: str | Path) -> DriftReference:
    """Write (or replace) the artifact's `drift_reference` from its training data and re-render
    its model card; removes `manifest.sig`, which no longer matches: sign again."""
    artifact_dir = Path(artifact_dir)
    document = read_manifest_document(artifact_dir)
    manifest = Manifest.from_dict(document)
    table = read_csv(data_path)
    if table.sha256 != manifest.training_data.sha256:
        raise DataError(
            f"{table.file_name} is not the data set the model was trained on (SHA-256 differs "
            f"from the manifest's {manifest.training_data.file})"
        )
    training = manifest.training
    if "seed" not in training or "holdout_fraction" not in training:
        raise ValueError("the manifest's training record lacks seed or holdout_fraction")
    dev, _ = development_split(
        labels(manifest.schema, table), float(training["holdout_fraction"]), int(training["seed"])
    )
    if len(dev) != training.get("development_rows", len(dev)):
        raise DataError(
            f"the split gives {len(dev)} development rows, the manifest says "
            f"{training['development_rows']}"
        )
    reference = compute_drift_reference(
        manifest.schema,
        table,
        dev,
        read_verified_onnx(artifact_dir, manifest),
        manifest.onnx.probability_output,
        manifest.onnx.bad_class_index,
        manifest.scaling,
    )
    document["drift_reference"] = reference.to_dict()
    updated = Manifest.from_dict(document)  # the server's parser must accept what we write
    (artifact_dir / SIGNATURE_FILE).unlink(missing_ok=True)  # it would vouch for nothing
    text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)
    (artifact_dir / MANIFEST_FILE).write_text(text + "\n", encoding="utf-8")
    lda = read_lda_document(artifact_dir, updated)
    (artifact_dir / CARD_FILE).write_text(render_card(updated, lda), encoding="utf-8")
    return reference
