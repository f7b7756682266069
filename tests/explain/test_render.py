"""Explanation messages: both languages, zh-CN first, every field filled from the catalogue."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from dataclasses import replace

import pytest

from privscore.v1 import common_pb2, privacy_service_pb2
from service.decisions.policy import DecisionPolicy
from service.explain import (
    Catalogue,
    CatalogueError,
    ExplainedDecision,
    counterfactuals,
    explain_decision_response,
    explanation,
    explanations,
    score_range,
)
from service.explain.catalogue import number_text
from service.explain.counterfactual import Counterfactual
from service.model.scorer import Row, Scorer

DECIDED_AT = dt.datetime(2026, 12, 2, 9, 30, 15, tzinfo=dt.UTC)
DECISION_ID = "0b7c61f2-5d1e-4c55-9a8e-3f1b2c4d5e6f"


@pytest.fixture(scope="module")
def declined_decision(
    scorer: Scorer, policy: DecisionPolicy, catalogue: Catalogue, rows: list[Row]
) -> ExplainedDecision:
    """A real declined applicant's decision, with its reasons and counterfactuals as the
    served model gives them."""
    columns = scorer.columns(rows)
    probabilities = scorer.run(columns)
    scores = [scorer.manifest.scaling.score(p) for p in probabilities.tolist()]
    index = next(i for i, s in enumerate(scores) if round(s) < policy.score.review_min_score)
    variants = scorer.reason_variants(columns.take([index]))
    (reasons,) = scorer.rank_reasons(
        [scores[index]], variants, scorer.run(variants.columns), policy.score.max_reasons
    )

    async def model(batch: Sequence[Row]) -> list[float]:
        return [float(p) for p in scorer.probabilities(batch).tolist()]

    found = asyncio.run(counterfactuals(rows[index], scorer, model, policy.score, catalogue))
    low, high = score_range(scorer.manifest.scaling)
    return ExplainedDecision(
        decision_id=DECISION_ID,
        kind="score",
        outcome="DECLINE",
        score=round(scores[index]),
        score_min=low,
        score_max=high,
        reasons=[r.code for r in reasons],
        decided_at=DECIDED_AT,
        model_version=scorer.model_version,
        counterfactuals=found,
    )


def test_a_declined_decision_is_explained_in_both_languages_chinese_first(
    catalogue: Catalogue, declined_decision: ExplainedDecision
) -> None:
    decision = declined_decision
    assert decision.reasons and decision.counterfactuals
    told = explanations(catalogue, decision)
    assert [e.language for e in told] == ["zh-CN", "en"]
    for explained in told:
        language = explained.language
        assert explained.outcome == catalogue.outcome("score", "DECLINE", language)
        assert explained.score == decision.score
        assert (explained.score_min, explained.score_max) == (
            decision.score_min,
            decision.score_max,
        )
        assert [r.code for r in explained.reasons] == list(decision.reasons)
        assert [r.text for r in explained.reasons] == [
            catalogue.reason(code, language) for code in decision.reasons
        ]
        assert explained.decided_at.ToDatetime(dt.UTC) == DECIDED_AT
        assert explained.model_version == decision.model_version
        assert DECISION_ID in explained.contest
        assert explained.contest == catalogue.contest(language, DECISION_ID)
        assert [c.feature for c in explained.counterfactuals] == [
            c.feature for c in decision.counterfactuals
        ]
        for message, found in zip(explained.counterfactuals, decision.counterfactuals, strict=True):
            assert message.reaches == found.decision
            assert message.score == found.score
            assert message.text == catalogue.change_text(
                language, found.feature, found.value, found.current
            )
        # The whole explanation as one text, in reading order.
        text = explained.text
        parts = [
            explained.outcome,
            str(decision.score),
            *(r.text for r in explained.reasons),
            *(c.text for c in explained.counterfactuals),
            catalogue.date(language, DECIDED_AT),
            decision.model_version,
            explained.contest,
        ]
        positions = [text.index(part) for part in parts]
        assert positions == sorted(positions)
    chinese, english = told
    assert "您的信用评分" in chinese.text and "Your credit score" in english.text
    assert "2026年12月2日 09:30" in chinese.text
    assert "2 December 2026, 09:30 UTC" in english.text


def test_every_explanation_field_is_set(
    catalogue: Catalogue, declined_decision: ExplainedDecision
) -> None:
    for explained in explanations(catalogue, declined_decision):
        every = {field.name for field in privacy_service_pb2.Explanation.DESCRIPTOR.fields}
        assert {field.name for field, _ in explained.ListFields()} == every
        for reason in explained.reasons:
            assert reason.code and reason.text
        for change in explained.counterfactuals:
            assert change.feature and change.text and change.reaches and change.score


def test_an_approved_decision_has_no_reasons_or_changes_to_tell(catalogue: Catalogue) -> None:
    decision = ExplainedDecision(
        decision_id=DECISION_ID,
        kind="score",
        outcome="APPROVE",
        score=560,
        score_min=0,
        score_max=1000,
        reasons=(),
        decided_at=DECIDED_AT,
        model_version="m-1",
    )
    for explained in explanations(catalogue, decision):
        language = explained.language
        assert not explained.reasons and not explained.counterfactuals
        assert catalogue.line("reasons", language) not in explained.text
        assert catalogue.line("counterfactuals", language) not in explained.text
        assert explained.text.startswith(catalogue.outcome("score", "APPROVE", language))


@pytest.mark.parametrize(
    ("outcome", "reasons"),
    [
        ("FREEZE", ("OPEN_CRITICAL_ALERT",)),
        ("HOLD", ("OPEN_HIGH_ALERT",)),
        ("DECREASE", ("PAST_DUE", "SCORE_DETERIORATED")),
        ("FREEZE", ("PAST_DUE_FREEZE",)),
        ("INCREASE", ("ON_TIME_REPAYMENTS",)),
    ],
)
def test_a_limit_decision_is_explained_with_its_rule_reasons(
    catalogue: Catalogue, outcome: str, reasons: tuple[str, ...]
) -> None:
    decision = ExplainedDecision(
        decision_id=DECISION_ID,
        kind="limit",
        outcome=outcome,
        score=512,
        score_min=0,
        score_max=1000,
        reasons=reasons,
        decided_at=DECIDED_AT,
        model_version="m-1",
    )
    for explained in explanations(catalogue, decision):
        assert explained.outcome == catalogue.outcome("limit", outcome, explained.language)
        assert [r.code for r in explained.reasons] == list(reasons)
        for reason in explained.reasons:
            assert reason.text in explained.text


def test_a_reduced_limit_can_carry_counterfactuals(catalogue: Catalogue) -> None:
    change = Counterfactual("duration_in_month", 36.0, 24.0, 531, "APPROVE", 0.4)
    decision = ExplainedDecision(
        decision_id=DECISION_ID,
        kind="limit",
        outcome="DECREASE",
        score=500,
        score_min=0,
        score_max=1000,
        reasons=("SCORE_DETERIORATED",),
        decided_at=DECIDED_AT,
        model_version="m-1",
        counterfactuals=(change,),
    )
    chinese, english = explanations(catalogue, decision)
    assert chinese.counterfactuals[0].text == "贷款期限由36个月缩短为24个月"
    assert english.counterfactuals[0].text == "A loan duration of 24 months instead of 36"
    assert "足以获得批准" in chinese.text
    assert "your score would be 531, enough for approval" in english.text


def test_an_unknown_code_or_outcome_is_refused_not_left_blank(catalogue: Catalogue) -> None:
    decision = ExplainedDecision(
        decision_id=DECISION_ID,
        kind="score",
        outcome="DECLINE",
        score=480,
        score_min=0,
        score_max=1000,
        reasons=("NEVER_HEARD_OF",),
        decided_at=DECIDED_AT,
        model_version="m-1",
    )
    with pytest.raises(CatalogueError, match="NEVER_HEARD_OF"):
        explanations(catalogue, decision)
    with pytest.raises(CatalogueError, match=r"score\.FREEZE"):
        explanation(catalogue, replace(decision, outcome="FREEZE"), "en")


def test_the_response_names_the_catalogue_version(
    catalogue: Catalogue, declined_decision: ExplainedDecision
) -> None:
    metadata = common_pb2.DecisionMetadata(decision_id="call-1")
    response = explain_decision_response(catalogue, declined_decision, metadata)
    assert response.catalogue_version == catalogue.version
    assert response.decision_id == DECISION_ID
    assert response.metadata == metadata
    assert [e.language for e in response.explanations] == ["zh-CN", "en"]


def test_the_score_range_is_the_scale_s_clipped_extremes(scorer: Scorer) -> None:
    scaling = scorer.manifest.scaling
    low, high = score_range(scaling)
    assert (low, high) == (round(scaling.score(1.0)), round(scaling.score(0.0)))
    assert low < scaling.base_score < high
    # Every score the served model gave the development sample lies inside.
    drift = scorer.manifest.drift_reference
    assert drift is not None
    assert low <= drift.score.edges[0] and drift.score.edges[-1] <= high


def test_numbers_are_written_as_customers_read_them() -> None:
    assert number_text(24.0) == "24"
    assert number_text(2.5) == "2.5"
    assert number_text(1234.567) == "1234.57"
