"""Counterfactuals with the served model: a declined applicant is told changes that really reach
the stated decision, never of a protected or immutable attribute; an approved one is told none."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest

from service.decisions.policy import DecisionPolicy
from service.explain.catalogue import SCORE_DECISIONS, Catalogue, FeatureEntry
from service.explain.counterfactual import (
    CATEGORY_CHANGE,
    GRID_STEPS,
    Counterfactual,
    Probabilities,
    candidates,
    counterfactuals,
    decision_of,
)
from service.model.scorer import ModelBatcher, Row, Scorer
from tests.explain.test_catalogue import PROTECTED_OR_IMMUTABLE

RANK = {decision: rank for rank, decision in enumerate(SCORE_DECISIONS)}


class CountingModel:
    """The served model as the servicer passes it (one async call over rows), counting calls."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.calls: list[int] = []

    async def __call__(self, rows: Sequence[Row]) -> np.ndarray:
        self.calls.append(len(rows))
        return self.scorer.probabilities(rows)


def explain(
    row: Row,
    scorer: Scorer,
    policy: DecisionPolicy,
    catalogue: Catalogue,
    model: Probabilities | None = None,
) -> list[Counterfactual]:
    probabilities = model if model is not None else CountingModel(scorer)
    return asyncio.run(counterfactuals(row, scorer, probabilities, policy.score, catalogue))


def decision(scorer: Scorer, policy: DecisionPolicy, row: Row) -> tuple[int, str]:
    score = scorer.score_of(float(scorer.probabilities([row])[0]))
    return score, decision_of(score, policy.score)


def scored(scorer: Scorer, policy: DecisionPolicy, rows: Sequence[Row]) -> list[tuple[int, str]]:
    scores = [scorer.score_of(p) for p in scorer.probabilities(rows).tolist()]
    return [(s, decision_of(s, policy.score)) for s in scores]


@pytest.fixture(scope="module")
def verdicts(scorer: Scorer, policy: DecisionPolicy, rows: list[Row]) -> list[tuple[int, str]]:
    return scored(scorer, policy, rows)


@pytest.fixture(scope="module")
def declined(rows: list[Row], verdicts: list[tuple[int, str]]) -> Row:
    """The first German-credit applicant the served model declines."""
    return next(row for row, (_, d) in zip(rows, verdicts, strict=True) if d == "DECLINE")


def test_a_declined_applicant_is_told_changes_that_really_reach_the_stated_decision(
    scorer: Scorer, policy: DecisionPolicy, catalogue: Catalogue, declined: Row
) -> None:
    score, verdict = decision(scorer, policy, declined)
    assert verdict == "DECLINE"
    model = CountingModel(scorer)
    found = explain(declined, scorer, policy, catalogue, model)
    assert found
    assert len(model.calls) == 1  # the row and every candidate in one batched call
    assert len(found) <= 3
    applied = [{**declined, c.feature: c.value} for c in found]
    for change, (new_score, new_decision) in zip(
        found, scored(scorer, policy, applied), strict=True
    ):
        assert change.current == declined[change.feature]
        assert change.value != change.current
        assert (change.score, change.decision) == (new_score, new_decision)
        assert change.score > score
    # Better decisions first.
    assert [RANK[c.decision] for c in found] == sorted(RANK[c.decision] for c in found)


def test_some_declined_applicant_is_told_how_to_reach_approval_with_the_smallest_change(
    scorer: Scorer,
    policy: DecisionPolicy,
    catalogue: Catalogue,
    rows: list[Row],
    verdicts: list[tuple[int, str]],
) -> None:
    """The first declined applicant whose best change reaches approval: no smaller candidate
    of that feature reaches it (the search's grid is the candidate list)."""
    schema = scorer.manifest.schema
    for row, (_, verdict) in zip(rows, verdicts, strict=True):
        if verdict != "DECLINE":
            continue
        found = explain(row, scorer, policy, catalogue)
        if found and found[0].decision == "APPROVE":
            break
    else:
        pytest.fail("no declined applicant can reach approval with one change")
    best = found[0]
    tried = [
        c
        for c in candidates(row, schema.model_features, catalogue, scorer.manifest.drift_reference)
        if c.feature == best.feature and c.change < best.change
    ]
    smaller = scored(scorer, policy, [{**row, best.feature: c.value} for c in tried])
    assert all(d != "APPROVE" for _, d in smaller)
    assert decision(scorer, policy, {**row, best.feature: best.value}) == (best.score, "APPROVE")


def test_no_protected_or_immutable_feature_is_ever_suggested(
    scorer: Scorer,
    policy: DecisionPolicy,
    catalogue: Catalogue,
    rows: list[Row],
    verdicts: list[tuple[int, str]],
) -> None:
    """Over many adverse applicants: every change is of an actionable feature, within the
    schema (bounds, whole numbers, the catalogue's targets), and reaches what it says."""
    schema = scorer.manifest.schema
    adverse = [row for row, (_, d) in zip(rows, verdicts, strict=True) if d != "APPROVE"][:60]
    applied, claims = [], []
    for row in adverse:
        for change in explain(row, scorer, policy, catalogue):
            spec = schema.feature(change.feature)
            assert change.feature in catalogue.actionable
            assert change.feature not in PROTECTED_OR_IMMUTABLE
            assert not spec.sensitive and not spec.excluded
            if isinstance(change.value, str):
                assert change.value in catalogue.features[change.feature].targets
                assert change.change == CATEGORY_CHANGE
            else:
                assert spec.min is not None and spec.max is not None
                assert spec.min <= change.value <= spec.max
                assert not spec.integer or float(change.value).is_integer()
            applied.append({**row, change.feature: change.value})
            claims.append((change.score, change.decision))
    assert claims
    assert scored(scorer, policy, applied) == claims


def test_an_approved_applicant_is_told_none(
    scorer: Scorer,
    policy: DecisionPolicy,
    catalogue: Catalogue,
    rows: list[Row],
    verdicts: list[tuple[int, str]],
) -> None:
    approved = [row for row, (_, d) in zip(rows, verdicts, strict=True) if d == "APPROVE"][:5]
    assert approved
    for row in approved:
        model = CountingModel(scorer)
        assert explain(row, scorer, policy, catalogue, model) == []
        assert len(model.calls) == 1


def test_a_reviewed_applicant_is_told_what_would_reach_approval_or_raise_the_score(
    scorer: Scorer,
    policy: DecisionPolicy,
    catalogue: Catalogue,
    rows: list[Row],
    verdicts: list[tuple[int, str]],
) -> None:
    reviewed = [(row, s) for row, (s, d) in zip(rows, verdicts, strict=True) if d == "REVIEW"]
    assert reviewed
    for row, score in reviewed[:10]:
        for change in explain(row, scorer, policy, catalogue):
            assert change.decision in ("APPROVE", "REVIEW")
            assert change.score > score


def test_a_catalogue_marking_a_sensitive_feature_actionable_is_not_obeyed(
    scorer: Scorer, policy: DecisionPolicy, catalogue: Catalogue, declined: Row
) -> None:
    """Defence in depth: the schema's sensitive and excluded marks win over the catalogue."""
    texts = {"zh-CN": "年龄{value}岁", "en": "An age of {value}"}
    age = FeatureEntry(
        "age_in_years", "actionable", {"lower": texts, "higher": texts}, (), None, {}
    )
    careless = replace(catalogue, features={**catalogue.features, "age_in_years": age})
    assert "age_in_years" in careless.actionable
    schema = scorer.manifest.schema
    tried = candidates(declined, schema.model_features, careless, scorer.manifest.drift_reference)
    assert all(c.feature != "age_in_years" for c in tried)
    assert all(c.feature != "age_in_years" for c in explain(declined, scorer, policy, careless))


def test_the_answer_is_deterministic_and_the_same_through_the_model_batcher(
    scorer: Scorer, policy: DecisionPolicy, catalogue: Catalogue, declined: Row
) -> None:
    """The servicer's way of calling the model (its batcher, off the event loop) gives the
    same answer as calling the session directly, every time."""

    async def through_batcher() -> list[Counterfactual]:
        batcher = ModelBatcher(scorer)
        try:
            return await counterfactuals(
                declined,
                scorer,
                lambda rows: batcher.probabilities(scorer.columns(rows)),
                policy.score,
                catalogue,
            )
        finally:
            batcher.close()

    direct = explain(declined, scorer, policy, catalogue)
    assert explain(declined, scorer, policy, catalogue) == direct
    assert asyncio.run(through_batcher()) == direct


def test_a_model_answering_the_wrong_number_of_rows_is_refused(
    scorer: Scorer, policy: DecisionPolicy, catalogue: Catalogue, declined: Row
) -> None:
    async def short(rows: Sequence[Row]) -> list[float]:
        return [0.5]

    with pytest.raises(ValueError, match="probabilities for"):
        explain(declined, scorer, policy, catalogue, short)


def test_numeric_candidates_stay_on_the_grid_within_bounds(
    scorer: Scorer, catalogue: Catalogue, declined: Row
) -> None:
    schema = scorer.manifest.schema
    tried = candidates(declined, schema.model_features, catalogue, scorer.manifest.drift_reference)
    features = {c.feature for c in tried}
    assert features <= catalogue.actionable
    for feature in features:
        spec = schema.feature(feature)
        values = [c.value for c in tried if c.feature == feature]
        assert len(values) == len(set(values))  # no value tried twice
        assert declined[feature] not in values
        if spec.is_numeric:
            entry = catalogue.features[feature]
            current = float(declined[feature])
            assert all(isinstance(v, float) for v in values)
            numbers = [float(v) for v in values]
            assert all(spec.min is not None and spec.min <= v for v in numbers)
            assert all(spec.max is not None and v <= spec.max for v in numbers)
            if spec.integer:
                assert all(v.is_integer() for v in numbers)
            if entry.directions == ("lower",):
                assert all(v < current for v in numbers)
    # Duration may move both ways; a short integer span is tried value by value.
    duration = [float(c.value) for c in tried if c.feature == "duration_in_month"]
    current = float(declined["duration_in_month"])
    assert any(v > current for v in duration)
    spec = schema.feature("duration_in_month")
    assert spec.min is not None
    if current - spec.min <= 2 * GRID_STEPS:
        shorter = sorted(v for v in duration if v < current)
        assert shorter == [float(v) for v in range(int(spec.min), int(current))]
