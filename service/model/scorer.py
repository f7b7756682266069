"""The scorer: the signed ONNX model in one onnxruntime session, scorecard points and reasons.

onnxruntime is the only model dependency of serving; nothing here re-implements the model.
Reasons are computed by the model itself: each adverse applicant's features are set, one at a
time, to the manifest's favourable reference value, and all those variants are scored in one
batched run; the features whose reference value would raise the score most are the reasons.
Rows become two matrices (`Columns`) once, so building variants takes a few numpy calls
whatever the number of rows and features: copying a dict per variant cost as much as the model
once a batch reached hundreds of variant rows.
`ModelBatcher` puts the runs of concurrent calls together, off the event loop.
"""

from __future__ import annotations

import os

# onnxruntime's official builds keep telemetry unless this is set before the first import.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from service.model.schema import FeatureSpec, FeatureValue

Row = Mapping[str, FeatureValue]


@dataclass(frozen=True)
class Columns:
    """Rows as model inputs: one matrix of numeric features (float32, feature x row) and one of
    categorical features (str objects, feature x row). Feature-major, so each model input is a
    contiguous row of a matrix."""

    numbers: np.ndarray
    categories: np.ndarray

    def __len__(self) -> int:
        return int(self.numbers.shape[1])

    def take(self, rows: np.ndarray | list[int]) -> Columns:
        return Columns(self.numbers[:, rows], self.categories[:, rows])

    @staticmethod
    def concat(parts: Sequence[Columns]) -> Columns:
        if len(parts) == 1:
            return parts[0]
        return Columns(
            np.concatenate([part.numbers for part in parts], axis=1),
            np.concatenate([part.categories for part in parts], axis=1),
        )


@dataclass(frozen=True)
class Reason:
    feature: str
    code: str
    text: str
    points: float  # how much the score would rise with the feature at its reference value


@dataclass(frozen=True)
class ReasonVariants:
    """Rows to score for reasons, and for each the row it copies and the feature it varies."""

    columns: Columns
    owner_rows: np.ndarray  # index into the explained rows
    owner_features: np.ndarray  # index into Scorer.features


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
        self._numeric = [spec for spec in self.features if spec.is_numeric]
        self._categorical = [spec for spec in self.features if not spec.is_numeric]
        # Where each matrix row's feature sits in `features`, for naming reasons.
        self._numeric_index = np.array(
            [self.features.index(f) for f in self._numeric], dtype=np.intp
        )
        self._categorical_index = np.array(
            [self.features.index(f) for f in self._categorical], dtype=np.intp
        )
        self._output = [self.manifest.onnx.probability_output]
        self._bad_column = self.manifest.onnx.bad_class_index
        self._reference = self.columns([self.manifest.reference_values])

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    @property
    def schema_version(self) -> str:
        return self.manifest.schema_version

    def columns(self, rows: Sequence[Row]) -> Columns:
        """Rows (validated, complete feature dicts) as model inputs."""
        shape = (len(self._numeric), len(rows)), (len(self._categorical), len(rows))
        return Columns(
            np.array(
                [[row[spec.name] for row in rows] for spec in self._numeric], dtype=np.float32
            ).reshape(shape[0]),
            np.array(
                [[row[spec.name] for row in rows] for spec in self._categorical], dtype=object
            ).reshape(shape[1]),
        )

    def run(self, columns: Columns) -> np.ndarray:
        """P(bad) for each row of `columns`, in one onnxruntime run."""
        feeds = {
            spec.name: column.reshape(-1, 1)
            for specs, matrix in (
                (self._numeric, columns.numbers),
                (self._categorical, columns.categories),
            )
            for spec, column in zip(specs, matrix, strict=True)
        }
        (probabilities,) = self._session.run(self._output, feeds)
        return np.asarray(probabilities[:, self._bad_column], dtype=np.float64)

    def probabilities(self, rows: Sequence[Row]) -> np.ndarray:
        return self.run(self.columns(rows))

    def score_of(self, probability_of_default: float) -> int:
        return round(self.manifest.scaling.score(probability_of_default))

    def reason_variants(self, columns: Columns) -> ReasonVariants:
        """For each row, one copy per feature with that feature at its reference value.

        A feature already at its reference value would move nothing, so it gets no copy: on
        typical applicants that saves a third of the reasons' model rows.
        """
        parts, owner_rows, owner_features = [], [], []
        for categorical in (False, True):
            matrix = columns.categories if categorical else columns.numbers
            reference = self._reference.categories if categorical else self._reference.numbers
            features, rows = np.nonzero(matrix != reference)  # reference: one column, broadcast
            variants = columns.take(rows)  # a copy: one column per (row, feature) to vary
            varied = variants.categories if categorical else variants.numbers
            varied[features, np.arange(len(rows))] = reference[features, 0]
            parts.append(variants)
            owner_rows.append(rows)
            index = self._categorical_index if categorical else self._numeric_index
            owner_features.append(index[features])
        return ReasonVariants(
            Columns.concat(parts), np.concatenate(owner_rows), np.concatenate(owner_features)
        )

    def rank_reasons(
        self,
        scores: Sequence[float],
        variants: ReasonVariants,
        variant_probabilities: np.ndarray,
        limit: int,
    ) -> list[list[Reason]]:
        """Up to `limit` reasons per row, most points first, from the scored variants.

        `scores` are the rows' unrounded scores, so gains compare exactly. Only features whose
        reference value would raise the score count.
        """
        scaling = self.manifest.scaling
        gains: list[list[tuple[float, FeatureSpec]]] = [[] for _ in scores]
        owners = zip(variants.owner_rows.tolist(), variants.owner_features.tolist(), strict=True)
        for (index, feature), probability in zip(
            owners, variant_probabilities.tolist(), strict=True
        ):
            gains[index].append(
                (scaling.score(probability) - scores[index], self.features[feature])
            )
        result = []
        for row_gains in gains:
            row_gains.sort(key=lambda gain: (-gain[0], gain[1].name))
            result.append(
                [
                    Reason(spec.name, spec.reason_code, spec.reason_text, gain)
                    for gain, spec in row_gains[:limit]
                    if gain > 0
                ]
            )
        return result


class ModelBatcher:
    """Runs the model off the event loop, putting concurrent callers' rows into one run.

    While a run is in progress, rows from other calls queue; the next run takes them all. An
    idle server runs each call's rows at once (no waiting for company); a busy one amortises
    the per-run cost over every call in flight. onnxruntime releases the GIL while it runs.
    """

    def __init__(self, scorer: Scorer, max_rows: int = 4096) -> None:
        self.scorer = scorer
        self._max_rows = max_rows
        self._pending: deque[tuple[Columns, asyncio.Future[np.ndarray]]] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def probabilities(self, columns: Columns) -> np.ndarray:
        if not len(columns):
            return np.empty(0)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((columns, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch: list[tuple[Columns, asyncio.Future[np.ndarray]]] = []
            taken = 0
            while self._pending and (
                not batch or taken + len(self._pending[0][0]) <= self._max_rows
            ):
                batch.append(self._pending.popleft())
                taken += len(batch[-1][0])
            try:
                result = await loop.run_in_executor(
                    self._thread, self._run, [columns for columns, _ in batch]
                )
            except Exception as error:  # noqa: BLE001 - each waiter gets the failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            start = 0
            for columns, future in batch:
                if not future.done():  # a cancelled caller's rows were scored in vain
                    future.set_result(result[start : start + len(columns)])
                start += len(columns)

    def _run(self, parts: list[Columns]) -> np.ndarray:
        return self.scorer.run(Columns.concat(parts))

    def close(self) -> None:
        self._thread.shutdown(wait=True)
