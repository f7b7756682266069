"""Counterfactuals: the smallest change of one actionable feature that the served model says
would most improve a declined or reviewed applicant's outcome.

Computed with the served model, never from a fixed list: for each feature the catalogue marks
actionable (and the schema does not mark sensitive or excluded, whatever the catalogue says),
candidate rows differ from the applicant's in that feature alone, and all of them, with the
applicant's own row, are scored in ONE batched model call. Per feature the answer is:

1. the smallest change that reaches approval (score >= the policy's approve_min_score);
2. failing that, for a declined applicant, the smallest change that reaches review;
3. failing that, the change that raises the score most (ties: the smaller change);

and no answer when no candidate raises the score. Features are then ranked by the decision
they reach; among those reaching a better decision than the applicant's, the smallest change
first; among those that only raise the score, the largest gain first. The first few are
returned.

Candidates: a numeric feature moves only in the directions the catalogue gives texts for (a
customer may shorten a loan but is never told to borrow more, say), to values on a grid between
its current value and the schema's bound, whole numbers for an `integer` feature: every value
when the span is short, else a linear grid merged with a geometric one (fine steps near the
current value, where the smallest sufficient change usually is, and coarse ones far from it).
A categorical feature moves to each of the catalogue's `targets`.

Sizes are comparable across features: a numeric change is divided by the spread of the
development sample (first to last decile edge of the manifest's drift reference; the schema's
range, or one, when that spread is empty), so a few months of duration and a few hundred DM of
amount weigh alike; a change of category counts as one whole spread.

Pure and deterministic: the same row, model, policy and catalogue give the same answer.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from service.decisions.policy import ScorePolicy
from service.explain.catalogue import LOWER, SCORE_DECISIONS, Catalogue
from service.model.manifest import DriftReference, NumericBins
from service.model.schema import FeatureSpec, FeatureValue
from service.model.scorer import Row, Scorer

# P(bad) of each row, in order, from one model call: e.g.
# `lambda rows: runtime.model.probabilities(scorer.columns(rows))`.
Probabilities: TypeAlias = Callable[[Sequence[Row]], Awaitable[Iterable[float]]]

MAX_COUNTERFACTUALS: Final = 3
GRID_STEPS: Final = 32  # per direction, for each of the linear and the geometric grid
CATEGORY_CHANGE: Final = 1.0  # the size of a change of category, in spreads
_RANK: Final = {decision: rank for rank, decision in enumerate(SCORE_DECISIONS)}


@dataclass(frozen=True)
class Counterfactual:
    """One change of one feature, and what the served model says it would lead to."""

    feature: str
    current: FeatureValue
    value: FeatureValue
    score: int  # the score with this change alone
    decision: str  # APPROVE, REVIEW or DECLINE with this change alone
    change: float  # the change's size in spreads (module doc)


@dataclass(frozen=True)
class Candidate:
    """A value to try for one feature, with the size of the change."""

    feature: str
    value: FeatureValue
    change: float


def decision_of(score: int, policy: ScorePolicy) -> str:
    """The Score decision for a (rounded) score, as the Score servicer decides it."""
    if score >= policy.approve_min_score:
        return "APPROVE"
    if score >= policy.review_min_score:
        return "REVIEW"
    return "DECLINE"


def candidates(
    row: Row,
    features: Sequence[FeatureSpec],
    catalogue: Catalogue,
    drift: DriftReference | None = None,
) -> list[Candidate]:
    """Every value to try, feature by feature in `features` order: only features the
    catalogue marks actionable and the schema neither marks sensitive nor excludes."""
    found: list[Candidate] = []
    for spec in features:
        entry = catalogue.features.get(spec.name)
        if entry is None or not entry.actionable or spec.sensitive or spec.excluded:
            continue
        current = row[spec.name]
        if isinstance(current, str):
            found.extend(
                Candidate(spec.name, target, CATEGORY_CHANGE)
                for target in entry.targets
                if target != current
            )
            continue
        scale = _spread(spec, drift)
        for direction in entry.directions:
            for value in _grid(spec, float(current), direction, scale):
                found.append(Candidate(spec.name, value, abs(value - current) / scale))
    return found


async def counterfactuals(
    row: Row,
    scorer: Scorer,
    probabilities: Probabilities,
    policy: ScorePolicy,
    catalogue: Catalogue,
    *,
    limit: int = MAX_COUNTERFACTUALS,
) -> list[Counterfactual]:
    """Up to `limit` counterfactuals for the applicant's validated `row` (module doc), best
    first; none when the served model approves the row as it is. One call of `probabilities`
    scores the row and every candidate."""
    manifest = scorer.manifest
    tried = candidates(row, manifest.schema.model_features, catalogue, manifest.drift_reference)
    rows = [row, *({**row, c.feature: c.value} for c in tried)]
    scored = [float(p) for p in await probabilities(rows)]
    if len(scored) != len(rows):
        raise ValueError(f"the model returned {len(scored)} probabilities for {len(rows)} rows")
    score = scorer.score_of(scored[0])
    decision = decision_of(score, policy)
    if decision == SCORE_DECISIONS[0]:
        return []
    by_feature: dict[str, list[Counterfactual]] = {}
    for candidate, probability in zip(tried, scored[1:], strict=True):
        moved = scorer.score_of(probability)
        by_feature.setdefault(candidate.feature, []).append(
            Counterfactual(
                candidate.feature,
                row[candidate.feature],
                candidate.value,
                moved,
                decision_of(moved, policy),
                candidate.change,
            )
        )
    best = [
        found
        for options in by_feature.values()
        if (found := _best(options, score, decision)) is not None
    ]
    best.sort(key=lambda c: _order(c, decision))
    return best[:limit]


def _order(found: Counterfactual, decision: str) -> tuple[int, int, float, float, str]:
    """Better decisions first; among changes that reach a better decision the smallest
    first, among those that only raise the score the largest gain first."""
    rank = _RANK[found.decision]
    if rank < _RANK[decision]:
        return rank, 0, found.change, -found.score, found.feature
    return rank, 1, -found.score, found.change, found.feature


def _best(options: Sequence[Counterfactual], score: int, decision: str) -> Counterfactual | None:
    """One feature's answer (module doc); `options` in candidate order, which breaks ties."""
    improving = [o for o in options if o.score > score]
    if not improving:
        return None
    for target in SCORE_DECISIONS[: _RANK[decision]]:  # better decisions, best first
        reaching = [o for o in improving if _RANK[o.decision] <= _RANK[target]]
        if reaching:
            return min(reaching, key=lambda o: (o.change, -o.score))
    return min(improving, key=lambda o: (-o.score, o.change))


def _spread(spec: FeatureSpec, drift: DriftReference | None) -> float:
    """What one unit of change is for this feature (module doc): always positive."""
    bins = drift.features.get(spec.name) if drift is not None else None
    if isinstance(bins, NumericBins) and len(bins.edges) > 1:
        return bins.edges[-1] - bins.edges[0]
    if spec.min is not None and spec.max is not None and spec.max > spec.min:
        return spec.max - spec.min
    return 1.0


def _grid(spec: FeatureSpec, current: float, direction: str, scale: float) -> list[float]:
    """Values from `current` towards the schema's bound in `direction` (two spreads when the
    schema sets none), nearest first, excluding `current`."""
    sign = -1.0 if direction == LOWER else 1.0
    bound = spec.min if direction == LOWER else spec.max
    span = 2 * scale if bound is None else sign * (bound - current)
    if spec.integer:
        whole = math.floor(span)
        if whole <= 0:
            return []
        if whole <= 2 * GRID_STEPS:
            distances: Iterable[float] = range(1, whole + 1)
        else:
            distances = {round(d) for d in _distances(whole, 1.0)}
    else:
        if not span > 0:
            return []
        distances = set(_distances(span, span / GRID_STEPS**2))
    return [current + sign * d for d in sorted(distances) if d > 0]


def _distances(span: float, smallest: float) -> list[float]:
    """A linear grid of GRID_STEPS steps up to `span`, and a geometric one from `smallest`."""
    linear = [span * k / GRID_STEPS for k in range(1, GRID_STEPS + 1)]
    ratio = span / smallest
    geometric = [smallest * ratio ** (k / (GRID_STEPS - 1)) for k in range(GRID_STEPS)]
    return linear + geometric
