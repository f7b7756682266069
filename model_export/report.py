"""`privscore-model report`: the champion and the shadow challenger judged on what happened.

The input is `privscore audit outcomes`' file (model_export/outcomes.py): Score decisions with
an observed outcome, each carrying the champion's assessment and, while a challenger ran in
shadow, the challenger's on the same applicant. Both models are measured on the same decisions
only (those with a challenger and a BAD or GOOD outcome; INDETERMINATE is counted and left
out), so a difference between them is a difference between the models and not between the
populations they happened to see.

Measures, for each model: AUC and KS (ranking bads above goods by predicted PD), the Brier
score (accuracy of the PD itself), calibration by decile of predicted PD, approval rate, the
bad rate among the approved, and the approval-rate ratio between the lowest- and highest-
approved age groups (groups under a minimum size left out and listed, as their rates are too
noisy to compare with the four-fifths line).

Does the challenger beat the champion? A paired bootstrap over decisions: each replicate
draws the decisions with replacement and computes both models' AUC on the same draw, and the
95% percentile interval of the AUC difference decides the verdict. Chosen over DeLong's test
for correlated ROC curves because:
- pairing is literal: the same resampled decisions feed both models, so the correlation
  between two models scoring the same applicants is kept without a variance formula for it;
- it needs no normal approximation, which matters for the small, unbalanced samples outcomes
  arrive in (few bads, many goods), and the same draws give intervals for each model's AUC
  and for the Brier difference at no extra design cost;
- it is seeded (`--seed`), so a report is reproducible byte for byte.
Its price is compute (replicates x decisions), kept small by weighting each decision by how
often a replicate drew it rather than copying rows: one sort per model, then linear work per
replicate. The tests check the intervals against DeLong's on the same data.

The interval treats decisions as independent; decisions on the same customer are not quite,
which makes any such interval somewhat too narrow (the report says so).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import secrets
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from sklearn.metrics import roc_curve

from model_export.evaluation import FOUR_FIFTHS, auc, calibration_table, ks_statistic, rounded
from model_export.outcomes import (
    AGE_GROUPS,
    DECISIONS,
    Assessment,
    OutcomeRecord,
    OutcomesFile,
    read_outcomes,
)

REPORT_FORMAT = "privscore-outcome-report/1"
JSON_FILE = "report.json"
MARKDOWN_FILE = "report.md"
PNG_FILE = "report.png"
DEFAULT_BOOTSTRAP = 1000
# Each 2.5% tail of the interval must rest on a few replicates at least.
MIN_BOOTSTRAP = 200
CONFIDENCE = 0.95
# An approval rate of a group this small has a standard error near 0.09 at worst (p = 0.5):
# too wide to hold against the four-fifths line, so smaller groups are listed, not compared.
DEFAULT_MIN_GROUP_SIZE = 30
# Fewer outcomes of either class than this and the report warns that the intervals are wide.
FEW_OUTCOMES = 50
DEFAULT_SEED = 42
# Bootstrap work is done in blocks of at most this many (replicate, decision) weights.
_BLOCK = 1 << 22
_FILE_MODE = 0o600
_DIR_MODE = 0o700
# No software/date metadata: the same report gives the same bytes (as model_export/plots.py).
_PNG_METADATA: dict[str, Any] = {"Software": None}

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class ReportError(ValueError):
    """The outcomes cannot give a report (nothing to compare); the message says why."""


@dataclass(frozen=True)
class ReportOptions:
    outcomes: Path
    out: Path
    definition: str | None = None
    bootstrap: int = DEFAULT_BOOTSTRAP
    seed: int = DEFAULT_SEED
    min_group_size: int = DEFAULT_MIN_GROUP_SIZE
    champion_version: str | None = None
    challenger_version: str | None = None


@dataclass(frozen=True)
class Sample:
    """The compared decisions, one entry per decision in file order; bad is 1 for BAD."""

    bad: IntArray
    champion: tuple[Assessment, ...]
    challenger: tuple[Assessment, ...]
    age_group: tuple[str | None, ...]

    def pd(self, role: str) -> FloatArray:
        return np.array([a.pd for a in self._assessments(role)], dtype=np.float64)

    def decisions(self, role: str) -> npt.NDArray[np.str_]:
        return np.array([a.decision for a in self._assessments(role)], dtype=np.str_)

    def _assessments(self, role: str) -> tuple[Assessment, ...]:
        return self.champion if role == "champion" else self.challenger

    @property
    def both_classes(self) -> bool:
        return 0 < int(self.bad.sum()) < len(self.bad)


@dataclass(frozen=True)
class Report:
    document: dict[str, Any]
    comparable: bool  # false when AUC is undefined (one outcome class): no verdict
    paths: tuple[Path, ...]


ROLES = ("champion", "challenger")


def run_report(options: ReportOptions) -> Report:
    """Read, measure, compare and write DIR/report.json, report.md and report.png (0600)."""
    if options.bootstrap < MIN_BOOTSTRAP:
        raise ReportError(f"--bootstrap must be at least {MIN_BOOTSTRAP} replicates")
    if options.min_group_size < 1:
        raise ReportError("--min-group-size must be at least 1")
    document, sample = build_report(options)
    png = _plot(sample, document)
    markdown = render_markdown(document)
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    _private_dir(options.out)
    paths = (options.out / JSON_FILE, options.out / MARKDOWN_FILE, options.out / PNG_FILE)
    for path, data in zip(paths, (text.encode(), markdown.encode(), png), strict=True):
        _write_private(path, data)
    return Report(document, sample.both_classes, paths)


def build_report(options: ReportOptions) -> tuple[dict[str, Any], Sample]:
    """The report's document (every number, rounded) and the decisions it was computed on."""
    source = read_outcomes(options.outcomes)
    if not source.records:
        raise ReportError(f"{options.outcomes}: no decisions with outcomes in the file")
    definition = _definition(source, options.definition)
    chosen = [r for r in source.records if r.definition == definition]
    with_challenger = [r for r in chosen if r.challenger is not None]
    if not with_challenger:
        raise ReportError(
            f"none of the {len(chosen)} decisions with a {definition} outcome has a challenger: "
            "outcomes are compared only on decisions made while a challenger ran in shadow"
        )
    pairs = _pairs(with_challenger)
    champion_version, challenger_version = _pair(
        pairs, options.champion_version, options.challenger_version
    )
    paired = [
        r
        for r in with_challenger
        if (r.champion.model_version, _challenger(r).model_version)
        == (champion_version, challenger_version)
    ]
    compared = [r for r in paired if r.outcome != "INDETERMINATE"]
    if not compared:
        raise ReportError(
            f"all {len(paired)} decisions of {champion_version} with {challenger_version} in "
            f"shadow have an INDETERMINATE {definition} outcome: nothing to compare"
        )
    sample = Sample(
        bad=np.array([r.outcome == "BAD" for r in compared], dtype=np.int64),
        champion=tuple(r.champion for r in compared),
        challenger=tuple(_challenger(r) for r in compared),
        age_group=tuple(r.age_group for r in compared),
    )
    bads = int(sample.bad.sum())
    counts = {
        "records": len(source.records),
        "other_definitions": len(source.records) - len(chosen),
        "without_challenger": len(chosen) - len(with_challenger),
        "other_model_pairs": len(with_challenger) - len(paired),
        "indeterminate": len(paired) - len(compared),
        "compared": len(compared),
        "bad": bads,
        "good": len(compared) - bads,
    }
    models = {
        role: model_metrics(
            version,
            sample.bad,
            sample.pd(role),
            sample.decisions(role),
            sample.age_group,
            options.min_group_size,
        )
        for role, version in zip(ROLES, (champion_version, challenger_version), strict=True)
    }
    comparison = compare(sample, options.bootstrap, options.seed)
    for role in ROLES:
        models[role]["auc_ci"] = comparison.pop(f"{role}_auc_ci")
    document: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "definition": definition,
        "source": {"file": options.outcomes.name, "exported_at": source.exported_at},
        "period": _period(compared),
        "counts": counts,
        "model_pairs": [
            {"champion": champion, "challenger": challenger, "decisions": n}
            for (champion, challenger), n in pairs
        ],
        "champion": models["champion"],
        "challenger": models["challenger"],
        "comparison": comparison,
        "decision_agreement": _agreement(sample),
    }
    document["caveats"] = _caveats(document)
    return document, sample


def _challenger(record: OutcomeRecord) -> Assessment:
    assert record.challenger is not None  # filtered by the caller
    return record.challenger


def _definition(source: OutcomesFile, wanted: str | None) -> str:
    found = Counter(r.definition for r in source.records)
    if wanted is None:
        wanted = source.header_definition
    if wanted is None:
        if len(found) > 1:
            listed = ", ".join(f"{name} ({n})" for name, n in sorted(found.items()))
            raise ReportError(
                f"the file holds outcomes under several definitions ({listed}): "
                "choose one with --definition"
            )
        (wanted,) = found
    if wanted not in found:
        raise ReportError(f"no decision in the file has a {wanted} outcome")
    return wanted


def _pairs(records: Sequence[OutcomeRecord]) -> list[tuple[tuple[str, str], int]]:
    """(champion, challenger) versions and their decisions, most decisions first."""
    counted = Counter((r.champion.model_version, _challenger(r).model_version) for r in records)
    return sorted(counted.items(), key=lambda item: (-item[1], item[0]))


def _pair(
    pairs: list[tuple[tuple[str, str], int]], champion: str | None, challenger: str | None
) -> tuple[str, str]:
    """The pair to compare: the one with most decisions among those matching the options.

    A promotion during the exported period changes who the champion is; mixing pairs would
    compare neither model with the other, so one pair is compared and the others are
    counted and listed."""
    matching = [
        pair for pair, _ in pairs if champion in (None, pair[0]) and challenger in (None, pair[1])
    ]
    if not matching:
        listed = "; ".join(f"{a} with {b} in shadow ({n})" for (a, b), n in pairs)
        raise ReportError(f"no decisions of the model versions asked for; the file has: {listed}")
    return matching[0]


def _period(records: Sequence[OutcomeRecord]) -> dict[str, Any]:
    """When the compared decisions were made, and how long after them outcomes were seen:
    an outcome observed early may still change (a GOOD before the window closes)."""
    days = [(r.observed_at - r.time).total_seconds() / 86400 for r in records]
    return {
        "first_decision": _iso(min(r.time for r in records)),
        "last_decision": _iso(max(r.time for r in records)),
        "days_to_outcome_min": rounded(min(days)),
        "days_to_outcome_median": rounded(statistics.median(days)),
    }


def _iso(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def model_metrics(
    version: str,
    bad: IntArray,
    pd: FloatArray,
    decisions: npt.NDArray[np.str_],
    age_groups: Sequence[str | None],
    min_group_size: int,
) -> dict[str, Any]:
    """One model's measures on the compared decisions; AUC and KS are None with one class."""
    both = 0 < int(bad.sum()) < len(bad)
    approved = decisions == "APPROVE"
    bad_approved = bad[approved]
    return {
        "model_version": version,
        "auc": rounded(auc(bad, pd)) if both else None,
        "ks": rounded(ks_statistic(bad, pd)) if both else None,
        "brier": rounded(float(np.mean((pd - bad) ** 2))),
        "mean_pd": rounded(float(np.mean(pd))),
        "calibration": calibration_table(bad, pd),
        "decisions": {name: int((decisions == name).sum()) for name in DECISIONS},
        "approval_rate": rounded(float(approved.mean())),
        "bad_rate_among_approved": (
            rounded(float(bad_approved.mean())) if len(bad_approved) else None
        ),
        "age_groups": age_fairness(age_groups, approved, bad, min_group_size),
    }


def age_fairness(
    age_groups: Sequence[str | None],
    approved: npt.NDArray[np.bool_],
    bad: IntArray,
    min_group_size: int,
) -> dict[str, Any]:
    """Approval rate per age group and the lowest-to-highest ratio over groups of at least
    `min_group_size` decisions. Smaller groups are listed by size only: a rate from a handful
    of decisions is noise, and it says more about the few people in it than about the model."""
    groups = np.array([g if g is not None else "" for g in age_groups], dtype=np.str_)
    rows: list[dict[str, Any]] = []
    excluded: list[dict[str, Any]] = []
    for name in AGE_GROUPS:
        members = groups == name
        n = int(members.sum())
        if n == 0:
            continue
        if n < min_group_size:
            excluded.append({"group": name, "n": n})
            continue
        rows.append(
            {
                "group": name,
                "n": n,
                "approved": int(approved[members].sum()),
                "approval_rate": rounded(float(approved[members].mean())),
                "observed_bad_rate": rounded(float(bad[members].mean())),
            }
        )
    result: dict[str, Any] = {
        "min_group_size": min_group_size,
        "groups": rows,
        "excluded_small_groups": excluded,
        "unknown": int((groups == "").sum()),
        "lowest_group": None,
        "highest_group": None,
        "approval_rate_ratio": None,
        "four_fifths_rule_met": None,
    }
    if len(rows) < 2:
        result["ratio_undefined"] = f"fewer than two age groups of {min_group_size} or more"
        return result
    lowest = min(rows, key=lambda row: row["approval_rate"])
    highest = max(rows, key=lambda row: row["approval_rate"])
    result["lowest_group"] = lowest["group"]
    result["highest_group"] = highest["group"]
    if highest["approval_rate"] == 0:
        result["ratio_undefined"] = "no age group has an approval"
        return result
    ratio = lowest["approval_rate"] / highest["approval_rate"]
    result["approval_rate_ratio"] = rounded(ratio)
    result["four_fifths_rule_met"] = bool(ratio >= FOUR_FIFTHS)
    return result


def weighted_auc(pd: FloatArray, bad: IntArray, weights: FloatArray) -> FloatArray:
    """AUC of `pd` against `bad` for each row of `weights` (replicates x decisions): the
    weighted share of (bad, good) pairs the bad ranks above, ties counting half. NaN for a
    row whose weights leave out every bad or every good.

    With all weights 1 this is the Mann-Whitney AUC (scikit-learn's roc_auc_score); with a
    bootstrap draw's counts it is the AUC of the resampled decisions, without copying rows."""
    order = np.argsort(pd, kind="stable")
    ordered = pd[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # one block per tie
    w = weights[:, order]
    is_bad = bad[order].astype(np.float64)
    bads = np.add.reduceat(w * is_bad, starts, axis=1)
    goods = np.add.reduceat(w * (1.0 - is_bad), starts, axis=1)
    goods_below = np.cumsum(goods, axis=1) - goods
    ranked = (bads * (goods_below + 0.5 * goods)).sum(axis=1)
    pairs = bads.sum(axis=1) * goods.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        result: FloatArray = np.where(pairs > 0, ranked / pairs, np.nan)
    return result


@dataclass(frozen=True)
class PairedBootstrap:
    """Per replicate (those with both classes drawn): each model's AUC and the difference
    of Brier scores (challenger minus champion)."""

    replicates: int
    champion_auc: FloatArray
    challenger_auc: FloatArray
    brier_difference: FloatArray


def paired_bootstrap(
    bad: IntArray, champion_pd: FloatArray, challenger_pd: FloatArray, replicates: int, seed: int
) -> PairedBootstrap:
    """Draw the decisions with replacement `replicates` times (seeded) and measure both models
    on each draw. The draws do not depend on the block size, so the result depends only on the
    data, the replicates and the seed."""
    n = len(bad)
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK // n)
    squared_gap = (challenger_pd - bad) ** 2 - (champion_pd - bad) ** 2
    champion: list[FloatArray] = []
    challenger: list[FloatArray] = []
    brier: list[FloatArray] = []
    done = 0
    while done < replicates:
        rows = min(block, replicates - done)
        drawn = rng.integers(0, n, size=(rows, n))
        flat = (drawn + np.arange(rows)[:, None] * n).ravel()
        counts = np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)
        champion.append(weighted_auc(champion_pd, bad, counts))
        challenger.append(weighted_auc(challenger_pd, bad, counts))
        # Row sums, not a matrix product: BLAS may group a product differently by block shape.
        brier.append((counts * squared_gap).sum(axis=1) / n)
        done += rows
    champion_auc, challenger_auc = np.concatenate(champion), np.concatenate(challenger)
    kept = ~(np.isnan(champion_auc) | np.isnan(challenger_auc))
    return PairedBootstrap(
        replicates, champion_auc[kept], challenger_auc[kept], np.concatenate(brier)[kept]
    )


def compare(sample: Sample, replicates: int, seed: int) -> dict[str, Any]:
    """The paired comparison and its verdict (see the module docstring for the method)."""
    champion_pd, challenger_pd = sample.pd("champion"), sample.pd("challenger")
    brier_difference = float(
        np.mean((challenger_pd - sample.bad) ** 2) - np.mean((champion_pd - sample.bad) ** 2)
    )
    result: dict[str, Any] = {
        "method": "paired percentile bootstrap over decisions",
        "confidence": CONFIDENCE,
        "replicates": replicates,
        "replicates_used": 0,
        "seed": seed,
        "auc_difference": None,
        "auc_difference_ci": None,
        "brier_difference": rounded(brier_difference),
        "brier_difference_ci": None,
        "champion_auc_ci": None,
        "challenger_auc_ci": None,
    }
    if not sample.both_classes:
        only = "BAD" if int(sample.bad.sum()) else "GOOD"
        result["verdict"] = "undefined"
        result["verdict_text"] = (
            f"AUC is undefined: every compared decision has a {only} outcome, so neither "
            "model's ranking of bads above goods can be measured and no verdict is given. "
            "Compare again once outcomes of both kinds are recorded."
        )
        return result
    drawn = paired_bootstrap(sample.bad, champion_pd, challenger_pd, replicates, seed)
    difference = auc(sample.bad, challenger_pd) - auc(sample.bad, champion_pd)
    interval = _interval(drawn.challenger_auc - drawn.champion_auc)
    result.update(
        replicates_used=len(drawn.champion_auc),
        auc_difference=rounded(difference),
        auc_difference_ci=interval,
        brier_difference_ci=_interval(drawn.brier_difference),
        champion_auc_ci=_interval(drawn.champion_auc),
        challenger_auc_ci=_interval(drawn.challenger_auc),
    )
    result["verdict"], result["verdict_text"] = verdict(rounded(difference), interval)
    return result


def _interval(values: FloatArray) -> list[float] | None:
    if len(values) == 0:
        return None
    tail = (1.0 - CONFIDENCE) / 2
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return [rounded(low), rounded(high)]


def verdict(difference: float, interval: list[float] | None) -> tuple[str, str]:
    """A code and a sentence from the AUC difference (challenger minus champion) and its
    interval; the interval, not the point estimate, decides."""
    level = f"{CONFIDENCE:.0%}"
    if interval is None:
        return "undefined", "No bootstrap replicate drew both outcome classes: no interval."
    low, high = interval
    shown = (
        f"{difference:+.4f} (challenger minus champion), {level} interval [{low:.4f}, {high:.4f}]"
    )
    if low > 0:
        return (
            "challenger_better",
            f"The challenger's AUC is higher and the interval excludes 0: {shown}.",
        )
    if high < 0:
        return (
            "champion_better",
            f"The challenger's AUC is lower and the interval excludes 0: the champion ranks "
            f"bads above goods better. {shown}.",
        )
    if low == high == 0:
        return (
            "no_significant_difference",
            f"No difference: the two models rank these decisions alike. {shown}.",
        )
    return (
        "no_significant_difference",
        f"No significant difference in AUC: the interval includes 0. {shown}.",
    )


def _agreement(sample: Sample) -> list[dict[str, Any]]:
    """Champion decision x challenger decision: how many, and how many went bad. The cells
    where they disagree are the swap sets a promotion would change."""
    champion, challenger = sample.decisions("champion"), sample.decisions("challenger")
    cells = []
    for first in DECISIONS:
        for second in DECISIONS:
            members = (champion == first) & (challenger == second)
            cells.append(
                {
                    "champion": first,
                    "challenger": second,
                    "n": int(members.sum()),
                    "bad": int(sample.bad[members].sum()),
                }
            )
    return cells


def _caveats(document: dict[str, Any]) -> list[str]:
    counts = document["counts"]
    champion = document["champion"]
    caveats = [
        "Selection bias: outcomes exist only for customers who were booked, which in the "
        "normal course means those the champion approved (it approved "
        f"{champion['approval_rate']:.1%} of the decisions compared). Both models are judged "
        "on that accepted population, not on everyone who applied: applicants the champion "
        "declined and the challenger would approve have no outcome, so how they would repay "
        "is unknown (judging them needs reject inference or a randomised test cell), and the "
        "approval rates and age-group ratios here are of decisions with outcomes, not of all "
        "applicants.",
    ]
    fewest = min(counts["bad"], counts["good"])
    if fewest < FEW_OUTCOMES:
        kind = "bad" if counts["bad"] <= counts["good"] else "good"
        caveats.append(
            f"Small sample: only {fewest} {kind} outcomes among {counts['compared']} decisions. "
            "The intervals are wide; a real difference smaller than their half-width would "
            "not show, and 'no significant difference' is not evidence that the models are equal."
        )
    else:
        caveats.append(
            f"Sample size: {counts['compared']} decisions ({counts['bad']} bad, "
            f"{counts['good']} good). 'No significant difference' means no difference this "
            "sample can resolve, not that the models are equal."
        )
    caveats.append(
        "Outcome maturity: an outcome recorded before the definition's window closed may "
        "still change (a GOOD can turn BAD); the median time from decision to recorded "
        f"outcome is {document['period']['days_to_outcome_median']:.0f} days."
    )
    if counts["indeterminate"]:
        caveats.append(
            f"{counts['indeterminate']} decisions with an INDETERMINATE outcome are left out."
        )
    if counts["without_challenger"] or counts["other_model_pairs"]:
        caveats.append(
            f"{counts['without_challenger']} decisions had no challenger in shadow and "
            f"{counts['other_model_pairs']} were made by another champion/challenger pair: "
            "left out, so the comparison covers only the period this pair ran together."
        )
    ages = champion["age_groups"]
    if ages["unknown"] or ages["excluded_small_groups"]:
        small = ", ".join(f"{g['group']} ({g['n']})" for g in ages["excluded_small_groups"])
        caveats.append(
            f"Age groups: {ages['unknown']} decisions have no age group (their inputs no longer "
            "open, e.g. an erased applicant) and are left out of the ratios"
            + (
                f"; groups under {ages['min_group_size']} decisions are listed, not compared: "
                f"{small}"
                if small
                else ""
            )
            + "."
        )
    caveats.append(
        "The bootstrap treats decisions as independent; repeat decisions on one customer are "
        "correlated, which makes the intervals somewhat too narrow."
    )
    return caveats


def render_markdown(document: dict[str, Any]) -> str:
    """The readable report: the verdict first, then the tables behind it."""
    counts, comparison = document["counts"], document["comparison"]
    champion, challenger = document["champion"], document["challenger"]
    period = document["period"]
    lines = [
        "# Champion and challenger on observed outcomes",
        "",
        f"- Outcome definition: `{document['definition']}`",
        f"- Champion: `{champion['model_version']}`; challenger (shadow): "
        f"`{challenger['model_version']}`",
        f"- Decisions made {period['first_decision']} to {period['last_decision']}; "
        f"outcomes file `{document['source']['file']}`"
        + (
            f", exported {document['source']['exported_at']}"
            if document["source"]["exported_at"]
            else ""
        ),
        "",
        "## Verdict",
        "",
        f"**{comparison['verdict_text']}**",
        "",
        "The verdict is on discrimination (AUC) alone; read calibration and the age-group "
        "ratios below before promoting.",
        "",
        "## Decisions compared",
        "",
        "| | decisions |",
        "|---|---:|",
        f"| in the file | {counts['records']} |",
        f"| other outcome definitions | -{counts['other_definitions']} |",
        f"| no challenger in shadow | -{counts['without_challenger']} |",
        f"| another champion/challenger pair | -{counts['other_model_pairs']} |",
        f"| INDETERMINATE outcome | -{counts['indeterminate']} |",
        f"| **compared** (BAD {counts['bad']}, GOOD {counts['good']}) | **{counts['compared']}** |",
        "",
        "## Measures",
        "",
        "| | champion | challenger | challenger - champion |",
        "|---|---:|---:|---:|",
        _metric_row(
            "AUC",
            champion["auc"],
            challenger["auc"],
            comparison["auc_difference"],
            comparison["auc_difference_ci"],
        ),
        _metric_row(
            f"AUC {comparison['confidence']:.0%} interval",
            _interval_text(champion["auc_ci"]),
            _interval_text(challenger["auc_ci"]),
        ),
        _metric_row("KS", champion["ks"], challenger["ks"]),
        _metric_row(
            "Brier score (lower is better)",
            champion["brier"],
            challenger["brier"],
            comparison["brier_difference"],
            comparison["brier_difference_ci"],
        ),
        _metric_row("mean predicted PD", champion["mean_pd"], challenger["mean_pd"]),
        _metric_row(
            "approval rate",
            _percent(champion["approval_rate"]),
            _percent(challenger["approval_rate"]),
        ),
        _metric_row(
            "bad rate among approved",
            _percent(champion["bad_rate_among_approved"]),
            _percent(challenger["bad_rate_among_approved"]),
        ),
        _metric_row(
            "age-group approval-rate ratio",
            champion["age_groups"]["approval_rate_ratio"],
            challenger["age_groups"]["approval_rate_ratio"],
        ),
        "",
        f"Observed bad rate of the compared decisions: "
        f"{_percent(counts['bad'] / counts['compared'])}. An approval is an APPROVE decision; "
        "REVIEW counts as not approved.",
        "",
        "![ROC and calibration](report.png)",
        "",
        "## Calibration by decile of predicted PD",
        "",
        "| decile | champion n | mean PD | bad rate | challenger n | mean PD | bad rate |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_bin = {row["bin"]: row for row in challenger["calibration"]}
    for row in champion["calibration"]:
        other = by_bin.get(row["bin"])
        right = (
            f"{other['n']} | {other['mean_predicted']:.4f} | {other['observed_bad_rate']:.4f}"
            if other
            else "- | - | -"
        )
        lines.append(
            f"| {row['bin']} | {row['n']} | {row['mean_predicted']:.4f} | "
            f"{row['observed_bad_rate']:.4f} | {right} |"
        )
    lines += ["", "## Approval by age group", ""]
    for role, metrics in (("champion", champion), ("challenger", challenger)):
        lines += _age_table(role, metrics["age_groups"])
    lines += [
        "## Decision agreement",
        "",
        "Rows: the champion's decision; columns: the challenger's (decisions, of which bad).",
        "",
        "| champion \\ challenger | " + " | ".join(DECISIONS) + " |",
        "|---|" + "---:|" * len(DECISIONS),
    ]
    cells = {(c["champion"], c["challenger"]): c for c in document["decision_agreement"]}
    for first in DECISIONS:
        row = [f"{cells[first, s]['n']} ({cells[first, s]['bad']})" for s in DECISIONS]
        lines.append(f"| {first} | " + " | ".join(row) + " |")
    lines += ["", "## Caveats", ""]
    lines += [f"- {caveat}" for caveat in document["caveats"]]
    lines += [
        "",
        "## Method",
        "",
        "AUC is the probability that a random bad has a higher predicted PD than a random good "
        "(ties count half); KS the largest gap between the cumulative PD distributions of bads "
        "and goods; the Brier score the mean squared gap between PD and outcome (1 bad, 0 good). "
        "Deciles are equal-count bins of each model's own predicted PD. The age-group ratio is "
        f"the lowest group's approval rate over the highest's ({FOUR_FIFTHS:g} is the "
        "four-fifths rule of thumb), over groups of at least "
        f"{champion['age_groups']['min_group_size']} decisions.",
        "",
        f"The comparison is a paired bootstrap: {comparison['replicates']} draws of the "
        f"compared decisions with replacement (seed {comparison['seed']}; "
        f"{comparison['replicates_used']} drew both classes and are used), both models "
        "measured on each draw; the intervals are the draws' percentiles.",
        "",
    ]
    return "\n".join(lines)


def _metric_row(
    name: str,
    first: Any,
    second: Any,
    difference: float | None = None,
    interval: list[float] | None = None,
) -> str:
    change = "" if difference is None else f"{difference:+.4f}"
    if interval is not None:
        change += f" {_interval_text(interval)}"
    return f"| {name} | {_cell(first)} | {_cell(second)} | {change} |"


def _cell(value: Any) -> str:
    if value is None:
        return "undefined"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{value:.1%}"


def _interval_text(interval: list[float] | None) -> str | None:
    return None if interval is None else f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def _age_table(role: str, ages: dict[str, Any]) -> list[str]:
    lines = [
        f"{role.capitalize()}:",
        "",
        "| age group | decisions | approved | approval rate | observed bad rate |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in ages["groups"]:
        lines.append(
            f"| {row['group']} | {row['n']} | {row['approved']} | "
            f"{row['approval_rate']:.1%} | {row['observed_bad_rate']:.1%} |"
        )
    for row in ages["excluded_small_groups"]:
        small = f"under {ages['min_group_size']}: not compared"
        lines.append(f"| {row['group']} | {row['n']} | {small} | | |")
    if ages["unknown"]:
        lines.append(f"| unknown | {ages['unknown']} | not compared | | |")
    if ages["approval_rate_ratio"] is not None:
        met = "meets" if ages["four_fifths_rule_met"] else "fails"
        summary = (
            f"Ratio {ages['lowest_group']} / {ages['highest_group']}: "
            f"{ages['approval_rate_ratio']:.3f} ({met} the four-fifths rule)."
        )
    else:
        summary = f"No ratio: {ages.get('ratio_undefined', 'undefined')}."
    return [*lines, "", summary, ""]


def _plot(sample: Sample, document: dict[str, Any]) -> bytes:
    """ROC curves of both models and their calibration by decile, side by side."""
    figure, (roc_axes, calibration_axes) = plt.subplots(1, 2, figsize=(11, 5))
    highest = 0.0
    for role, width in zip(ROLES, (2.2, 1.4), strict=True):
        metrics = document[role]
        label = f"{role}: {metrics['model_version']}"
        if sample.both_classes:
            fpr, tpr, _ = roc_curve(sample.bad, sample.pd(role))
            roc_axes.plot(fpr, tpr, linewidth=width, label=f"{label} (AUC {metrics['auc']:.3f})")
        table = metrics["calibration"]
        predicted = [row["mean_predicted"] for row in table]
        observed = [row["observed_bad_rate"] for row in table]
        highest = max(highest, *predicted, *observed)
        calibration_axes.plot(
            predicted, observed, marker="o", markersize=3, linewidth=width, label=label
        )
    roc_axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    if not sample.both_classes:
        roc_axes.text(0.5, 0.5, "ROC undefined:\none outcome class only", ha="center")
    roc_axes.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="False positive rate (goods flagged)",
        ylabel="True positive rate (bads caught)",
    )
    counts = document["counts"]
    roc_axes.set_title(f"ROC on the same {counts['compared']} decisions ({counts['bad']} bad)")
    if sample.both_classes:
        roc_axes.legend(loc="lower right", fontsize=8)
    top = min(1.0, highest * 1.1) or 1.0
    calibration_axes.plot(
        [0, top], [0, top], linestyle="--", color="grey", linewidth=0.8, label="perfect"
    )
    calibration_axes.set(
        xlim=(0, top), ylim=(0, top), xlabel="Mean predicted PD", ylabel="Observed bad rate"
    )
    calibration_axes.set_title("Calibration (deciles of predicted PD)")
    calibration_axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata=_PNG_METADATA)
    plt.close(figure)
    return buffer.getvalue()


def _private_dir(path: Path) -> None:
    """Create `path` and missing parents 0700 whatever the umask; an existing one is left."""
    missing = []
    current = path
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, _DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(directory, _DIR_MODE)


def _write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, 0600 from its creation on: a new file beside it, renamed
    over the old one, so a reader never sees half a report nor a moment of a wider mode.
    The report holds approval and bad rates by age group: owner-only, like its input."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    try:
        try:
            os.fchmod(descriptor, _FILE_MODE)
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
