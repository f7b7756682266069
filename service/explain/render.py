"""Explanations a customer reads: one `Explanation` message per catalogue language.

Every text comes from the catalogue; this module only chooses which texts and lays them out,
so the wording can change (and be translated) without touching code, and an explanation can
always name the catalogue version it was told from. Pure: the same decision and catalogue
give the same messages.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from privscore.v1 import common_pb2, privacy_service_pb2
from service.explain.catalogue import OUTCOMES, Catalogue, CatalogueError, DecisionKind
from service.explain.counterfactual import Counterfactual
from service.model.manifest import ScorecardScaling


@dataclass(frozen=True)
class ExplainedDecision:
    """What an explanation tells about one decision: all of it from the decision's record."""

    decision_id: str
    kind: DecisionKind  # "score": a Score decision; "limit": an AdjustLimit decision
    outcome: str  # APPROVE/REVIEW/DECLINE, or HOLD/INCREASE/DECREASE/FREEZE
    score: int
    score_min: int  # the model's scale (`score_range`)
    score_max: int
    reasons: Sequence[str]  # reason codes, most important first
    decided_at: dt.datetime  # timezone-aware
    model_version: str
    counterfactuals: Sequence[Counterfactual] = ()


def score_range(scaling: ScorecardScaling) -> tuple[int, int]:
    """(lowest, highest) score the service can ever give under `scaling`, as it rounds them.

    The scorecard maps P(bad) to `offset + factor * ln((1 - p) / p)`, which is unbounded, so
    the scorer clips p away from 0 and 1 (`ScorecardScaling.score`'s epsilon). The extremes
    are therefore the scores of certain default (p = 1) and certain repayment (p = 0) after
    that clipping: the bounds of the scale. A particular model's scores fill only part of it.
    """
    return round(scaling.score(1.0)), round(scaling.score(0.0))


def explanation(
    catalogue: Catalogue, decision: ExplainedDecision, language: str
) -> privacy_service_pb2.Explanation:
    """The decision told in one language, every field filled (`text`: all of it as one text a
    person reads top to bottom)."""
    if decision.kind not in OUTCOMES:
        raise CatalogueError(f"unknown decision kind {decision.kind!r}")
    outcome = catalogue.outcome(decision.kind, decision.outcome, language)
    reasons = [
        common_pb2.Reason(code=code, text=catalogue.reason(code, language))
        for code in decision.reasons
    ]
    changes = [
        privacy_service_pb2.Counterfactual(
            feature=found.feature,
            text=catalogue.change_text(language, found.feature, found.value, found.current),
            reaches=found.decision,
            score=found.score,
        )
        for found in decision.counterfactuals
    ]
    contest = catalogue.contest(language, decision.decision_id)
    decided_at = Timestamp()
    decided_at.FromDatetime(decision.decided_at.astimezone(dt.UTC))

    sections = [
        [
            outcome,
            catalogue.line(
                "score",
                language,
                score=decision.score,
                score_min=decision.score_min,
                score_max=decision.score_max,
            ),
        ]
    ]
    if reasons:
        sections.append(
            [
                catalogue.line("reasons", language),
                *(f"{i}. {reason.text}" for i, reason in enumerate(reasons, 1)),
            ]
        )
    if changes:
        lines = [
            catalogue.line(
                "counterfactual",
                language,
                change=change.text,
                score=change.score,
                reaches=catalogue.reach(change.reaches, language),
            )
            for change in changes
        ]
        sections.append(
            [catalogue.line("counterfactuals", language), *(f"- {line}" for line in lines)]
        )
    date = catalogue.date(language, decision.decided_at)
    sections.append(
        [catalogue.line("decided", language, date=date, model_version=decision.model_version)]
    )
    sections.append([contest])

    return privacy_service_pb2.Explanation(
        language=language,
        outcome=outcome,
        score=decision.score,
        score_min=decision.score_min,
        score_max=decision.score_max,
        reasons=reasons,
        decided_at=decided_at,
        model_version=decision.model_version,
        contest=contest,
        counterfactuals=changes,
        text="\n\n".join("\n".join(section) for section in sections),
    )


def explanations(
    catalogue: Catalogue, decision: ExplainedDecision
) -> list[privacy_service_pb2.Explanation]:
    """The decision in every catalogue language, in the catalogue's order (zh-CN first)."""
    return [explanation(catalogue, decision, language) for language in catalogue.languages]


def explain_decision_response(
    catalogue: Catalogue,
    decision: ExplainedDecision,
    metadata: common_pb2.DecisionMetadata,
) -> privacy_service_pb2.ExplainDecisionResponse:
    """ExplainDecision's reply for `decision`; `metadata` says where the call is recorded."""
    return privacy_service_pb2.ExplainDecisionResponse(
        metadata=metadata,
        decision_id=decision.decision_id,
        catalogue_version=catalogue.version,
        explanations=explanations(catalogue, decision),
    )
