"""The model card (markdown), rendered from the manifest so the two never disagree."""

from __future__ import annotations

from typing import Any

from model_export.plots import CALIBRATION_FILE, ROC_FILE
from service.model.manifest import Manifest

CARD_FILE = "model_card.md"


def render_card(manifest: Manifest) -> str:
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
    for spec in excluded:
        why = (
            "a sensitive attribute a lender must not base a credit decision on"
            if spec.sensitive
            else "excluded for this training run"
        )
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
