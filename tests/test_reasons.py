"""Reasons keep their meaning: a feature's strength is the change in score when that feature
alone is set to its reference value, computed by the served model. The scorer builds variants
as encoded rows and scores them in the same run as rows (`service.model.encoded`); these tests
hold it to the definition, computed plainly with the signed ONNX file, on every applicant of
the German credit set."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
import pytest

from service.config import DEFAULT_MODEL_DIR, DEFAULT_MODEL_PUBLIC_KEY
from service.model import onnx_proto
from service.model.encoded import split_graph
from service.model.manifest import read_verified_onnx
from service.model.scorer import (
    Columns,
    EncodedRows,
    ModelBatcher,
    Reason,
    ReasonVariants,
    Row,
    Scorer,
)
from tests.conftest import applicants


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer(DEFAULT_MODEL_DIR, DEFAULT_MODEL_PUBLIC_KEY)


class SignedGraph:
    """The signed ONNX file as it is, in a plain onnxruntime session with the scorer's
    options (one thread), fed one row per dict."""

    def __init__(self, scorer: Scorer) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.manifest = scorer.manifest
        self.features = scorer.features
        self.session = ort.InferenceSession(
            read_verified_onnx(DEFAULT_MODEL_DIR, scorer.manifest),
            options,
            providers=["CPUExecutionProvider"],
        )

    def probabilities(self, rows: Sequence[Row]) -> list[float]:
        feeds = {
            f.name: np.array(
                [[row[f.name]] for row in rows], dtype=np.float32 if f.is_numeric else object
            )
            for f in self.features
        }
        (probabilities,) = self.session.run([self.manifest.onnx.probability_output], feeds)
        return [float(p) for p in probabilities[:, self.manifest.onnx.bad_class_index]]


def defined_reasons(graph: SignedGraph, rows: Sequence[Row], limit: int) -> list[list[Reason]]:
    """The definition, written out plainly: every feature of every row set in turn to its
    reference value as a whole row, scored by the signed graph; most points first, ties by
    feature name; only features that would raise the score."""
    scaling, reference = graph.manifest.scaling, graph.manifest.reference_values
    count = len(graph.features)
    variants = [{**row, f.name: reference[f.name]} for row in rows for f in graph.features]
    probabilities = graph.probabilities(variants)
    result = []
    for index, p_row in enumerate(graph.probabilities(rows)):
        score = scaling.score(p_row)
        own = probabilities[index * count : (index + 1) * count]
        gains = sorted(
            ((scaling.score(p) - score, f) for p, f in zip(own, graph.features, strict=True)),
            key=lambda gain: (-gain[0], gain[1].name),
        )
        result.append(
            [Reason(f.name, f.reason_code, f.reason_text, g) for g, f in gains[:limit] if g > 0]
        )
    return result


def served_reasons(scorer: Scorer, rows: Sequence[Row], limit: int) -> list[list[Reason]]:
    """The scorer's way, as `service.api.scoring.assess` calls it."""
    columns = scorer.columns(rows)
    scores = [scorer.manifest.scaling.score(p) for p in scorer.run(columns).tolist()]
    variants = scorer.reason_variants(columns)
    return scorer.rank_reasons(scores, variants, scorer.run(variants.columns), limit)


def test_the_served_graph_takes_encoded_variants(scorer: Scorer) -> None:
    assert scorer.encoded_variants
    variants = scorer.reason_variants(scorer.columns(applicants()[:3]))
    assert isinstance(variants.columns, EncodedRows)


@pytest.mark.parametrize("encoded", [True, False], ids=["encoded", "whole-rows"])
def test_reasons_equal_the_definition_on_the_whole_german_credit_set(
    scorer: Scorer, encoded: bool
) -> None:
    """Same features, same order, the same strengths to the bit, for all 1,000 applicants
    (adverse or not) and every feature's rank, not only the first four; and the same
    probabilities for the rows themselves."""
    if not encoded:
        scorer = Scorer(DEFAULT_MODEL_DIR, DEFAULT_MODEL_PUBLIC_KEY, encoded_variants=False)
    assert scorer.encoded_variants is encoded
    graph = SignedGraph(scorer)
    rows = applicants()
    assert len(rows) == 1000
    assert scorer.probabilities(rows).tolist() == graph.probabilities(rows)
    every = len(scorer.features)
    expected = defined_reasons(graph, rows, every)
    assert served_reasons(scorer, rows, every) == expected
    assert served_reasons(scorer, rows, 4) == [reasons[:4] for reasons in expected]
    assert sum(map(len, expected)) > 5000 and any(not reasons for reasons in expected)


def test_encoded_variants_score_as_their_whole_rows(scorer: Scorer) -> None:
    """Each encoded variant scores exactly as its row with the feature at its reference value
    does in the signed graph, also for a category the encoder does not know (validation
    refuses one before the model, but the encoder still agrees with OneHotEncoder)."""
    graph = SignedGraph(scorer)
    reference = scorer.manifest.reference_values
    rows = list(applicants()[:50])
    for some in (rows, [{**row, "purpose": "not a category"} for row in rows[:5]]):
        variants = scorer.reason_variants(scorer.columns(some))
        names = [scorer.features[f].name for f in variants.owner_features.tolist()]
        whole = graph.probabilities(
            [
                {**some[r], name: reference[name]}
                for r, name in zip(variants.owner_rows.tolist(), names, strict=True)
            ]
        )
        assert scorer.run(variants.columns).tolist() == whole


def test_equal_gains_rank_by_feature_name(scorer: Scorer) -> None:
    """No two gains tie on German credit, so ties are checked here: equal probabilities give
    equal points, and the feature whose name sorts first comes first."""
    names = [f.name for f in scorer.features]
    a, b, c = sorted(names)[:3]
    features = np.array([names.index(c), names.index(a), names.index(b)], dtype=np.intp)
    variants = ReasonVariants(scorer.columns([]), np.zeros(3, dtype=np.intp), features)
    base = scorer.manifest.scaling.score(0.5)
    ranked = scorer.rank_reasons([base], variants, np.array([0.25, 0.25, 0.25]), 2)
    assert [r.feature for r in ranked[0]] == [a, b]
    assert ranked[0][0].points == ranked[0][1].points > 0
    ranked = scorer.rank_reasons([base], variants, np.array([0.5, 0.75, 0.4]), 4)
    assert [r.feature for r in ranked[0]] == [b]  # no gain and a loss are no reasons


def test_many_scores_are_the_manifest_scores_to_the_bit(scorer: Scorer) -> None:
    p = np.array([0.0, 1e-12, 1e-9, 0.02, 0.123456789, 0.5, 0.97, 1 - 1e-9, 1.0])
    p = np.concatenate([p, scorer.probabilities(applicants())])
    scaling = scorer.manifest.scaling
    assert scorer.scores(p).tolist() == [scaling.score(x) for x in p.tolist()]


def test_a_graph_with_another_front_is_not_split(scorer: Scorer) -> None:
    """A front the split does not know (here a Scaler on the numbers, as logistic regression
    has), or a tail that may mix rows, leaves the scorer with the signed graph alone."""
    features, output = scorer.features, scorer.manifest.onnx.probability_output
    onnx_bytes = (DEFAULT_MODEL_DIR / "model.onnx").read_bytes()
    assert split_graph(onnx_bytes, features, output) is not None

    scaled = onnx_proto.ModelProto.FromString(onnx_bytes)
    for node in scaled.graph.node:
        if node.op_type == "Concat" and "merged_columns" in node.input:
            node.input[list(node.input).index("merged_columns")] = "scaled"
    scaled.graph.node.add(
        op_type="Scaler", domain="ai.onnx.ml", input=["merged_columns"], output=["scaled"]
    )
    assert split_graph(scaled.SerializeToString(), features, output) is None

    mixed = onnx_proto.ModelProto.FromString(onnx_bytes)
    for node in mixed.graph.node:
        if node.op_type == "Exp":
            node.op_type = "Softmax"
    assert split_graph(mixed.SerializeToString(), features, output) is None


def test_the_batcher_scores_rows_and_encoded_variants_in_one_job(scorer: Scorer) -> None:
    rows = list(applicants()[:8])
    columns = scorer.columns(rows)
    variants = scorer.reason_variants(columns)
    assert isinstance(columns, Columns) and isinstance(variants.columns, EncodedRows)

    async def together() -> list[np.ndarray]:
        batcher = ModelBatcher(scorer)
        try:
            return list(
                await asyncio.gather(
                    batcher.probabilities(columns),
                    batcher.probabilities(variants.columns),
                    batcher.probabilities(columns.take([3, 1])),
                )
            )
        finally:
            batcher.close()

    rows_p, variants_p, some_p = asyncio.run(together())
    assert rows_p.tolist() == scorer.run(columns).tolist()
    assert variants_p.tolist() == scorer.run(variants.columns).tolist()
    assert some_p.tolist() == scorer.run(columns).tolist()[3:4] + scorer.run(columns).tolist()[1:2]
