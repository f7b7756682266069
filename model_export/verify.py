"""`privscore-model verify`: signature, hashes, then onnxruntime vs scikit-learn on every row.

The scikit-learn pipeline (`pipeline.joblib`) is a pickle: it is loaded only after the manifest's
signature and the pickle's SHA-256 (pinned in the signed manifest) have both been checked, so
verify never unpickles a file nobody signed. The server never reads it.
"""

from __future__ import annotations

import os

os.environ["ORT_DISABLE_TELEMETRY"] = "1"  # before onnxruntime is first imported

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import numpy.typing as npt
import sklearn

import service.model
from model_export.dataset import feature_matrix, onnx_feeds, read_csv
from service.model.manifest import (
    ArtifactError,
    ArtifactFailure,
    Manifest,
    check_file_hash,
    load_verified_manifest,
)

PARITY_TOLERANCE = 1e-5
PIPELINE_KEY = "sklearn_pipeline"
DEFAULT_PUBLIC_KEY = (
    Path(service.model.__file__).resolve().parent / "trusted_keys" / "model-team.pub"
)


@dataclass
class VerifyReport:
    signature_ok: bool = False
    parity_ok: bool = False
    rows: int = 0
    max_abs_diff: float | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.signature_ok and self.parity_ok


def onnx_bad_probability(
    model: bytes | str | Path, feeds: dict[str, npt.NDArray[Any]], output: str, bad_index: int
) -> npt.NDArray[np.float64]:
    """P(bad) per row from onnxruntime on the given per-feature inputs."""
    import onnxruntime

    source = model if isinstance(model, bytes) else str(model)
    session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    (probabilities,) = session.run([output], feeds)
    return np.asarray(probabilities, dtype=np.float64)[:, bad_index]


def sklearn_bad_probability(pipeline: Any, matrix: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    bad_index = [int(c) for c in pipeline.classes_].index(1)
    return np.asarray(pipeline.predict_proba(matrix), dtype=np.float64)[:, bad_index]


def verify_artifact(
    artifact_dir: str | Path,
    data_path: str | Path,
    public_key: str | Path = DEFAULT_PUBLIC_KEY,
    tolerance: float = PARITY_TOLERANCE,
) -> VerifyReport:
    report = VerifyReport()
    try:
        manifest = load_verified_manifest(artifact_dir, public_key)
    except ArtifactError as error:
        report.problems.append(f"signature/integrity: {error}")
        report.notes.append("parity not checked: nothing is loaded from an unverified artifact")
        return report
    report.signature_ok = True
    try:
        pipeline = _load_pipeline(artifact_dir, manifest, report)
    except ArtifactError as error:
        report.problems.append(f"scikit-learn pipeline: {error}")
        return report

    table = read_csv(data_path)
    if table.sha256 != manifest.training_data.sha256:
        report.notes.append("the data set is not the one the model was trained on")
    matrix = feature_matrix(manifest.schema, table)
    onnx_p = onnx_bad_probability(
        manifest.onnx_path(artifact_dir),
        onnx_feeds(manifest.schema, matrix),
        manifest.onnx.probability_output,
        manifest.onnx.bad_class_index,
    )
    sklearn_p = sklearn_bad_probability(pipeline, matrix)
    report.rows = len(matrix)
    report.max_abs_diff = float(np.max(np.abs(onnx_p - sklearn_p))) if len(matrix) else 0.0
    report.parity_ok = bool(np.isfinite(onnx_p).all()) and report.max_abs_diff <= tolerance
    if not report.parity_ok:
        report.problems.append(
            f"parity: max |onnxruntime - scikit-learn| = {report.max_abs_diff:.3g} over "
            f"{report.rows} rows exceeds {tolerance:g}"
        )
    return report


def _load_pipeline(artifact_dir: str | Path, manifest: Manifest, report: VerifyReport) -> Any:
    entry = manifest.verification.get(PIPELINE_KEY)
    if not isinstance(entry, dict) or not {"file", "sha256"} <= set(entry):
        raise ArtifactError(
            ArtifactFailure.MALFORMED, f"the manifest has no verification.{PIPELINE_KEY} entry"
        )
    path = check_file_hash(artifact_dir, entry["file"], entry["sha256"])
    trained_with = manifest.training.get("versions", {}).get("scikit-learn")
    if trained_with and trained_with != sklearn.__version__:
        report.notes.append(
            f"pipeline pickled by scikit-learn {trained_with}, loading with {sklearn.__version__}"
        )
    return joblib.load(path)
