"""The model card (markdown), rendered from the manifest so the two never disagree.

The LDA search's full candidate table lives in `lda.json` beside the card (its hash pinned in
the signed manifest); the manifest itself keeps the search's summary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model_export.plots import CALIBRATION_FILE, FRONTIER_FILE, ROC_FILE
from service.model.manifest import Manifest, check_file_hash

CARD_FILE = "model_card.md"
LDA_FILE = "lda.json"
LDA_KEY = "lda_search"  # the manifest's verification entry pinning LDA_FILE


def read_lda_document(artifact_dir: str | Path, manifest: Manifest) -> dict[str, Any] | None:
    """The artifact's LDA search table, if the manifest pins one (its hash checked first)."""
    entry = manifest.verification.get(LDA_KEY)
    if not isinstance(entry, dict):
        return None
    path = check_file_hash(artifact_dir, entry["file"], entry["sha256"])
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return document


def render_card(manifest: Manifest, lda: Mapping[str, Any] | None = None) -> str:
    """The card; `lda` is the search's document (lda.json) when the run searched."""
    metrics = manifest.metrics
    champion = manifest.champion
    fairness = metrics["fairness"]
    data = manifest.training_data
    training = manifest.training
    lines = [
        f"# Model card: {manifest.model_version}",
        "",
        f"Created {manifest.created_at} by `privscore-model train` (seed {training['seed']}). "
        f"Schema `{manifest.schema_version}`. Champion: **{champion}**.",
        "",
        "## Intended use",
        "",
        "Estimates the probability that a consumer-credit applicant will not repay as agreed "
        "(P(bad)), for the privscore service, which turns it into scorecard points and reason "
        "codes. It supports a credit officer's decision; it is not an automatic decision maker, "
        "and it is valid only for applicants like those in the training data.",
        "",
        "## Data",
        "",
        f"- File `{data.file}`, {data.rows} rows, SHA-256 `{data.sha256}`.",
        f"- Label `{manifest.schema.label}`; bad class `{manifest.schema.bad_value}`.",
    ]
    if training.get("citation"):
        lines.append(f"- Source: {training['citation']}")
    lines += [
        f"- Split: {training['development_rows']} development rows (cross-validation, fitting, "
        f"calibration) and a stratified holdout of {training['holdout_rows']} rows "
        "(all holdout metrics below).",
        "",
        "## Attributes",
        "",
        "| Feature | Kind | Used by the model | Sensitive |",
        "|---|---|---|---|",
    ]
    for spec in manifest.schema.features:
        used = "no (excluded)" if spec.excluded else "yes"
        lines.append(
            f"| `{spec.name}` | {spec.kind} | {used} | {'yes' if spec.sensitive else 'no'} |"
        )
    lines += ["", "### Excluded attributes and why", ""]
    excluded = manifest.schema.excluded_features
    if not excluded:
        lines.append("None.")
    search = manifest.training.get("lda_search") or {}
    lda_dropped = set((search.get("shipped_candidate") or {}).get("dropped_features", ()))
    for spec in excluded:
        if spec.name in lda_dropped:
            why = "dropped by the LDA search (below), as a sensitive input or a proxy"
        elif spec.sensitive:
            why = "a sensitive attribute a lender must not base a credit decision on"
        else:
            why = "excluded for this training run"
        detail = f" ({spec.description})" if spec.description else ""
        lines.append(f"- `{spec.name}`{detail}: {why}. It is not an input of the ONNX model.")
    lines += [
        "",
        "Excluding an attribute does not remove its information: other attributes can act as "
        "proxies, which is why the fairness section reports approval rates for every sensitive "
        "attribute, excluded or not.",
        "",
        "## Performance",
        "",
        f"Cross-validation: {training['cv']['repeats']} x repeated stratified "
        f"{training['cv']['folds']}-fold on the development rows, uncalibrated models; the "
        "champion is the family with the highest mean CV AUC. Holdout: each family refit on all "
        "development rows with sigmoid calibration, scored once on the holdout. The shipped "
        "model is the champion's calibrated fit; its holdout numbers describe exactly it.",
        "",
    ]
    if metrics.get("selection", "").startswith("LDA search"):
        lines += [
            f"The shipped model, **{champion}**, is the LDA search's choice (see below), not "
            "necessarily the family with the highest mean CV AUC; its row went through the same "
            "cross-validation and holdout steps.",
            "",
        ]
    lines += [
        "| Family | CV AUC mean | CV AUC std | Holdout AUC | Holdout KS | Holdout Brier |",
        "|---|---|---|---|---|---|",
    ]
    for family, values in metrics["families"].items():
        name = f"**{family}** (champion)" if family == champion else family
        lines.append(
            f"| {name} | {values['cv_auc_mean']:.4f} | {values['cv_auc_std']:.4f} | "
            f"{values['holdout_auc']:.4f} | {values['holdout_ks']:.4f} | "
            f"{values['holdout_brier']:.4f} |"
        )
    lines += [
        "",
        f"![ROC curves on the holdout split]({ROC_FILE})",
        "",
        "### Calibration (champion, holdout deciles of predicted P(bad))",
        "",
        "| Decile | n | Mean predicted | Observed bad rate |",
        "|---|---|---|---|",
    ]
    for row in metrics["calibration"]:
        lines.append(
            f"| {row['bin']} | {row['n']} | {row['mean_predicted']:.3f} | "
            f"{row['observed_bad_rate']:.3f} |"
        )
    lines += ["", f"![Calibration on the holdout split]({CALIBRATION_FILE})", ""]
    lines += _fairness_section(fairness)
    lines += _lda_section(manifest, lda)
    scaling = manifest.scaling
    lines += [
        "## Scorecard scaling and reason codes",
        "",
        f"Score = {scaling.offset:.2f} + {scaling.factor:.4f} x ln(good:bad odds): "
        f"{scaling.base_score:g} points at odds {scaling.base_odds:g}:1, "
        f"+{scaling.points_to_double_odds:g} points each time the odds double.",
        "",
        f"Reference values (favourable value per feature for reason codes): "
        f"{manifest.reference_method}.",
        "",
        "| Feature | Reason code | Reason text | Reference value |",
        "|---|---|---|---|",
    ]
    for spec in manifest.schema.model_features:
        reference = manifest.reference_values[spec.name]
        shown = f"{reference:g}" if isinstance(reference, float) else f"`{reference}`"
        lines.append(f"| `{spec.name}` | {spec.reason_code} | {spec.reason_text} | {shown} |")
    lines += _drift_section(manifest)
    kept_sensitive = [f"`{spec.name}`" for spec in manifest.schema.model_features if spec.sensitive]
    lines += ["## Limitations", ""]
    if kept_sensitive:
        lines.append(
            f"- Sensitive attributes kept as model inputs ({', '.join(kept_sensitive)}) influence "
            "scores and can surface as reason codes; the decision policy must decide whether "
            "that is acceptable where the service runs."
        )
    lines += _lda_limitations(manifest)
    lines += [
        "- Trained on a small, historical sample; outcomes exist only for applicants who were "
        "granted credit (no reject inference), so risk for profiles unlike past approvals is "
        "extrapolated.",
        "- Holdout metrics and fairness ratios come from a few hundred rows: treat differences "
        "of a few points as noise.",
        "- The fairness report measures approval-rate parity at one illustrative cut-off; it is "
        "not a legal disparate-impact analysis, and the service's own decision policy may differ.",
        "- Calibration was fitted on the development sample; recalibrate before using the "
        "probabilities on a population with a different bad rate.",
        "- onnxruntime computes in float32; `privscore-model verify` checks it agrees with the "
        f"scikit-learn pipeline within {training['parity_tolerance']:g} on every row "
        f"(max difference at training: {manifest.verification['parity_max_abs_diff']:.2g}).",
        "",
    ]
    return "\n".join(lines)


def _drift_section(manifest: Manifest) -> list[str]:
    reference = manifest.drift_reference
    if reference is None:
        return [""]
    edges = ", ".join(f"{edge:g}" for edge in reference.score.edges)
    return [
        "",
        "## Drift monitoring reference",
        "",
        f"The manifest's `drift_reference` holds the distribution of the {reference.rows} "
        "development rows: each numeric feature in bins split at its deciles, each categorical "
        "feature per category, and the score (computed with the ONNX model, rounded as the "
        f"service rounds it) split at its deciles ({edges}). The service counts served "
        "decisions in the same bins, never a value, and reports the population stability index "
        "per feature and for the score; bins with fewer decisions than its minimum count are "
        "merged before anything is reported.",
        "",
    ]


def _fairness_section(fairness: dict[str, Any]) -> list[str]:
    lines = [
        "## Fairness",
        "",
        f"Approval rule for this report: approve when P(bad) < {fairness['approval_cutoff']:.4f} "
        f"({fairness['cutoff_rule']}). Measured on the holdout split; overall approval rate "
        f"{fairness['overall_approval_rate']:.3f}. Ratio = lowest / highest group approval rate "
        "(below 0.8 fails the four-fifths rule of thumb).",
        "",
    ]
    for name, report in fairness["attributes"].items():
        status = "excluded from the model" if report["excluded_from_model"] else "used by the model"
        lines += [
            f"### `{name}` ({status})",
            "",
            f"Approval-rate ratio **{report['approval_rate_ratio']:.3f}** "
            f"({report['lowest_group']} vs {report['highest_group']}); four-fifths rule "
            f"{'met' if report['four_fifths_rule_met'] else 'NOT met'}.",
            "",
            "| Group | n | Approval rate | Observed bad rate |",
            "|---|---|---|---|",
        ]
        for group in report["groups"]:
            lines.append(
                f"| {group['group']} | {group['n']} | {group['approval_rate']:.3f} | "
                f"{group['observed_bad_rate']:.3f} |"
            )
        lines.append("")
    return lines


def _lda_section(manifest: Manifest, lda: Mapping[str, Any] | None) -> list[str]:
    search = manifest.training.get("lda_search")
    if search is None:
        return []  # trained before the search existed: the card stays as it was
    lines = ["## Less discriminatory alternative (LDA) search", ""]
    summary = manifest.metrics.get("lda")
    if not search.get("enabled") or summary is None:
        return [
            *lines,
            "**Not run for this model** (`--no-lda-search`): nothing here says whether a model "
            "about as accurate would treat the groups more evenly.",
            "",
        ]
    lines += [
        "Excluding a sensitive attribute does not stop proxies from carrying it, so training "
        "searches a documented space of alternatives (`model_export/lda.py`: each family as "
        "compared above, regularised, monotone, without sensitive inputs, reweighed by group x "
        "label, without the strongest proxies) and picks one by a stated rule.",
        "",
        f"**Rule:** {summary['rule']}.",
        "",
        f"**Result:** {summary['statement']}",
        "",
    ]
    if summary["meets_rule"]:
        lines.append(f"**Shipped:** {summary['shipped']}, the search's choice.")
    else:
        lines.append(
            f"**Shipped:** {summary['shipped']}, the champion, unchanged: the four-fifths "
            "rule is NOT met by any candidate within the accuracy band."
        )
    lines.append("")
    if lda is None:
        return [*lines, f"The candidate table is in `{summary['file']}`.", ""]
    method = lda["method"]
    confidence = f"{method['confidence']:.0%}"
    lines += _two_samples(manifest, lda, summary["shipped"])
    lines += [
        f"Measured on the {method['rows']} development rows (the holdout is not used): "
        f"stratified {method['folds']}-fold CV, each fold fitting the calibrated pipeline; "
        f"every row's out-of-fold P(bad) approved when below {method['approval_cutoff']:.4f} "
        f"({method['cutoff_rule']}). Ratio = lowest / highest group approval rate. "
        f"Intervals: {confidence} percentile bootstrap ({method['bootstrap_samples']} "
        "resamples of the out-of-fold rows within fold and label; the same resamples for every "
        "candidate, so the gap to the best is paired); they show the evaluation rows' noise, "
        "not refits'.",
        "",
        f"Groups with fewer than {method['min_group_size']} development rows are listed but "
        "not used in a ratio; an attribute with fewer than two usable groups is not measured. "
        "A candidate's ratio is its lowest over the measured attributes.",
        "",
        "| Attribute | Group | Development rows | Used in the ratio | Strongest proxies "
        "(bias-corrected Cramer's V) |",
        "|---|---|---|---|---|",
    ]
    for name, attribute in lda["attributes"].items():
        proxies = ", ".join(
            f"`{p['feature']}` {p['cramers_v']:.3f}" for p in attribute["proxies"][:3]
        )
        for index, group in enumerate(attribute["groups"]):
            shown = (proxies or "not measured") if index == 0 else ""
            lines.append(
                f"| `{name}` | {group['group']} | {group['n']} | "
                f"{'yes' if group['used'] else 'no (too few rows)'} | {shown} |"
            )
    measured = [name for name, a in lda["attributes"].items() if a["measured"]]
    header = "".join(f" Ratio `{name}` [CI] |" for name in measured)
    lines += [
        "",
        f"| Candidate | Change | CV AUC [{confidence} CI] | Gap to best [CI] | Approval rate |"
        + header
        + f" Within {method['auc_tolerance']:g} |",
        "|---|---|---|---|---|" + "---|" * len(measured) + "---|",
    ]
    chosen = summary["chosen"]
    for row in lda["candidates"]:
        name = f"**{row['name']}** (chosen)" if row["name"] == chosen else row["name"]
        ratios = "".join(
            f" {_ratio_text(row['attributes'][attribute])} |" for attribute in measured
        )
        lines.append(
            f"| {name} | {row['description']} | {row['cv_auc_mean']:.4f} "
            f"{_interval_text(row['cv_auc_ci'], 4)} | {row['auc_gap_to_best']:.4f} "
            f"{_interval_text(row['auc_gap_ci'], 4)} | {row['approval_rate']:.3f} |"
            f"{ratios} {'yes' if row['eligible'] else 'no'} |"
        )
    best = next(row for row in lda["candidates"] if row["name"] == summary["best"])
    low, high = best["cv_auc_ci"]
    lines.append("")
    if high - low > method["auc_tolerance"]:
        lines += [
            f"The best candidate's CV AUC interval ({_interval_text(best['cv_auc_ci'], 4)}) is "
            f"wider than the accuracy band ({method['auc_tolerance']:g}): the candidates inside "
            "the band are ones cross-validation cannot tell apart on accuracy.",
            "",
        ]
    lines += [
        f"![LDA frontier: CV AUC against approval-rate ratio]({FRONTIER_FILE})",
        "",
    ]
    return lines


def _two_samples(manifest: Manifest, lda: Mapping[str, Any], shipped: str) -> list[str]:
    """The shipped model's ratios here beside the fairness section's: the same model on two
    samples, so a reader sees how far one sample's ratio can be from another's."""
    row = next((row for row in lda["candidates"] if row["name"] == shipped), None)
    holdout = manifest.metrics["fairness"]["attributes"]
    if row is None:
        return []
    pairs = [
        f"`{name}` {report['ratio']:.3f} here, {holdout[name]['approval_rate_ratio']:.3f} there"
        for name, report in row["attributes"].items()
        if name in holdout
    ]
    if not pairs:
        return []
    return [
        f"The shipped model measured here (development rows, out-of-fold) and in the fairness "
        f"section (holdout, every group however small): {'; '.join(pairs)}. "
        f"{manifest.training['development_rows']} development rows against "
        f"{manifest.training['holdout_rows']} holdout rows; where the two disagree, the "
        "intervals below show how far a ratio moves with the sample.",
        "",
    ]


def _ratio_text(report: Mapping[str, Any]) -> str:
    low, high = report["ratio_ci"]
    return f"{report['ratio']:.3f} [{low:.3f}, {high:.3f}]"


def _interval_text(interval: list[float], digits: int) -> str:
    return f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def _lda_limitations(manifest: Manifest) -> list[str]:
    search = manifest.training.get("lda_search") or {}
    shipped = search.get("shipped_candidate")
    if not shipped:
        return []
    lines = []
    if shipped.get("reweighed_by"):
        lines.append(
            f"- Training weighted rows by `{shipped['reweighed_by']}` group x label "
            "(reweighing, to even out approval rates). The attribute is not a model input, but "
            "it was used in training: some jurisdictions treat any such use as disparate "
            "treatment; check before shipping there."
        )
    if shipped.get("dropped_features"):
        dropped = ", ".join(f"`{name}`" for name in shipped["dropped_features"])
        lines.append(
            f"- The LDA search dropped {dropped} from the model: the schema version changed, "
            "and callers must stop sending those features."
        )
    return lines
