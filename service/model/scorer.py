"""The scorer: the signed ONNX model in onnxruntime, scorecard points and reasons.

onnxruntime is the only model dependency of serving; nothing here re-implements the model.
Reasons are computed by the model itself: each adverse applicant's features are set, one at a
time, to the manifest's favourable reference value, and all those variants are scored in one
batched run; the features whose reference value would raise the score most are the reasons.
Rows become two matrices (`Columns`) once, so building variants takes a few numpy calls
whatever the number of rows and features: copying a dict per variant cost as much as the model
once a batch reached hundreds of variant rows.

When the served graph's front is one-hot encoding and passthrough (`service.model.encoded`),
variants are rows of its encoded feature matrix (`EncodedRows`): the row's encoding with one
feature's columns taken from the reference's. The session then runs the signed graph with one
more input, encoded rows appended to the front's matrix, so rows and variants go through the
same estimator and calibration nodes in one run, and variants skip the string encoding. On
load that graph must score check rows, raw and encoded, exactly as the signed graph does;
otherwise (or for a front this does not recognise) variants are whole rows, as before.
`ModelBatcher` puts the runs of concurrent calls together, off the event loop.
"""

from __future__ import annotations

import os

# onnxruntime's official builds keep telemetry unless this is set before the first import.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.model.encoded import Encoder, split_graph, with_encoded_rows
from service.model.manifest import (
    Manifest,
    file_sha256,
    load_verified_manifest,
    read_verified_onnx,
)
from service.model.schema import FeatureValue

Row = Mapping[str, FeatureValue]
_SCORE_EPSILON = 1e-9  # ScorecardScaling.score's default clipping of P(bad)
ENCODED_INPUT = "privscore_encoded_rows"  # the input the scorer adds to the graph


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
class EncodedRows:
    """Rows of the served graph's encoded feature matrix (float32, row x encoded column)."""

    matrix: np.ndarray

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    @staticmethod
    def concat(parts: Sequence[EncodedRows]) -> EncodedRows:
        if len(parts) == 1:
            return parts[0]
        return EncodedRows(np.concatenate([part.matrix for part in parts]))


ModelRows = Columns | EncodedRows


@dataclass(frozen=True)
class Reason:
    feature: str
    code: str
    text: str
    points: float  # how much the score would rise with the feature at its reference value


@dataclass(frozen=True)
class ReasonVariants:
    """Rows to score for reasons, and for each the row it copies and the feature it varies."""

    columns: ModelRows
    owner_rows: np.ndarray  # index into the explained rows
    owner_features: np.ndarray  # index into Scorer.features


class Scorer:
    def __init__(
        self,
        artifact_dir: Path,
        trusted_public_key: Path,
        threads: int = 1,
        *,
        encoded_variants: bool = True,
    ) -> None:
        """Verify the artifact (signature and ONNX hash) and open one session (on the graph
        that also takes encoded rows, see the module doc, unless `encoded_variants=False`);
        raises ArtifactError when the artifact must not be served."""
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
        onnx_bytes = read_verified_onnx(artifact_dir, self.manifest)
        self._session = ort.InferenceSession(
            onnx_bytes, options, providers=["CPUExecutionProvider"]
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
        self._no_rows = self.columns([])
        self._encoder: Encoder | None = None
        if encoded_variants:
            self._join_encoded_rows(onnx_bytes, options)

    def _join_encoded_rows(self, onnx_bytes: bytes, options: ort.SessionOptions) -> None:
        """Serve from the graph that also takes encoded rows (see the module doc), if the
        served graph splits and the joined graph scores exactly as it does, raw rows and
        encoded rows alike: rows that take every category and several values of each number,
        one feature at a time."""
        split = split_graph(onnx_bytes, self.features, self._output[0])
        if split is None:
            return
        joined = ort.InferenceSession(
            with_encoded_rows(onnx_bytes, split, self._output[0], ENCODED_INPUT),
            options,
            providers=["CPUExecutionProvider"],
        )
        encoder = Encoder(split, self._numeric_index.tolist(), self._categorical_index.tolist())
        check = self.columns(self._check_rows())
        feeds = self._feeds(check)
        feeds[ENCODED_INPUT] = encoder.encode(check.numbers, check.categories)
        (probabilities,) = joined.run(self._output, feeds)
        served = self.run(check)
        if np.array_equal(probabilities[:, self._bad_column], np.concatenate([served, served])):
            self._session = joined
            self._encoder = encoder
            self._reference_encoded = encoder.encode(
                self._reference.numbers, self._reference.categories
            )[0]
            self._no_encoded_rows = np.zeros((0, encoder.width), dtype=np.float32)

    def _check_rows(self) -> list[dict[str, FeatureValue]]:
        reference = dict(self.manifest.reference_values)
        rows = [reference]
        for spec in self.features:
            if spec.is_numeric:
                value = float(reference[spec.name])
                values: list[FeatureValue] = [value - 1, value + 1, value / 2, value * 2]
                values += [v for v in (spec.min, spec.max) if v is not None]
            else:
                values = list(spec.categories or ())
            rows.extend({**reference, spec.name: value} for value in values)
        return rows

    @property
    def encoded_variants(self) -> bool:
        """Whether reason variants are encoded rows (see the module doc)."""
        return self._encoder is not None

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

    def run(self, columns: ModelRows) -> np.ndarray:
        """P(bad) for each row of `columns`, in one onnxruntime run."""
        return self.run_parts([columns])[0]

    def run_parts(self, parts: Sequence[ModelRows]) -> list[np.ndarray]:
        """P(bad) for each part, all in one onnxruntime run."""
        if not sum(map(len, parts)):
            return [np.empty(0) for _ in parts]
        raw = [part for part in parts if isinstance(part, Columns)]
        encoded = [part for part in parts if isinstance(part, EncodedRows)]
        columns = Columns.concat(raw) if raw else self._no_rows
        feeds = self._feeds(columns)
        if self._encoder is not None:
            feeds[ENCODED_INPUT] = (
                EncodedRows.concat(encoded).matrix if encoded else self._no_encoded_rows
            )
        elif encoded:
            raise TypeError("this scorer takes no encoded rows")
        (probabilities,) = self._session.run(self._output, feeds)
        merged = np.asarray(probabilities[:, self._bad_column], dtype=np.float64)
        # The graph returns the raw rows, then the encoded rows.
        results, raw_at, encoded_at = [], 0, len(columns)
        for part in parts:
            if isinstance(part, Columns):
                results.append(merged[raw_at : raw_at + len(part)])
                raw_at += len(part)
            else:
                results.append(merged[encoded_at : encoded_at + len(part)])
                encoded_at += len(part)
        return results

    def _feeds(self, columns: Columns) -> dict[str, np.ndarray]:
        return {
            spec.name: column.reshape(-1, 1)
            for specs, matrix in (
                (self._numeric, columns.numbers),
                (self._categorical, columns.categories),
            )
            for spec, column in zip(specs, matrix, strict=True)
        }

    def probabilities(self, rows: Sequence[Row]) -> np.ndarray:
        return self.run(self.columns(rows))

    def score_of(self, probability_of_default: float) -> int:
        return round(self.manifest.scaling.score(probability_of_default))

    def scores(self, probabilities: np.ndarray) -> np.ndarray:
        """`manifest.scaling.score` of each probability, to the bit (the same expression on
        the same Python floats), for many at once."""
        scaling = self.manifest.scaling
        offset, factor = scaling.offset, scaling.factor
        low, high = _SCORE_EPSILON, 1.0 - _SCORE_EPSILON
        clipped = (min(max(p, low), high) for p in probabilities.tolist())
        return np.array([offset + factor * math.log((1.0 - p) / p) for p in clipped])

    def reason_variants(self, columns: Columns) -> ReasonVariants:
        """For each row, one copy per feature with that feature at its reference value.

        A feature already at its reference value would move nothing, so it gets no copy: on
        typical applicants that saves a third of the reasons' model rows. The copies are
        `EncodedRows` when the session takes them (see the module doc), else `Columns`.
        """
        if self._encoder is None:
            return self._variant_columns(columns)
        differs = np.empty((len(self.features), len(columns)), dtype=bool)
        differs[self._numeric_index] = columns.numbers != self._reference.numbers
        differs[self._categorical_index] = columns.categories != self._reference.categories
        features, rows = np.nonzero(differs)
        matrix = np.where(
            self._encoder.feature_columns[features],
            self._reference_encoded,
            self._encoder.encode(columns.numbers, columns.categories)[rows],
        )
        return ReasonVariants(EncodedRows(matrix), rows, features)

    def _variant_columns(self, columns: Columns) -> ReasonVariants:
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
        scores: Sequence[float] | np.ndarray,
        variants: ReasonVariants,
        variant_probabilities: np.ndarray,
        limit: int,
    ) -> list[list[Reason]]:
        """Up to `limit` reasons per row, most points first, from the scored variants.

        `scores` are the rows' unrounded scores, so gains compare exactly. Only features whose
        reference value would raise the score count.
        """
        gains = self.scores(variant_probabilities)
        gains -= np.asarray(scores, dtype=np.float64)[variants.owner_rows]
        # Per row: most points first, ties by feature name (names are unique within a row).
        ranked: list[list[tuple[float, str, int]]] = [[] for _ in scores]
        for index, feature, gain in zip(
            variants.owner_rows.tolist(),
            variants.owner_features.tolist(),
            gains.tolist(),
            strict=True,
        ):
            ranked[index].append((-gain, self.features[feature].name, feature))
        result = []
        for row in ranked:
            row.sort()
            reasons = []
            for loss, _, feature in row[:limit]:
                if loss < 0:
                    spec = self.features[feature]
                    reasons.append(Reason(spec.name, spec.reason_code, spec.reason_text, -loss))
            result.append(reasons)
        return result


class ModelBatcher:
    """Runs the model off the event loop, putting concurrent callers' rows into one run.

    While a run is in progress, rows from other calls queue; the next run takes them all (raw
    rows and encoded reason variants alike). An idle server runs each call's rows at once (no
    waiting for company); a busy one amortises the per-run cost over every call in flight.
    onnxruntime releases the GIL while it runs.
    """

    def __init__(
        self,
        scorer: Scorer,
        max_rows: int = 4096,
        on_run: Callable[[int, float], None] | None = None,
    ) -> None:
        """`on_run(rows, seconds)` is told of every run, on the model's thread (metrics)."""
        self.scorer = scorer
        self._max_rows = max_rows
        self._on_run = on_run
        self._pending: deque[tuple[ModelRows, asyncio.Future[np.ndarray]]] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def probabilities(self, columns: ModelRows) -> np.ndarray:
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
            batch: list[tuple[ModelRows, asyncio.Future[np.ndarray]]] = []
            taken = 0
            while self._pending and (
                not batch or taken + len(self._pending[0][0]) <= self._max_rows
            ):
                batch.append(self._pending.popleft())
                taken += len(batch[-1][0])
            try:
                results = await loop.run_in_executor(
                    self._thread, self._run, [columns for columns, _ in batch], taken
                )
            except Exception as error:  # noqa: BLE001 - each waiter gets the failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():  # a cancelled caller's rows were scored in vain
                    future.set_result(result)

    def _run(self, parts: list[ModelRows], rows: int) -> list[np.ndarray]:
        if self._on_run is None:
            return self.scorer.run_parts(parts)
        started = time.perf_counter()
        results = self.scorer.run_parts(parts)
        self._on_run(rows, time.perf_counter() - started)
        return results

    def close(self) -> None:
        self._thread.shutdown(wait=True)
