"""Reason variants in the served graph's encoded feature space, scored in the same run as rows.

A scikit-learn ColumnTransformer exported by skl2onnx becomes a front that turns the raw inputs
into one float matrix (numeric inputs passed through, each categorical input one-hot encoded by
its own OneHotEncoder, the parts concatenated), and a tail that scores that matrix row by row
(the estimator, then the calibration). Each column of the matrix depends on one input feature
only, so a row with one feature set to its reference value encodes as the row's encoding with
that feature's columns taken from the reference's encoding.

`split_graph` recognises such a front, and a tail of row-wise operators that reads only the
matrix, from the graph's nodes, and refuses (returns None) anything else. `with_encoded_rows`
adds to the graph a second input of already encoded rows, appended (Concat on the row axis)
to the front's matrix before the tail: rows and encoded variants are scored by the same tail
nodes in one run, and variants skip the string encoding. The raw rows' outputs come out of the
same nodes on the same numbers as in the served graph; the scorer checks both kinds of rows
against the served graph on load before it uses this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.model import onnx_proto
from service.model.schema import FeatureSpec

_ML_DOMAIN = "ai.onnx.ml"
# Operators whose output rows each depend on the same input row only (Concat: not on axis 0),
# as in the tails skl2onnx writes for scikit-learn classifiers and their calibration.
_ROW_WISE = frozenset(
    {
        "TreeEnsembleClassifier", "TreeEnsembleRegressor", "LinearClassifier", "LinearRegressor",
        "Normalizer", "ArrayFeatureExtractor", "Mul", "Add", "Sub", "Div", "Exp", "Log", "Abs",
        "Neg", "Sigmoid", "Clip", "Cast", "Identity", "Sum", "Concat",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Segment:
    """Where one model feature sits in the encoded matrix."""

    feature: int  # index into the model features
    offset: int  # first column
    categories: tuple[str, ...] | None  # one-hot categories in column order; None: numeric

    @property
    def width(self) -> int:
        return 1 if self.categories is None else len(self.categories)


@dataclass(frozen=True)
class SplitGraph:
    matrix: str  # the name of the encoded matrix in the served graph
    width: int
    segments: tuple[Segment, ...]  # in column order
    tail: tuple[int, ...]  # the nodes after the matrix that the probability output needs


class _NotRecognised(Exception):
    pass


@dataclass(frozen=True)
class _Part:
    rank: int  # 2: [N, width]; 3: [N, 1, width] (what OneHotEncoder gives for an [N, 1] input)
    segments: tuple[tuple[int, tuple[str, ...] | None], ...]
    nodes: frozenset[int]

    @property
    def width(self) -> int:
        return sum(1 if categories is None else len(categories) for _, categories in self.segments)


def split_graph(
    onnx_bytes: bytes, features: Sequence[FeatureSpec], output: str
) -> SplitGraph | None:
    """The served graph split at its encoded feature matrix, or None if its front is not one
    this module knows to be column-separable, or its tail reads anything but that matrix."""
    try:
        return _split(onnx_proto.ModelProto.FromString(onnx_bytes).graph, features, output)
    except _NotRecognised:
        return None


def _split(graph: Any, features: Sequence[FeatureSpec], output: str) -> SplitGraph:
    nodes = list(graph.node)
    producer = {name: index for index, node in enumerate(nodes) for name in node.output}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    inputs = {item.name for item in graph.input}
    by_name = {spec.name: index for index, spec in enumerate(features)}

    needed: set[int] = set()
    stack = [output]
    while stack:
        index = producer.get(stack.pop())
        if index is not None and index not in needed:
            needed.add(index)
            stack.extend(nodes[index].input)

    def parse(name: str) -> _Part:
        if name in inputs:
            feature = by_name.get(name)
            if feature is None or not features[feature].is_numeric:
                raise _NotRecognised(name)
            return _Part(2, ((feature, None),), frozenset())
        index = producer.get(name)
        if index is None:
            raise _NotRecognised(name)
        node = nodes[index]
        if node.op_type == "Concat" and node.domain == "":
            parts = [parse(item) for item in node.input]
            rank = parts[0].rank
            axis = onnx_proto.attribute(node, "axis")
            if axis is None or axis.i not in (rank - 1, -1) or any(p.rank != rank for p in parts):
                raise _NotRecognised(name)
            return _Part(
                rank,
                tuple(segment for part in parts for segment in part.segments),
                frozenset({index}).union(*(part.nodes for part in parts)),
            )
        if node.op_type == "OneHotEncoder" and node.domain == _ML_DOMAIN:
            (source,) = node.input
            feature = by_name.get(source)
            categories = onnx_proto.attribute(node, "cats_strings")
            zeros = onnx_proto.attribute(node, "zeros")
            if (
                source not in inputs
                or feature is None
                or features[feature].is_numeric
                or categories is None
                or not categories.strings
                or onnx_proto.attribute(node, "cats_int64s") is not None
                or (zeros is not None and zeros.i != 1)
            ):
                raise _NotRecognised(name)
            names = tuple(item.decode("utf-8") for item in categories.strings)
            return _Part(3, ((feature, names),), frozenset({index}))
        if node.op_type == "Reshape" and node.domain == "" and len(node.input) == 2:
            part = parse(node.input[0])
            shape = initializers.get(node.input[1])
            allowzero = onnx_proto.attribute(node, "allowzero")
            if (
                part.rank != 3
                or shape is None
                or onnx_proto.int64_values(shape) != [-1, part.width]
                or (allowzero is not None and allowzero.i != 0)
            ):
                raise _NotRecognised(name)
            return _Part(2, part.segments, part.nodes | {index})
        raise _NotRecognised(name)

    # The matrix: the needed Concat whose front covers every model feature exactly once.
    found: list[tuple[str, _Part]] = []
    for index in sorted(needed):
        node = nodes[index]
        if node.op_type != "Concat":
            continue
        try:
            part = parse(node.output[0])
        except _NotRecognised:
            continue
        covered = sorted(feature for feature, _ in part.segments)
        if part.rank == 2 and covered == list(range(len(features))):
            found.append((node.output[0], part))
    if len(found) != 1:
        raise _NotRecognised("no single encoded matrix")
    matrix, front = found[0]

    tail = sorted(needed - front.nodes)
    known = {matrix, "", *initializers}
    for index in tail:  # graph order is topological
        node = nodes[index]
        if not set(node.input) <= known:
            raise _NotRecognised(f"{node.op_type} reads the raw inputs")
        axis = onnx_proto.attribute(node, "axis")
        if node.op_type not in _ROW_WISE or (
            node.op_type == "Concat" and (axis is None or not (axis.i >= 1 or axis.i == -1))
        ):
            raise _NotRecognised(f"{node.op_type} may mix rows")
        known.update(node.output)
    if not tail or output not in known:
        raise _NotRecognised("no tail")

    segments, offset = [], 0
    for feature, categories in front.segments:
        segments.append(Segment(feature, offset, categories))
        offset += segments[-1].width
    return SplitGraph(matrix, offset, tuple(segments), tuple(tail))


def with_encoded_rows(
    onnx_bytes: bytes, split: SplitGraph, output: str, encoded_input: str
) -> bytes:
    """The served graph with a second input, `encoded_input` (float [M, width]): its rows are
    appended to the front's matrix, so the output has the N raw rows, then the M encoded ones.
    Only `output` is kept as a graph output."""
    model = onnx_proto.ModelProto.FromString(onnx_bytes)
    graph = model.graph
    names = {name for node in graph.node for name in (*node.input, *node.output)}
    names |= {item.name for item in (*graph.input, *graph.initializer)}
    if encoded_input in names:
        raise ValueError(f"{encoded_input} is already a name in the graph")
    joined = f"{split.matrix}_and_{encoded_input}"
    while joined in names:
        joined += "_"
    for index in split.tail:
        node = graph.node[index]
        for position, name in enumerate(node.input):
            if name == split.matrix:
                node.input[position] = joined
    nodes = list(graph.node)
    first = min(split.tail)  # every tail node comes after the matrix (graph order is topological)
    concat = onnx_proto.NodeProto(
        op_type="Concat", name=joined, input=[split.matrix, encoded_input], output=[joined]
    )
    concat.attribute.add(name="axis", i=0, type=onnx_proto.ATTRIBUTE_INT)
    del graph.node[:]
    graph.node.extend([*nodes[:first], concat, *nodes[first:]])
    graph.input.append(onnx_proto.float_matrix_input(encoded_input, split.width))
    kept = [item for item in graph.output if item.name == output]
    del graph.output[:]
    graph.output.extend(kept)
    return bytes(model.SerializeToString())


class Encoder:
    """Rows as the front encodes them: numeric values as they are (float32), one 1.0 per
    categorical feature at its category's column (none for a category the encoder does not
    know, as OneHotEncoder with zeros=1 does)."""

    def __init__(
        self, split: SplitGraph, numeric: Sequence[int], categorical: Sequence[int]
    ) -> None:
        """`numeric` and `categorical`: the model feature indices of the scorer's two input
        matrices' rows, in order."""
        self.width = split.width
        at = {segment.feature: segment for segment in split.segments}
        self._numeric_columns = np.array([at[f].offset for f in numeric], dtype=np.intp)
        self._category_columns = [
            {name: at[f].offset + k for k, name in enumerate(at[f].categories or ())}
            for f in categorical
        ]
        self.feature_columns = np.zeros((len(split.segments), split.width), dtype=bool)
        for segment in split.segments:
            self.feature_columns[
                segment.feature, segment.offset : segment.offset + segment.width
            ] = True

    def encode(self, numbers: np.ndarray, categories: np.ndarray) -> np.ndarray:
        """numbers: float32 [numeric feature, row]; categories: str [categorical feature, row]
        -> float32 [row, encoded column]."""
        rows = numbers.shape[1] if len(numbers) else categories.shape[1]
        # One spare last column takes the 1.0 of categories the encoder does not know.
        matrix = np.zeros((rows, self.width + 1), dtype=np.float32)
        matrix[:, self._numeric_columns] = numbers.T
        hot = np.array(
            [
                columns.get(value, self.width)
                for columns, values in zip(self._category_columns, categories.tolist(), strict=True)
                for value in values
            ],
            dtype=np.intp,
        )
        matrix[np.arange(rows), hot.reshape(len(self._category_columns), rows)] = 1.0
        return np.ascontiguousarray(matrix[:, : self.width])
