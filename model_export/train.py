"""`privscore-model train`: data -> schema -> CV per family -> calibrated champion -> artifact.

Method, in order (all randomness from one seed, so the same data and seed give the same
metrics):
1. Stratified split: a development sample and a holdout (default 25%) touched only at the end.
2. Repeated stratified k-fold CV AUC on the development sample for each family, uncalibrated;
   the champion is the highest mean (ties: the earlier family in FAMILIES).
3. Each family is refit on the whole development sample with sigmoid calibration and scored once
   on the holdout (AUC, KS, Brier, calibration deciles). The champion's calibrated fit is the
   shipped model, so its holdout metrics describe exactly what the service runs.
4. The search for a less discriminatory alternative (`model_export.lda`, on by default; off
   with --no-lda-search): a documented space of candidates on the development rows, picked by
   the stated rule. Its choice ships instead of the champion only if it meets the rule; it is
   then cross-validated and scored on the holdout exactly as the families were.
5. Fairness at an approval cut-off, reference values, ONNX export, a parity check on every row,
   then the drift reference (the development rows' distribution, `model_export.drift_reference`),
   manifest, model card and plots. The artifact is left unsigned: `privscore-model sign`.

The search is on by default because the question it answers (is there a model as accurate that
treats groups more evenly?) belongs to every model a lender ships, and a default that skips it
would let an artifact leave without the answer; the switch exists for quick iterations and for
tests about other things. A run records in `training.lda_search` whether it searched.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import numpy.typing as npt
from joblib import Parallel, delayed
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import RepeatedStratifiedKFold

from model_export.card import CARD_FILE, LDA_FILE, LDA_KEY, render_card
from model_export.dataset import Table, feature_matrix, labels, onnx_feeds, read_csv
from model_export.drift_reference import compute_drift_reference, development_split
from model_export.evaluation import (
    calibration_table,
    fairness_report,
    holdout_metrics,
    numeric_split,
    rounded,
)
from model_export.export import ONNX_ML_OPSET, ONNX_OPSET, ExportedModel, export_onnx
from model_export.families import (
    CALIBRATION_FOLDS,
    FAMILIES,
    HYPERPARAMETERS,
    build_calibrated,
)
from model_export.lda import (
    Candidate,
    SearchInputs,
    SearchResult,
    attributes_for,
    fit_candidate,
    run_search,
)
from model_export.plots import (
    CALIBRATION_FILE,
    FRONTIER_FILE,
    ROC_FILE,
    calibration_plot,
    frontier_plot,
    roc_plot,
)
from model_export.progress import Progress
from model_export.reference import METHOD as REFERENCE_METHOD
from model_export.reference import reference_values
from model_export.schema_infer import apply_flags, infer_schema, schema_name_for
from model_export.verify import (
    PARITY_TOLERANCE,
    PIPELINE_KEY,
    onnx_bad_probability,
    sklearn_bad_probability,
)
from service.model.manifest import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    DatasetInfo,
    Manifest,
    OnnxModelInfo,
    ScorecardScaling,
    file_sha256,
)
from service.model.schema import FeatureSchema, SchemaError

ONNX_FILE = "model.onnx"
PIPELINE_FILE = "pipeline.joblib"


class TrainingError(RuntimeError):
    """Training finished but the result must not be shipped (e.g. ONNX parity failed)."""


@dataclass(frozen=True)
class TrainOptions:
    data: Path
    label: str
    bad_value: str
    out: Path
    exclude: tuple[str, ...] = ()
    sensitive: tuple[str, ...] = ()
    schema_path: Path | None = None
    seed: int = 42
    folds: int = 5
    repeats: int = 3
    holdout: float = 0.25
    families: tuple[str, ...] = FAMILIES
    approval_cutoff: float | None = None
    jobs: int = 1
    citation: str = ""
    lda_search: bool = True
    scaling: ScorecardScaling = field(default_factory=ScorecardScaling)


def resolve_schema(options: TrainOptions, table: Table) -> FeatureSchema:
    """The schema file when given (checked against --label/--bad), else one inferred from data."""
    if options.schema_path is None:
        schema = infer_schema(
            table,
            label=options.label,
            bad_value=options.bad_value,
            name=schema_name_for(options.data),
        )
    else:
        schema = FeatureSchema.load(options.schema_path)
        if (schema.label, schema.bad_value) != (options.label, options.bad_value):
            raise SchemaError(
                f"--label/--bad ({options.label!r}, {options.bad_value!r}) disagree with the "
                f"schema file ({schema.label!r}, {schema.bad_value!r})"
            )
    return apply_flags(schema, exclude=options.exclude, sensitive=options.sensitive)


def train(options: TrainOptions, progress: Progress | None = None) -> Manifest:
    progress = progress or Progress(enabled=False)
    unknown = sorted(set(options.families) - set(FAMILIES))
    if unknown or not options.families:
        raise ValueError(f"unknown model families {unknown}; choose from {', '.join(FAMILIES)}")
    table = read_csv(options.data)
    schema = resolve_schema(options, table)
    x = feature_matrix(schema, table)
    y = labels(schema, table)
    excluded = ", ".join(spec.name for spec in schema.excluded_features) or "none"
    progress.log(
        f"{table.file_name}: {len(y)} rows, bad rate {y.mean():.3f}, "
        f"{len(schema.model_features)} model features; excluded: {excluded}"
    )

    dev, hold = development_split(y, options.holdout, options.seed)
    cv_scores = {
        family: _cross_validate(_plain(family), schema, x[dev], y[dev], {}, options, progress)
        for family in options.families
    }
    champion = max(options.families, key=lambda family: float(np.mean(cv_scores[family])))

    fitted: dict[str, Any] = {}
    holdout_p: dict[str, npt.NDArray[np.float64]] = {}
    family_metrics: dict[str, dict[str, float]] = {}
    for family in options.families:
        progress.log(f"fitting calibrated {family} on {len(dev)} development rows")
        fitted[family] = build_calibrated(family, schema, options.seed).fit(x[dev], y[dev])
        holdout_p[family] = sklearn_bad_probability(fitted[family], x[hold])
        family_metrics[family] = {
            "cv_auc_mean": rounded(float(np.mean(cv_scores[family]))),
            "cv_auc_std": rounded(float(np.std(cv_scores[family]))),
            **holdout_metrics(y[hold], holdout_p[family]),
        }
        progress.log(f"{family}: {json.dumps(family_metrics[family])}")
    progress.log(f"champion: {champion} (highest mean CV AUC)")
    cutoff, cutoff_rule = _approval_cutoff(options, y[dev])

    search: SearchResult | None = None
    selection = "highest cv_auc_mean"
    shipped_candidate: dict[str, Any] | None = None
    if options.lda_search:
        search = run_search(
            SearchInputs(
                schema=schema,
                table=table,
                x=x,
                y=y,
                dev=dev,
                cutoff=cutoff,
                cutoff_rule=cutoff_rule,
                families=options.families,
                seed=options.seed,
                folds=options.folds,
                jobs=options.jobs,
            ),
            progress,
        )
        chosen = search.selection.chosen
        if search.selection.meets_rule and chosen is not None:
            candidate = search.candidate(chosen)
            selection = f"LDA search: {search.selection.statement}"
            if candidate.is_plain:
                champion = candidate.family  # a family as the comparison trained it
            else:
                champion = candidate.name
                x = x[:, candidate.columns(schema)]
                schema = candidate.schema(schema)
                shipped = _fit_candidate_as_shipped(
                    candidate, schema, table, x, y, dev, hold, options, progress
                )
                fitted[champion], holdout_p[champion] = shipped.model, shipped.holdout_p
                family_metrics[champion] = shipped.metrics
                shipped_candidate = shipped.record
            progress.log(f"shipping the LDA search's choice: {champion}")
        else:
            progress.log(f"the champion ships: {search.selection.statement}")
    model = fitted[champion]

    fairness = _fairness(schema, table, y, dev, hold, holdout_p[champion], cutoff, cutoff_rule)
    calibration = {family: calibration_table(y[hold], p) for family, p in holdout_p.items()}
    metrics: dict[str, Any] = {
        "champion": champion,
        "selection": selection,
        "families": family_metrics,
        "calibration": calibration[champion],
        "fairness": fairness,
    }
    if search is not None:
        metrics["lda"] = _lda_summary(search, champion)

    progress.log("computing reference values for reason codes")
    references = reference_values(model, schema, x[dev])
    references = {name: _clip(schema, name, value) for name, value in references.items()}

    progress.log(f"exporting ONNX (target opset {ONNX_OPSET}, ai.onnx.ml {ONNX_ML_OPSET})")
    exported = export_onnx(model, schema, model_name=schema.name)
    parity = _parity_max_diff(exported, schema, model, x)
    progress.log(f"ONNX parity on all {len(y)} rows: max |diff| = {parity:.2g}")
    if not parity <= PARITY_TOLERANCE:
        raise TrainingError(f"ONNX parity {parity:.3g} exceeds {PARITY_TOLERANCE:g}; not shipping")

    progress.log(f"drift reference: bins of the {len(dev)} development rows and their scores")
    drift = compute_drift_reference(
        schema,
        table,
        dev,
        exported.onnx_bytes,
        exported.probability_output,
        exported.bad_class_index,
        options.scaling,
    )

    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    (out / SIGNATURE_FILE).unlink(missing_ok=True)  # a stale signature would vouch for nothing
    (out / ONNX_FILE).write_bytes(exported.onnx_bytes)
    joblib.dump(model, out / PIPELINE_FILE, compress=3)
    verification: dict[str, Any] = {
        PIPELINE_KEY: {"file": PIPELINE_FILE, "sha256": file_sha256(out / PIPELINE_FILE)},
        "parity_max_abs_diff": float(f"{parity:.3g}"),
        "parity_rows": len(y),
    }
    (out / LDA_FILE).unlink(missing_ok=True)
    (out / FRONTIER_FILE).unlink(missing_ok=True)
    if search is not None:
        lda_text = json.dumps(search.document, indent=2, ensure_ascii=False, allow_nan=False)
        (out / LDA_FILE).write_text(lda_text + "\n", encoding="utf-8")
        # Pinned in the signed manifest: the signature vouches for the search's table too.
        verification[LDA_KEY] = {"file": LDA_FILE, "sha256": file_sha256(out / LDA_FILE)}

    created = _created_at()
    onnx_sha = file_sha256(out / ONNX_FILE)
    manifest = Manifest(
        model_version=f"{schema.name}-{created:%Y%m%d}-{onnx_sha[:8]}",
        created_at=created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        schema=schema,
        training_data=DatasetInfo(table.file_name, table.sha256, len(y)),
        onnx=OnnxModelInfo(
            file=ONNX_FILE,
            sha256=onnx_sha,
            opset=exported.opset,
            ml_opset=exported.ml_opset,
            inputs=exported.inputs,
            label_output=exported.label_output,
            probability_output=exported.probability_output,
            bad_class_index=exported.bad_class_index,
        ),
        scaling=options.scaling,
        reference_values=references,
        reference_method=REFERENCE_METHOD,
        metrics=metrics,
        training=_training_record(options, len(dev), len(hold), shipped_candidate),
        verification=verification,
        drift_reference=drift,
    )
    document = manifest.to_dict()
    Manifest.from_dict(document)  # the server's parser must accept what we write
    text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)
    (out / MANIFEST_FILE).write_text(text + "\n", encoding="utf-8")
    lda_document = None if search is None else search.document
    (out / CARD_FILE).write_text(render_card(manifest, lda_document), encoding="utf-8")
    aucs = {family: values["holdout_auc"] for family, values in family_metrics.items()}
    roc_plot(out / ROC_FILE, y[hold], holdout_p, aucs, champion)
    calibration_plot(out / CALIBRATION_FILE, calibration, champion)
    if search is not None:
        frontier_plot(out / FRONTIER_FILE, search.document)
    progress.log(f"wrote {out} ({manifest.model_version}); unsigned: run `privscore-model sign`")
    return manifest


def _plain(family: str) -> Candidate:
    """A family exactly as the comparison trains it (the LDA search's reference point)."""
    return Candidate(family, family, "as the family comparison trains it")


def _development_groups(
    schema: FeatureSchema, table: Table, dev: npt.NDArray[np.intp]
) -> dict[str, npt.NDArray[np.object_]]:
    """Each sensitive attribute's group per development row (what reweighing weighs by)."""
    return {name: a.groups for name, a in attributes_for(schema, table, dev).items()}


def _cross_validate(
    candidate: Candidate,
    schema: FeatureSchema,
    x: npt.NDArray[np.object_],
    y: npt.NDArray[np.int64],
    groups: dict[str, npt.NDArray[np.object_]],
    options: TrainOptions,
    progress: Progress,
) -> list[float]:
    """Repeated stratified k-fold AUC of the uncalibrated model (the family comparison)."""
    splitter = RepeatedStratifiedKFold(
        n_splits=options.folds, n_repeats=options.repeats, random_state=options.seed
    )
    total = options.folds * options.repeats
    jobs = (
        delayed(_fold_auc)(candidate, schema, x, y, groups, options.seed, train_rows, test_rows)
        for train_rows, test_rows in splitter.split(x, y)
    )
    scores: list[float] = []
    # Results come back in fold order whatever the worker count, so metrics do not depend on it.
    for score in Parallel(n_jobs=options.jobs, return_as="generator")(jobs):
        scores.append(score)
        label = f"cv {candidate.name}"
        progress.tick(label, len(scores), total, f"mean AUC {np.mean(scores):.4f}")
    return scores


def _fold_auc(
    candidate: Candidate,
    schema: FeatureSchema,
    x: npt.NDArray[np.object_],
    y: npt.NDArray[np.int64],
    groups: dict[str, npt.NDArray[np.object_]],
    seed: int,
    train_rows: npt.NDArray[np.intp],
    test_rows: npt.NDArray[np.intp],
) -> float:
    fold_groups = {name: values[train_rows] for name, values in groups.items()}
    model, _ = fit_candidate(
        candidate, schema, x[train_rows], y[train_rows], fold_groups, seed, calibrated=False
    )
    return float(roc_auc_score(y[test_rows], sklearn_bad_probability(model, x[test_rows])))


@dataclass(frozen=True)
class _ShippedCandidate:
    model: Any
    holdout_p: npt.NDArray[np.float64]
    metrics: dict[str, float]
    record: dict[str, Any]


def _fit_candidate_as_shipped(
    candidate: Candidate,
    schema: FeatureSchema,
    table: Table,
    x: npt.NDArray[np.object_],
    y: npt.NDArray[np.int64],
    dev: npt.NDArray[np.intp],
    hold: npt.NDArray[np.intp],
    options: TrainOptions,
    progress: Progress,
) -> _ShippedCandidate:
    """An LDA candidate through the families' own steps: repeated CV (uncalibrated), then the
    calibrated fit on the development rows, scored once on the holdout. `schema` and `x` are
    the candidate's own (its dropped features gone)."""
    groups = _development_groups(schema, table, dev)
    cv = _cross_validate(candidate, schema, x[dev], y[dev], groups, options, progress)
    progress.log(f"fitting calibrated {candidate.name} on {len(dev)} development rows")
    model, record = fit_candidate(candidate, schema, x[dev], y[dev], groups, options.seed)
    holdout_p = sklearn_bad_probability(model, x[hold])
    metrics = {
        "cv_auc_mean": rounded(float(np.mean(cv))),
        "cv_auc_std": rounded(float(np.std(cv))),
        **holdout_metrics(y[hold], holdout_p),
    }
    progress.log(f"{candidate.name}: {json.dumps(metrics)}")
    return _ShippedCandidate(model, holdout_p, metrics, candidate.to_dict() | record)


def _lda_summary(search: SearchResult, shipped: str) -> dict[str, Any]:
    """What the manifest says of the search; the whole table is in lda.json (pinned)."""
    selection = search.selection
    chosen = next(
        (row for row in search.document["candidates"] if row["name"] == selection.chosen), None
    )
    return {
        "file": LDA_FILE,
        "candidates": len(search.candidates),
        "rule": search.document["selection"]["rule"],
        "best": selection.best,
        "best_cv_auc": selection.best_cv_auc,
        "chosen": selection.chosen,
        "chosen_cv_auc": None if chosen is None else chosen["cv_auc_mean"],
        "chosen_ratio": selection.chosen_ratio,
        "chosen_ratio_ci": None if chosen is None else chosen["ratio_ci"],
        "chosen_ratio_attribute": None if chosen is None else chosen["ratio_attribute"],
        "meets_rule": selection.meets_rule,
        "shipped": shipped,
        "statement": selection.statement,
    }


def _fairness(
    schema: FeatureSchema,
    table: Table,
    y: npt.NDArray[np.int64],
    dev: npt.NDArray[np.intp],
    hold: npt.NDArray[np.intp],
    p_bad_hold: npt.NDArray[np.float64],
    cutoff: float,
    cutoff_rule: str,
) -> dict[str, Any]:
    """Approval rates per group of every sensitive attribute (excluded ones too) on the holdout."""
    approved = p_bad_hold < cutoff
    attributes = {}
    for spec in schema.sensitive_features:
        column = table.column(spec.name)
        attributes[spec.name] = fairness_report(
            spec,
            [column[i] for i in hold],
            y[hold],
            approved,
            numeric_split=numeric_split(spec, column, dev),
        )
    return {
        "sample": "holdout",
        "approval_cutoff": rounded(cutoff),
        "cutoff_rule": cutoff_rule,
        "overall_approval_rate": rounded(float(approved.mean())),
        "attributes": attributes,
    }


def _parity_max_diff(
    exported: ExportedModel, schema: FeatureSchema, model: Any, x: npt.NDArray[np.object_]
) -> float:
    """Max |P(bad)| difference between onnxruntime and scikit-learn over every row."""
    onnx_p = onnx_bad_probability(
        exported.onnx_bytes,
        onnx_feeds(schema, x),
        exported.probability_output,
        exported.bad_class_index,
    )
    return float(np.max(np.abs(onnx_p - sklearn_bad_probability(model, x))))


def _approval_cutoff(options: TrainOptions, y_dev: npt.NDArray[np.int64]) -> tuple[float, str]:
    if options.approval_cutoff is not None:
        if not 0.0 < options.approval_cutoff < 1.0:
            raise ValueError("--approval-cutoff must be between 0 and 1")
        return options.approval_cutoff, "set with --approval-cutoff"
    return float(y_dev.mean()), (
        "default: the development sample's bad rate, i.e. approve applicants predicted to be "
        "less risky than the average applicant"
    )


def _clip(schema: FeatureSchema, name: str, value: float | str) -> float | str:
    """Keep a float32-rounded reference inside the schema's range (0.1 rounds above 0.1)."""
    spec = schema.feature(name)
    if isinstance(value, str):
        return value
    low = spec.min if spec.min is not None else value
    high = spec.max if spec.max is not None else value
    return float(min(max(value, low), high))


def _created_at() -> datetime:
    # SOURCE_DATE_EPOCH (reproducible-builds convention) pins the timestamp when set.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        return datetime.fromtimestamp(int(epoch), tz=UTC)
    return datetime.now(UTC).replace(microsecond=0)


def _training_record(
    options: TrainOptions,
    dev_rows: int,
    hold_rows: int,
    shipped_candidate: dict[str, Any] | None,
) -> dict[str, Any]:
    packages = ("numpy", "scikit-learn", "skl2onnx", "onnx", "onnxruntime", "joblib")
    search: dict[str, Any] = {"enabled": options.lda_search}
    if options.lda_search:
        search |= {"file": LDA_FILE, "folds": options.folds, "repeats": 1}
        # The configuration that ships, with what its fit resolved (monotone directions,
        # reweighing weights); absent when the champion ships.
        search["shipped_candidate"] = shipped_candidate
    return {
        "seed": options.seed,
        "cv": {"folds": options.folds, "repeats": options.repeats, "sample": "development"},
        "holdout_fraction": options.holdout,
        "development_rows": dev_rows,
        "holdout_rows": hold_rows,
        "calibration": f"sigmoid, {CALIBRATION_FOLDS}-fold out-of-fold, ensemble=False",
        "hyperparameters": {family: HYPERPARAMETERS[family] for family in options.families},
        "onnx_target_opsets": {"ai.onnx": ONNX_OPSET, "ai.onnx.ml": ONNX_ML_OPSET},
        "parity_tolerance": PARITY_TOLERANCE,
        "lda_search": search,
        "citation": options.citation,
        "versions": {"python": platform.python_version()}
        | {package: version(package) for package in packages},
    }
