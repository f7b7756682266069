"""The search for a less discriminatory alternative (LDA), run by `privscore-model train`.

Why: excluding a sensitive attribute from the inputs does not stop a model from treating its
groups differently, because other features carry it (proxies). Lenders are expected to look
for an alternative model that treats groups more evenly at similar accuracy, and to be able to
show the search. This module makes that search a fixed, documented, seeded part of training.

What is measured, per candidate, on the development rows only (the holdout stays untouched):
- CV AUC: the mean of the fold AUCs of one stratified k-fold pass (the first repetition of the
  family comparison's splitter, so the same seed gives the same folds). One pass rather than
  several because each fold fits the calibrated pipeline as it ships (CALIBRATION_FOLDS fits
  for the out-of-fold calibration and a final one): calibrated probabilities are what make the
  approval rule below meaningful, and their cost is what bounds the runtime.
- Approval-rate ratio, per sensitive attribute: each development row gets its out-of-fold
  calibrated P(bad); it is approved under the model card's rule (P(bad) below the cut-off, by
  default the development bad rate); the ratio is the lowest group approval rate over the
  highest. Groups are the attribute's categories, or `<t` / `>=t` for a numeric attribute split
  at its schema threshold (else the development median), exactly as the card's fairness report
  groups them. A group with fewer than MIN_GROUP_SIZE development rows is listed but not used
  in the ratio: with 30 rows an approval rate near one half has a 95% interval of about +-0.18,
  so a ratio built on a smaller group says more about sampling than about the model. An
  attribute with fewer than two usable groups is not measured. A candidate's ratio (the one
  the rule reads) is its lowest ratio over the measured attributes: improving one attribute
  by harming another is no LDA.
- Confidence intervals: a percentile bootstrap over the development rows, resampled within each
  fold and label (so every fold keeps both classes), BOOTSTRAP_SAMPLES times with the training
  seed. The same resamples serve every candidate, so the AUC gap to the best candidate gets a
  paired interval too. They describe the sampling noise of the evaluation rows, not refits.

The space (every axis applied to every family the run compares, duplicates removed):
- The family as the comparison trains it: the reference points, the champion among them.
- Regularised (REGULARISED): a simpler model has less room to reassemble a group from several
  weak proxies. Logistic regression shrinks harder; the forest needs larger leaves; boosting
  uses stumps, which makes it additive (no interactions through which proxies combine).
- Monotone (random forest only, `monotonic_cst`): each numeric feature may move P(bad) in one
  direction only, the sign of its association with the label on the rows the fold trains on,
  so the model cannot single out a band of values (an age range, the amounts one group
  typically borrows) for a group. Logistic regression is monotone in each numeric feature by
  construction; GradientBoostingClassifier has no such option, and HistGradientBoosting would
  be a new family to export and verify for an axis the forest already covers.
- Without sensitive model inputs: a sensitive attribute the schema keeps as an input (age)
  separates its groups directly; this drops it.
- Reweighing (Kamiran & Calders 2012) by a measured attribute's group x label: each training
  row weighs P(group) P(label) / P(group, label), so in the weighted data the label is
  independent of the group while every group keeps its size. The attribute is used to weight
  training rows only; it is never a model input. Some jurisdictions treat any use of a
  protected attribute in training as disparate treatment: the card says so when this ships.
- Without the strongest proxies of a measured attribute (and without sensitive inputs): the
  one, then the two (PROXY_STEPS) model features most associated with its groups, by
  bias-corrected Cramer's V (Bergsma 2013; numeric features binned at their development
  deciles). A ladder rather than one cut: a feature can rank second by chance and still be the
  main risk driver, and the CV shows what each step costs. Association, not the model's use,
  decides, so the choice needs no model and is the same for every family. A dropped feature
  leaves the schema (callers must stop sending it; the schema version changes).
- Without the most proxies and reweighed: the two levers at their strongest together.

Cost: every candidate is `folds` calibrated fits (CALIBRATION_FOLDS + 1 fits each), and the
space holds at most families x (4 + 4 x measured attributes) candidates (`space_bound`); the
fits run on `--jobs` workers. The folds are not repeated and the axes are not crossed further
for that reason.

The rule (`select`): among the candidates whose CV AUC is within AUC_TOLERANCE of the best
candidate's, pick the highest approval-rate ratio (ties: the higher CV AUC, then the earlier
candidate). It meets the rule if that ratio's point estimate is at least the four-fifths
threshold; if none does, the search says so, and train ships the champion unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from joblib import Parallel, delayed
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import RepeatedStratifiedKFold

from model_export.dataset import Table
from model_export.evaluation import DIGITS, FOUR_FIFTHS, group_labels, numeric_split, rounded
from model_export.families import (
    GRADIENT_BOOSTING,
    LOGISTIC_REGRESSION,
    RANDOM_FOREST,
    build,
    build_calibrated,
    monotone_constraints,
)
from model_export.progress import Progress
from model_export.verify import sklearn_bad_probability
from service.model.schema import FeatureSchema

AUC_TOLERANCE = 0.01
MIN_GROUP_SIZE = 30
BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95
PROXY_STEPS = (1, 2)  # how many of an attribute's strongest proxies a candidate drops
DECILES = 10
# Stronger settings than families.HYPERPARAMETERS, one step each: see the module docstring.
REGULARISED: dict[str, dict[str, Any]] = {
    LOGISTIC_REGRESSION: {"C": 0.01},
    RANDOM_FOREST: {"min_samples_leaf": 16},
    GRADIENT_BOOSTING: {"max_depth": 1},
}
MONOTONE_FAMILIES = (RANDOM_FOREST,)
RULE = (
    f"among the candidates whose CV AUC is within {AUC_TOLERANCE:g} of the best candidate's, "
    "the one with the highest approval-rate ratio (its lowest over the measured sensitive "
    "attributes; ties: higher CV AUC, then the earlier candidate); it meets the rule if that "
    f"ratio is at least {FOUR_FIFTHS:g} (four-fifths)"
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
ObjectArray = npt.NDArray[np.object_]


@dataclass(frozen=True)
class Candidate:
    """One point of the space: a family, its setting, its features and its training weights."""

    name: str
    family: str
    description: str
    params: Mapping[str, Any] = field(default_factory=dict)
    drop: tuple[str, ...] = ()
    reweigh: str | None = None
    monotone: bool = False

    @property
    def is_plain(self) -> bool:
        """The family exactly as the comparison trains it."""
        return not (self.params or self.drop or self.reweigh or self.monotone)

    def schema(self, base: FeatureSchema) -> FeatureSchema:
        return base.with_exclusions(self.drop) if self.drop else base

    def columns(self, base: FeatureSchema) -> list[int]:
        """The base feature matrix's columns this candidate keeps (schema order)."""
        return [j for j, spec in enumerate(base.model_features) if spec.name not in self.drop]

    def key(self) -> tuple[Any, ...]:
        params = tuple(sorted(self.params.items()))
        return (self.family, params, tuple(sorted(self.drop)), self.reweigh, self.monotone)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "params": dict(self.params),
            "dropped_features": list(self.drop),
            "reweighed_by": self.reweigh,
            "monotone": self.monotone,
        }


@dataclass(frozen=True)
class Attribute:
    """A sensitive attribute's group per development row, and which groups are big enough."""

    name: str
    groups: ObjectArray
    names: tuple[str, ...]
    sizes: Mapping[str, int]
    split: float | None
    min_group_size: int = MIN_GROUP_SIZE

    @property
    def used(self) -> tuple[str, ...]:
        return tuple(name for name in self.names if self.sizes[name] >= self.min_group_size)

    @property
    def measured(self) -> bool:
        return len(self.used) >= 2


@dataclass(frozen=True)
class Scored:
    """What the rule reads of a candidate."""

    name: str
    cv_auc: float
    ratio: float | None


@dataclass(frozen=True)
class Selection:
    best: str
    best_cv_auc: float
    auc_floor: float
    eligible: tuple[str, ...]
    chosen: str | None
    chosen_ratio: float | None
    meets_rule: bool
    statement: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": RULE,
            "best": self.best,
            "best_cv_auc": self.best_cv_auc,
            "auc_floor": self.auc_floor,
            "eligible": list(self.eligible),
            "chosen": self.chosen,
            "chosen_ratio": self.chosen_ratio,
            "meets_rule": self.meets_rule,
            "statement": self.statement,
        }


@dataclass(frozen=True)
class SearchInputs:
    """The training run's data and settings, as the search needs them."""

    schema: FeatureSchema
    table: Table
    x: ObjectArray  # every row, the schema's model features
    y: IntArray
    dev: npt.NDArray[np.intp]
    cutoff: float
    cutoff_rule: str
    families: tuple[str, ...]
    seed: int
    folds: int
    jobs: int = 1
    bootstrap: int = BOOTSTRAP_SAMPLES
    min_group_size: int = MIN_GROUP_SIZE


@dataclass(frozen=True)
class SearchResult:
    candidates: tuple[Candidate, ...]
    attributes: Mapping[str, Attribute]
    selection: Selection
    document: dict[str, Any]  # lda.json

    def candidate(self, name: str) -> Candidate:
        for candidate in self.candidates:
            if candidate.name == name:
                return candidate
        raise KeyError(name)


def select(
    scored: Sequence[Scored],
    *,
    tolerance: float = AUC_TOLERANCE,
    threshold: float = FOUR_FIFTHS,
) -> Selection:
    """The stated rule (module docstring) over a table of candidates, in the space's order.

    "Within the tolerance" is judged on the difference rounded to the metrics' 6 decimals, so
    a gap of exactly 0.01 counts as within, whatever the binary floating point says.
    """
    if not scored:
        raise ValueError("no candidates to select from")
    best = max(enumerate(scored), key=lambda item: (item[1].cv_auc, -item[0]))[1]
    eligible = [s for s in scored if round(best.cv_auc - s.cv_auc, DIGITS) <= tolerance]
    measured = [(index, s) for index, s in enumerate(eligible) if s.ratio is not None]
    floor = rounded(best.cv_auc - tolerance)
    names = tuple(s.name for s in eligible)
    if not measured:
        return Selection(
            best.name, best.cv_auc, floor, names, None, None, False,
            "No candidate meets the rule: no sensitive attribute has two groups large enough "
            "to measure an approval-rate ratio, so no less discriminatory alternative can be "
            "told apart.",
        )  # fmt: skip
    _, chosen = max(measured, key=lambda item: (item[1].ratio, item[1].cv_auc, -item[0]))
    ratio = float(chosen.ratio) if chosen.ratio is not None else 0.0
    meets = ratio >= threshold
    if meets:
        statement = (
            f"{chosen.name} meets the rule: approval-rate ratio {ratio:.3f} >= {threshold:g} "
            f"at CV AUC {chosen.cv_auc:.4f}, within {tolerance:g} of the best candidate "
            f"({best.name}, {best.cv_auc:.4f})."
        )
    else:
        statement = (
            f"No candidate meets the rule: the least discriminatory candidate within "
            f"{tolerance:g} of the best CV AUC ({best.name}, {best.cv_auc:.4f}) is "
            f"{chosen.name}, with an approval-rate ratio of {ratio:.3f}, under the "
            f"four-fifths threshold of {threshold:g}."
        )
    return Selection(best.name, best.cv_auc, floor, names, chosen.name, ratio, meets, statement)


def reweighing_weights(groups: ObjectArray, y: IntArray) -> FloatArray:
    """Kamiran & Calders: weight P(group) P(label) / P(group, label) per row.

    The weights sum to the number of rows, keep every group's total weight equal to its row
    count, and give every group the overall label rate in the weighted data.
    """
    weights = np.empty(len(y), dtype=np.float64)
    for group in np.unique(groups):
        in_group = groups == group
        for label in (0, 1):
            cell = in_group & (y == label)
            if cell.any():
                weights[cell] = in_group.mean() * (y == label).mean() / cell.mean()
    return weights


def proxy_strength(values: npt.NDArray[Any], numeric: bool, groups: ObjectArray) -> float:
    """Bias-corrected Cramer's V (Bergsma 2013) between a feature and a group label.

    0 means no association, 1 that the feature determines the group. Numeric values are binned
    at their deciles first. The correction keeps features with many categories from looking
    like proxies through small-sample noise alone.
    """
    if numeric:
        numbers = np.asarray(values, dtype=np.float64)
        edges = np.unique(np.quantile(numbers, np.arange(1, DECILES) / DECILES))
        codes = np.searchsorted(edges, numbers, side="right")
    else:
        _, codes = np.unique(np.asarray(values, dtype=str), return_inverse=True)
    _, group_codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    table = np.zeros((int(codes.max()) + 1, int(group_codes.max()) + 1))
    np.add.at(table, (codes, group_codes), 1.0)
    table = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]
    rows, columns = table.shape
    n = float(table.sum())
    if rows < 2 or columns < 2 or n < 2:
        return 0.0
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / n
    phi2 = float(((table - expected) ** 2 / expected).sum()) / n
    phi2 = max(0.0, phi2 - (rows - 1) * (columns - 1) / (n - 1))
    rows_c = rows - (rows - 1) ** 2 / (n - 1)
    columns_c = columns - (columns - 1) ** 2 / (n - 1)
    scale = min(rows_c - 1, columns_c - 1)
    return float(np.sqrt(phi2 / scale)) if scale > 0 else 0.0


def rank_proxies(
    schema: FeatureSchema, x: ObjectArray, attribute: Attribute
) -> list[tuple[str, float]]:
    """Non-sensitive model features by proxy strength for `attribute`, strongest first.

    Only rows in the attribute's usable groups count (the groups the ratio compares); ties keep
    the schema's order.
    """
    rows = np.isin(attribute.groups, list(attribute.used))
    ranked = []
    for j, spec in enumerate(schema.model_features):
        if spec.sensitive:
            continue
        strength = proxy_strength(x[rows, j], spec.is_numeric, attribute.groups[rows])
        ranked.append((spec.name, rounded(strength)))
    return sorted(ranked, key=lambda item: -item[1])


def attributes_for(
    schema: FeatureSchema,
    table: Table,
    rows: npt.NDArray[np.intp],
    min_group_size: int = MIN_GROUP_SIZE,
) -> dict[str, Attribute]:
    """Every sensitive attribute's groups over `rows` (the development sample)."""
    attributes = {}
    for spec in schema.sensitive_features:
        column = table.column(spec.name)
        split = numeric_split(spec, column, rows)
        groups, names = group_labels(spec, [column[i] for i in rows], numeric_split=split)
        sizes = {name: int((groups == name).sum()) for name in names}
        attributes[spec.name] = Attribute(
            spec.name, groups, tuple(names), sizes, split, min_group_size
        )
    return attributes


def candidate_space(
    schema: FeatureSchema,
    families: Sequence[str],
    proxies: Mapping[str, Sequence[tuple[str, float]]],
) -> list[Candidate]:
    """The documented space, in a fixed order; `proxies` names the measured attributes."""
    sensitive_inputs = tuple(spec.name for spec in schema.model_features if spec.sensitive)
    numeric_inputs = [spec for spec in schema.model_features if spec.is_numeric]
    candidates: list[Candidate] = []
    for family in families:
        candidates.append(Candidate(family, family, "as the family comparison trains it"))
        settings = ", ".join(f"{key}={value}" for key, value in REGULARISED[family].items())
        candidates.append(
            Candidate(
                f"{family}/regularised", family, f"stronger regularisation ({settings})",
                params=REGULARISED[family],
            )
        )  # fmt: skip
        if family in MONOTONE_FAMILIES and numeric_inputs:
            candidates.append(
                Candidate(
                    f"{family}/monotone", family,
                    "monotone in every numeric feature, in the direction of its association "
                    "with the label on the training rows",
                    monotone=True,
                )
            )  # fmt: skip
        if sensitive_inputs:
            candidates.append(
                Candidate(
                    f"{family}/no-sensitive-inputs", family,
                    f"without the sensitive inputs {', '.join(sensitive_inputs)}",
                    drop=sensitive_inputs,
                )
            )  # fmt: skip
        for attribute, ranked in proxies.items():
            candidates.append(
                Candidate(
                    f"{family}/reweigh:{attribute}", family,
                    f"reweighed by {attribute} group x label (Kamiran & Calders)",
                    reweigh=attribute,
                )
            )  # fmt: skip
            for count in PROXY_STEPS:
                drop = sensitive_inputs + tuple(name for name, _ in ranked[:count])
                strongest = "proxy" if count == 1 else f"{count} proxies"
                candidates.append(
                    Candidate(
                        f"{family}/no-proxies-{count}:{attribute}", family,
                        f"without {', '.join(drop)} (sensitive inputs and the strongest "
                        f"{strongest} of {attribute})",
                        drop=drop,
                    )
                )  # fmt: skip
            count = PROXY_STEPS[-1]
            drop = sensitive_inputs + tuple(name for name, _ in ranked[:count])
            candidates.append(
                Candidate(
                    f"{family}/no-proxies-{count}+reweigh:{attribute}", family,
                    f"without {', '.join(drop)}, reweighed by {attribute} group x label",
                    drop=drop, reweigh=attribute,
                )
            )  # fmt: skip
    unique: dict[tuple[Any, ...], Candidate] = {}
    model_features = {spec.name for spec in schema.model_features}
    for candidate in candidates:
        if set(candidate.drop) >= model_features:
            continue  # nothing left to train on
        unique.setdefault(candidate.key(), candidate)
    return list(unique.values())


def space_bound(families: int, measured_attributes: int) -> int:
    """The most candidates `candidate_space` can return (the runtime's bound, with folds)."""
    return families * (4 + (2 + len(PROXY_STEPS)) * measured_attributes)


def fit_candidate(
    candidate: Candidate,
    schema: FeatureSchema,
    x: ObjectArray,
    y: IntArray,
    groups: Mapping[str, ObjectArray],
    seed: int,
    *,
    calibrated: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Fit `candidate` on rows `x` (its own columns) and return it with what the fit resolved.

    Monotone directions and reweighing weights come from these rows alone, so inside the CV a
    test fold never shapes its own model. The record (directions, weight per group x label)
    is what the manifest keeps to describe a shipped candidate.
    """
    own = candidate.schema(schema)
    params = dict(candidate.params)
    record: dict[str, Any] = {}
    if candidate.monotone:
        directions = monotone_directions(own, x, y)
        params["monotonic_cst"] = monotone_constraints(own, directions)
        record["monotone_directions"] = directions
    builder = build_calibrated if calibrated else build
    pipeline = builder(candidate.family, own, seed, params)
    fit_params: dict[str, Any] = {}
    if candidate.reweigh is not None:
        weights = reweighing_weights(groups[candidate.reweigh], y)
        fit_params["model__sample_weight"] = weights
        record["weights"] = _weight_table(groups[candidate.reweigh], y, weights)
    return pipeline.fit(x, y, **fit_params), record


def monotone_directions(schema: FeatureSchema, x: ObjectArray, y: IntArray) -> dict[str, int]:
    """+1 / -1 per numeric model feature: the sign of its univariate AUC for bad minus 0.5
    (a feature with no association at all stays unconstrained)."""
    directions = {}
    for j, spec in enumerate(schema.model_features):
        if spec.is_numeric:
            gap = float(roc_auc_score(y, np.asarray(x[:, j], dtype=np.float64))) - 0.5
            directions[spec.name] = int(np.sign(round(gap, DIGITS)))
    return directions


def run_search(inputs: SearchInputs, progress: Progress | None = None) -> SearchResult:
    progress = progress or Progress(enabled=False)
    schema, dev = inputs.schema, inputs.dev
    x, y = inputs.x[dev], inputs.y[dev]
    attributes = attributes_for(schema, inputs.table, dev, inputs.min_group_size)
    measured = {name: a for name, a in attributes.items() if a.measured}
    proxies = {name: rank_proxies(schema, x, a) for name, a in measured.items()}
    candidates = candidate_space(schema, inputs.families, proxies)
    splitter = RepeatedStratifiedKFold(n_splits=inputs.folds, n_repeats=1, random_state=inputs.seed)
    folds = list(splitter.split(x, y))
    progress.log(
        f"LDA search: {len(candidates)} candidates x {len(folds)} folds on {len(y)} "
        f"development rows; measured: {', '.join(measured) or 'none'}"
    )
    groups = {name: a.groups for name, a in attributes.items()}
    tasks = [
        delayed(_oof_fold)(candidate, schema, x, y, groups, inputs.seed, train_rows, test_rows)
        for candidate in candidates
        for train_rows, test_rows in folds
    ]
    p_bad = np.zeros((len(candidates), len(y)))
    # Results come back in task order whatever the worker count: metrics do not depend on it.
    results = Parallel(n_jobs=inputs.jobs, return_as="generator")(tasks)
    for index, (test_rows, probabilities) in enumerate(results):
        p_bad[index // len(folds), test_rows] = probabilities
        progress.tick("lda search", index + 1, len(tasks))

    fold_of = np.empty(len(y), dtype=np.int64)
    for number, (_, test_rows) in enumerate(folds):
        fold_of[test_rows] = number
    counts = _bootstrap_counts(fold_of * 2 + y, inputs.bootstrap, inputs.seed)
    evaluations = [
        _evaluate(p_bad[i], y, fold_of, counts, measured, inputs.cutoff)
        for i in range(len(candidates))
    ]
    scored = [
        Scored(c.name, e.cv_auc, e.ratio) for c, e in zip(candidates, evaluations, strict=True)
    ]
    selection = select(scored)
    best = evaluations[[c.name for c in candidates].index(selection.best)]
    rows = []
    for candidate, evaluation in zip(candidates, evaluations, strict=True):
        row = candidate.to_dict() | evaluation.to_dict(best)
        row["eligible"] = candidate.name in selection.eligible
        rows.append(row)
    document = {
        "method": {
            "sample": "development",
            "rows": len(y),
            "folds": inputs.folds,
            "seed": inputs.seed,
            "approval_cutoff": rounded(inputs.cutoff),
            "cutoff_rule": inputs.cutoff_rule,
            "min_group_size": inputs.min_group_size,
            "bootstrap_samples": inputs.bootstrap,
            "confidence": CONFIDENCE,
            "auc_tolerance": AUC_TOLERANCE,
            "four_fifths": FOUR_FIFTHS,
            "proxy_steps": list(PROXY_STEPS),
            "regularised": REGULARISED,
        },
        "attributes": {
            name: {
                "split": attribute.split,
                "measured": attribute.measured,
                "groups": [
                    {"group": group, "n": attribute.sizes[group], "used": group in attribute.used}
                    for group in attribute.names
                ],
                "proxies": [
                    {"feature": feature, "cramers_v": strength}
                    for feature, strength in proxies.get(name, [])
                ],
            }
            for name, attribute in attributes.items()
        },
        "candidates": rows,
        "selection": selection.to_dict(),
    }
    progress.log(f"LDA search: {selection.statement}")
    return SearchResult(tuple(candidates), attributes, selection, document)


def _oof_fold(
    candidate: Candidate,
    schema: FeatureSchema,
    x: ObjectArray,
    y: IntArray,
    groups: Mapping[str, ObjectArray],
    seed: int,
    train_rows: npt.NDArray[np.intp],
    test_rows: npt.NDArray[np.intp],
) -> tuple[npt.NDArray[np.intp], FloatArray]:
    columns = candidate.columns(schema)
    own = x[:, columns]
    fold_groups = {name: values[train_rows] for name, values in groups.items()}
    model, _ = fit_candidate(candidate, schema, own[train_rows], y[train_rows], fold_groups, seed)
    return test_rows, sklearn_bad_probability(model, own[test_rows])


@dataclass(frozen=True)
class _Evaluation:
    cv_auc: float
    fold_aucs: tuple[float, ...]
    auc_samples: FloatArray
    approval_rate: float
    ratio: float | None
    ratio_attribute: str | None
    ratio_samples: FloatArray | None
    attributes: Mapping[str, dict[str, Any]]

    def to_dict(self, best: _Evaluation) -> dict[str, Any]:
        gap = best.auc_samples - self.auc_samples
        return {
            "cv_auc_mean": self.cv_auc,
            "cv_auc_ci": _interval(self.auc_samples),
            "cv_auc_folds": list(self.fold_aucs),
            "auc_gap_to_best": rounded(best.cv_auc - self.cv_auc),
            "auc_gap_ci": _interval(gap),
            "approval_rate": self.approval_rate,
            "ratio": self.ratio,
            "ratio_ci": None if self.ratio_samples is None else _interval(self.ratio_samples),
            "ratio_attribute": self.ratio_attribute,
            "attributes": dict(self.attributes),
        }


def _evaluate(
    p_bad: FloatArray,
    y: IntArray,
    fold_of: IntArray,
    counts: npt.NDArray[np.int32],
    measured: Mapping[str, Attribute],
    cutoff: float,
) -> _Evaluation:
    folds = range(int(fold_of.max()) + 1)
    fold_aucs = tuple(
        rounded(float(roc_auc_score(y[fold_of == f], p_bad[fold_of == f]))) for f in folds
    )
    in_fold = [fold_of == f for f in folds]
    auc_samples = np.mean(
        [_weighted_auc(p_bad[rows], y[rows], counts[:, rows]) for rows in in_fold], axis=0
    )
    approved = (p_bad < cutoff).astype(np.float64)
    reports: dict[str, dict[str, Any]] = {}
    samples: dict[str, FloatArray] = {}
    for name, attribute in measured.items():
        members = np.stack([attribute.groups == g for g in attribute.names], axis=1).astype(float)
        rates = members.T @ approved / members.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):  # an emptied group: NaN
            sampled = (counts @ (members * approved[:, None])) / (counts @ members)
        used = [attribute.names.index(g) for g in attribute.used]
        samples[name] = _ratio_rows(sampled[:, used])
        low, high = used[int(np.argmin(rates[used]))], used[int(np.argmax(rates[used]))]
        reports[name] = {
            "ratio": rounded(_ratio(rates[used])),
            "ratio_ci": _interval(samples[name]),
            "lowest_group": attribute.names[low],
            "highest_group": attribute.names[high],
            "groups": [
                {
                    "group": group,
                    "n": attribute.sizes[group],
                    "used": group in attribute.used,
                    "approval_rate": rounded(float(rates[k])),
                    "approval_rate_ci": _interval(sampled[:, k]),
                }
                for k, group in enumerate(attribute.names)
            ],
        }
    # The rule reads the lowest ratio over the measured attributes (first one on a tie).
    worst = min(reports, key=lambda name: reports[name]["ratio"], default=None)
    return _Evaluation(
        cv_auc=rounded(float(np.mean(fold_aucs))),
        fold_aucs=fold_aucs,
        auc_samples=auc_samples,
        approval_rate=rounded(float(approved.mean())),
        ratio=None if worst is None else reports[worst]["ratio"],
        ratio_attribute=worst,
        ratio_samples=np.min(list(samples.values()), axis=0) if samples else None,
        attributes=reports,
    )


def _ratio(rates: FloatArray) -> float:
    highest = float(np.max(rates))
    return float(np.min(rates)) / highest if highest > 0 else 1.0


def _ratio_rows(rates: FloatArray) -> FloatArray:
    """`_ratio` per resample; NaN where a resample left a group empty (`_interval` skips it)."""
    highest = rates.max(axis=1)
    safe = np.where(highest > 0, highest, 1.0)
    ratios: FloatArray = np.where(highest > 0, rates.min(axis=1) / safe, 1.0)
    ratios[np.isnan(highest)] = np.nan
    return ratios


def _weighted_auc(p_bad: FloatArray, y: IntArray, counts: npt.NDArray[np.int32]) -> FloatArray:
    """The AUC of one fold under each bootstrap resample (row multiplicities in `counts`)."""
    bad, good = p_bad[y == 1], p_bad[y == 0]
    wins = (bad[:, None] > good[None, :]) + 0.5 * (bad[:, None] == good[None, :])
    bad_counts = counts[:, y == 1].astype(np.float64)
    good_counts = counts[:, y == 0].astype(np.float64)
    pairs = bad_counts.sum(axis=1) * good_counts.sum(axis=1)
    aucs: FloatArray = ((bad_counts @ wins) * good_counts).sum(axis=1) / pairs
    return aucs


def _bootstrap_counts(strata: IntArray, samples: int, seed: int) -> npt.NDArray[np.int32]:
    """Row multiplicities (samples x rows) of a bootstrap resampling within each stratum."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((samples, len(strata)), dtype=np.int32)
    sample_index = np.arange(samples)[:, None]
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        picks = members[rng.integers(0, len(members), size=(samples, len(members)))]
        np.add.at(counts, (np.broadcast_to(sample_index, picks.shape), picks), 1)
    return counts


def _interval(samples: FloatArray) -> list[float]:
    tail = (1.0 - CONFIDENCE) / 2.0 * 100.0
    finite = samples[np.isfinite(samples)]
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return [rounded(float(low)), rounded(float(high))]


def _weight_table(groups: ObjectArray, y: IntArray, weights: FloatArray) -> list[dict[str, Any]]:
    table = []
    for group in sorted({str(g) for g in groups}):
        for label in (0, 1):
            cell = (groups == group) & (y == label)
            if cell.any():
                table.append(
                    {
                        "group": group,
                        "bad": bool(label),
                        "rows": int(cell.sum()),
                        "weight": rounded(float(weights[cell][0])),
                    }
                )
    return table
