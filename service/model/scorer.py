"""The scorer: the signed ONNX model in one onnxruntime session, scorecard points and reasons.

onnxruntime is the only model dependency of serving; nothing here re-implements the model.
Reasons are computed by the model itself: each adverse applicant's features are set, one at a
time, to the manifest's favourable reference value, and all those variants are scored in one
batched run; the features whose reference value would raise the score most are the reasons.
"""

from __future__ import annotations

import os

# onnxruntime's official builds keep telemetry unless this is set before the first import.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.model.manifest import (
    Manifest,
    file_sha256,
    load_verified_manifest,
    read_verified_onnx,
)
from service.model.schema import FeatureValue

Row = Mapping[str, FeatureValue]


@dataclass(frozen=True)
class Reason:
    feature: str
    code: str
    text: str
    points: float  # how much the score would rise with the feature at its reference value


class Scorer:
    def __init__(self, artifact_dir: Path, trusted_public_key: Path, threads: int = 1) -> None:
        """Verify the artifact (signature and ONNX hash) and open one session; raises
        ArtifactError when the artifact must not be served."""
        self.manifest: Manifest = load_verified_manifest(artifact_dir, trusted_public_key)
        self.manifest_sha256 = file_sha256(artifact_dir / "manifest.json")
        options = ort.SessionOptions()
        # One session serves every request; on a small box, threads per run compete with the
        # gRPC event loop, so keep them few and let batching carry throughput.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The verified bytes, not the path: the file cannot be swapped after the hash check.
        self._session = ort.InferenceSession(
            read_verified_onnx(artifact_dir, self.manifest),
            options,
            providers=["CPUExecutionProvider"],
        )
        self.features = self.manifest.schema.model_features
        self._output = [self.manifest.onnx.probability_output]
        self._bad_column = self.manifest.onnx.bad_class_index
        self._reference = self.manifest.reference_values

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    @property
    def schema_version(self) -> str:
        return self.manifest.schema_version

    def probabilities(self, rows: Sequence[Row]) -> np.ndarray:
        """P(bad) for each row (validated, complete feature dicts), in one onnxruntime run."""
        feeds = {}
        for spec in self.features:
            column = [row[spec.name] for row in rows]
            if spec.is_numeric:
                feeds[spec.name] = np.asarray(column, dtype=np.float32).reshape(-1, 1)
            else:
                feeds[spec.name] = np.asarray(column, dtype=object).reshape(-1, 1)
        (probabilities,) = self._session.run(self._output, feeds)
        return np.asarray(probabilities[:, self._bad_column], dtype=np.float64)

    def score_of(self, probability_of_default: float) -> int:
        return round(self.manifest.scaling.score(probability_of_default))

    def reasons(
        self, rows: Sequence[Row], scores: Sequence[float], limit: int
    ) -> list[list[Reason]]:
        """Up to `limit` reasons per row, most points first, from one batched run.

        `scores` are the rows' unrounded scores, so gains compare exactly. Only features whose
        reference value would raise the score count.
        """
        variants: list[Row] = []
        for row in rows:
            for spec in self.features:
                variant = dict(row)
                variant[spec.name] = self._reference[spec.name]
                variants.append(variant)
        if not variants:
            return []
        scaling = self.manifest.scaling
        variant_scores = [scaling.score(float(p)) for p in self.probabilities(variants)]
        width = len(self.features)
        result = []
        for index, base in enumerate(scores):
            gains = [
                (variant_scores[index * width + k] - base, spec)
                for k, spec in enumerate(self.features)
            ]
            gains.sort(key=lambda gain: (-gain[0], gain[1].name))
            result.append(
                [
                    Reason(spec.name, spec.reason_code, spec.reason_text, gain)
                    for gain, spec in gains[:limit]
                    if gain > 0
                ]
            )
        return result
